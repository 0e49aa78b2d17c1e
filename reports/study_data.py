"""A search's Optuna study read into plain rows for the reports.

The layout of the study is fixed by `docs/study-schema.md` and read through its one module,
`nas.study_schema` (the bottom of `nas/`: Optuna and `lfm2` only; reports import nothing
else of `nas` and nothing of `devices`): objectives named with `set_metric_names`, the
memory constraint in each trial's `constraints`, the architecture and every measured figure
in trial user attrs, the device/runtime/protocol facts in the study user attr `lfm2_nas`.
Everything downstream (figures, HTML, `pick`) works on the `StudyData` made here, so
nothing else touches Optuna objects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lfm2.spec import ArchSpec, SpecError
from reports.intervals import LoadSpread, pooled_load_spread
from nas.study_schema import DEFAULT_STORAGE, METADATA_KEY, StudyMetadata, TrialRecord, load_study, metric_names, open_storage

#: How a trial ended, coarsely, for colours and legends: the schema's `status` folded into
#: what a reader needs to tell apart.
OUTCOMES = ("feasible", "infeasible", "prefiltered", "skipped", "oom", "failed", "running")


@dataclass
class TrialRow:
    """One trial as the report shows it. Figures are None where the trial has none."""

    number: int
    state: str  # Optuna's state name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    status: str  # the schema's status: ok, infeasible, prefiltered, oom, compile_error, ...
    outcome: str  # one of OUTCOMES
    reason: str | None
    values: dict[str, float]  # objective name -> value (COMPLETE trials only)
    constraint: float | None  # footprint - budget, bytes; feasible when <= 0
    on_pareto_set: bool
    preset: str | None
    spec: dict[str, Any] | None
    spec_key: str | None
    layout: str | None
    params: int | None
    quality: float | None
    quality_detail: Any
    prefill_ms: float | None
    decode_ms: float | None
    prefill_stats: dict[str, Any] | None
    decode_stats: dict[str, Any] | None
    footprint_bytes: int | None
    peak_rss_bytes: int | None
    memory_estimate_bytes: int | None
    measurement: dict[str, Any] | None
    artifact: dict[str, Any] | None
    cached: bool
    duration_s: float | None
    # A multi-device study's per-device records (the trial attr `devices`), by device name;
    # reports.devices reads them. Its headline figures above are then the worst over the
    # devices (the largest latency and footprint), set only when every device measured it.
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def arch(self) -> ArchSpec | None:
        try:
            return ArchSpec.from_dict(self.spec) if self.spec else None
        except (SpecError, TypeError):
            return None

    @property
    def measured(self) -> bool:
        """True when the trial has latencies to plot (measured, within budget or not)."""
        return self.state == "COMPLETE" and self.outcome in ("feasible", "infeasible")


@dataclass
class StudyData:
    name: str
    metric_names: list[str]
    directions: list[str]  # "maximize" / "minimize", one per metric
    facts: dict[str, Any]  # the study user attr `lfm2_nas` (empty when the search wrote none)
    trials: list[TrialRow]
    pareto_numbers: list[int]  # study.best_trials: the Pareto set of the feasible trials
    revision: str  # changes whenever a trial is added or changes state
    hypervolume: dict[str, Any] | None = None  # `reports.pareto.hypervolume_history`

    @property
    def has_quality(self) -> bool:
        return "quality" in self.metric_names

    @property
    def budget_bytes(self) -> int | None:
        value = self.facts.get("budget_bytes")
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def pareto_set(self) -> list[TrialRow]:
        by_number = {t.number: t for t in self.trials}
        return [by_number[n] for n in self.pareto_numbers]

    @property
    def preset_trials(self) -> list[TrialRow]:
        return [t for t in self.trials if t.preset]

    @functools.cached_property
    def load_spreads(self) -> dict[str, LoadSpread | None]:
        """Per latency objective, how far one load of a model moves its figure, pooled over
        the measured trials (`reports.intervals`; None where too few trials had several loads).
        A trial's figure is pooled with the others of the device it came from (a multi-device
        study's headline figure is one device's or another's), and the widest device's
        spread is the one given."""
        spreads: dict[str, LoadSpread | None] = {}
        for metric, attr in (("prefill_ms", "prefill_stats"), ("decode_ms", "decode_stats")):
            by_device: dict[str | None, list[dict[str, Any] | None]] = {}
            for trial in self.trials:
                if not trial.measured:
                    continue
                stats = getattr(trial, attr)
                device = next((name for name, record in trial.devices.items() if stats is not None and record.get(attr) == stats), None)
                by_device.setdefault(device, []).append(stats)
            found = [s for s in (pooled_load_spread(points) for points in by_device.values()) if s is not None]
            spreads[metric] = max(found, key=lambda s: s.sd) if found else None
        return spreads

    def outcome_counts(self) -> dict[str, int]:
        counts = {outcome: 0 for outcome in OUTCOMES}
        for trial in self.trials:
            counts[trial.outcome] += 1
        return counts


def _outcome(state: TrialState, status: str, constraint: float | None) -> str:
    if state in (TrialState.RUNNING, TrialState.WAITING):
        return "running"
    if status == "oom":
        return "oom"
    if status == "skipped":
        return "skipped"
    if status == "prefiltered" or state == TrialState.PRUNED:
        return "prefiltered"
    if state == TrialState.COMPLETE:
        return "infeasible" if status == "infeasible" or (constraint is not None and constraint > 0) else "feasible"
    return "failed"


def _row(trial: FrozenTrial, names: list[str], pareto: set[int]) -> TrialRow:
    record = TrialRecord.read(trial, names)  # a multi-device trial's headline figures: the worst device's
    return TrialRow(
        number=record.number,
        state=record.state,
        status=record.status.value,
        outcome=_outcome(trial.state, record.status, record.constraint),
        reason=record.reason,
        values=record.values,
        constraint=record.constraint,
        on_pareto_set=record.number in pareto,
        preset=record.preset,
        spec=record.spec,
        spec_key=record.spec_key,
        layout=record.layout,
        params=record.params,
        quality=record.quality,
        quality_detail=record.quality_detail,
        prefill_ms=record.prefill_ms,
        decode_ms=record.decode_ms,
        prefill_stats=record.prefill_stats,
        decode_stats=record.decode_stats,
        footprint_bytes=record.footprint_bytes,
        peak_rss_bytes=record.peak_rss_bytes,
        memory_estimate_bytes=record.memory_estimate_bytes,
        measurement=record.measurement,
        artifact=record.artifact,
        cached=record.cached,
        duration_s=record.duration_s,
        devices={name: r.to_attrs() for name, r in record.devices.items()},
    )


def study_revision(trials: list[FrozenTrial]) -> str:
    """A short fingerprint of the trials' progress: equal revisions, equal reports."""
    digest = hashlib.sha256()
    for trial in trials:
        digest.update(f"{trial.number}:{trial.state.name}:{trial.values}:{len(trial.user_attrs)};".encode())
    return digest.hexdigest()[:16]


def read_study(study: optuna.Study) -> StudyData:
    """Everything the reports need from `study`, as plain rows (see the module docstring)."""
    trials = study.get_trials(deepcopy=False)
    names = metric_names(study)
    pareto_numbers = sorted(t.number for t in study.best_trials)
    data = StudyData(
        name=study.study_name,
        metric_names=names,
        directions=[d.name.lower() for d in study.directions],
        facts=_facts(study),
        trials=[_row(t, names, set(pareto_numbers)) for t in trials],
        pareto_numbers=pareto_numbers,
        revision=study_revision(trials),
    )
    from reports.pareto import hypervolume_history  # pareto works on StudyData: import late

    data.hypervolume = hypervolume_history(study, data)
    return data


def _facts(study: optuna.Study) -> dict[str, Any]:
    metadata = StudyMetadata.read(study)
    return metadata.to_attrs() if metadata.written else {}


def load_study_data(name: str, storage_url: str | None = None) -> StudyData:
    return read_study(load_study(name, storage_url))


def to_jsonable(value: Any) -> Any:
    """`value` with non-finite floats as None, so that `json.dumps` writes strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(to_jsonable(value), sort_keys=True, allow_nan=False, default=str)


__all__ = [
    "DEFAULT_STORAGE",
    "METADATA_KEY",
    "OUTCOMES",
    "StudyData",
    "TrialRow",
    "load_study",
    "load_study_data",
    "open_storage",
    "read_study",
    "study_revision",
]
