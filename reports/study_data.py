"""A search's Optuna study read into plain rows, through Optuna's public API only.

The layout of the study is fixed by `docs/study-schema.md`: objectives named with
`set_metric_names`, the memory constraint in each trial's `constraints` (Optuna's public
`FrozenTrial.constraints`, which reads both the named `set_constraint` form and the older
`constraints_func` list), the architecture
and every measured figure in trial user attrs, the device/runtime/protocol facts in the
study user attr `lfm2_nas`. Everything downstream (figures, HTML, `pick`) works on the
`StudyData` made here, so nothing else touches Optuna objects.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lfm2.errors import UserError
from lfm2.spec import ArchSpec, SpecError

#: Where the search keeps its study unless told otherwise (the same default as `nas`).
DEFAULT_STORAGE = "sqlite:///lfm2-nas.db"
METADATA_KEY = "lfm2_nas"
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
STORAGE_FORMS = "give --storage sqlite:///PATH.db (the default is sqlite:///lfm2-nas.db), an RDB URL such as postgresql://user@host/db, or a journal file PATH.log"

#: How a trial ended, coarsely, for colours and legends: the schema's `status` folded into
#: what a reader needs to tell apart.
OUTCOMES = ("feasible", "infeasible", "prefiltered", "oom", "failed", "running")


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """The storage at `url`, read-only in spirit: a SQLite or journal file must already exist
    (Optuna would silently create an empty one), and any failure becomes a `UserError`."""
    url = url or DEFAULT_STORAGE
    if url.startswith("journal:") or ("://" not in url and url.endswith(JOURNAL_SUFFIXES)):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.is_file():
            raise UserError(f"storage {url!r}: no journal file {path}; {STORAGE_FORMS}")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if "://" not in url:
        if Path(url).expanduser().is_file():  # a bare path to a SQLite file: accept it
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
        else:
            raise UserError(f"storage {url!r} is not a URL or an existing file; {STORAGE_FORMS}")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if str(path) != ":memory:" and not path.is_file():
            raise UserError(f"storage {url!r}: no database file {path}; run the search first or {STORAGE_FORMS}")
    try:
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as exc:
        raise UserError(f"storage {url!r} needs a database driver that is not installed ({exc}); install it or {STORAGE_FORMS}") from exc
    except Exception as exc:  # SQLAlchemy raises many kinds for a malformed or unreachable URL
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"cannot open storage {url!r} ({type(exc).__name__}: {first_line}); {STORAGE_FORMS}") from exc


def load_study(name: str, storage_url: str | None = None, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The study `name`, or a `UserError` listing the studies that the storage does hold."""
    storage = storage or open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        where = storage_url or DEFAULT_STORAGE
        known = ", ".join(sorted(names)) or "none"
        raise UserError(f"no study named {name!r} in {where} (studies there: {known}); check --study and --storage")
    return optuna.load_study(study_name=name, storage=storage)


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

    def outcome_counts(self) -> dict[str, int]:
        counts = {outcome: 0 for outcome in OUTCOMES}
        for trial in self.trials:
            counts[trial.outcome] += 1
        return counts


def _metric_names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    if names:
        return list(names)
    # A study written before the names were set: the schema's order is fixed.
    return ["quality", "prefill_ms", "decode_ms"] if len(study.directions) == 3 else ["prefill_ms", "decode_ms"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _status(trial: FrozenTrial, constraint: float | None) -> str:
    status = trial.user_attrs.get("status")
    if isinstance(status, str) and status:
        return status
    # No status attr (a trial still running, or one a person added): infer it from the state.
    if trial.state == TrialState.COMPLETE:
        return "infeasible" if constraint is not None and constraint > 0 else "ok"
    if trial.state == TrialState.PRUNED:
        return "prefiltered"
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return "running"
    return "error"


def _outcome(state: TrialState, status: str, constraint: float | None) -> str:
    if state in (TrialState.RUNNING, TrialState.WAITING):
        return "running"
    if status == "oom":
        return "oom"
    if status == "prefiltered" or state == TrialState.PRUNED:
        return "prefiltered"
    if state == TrialState.COMPLETE:
        return "infeasible" if status == "infeasible" or (constraint is not None and constraint > 0) else "feasible"
    return "failed"


def _worst_over_devices(records: dict[str, Any]) -> dict[str, Any]:
    """The largest latency and footprint over a multi-device trial's devices, where every
    device measured it: the figure a limit must meet to hold on all of them (pick)."""
    measured = [r for r in records.values() if isinstance(r, dict) and r.get("status") in ("ok", "infeasible")]
    if not measured or len(measured) != len(records):
        return {}
    worst = {}
    for key in ("prefill_ms", "decode_ms", "footprint_bytes", "peak_rss_bytes"):
        figures = [_number(r.get(key)) for r in measured]
        if all(f is not None for f in figures):
            worst[key] = max(figures)
    return worst


def _row(trial: FrozenTrial, metric_names: list[str], pareto: set[int]) -> TrialRow:
    attrs = trial.user_attrs
    devices = attrs.get("devices") if isinstance(attrs.get("devices"), dict) else {}
    if devices:
        attrs = {**_worst_over_devices(devices), **attrs}
    constraints = list(trial.constraints.values())
    constraint = max(constraints) if constraints else None
    status = _status(trial, constraint)
    values = {}
    if trial.state == TrialState.COMPLETE and trial.values is not None:
        values = dict(zip(metric_names, trial.values))
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        status=status,
        outcome=_outcome(trial.state, status, constraint),
        reason=attrs.get("reason"),
        values=values,
        constraint=constraint,
        on_pareto_set=trial.number in pareto,
        preset=attrs.get("preset"),
        spec=attrs.get("spec") if isinstance(attrs.get("spec"), dict) else None,
        spec_key=attrs.get("spec_key"),
        layout=attrs.get("layout"),
        params=_number(attrs.get("params")),
        quality=_number(values.get("quality", attrs.get("quality"))),
        quality_detail=attrs.get("quality_detail"),
        prefill_ms=_number(values.get("prefill_ms", attrs.get("prefill_ms"))),
        decode_ms=_number(values.get("decode_ms", attrs.get("decode_ms"))),
        prefill_stats=attrs.get("prefill_stats") if isinstance(attrs.get("prefill_stats"), dict) else None,
        decode_stats=attrs.get("decode_stats") if isinstance(attrs.get("decode_stats"), dict) else None,
        footprint_bytes=_number(attrs.get("footprint_bytes")),
        peak_rss_bytes=_number(attrs.get("peak_rss_bytes")),
        memory_estimate_bytes=_number(attrs.get("memory_estimate_bytes")),
        measurement=attrs.get("measurement") if isinstance(attrs.get("measurement"), dict) else None,
        artifact=attrs.get("artifact") if isinstance(attrs.get("artifact"), dict) else None,
        cached=bool(attrs.get("cached", False)),
        duration_s=duration,
        devices=devices,
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
    metric_names = _metric_names(study)
    pareto_numbers = sorted(t.number for t in study.best_trials)
    facts = study.user_attrs.get(METADATA_KEY)
    data = StudyData(
        name=study.study_name,
        metric_names=metric_names,
        directions=[d.name.lower() for d in study.directions],
        facts=facts if isinstance(facts, dict) else {},
        trials=[_row(t, metric_names, set(pareto_numbers)) for t in trials],
        pareto_numbers=pareto_numbers,
        revision=study_revision(trials),
    )
    from reports.pareto import hypervolume_history  # pareto works on StudyData: import late

    data.hypervolume = hypervolume_history(study, data)
    return data


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
