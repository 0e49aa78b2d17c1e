"""How a search is stored in its Optuna study: the one schema (docs/study-schema.md), and the
only module that knows its keys.

The search writes through it (`write_trial_attrs`, `StudyMetadata`); `nas.study`, `nas.export`,
the `study` commands, `reports` and the tests read through it (`TrialRecord.read`,
`StudyMetadata.read`, `trials_table`). It sits at the bottom of `nas/`: it imports Optuna,
`lfm2` and the standard library only (pandas when a table is asked for), so `reports`, which
imports neither the search nor `devices`, can depend on it.

Storage has one rule (`open_storage`): only the command that starts a search may create a
study's storage; every other command opens storage that already exists, so a mistyped
`--storage sqlite:///typo.db` is refused instead of answered from an empty new database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lfm2.errors import EnvironmentFailure, UserError

if TYPE_CHECKING:
    import pandas

#: The study user attr that holds `StudyMetadata`.
METADATA_KEY = "lfm2_nas"
#: The study user attr of an anchored search: device -> {prefill_ms, decode_ms, trial}, the
#: anchor's own milliseconds that every trial's ratios are multiplied by (nas.search)
ANCHOR_REFERENCE_ATTR = "anchor_reference"
#: The trial constraint (footprint - budget, bytes; feasible when <= 0), set with `set_constraint`.
MEMORY_CONSTRAINT = "memory_over_budget_bytes"
#: Where a study lives unless `--storage` says otherwise.
DEFAULT_STORAGE = "sqlite:///lfm2-nas.db"
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
STORAGE_FORMS = (
    "give --storage sqlite:///PATH.db (the default is sqlite:///lfm2-nas.db in the working directory), "
    "an RDB URL such as postgresql://user@host/db, or a journal file PATH.log / journal:PATH"
)


class TrialStatus(StrEnum):
    """How a trial ended, in the schema's words (a `str`: compares equal to its value)."""

    OK = "ok"  # measured, within the budget
    INFEASIBLE = "infeasible"  # measured, over the budget
    PREFILTERED = "prefiltered"  # the analytic lower bound is over the budget: never compiled
    SKIPPED = "skipped"  # the predictor is sure it is over budget or dominated (nas.prescreen): never compiled
    COMPILE_ERROR = "compile_error"
    OOM = "oom"  # the device ran out of memory: infeasible too
    ERROR = "error"
    TIMEOUT = "timeout"
    LOST = "lost"  # the driver or the agent went away; re-enqueued on --resume
    RUNNING = "running"  # no status written yet (read side only)

    @property
    def state(self) -> TrialState:
        """The Optuna state the search tells for this status."""
        if self in (TrialStatus.OK, TrialStatus.INFEASIBLE):
            return TrialState.COMPLETE
        if self in (TrialStatus.PREFILTERED, TrialStatus.SKIPPED):
            return TrialState.PRUNED
        if self is TrialStatus.RUNNING:
            return TrialState.RUNNING
        return TrialState.FAIL


# -- study metadata ------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyMetadata:
    """The study user attr `lfm2_nas`: what the search ran on and with (docs/study-schema.md)."""

    version: str | None = None
    device: dict[str, Any] = field(default_factory=dict)
    budget_bytes: int | None = None
    context: int | None = None
    backend: str | None = None
    quant: str | None = None
    protocol: dict[str, Any] | None = None
    space: dict[str, Any] | None = None
    quality: str | None = None
    quality_settings: str | None = None
    #: the quality signal's version (nas.quality.signal_version): scores of two versions do not compare
    quality_signal: str | None = None
    sampler: str | None = None
    seed: int | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    #: a multi-device study: name -> the facts `device` holds for one device, and name -> budget
    devices: dict[str, Any] | None = None
    budgets_bytes: dict[str, int] | None = None
    #: the anchor architecture (a spec dict) timed beside every candidate; None: not anchored
    anchor: dict[str, Any] | None = None
    #: keys this version does not know (a newer writer's): kept, never dropped on a rewrite
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_attrs(cls, value: Any) -> StudyMetadata:
        if not isinstance(value, dict):
            return cls()
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in value.items() if k in known and v is not None}
        for name in ("device", "versions", "devices", "budgets_bytes"):
            if not isinstance(kwargs.get(name, {}), dict):
                kwargs.pop(name)
        return cls(**kwargs, extra={k: v for k, v in value.items() if k not in known})

    @classmethod
    def read(cls, study: optuna.Study) -> StudyMetadata:
        """The study's metadata; empty (every field None) for a study the search did not write."""
        return cls.from_attrs(study.user_attrs.get(METADATA_KEY))

    @property
    def written(self) -> bool:
        """True when a search wrote this metadata (it always records the backend)."""
        return self.backend is not None

    @property
    def space_name(self) -> str | None:
        return (self.space or {}).get("name")

    def to_attrs(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if not values["device"]:  # a multi-device study records `devices` instead
            del values["device"]
        if values["anchor"] is None:  # not anchored: the metadata of before anchors existed
            del values["anchor"]
        for name in ("devices", "budgets_bytes"):  # a single-device study has neither
            if values[name] is None:
                del values[name]
        return {**self.extra, **values}

    def write(self, study: optuna.Study) -> None:
        study.set_user_attr(METADATA_KEY, self.to_attrs())


def write_estimate_error_summary(study: optuna.Study) -> None:
    """The study attr `memory_estimate_error` ({n, median_abs, max_abs}): how far the analytic
    memory estimate was from every measured footprint of the study (each device's too)."""
    errors = []
    for record in read_trials(study):
        sources: list[TrialRecord | DeviceRecord] = [record, *record.devices.values()]
        for source in sources:
            if source.memory_estimate_error is not None:
                errors.append(abs(source.memory_estimate_error))
    errors.sort()
    if errors:
        study.set_user_attr("memory_estimate_error", {"n": len(errors), "median_abs": errors[len(errors) // 2], "max_abs": errors[-1]})


# -- trials ----------------------------------------------------------------------------------


@dataclass
class DeviceRecord:
    """What one device made of a trial: its status (`ok`, `infeasible` over its budget,
    `prefiltered` there, or how it failed), the headline figures and the whole measurement.
    A multi-device trial stores one per device under `devices`; a single-device trial
    stores the figures flat (`DeviceRecord.trial_attrs`)."""

    status: TrialStatus
    budget_bytes: int | None = None
    reason: str | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    prefill_stats: dict[str, Any] | None = None
    decode_stats: dict[str, Any] | None = None
    footprint_bytes: int | None = None
    peak_rss_bytes: int | None = None
    over_budget_bytes: float | None = None
    memory_estimate_error: float | None = None
    measurement: dict[str, Any] | None = None
    measured_from: str | None = None
    cached_from: Any = None

    #: the figures a single-device trial stores as trial attrs of the same names
    FLAT = ("reason", "measurement", "prefill_ms", "decode_ms", "prefill_stats", "decode_stats", "footprint_bytes", "peak_rss_bytes", "memory_estimate_error")

    @property
    def measured(self) -> bool:
        return self.status in (TrialStatus.OK, TrialStatus.INFEASIBLE)

    def latencies(self) -> tuple[float, float]:
        """(prefill ms, decode ms) of a measured record; an error for one without them."""
        if self.prefill_ms is None or self.decode_ms is None:
            raise ValueError(f"a device record with status {self.status.value!r} has no latencies; only a measured one (ok, infeasible) has")
        return self.prefill_ms, self.decode_ms

    def to_attrs(self) -> dict[str, Any]:
        """The JSON dict stored under the trial attr `devices` (None fields left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["status"] = TrialStatus(self.status).value
        if values["reason"] is not None:
            values["reason"] = values["reason"][:MAX_REASON_CHARS]
        return {k: v for k, v in values.items() if v is not None}

    def trial_attrs(self) -> dict[str, Any]:
        """A single-device trial's own attrs (the status is written when the trial is told)."""
        return {k: getattr(self, k) for k in self.FLAT}

    @classmethod
    def from_attrs(cls, value: Any) -> DeviceRecord:
        """A stored record, read defensively (a field of the wrong type reads as None)."""
        value = value if isinstance(value, dict) else {}
        status = value.get("status")
        try:
            status = TrialStatus(status) if isinstance(status, str) else TrialStatus.ERROR
        except ValueError:
            status = TrialStatus.ERROR
        return cls(
            status=status,
            budget_bytes=_count(value.get("budget_bytes")),
            reason=_text(value.get("reason")),
            prefill_ms=_number(value.get("prefill_ms")),
            decode_ms=_number(value.get("decode_ms")),
            prefill_stats=_dict(value.get("prefill_stats")),
            decode_stats=_dict(value.get("decode_stats")),
            footprint_bytes=_count(value.get("footprint_bytes")),
            peak_rss_bytes=_count(value.get("peak_rss_bytes")),
            over_budget_bytes=_number(value.get("over_budget_bytes")),
            memory_estimate_error=_number(value.get("memory_estimate_error")),
            measurement=_dict(value.get("measurement")),
            measured_from=_text(value.get("measured_from")),
            cached_from=value.get("cached_from"),
        )


#: The headline figures of a multi-device trial: the worst (largest) over its devices.
HEADLINE_FIGURES = ("prefill_ms", "decode_ms", "footprint_bytes", "peak_rss_bytes")


def worst_over_devices(records: dict[str, DeviceRecord]) -> dict[str, Any]:
    """The largest latency and footprint over a multi-device trial's devices, where every
    device measured it: the figure a limit must meet to hold on all of them (pick)."""
    if not records or not all(r.measured for r in records.values()):
        return {}
    worst = {}
    for key in HEADLINE_FIGURES:
        figures = [getattr(r, key) for r in records.values()]
        if all(f is not None for f in figures):
            worst[key] = max(figures)
    return worst

#: Every trial user attr of the schema, with the JSON type it holds.
TRIAL_ATTRS: dict[str, tuple[type, ...]] = {
    "spec": (dict,),
    "spec_key": (str,),
    "layout": (str,),
    "preset": (str,),
    "status": (str,),
    "reason": (str,),
    "params": (int,),
    "memory_estimate_bytes": (int,),
    "memory_estimate": (dict,),
    "footprint_bytes": (int,),
    "peak_rss_bytes": (int,),
    "prefill_ms": (float, int),
    "decode_ms": (float, int),
    "prefill_stats": (dict,),
    "decode_stats": (dict,),
    "quality": (float, int),
    "quality_detail": (dict, list, float, int, str),
    "quality_signal": (str,),
    "prescreen": (dict,),
    "devices": (dict,),  # a multi-device search's record per device, by name (docs/study-schema.md)
    "measurement": (dict,),
    "artifact": (dict,),
    "cached": (bool,),
    "measurement_cached_from": (dict, str),
    "quality_cached_from": (dict, str),
    "stage_s": (dict,),
    "memory_estimate_error": (float, int),
    "requeued": (bool,),
    "requeued_from": (int,),
}
#: The longest reason kept (a compile's traceback tail is enough).
MAX_REASON_CHARS = 2000


def check_trial_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """`attrs` checked against the schema (known keys, JSON types, a known status); None
    values dropped. A `ValueError` names the key: a writer that drifts fails in its tests."""
    checked: dict[str, Any] = {}
    for key, value in attrs.items():
        if key not in TRIAL_ATTRS:
            raise ValueError(f"trial attr {key!r} is not in the study schema (nas/study_schema.py TRIAL_ATTRS, docs/study-schema.md)")
        if value is None:
            continue
        if key == "status":
            value = TrialStatus(value).value  # ValueError for a status the schema does not know
        elif key == "reason":
            value = str(value)[:MAX_REASON_CHARS]
        elif key == "devices" and isinstance(value, dict):
            value = {name: _check_device_record(name, record) for name, record in value.items()}
        elif not isinstance(value, TRIAL_ATTRS[key]) or (isinstance(value, bool) and bool not in TRIAL_ATTRS[key]):
            raise ValueError(f"trial attr {key!r} holds {type(value).__name__}, the schema says {'/'.join(t.__name__ for t in TRIAL_ATTRS[key])}")
        checked[key] = value
    return checked


def _check_device_record(name: str, record: Any) -> dict[str, Any]:
    if isinstance(record, DeviceRecord):
        return record.to_attrs()
    known = {f.name for f in fields(DeviceRecord)}
    if not isinstance(record, dict) or not set(record) <= known:
        raise ValueError(f"trial attr 'devices' entry {name!r} is not a device record (keys {sorted(known)}): write a nas.study_schema.DeviceRecord")
    status = record.get("status")
    if not isinstance(status, str):
        raise ValueError(f"trial attr 'devices' entry {name!r} has no status (got {status!r}); give it one of {[s.value for s in TrialStatus]}")
    TrialStatus(status)  # ValueError for an unknown status
    return record


def write_trial_attrs(trial: optuna.Trial, **attrs: Any) -> None:
    """Write schema attrs to a live trial (`status=TrialStatus.OK, reason=...`)."""
    for key, value in check_trial_attrs(attrs).items():
        trial.set_user_attr(key, value)


def write_trial_attrs_by_id(storage: optuna.storages.BaseStorage, trial_id: int, **attrs: Any) -> None:
    """The same for a trial known only by its storage id (one a dead driver left RUNNING)."""
    for key, value in check_trial_attrs(attrs).items():
        storage.set_trial_user_attr(trial_id, key, value)


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _count(value: Any) -> int | None:
    """A stored count (bytes, parameters, a trial number) as an int: a float one (written by
    hand, or by an older writer) rounded, not dropped; anything else but a number reads as None."""
    number = _number(value)
    return round(number) if isinstance(number, float) else number


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def metric_names(study: optuna.Study) -> list[str]:
    """The objective names; a study written before they were set gets the schema's order."""
    names = study.metric_names
    if names:
        return list(names)
    return ["quality", "prefill_ms", "decode_ms"] if len(study.directions) == 3 else ["prefill_ms", "decode_ms"]


def _status(trial: FrozenTrial, constraint: float | None) -> TrialStatus:
    written = trial.user_attrs.get("status")
    if isinstance(written, str) and written:
        try:
            return TrialStatus(written)
        except ValueError:
            return TrialStatus.ERROR
    # No status attr (a trial still running, or one a person added): infer it from the state.
    if trial.state == TrialState.COMPLETE:
        return TrialStatus.INFEASIBLE if constraint is not None and constraint > 0 else TrialStatus.OK
    if trial.state == TrialState.PRUNED:
        return TrialStatus.PREFILTERED
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return TrialStatus.RUNNING
    return TrialStatus.ERROR


@dataclass
class TrialRecord:
    """One trial as the schema stores it, typed. Figures are None where the trial has none
    (or holds a value of the wrong type: a reader never trusts a hand-edited study)."""

    number: int
    state: str  # Optuna's state name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    status: TrialStatus
    values: dict[str, float]  # objective name -> value (COMPLETE trials only)
    constraint: float | None  # footprint - budget, bytes; feasible when <= 0
    duration_s: float | None
    datetime_complete: str | None
    spec: dict[str, Any] | None = None
    spec_key: str | None = None
    layout: str | None = None
    preset: str | None = None
    reason: str | None = None
    params: int | None = None
    memory_estimate_bytes: int | None = None
    memory_estimate: dict[str, Any] | None = None
    footprint_bytes: int | None = None
    peak_rss_bytes: int | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    prefill_stats: dict[str, Any] | None = None
    decode_stats: dict[str, Any] | None = None
    quality: float | None = None
    quality_detail: Any = None
    measurement: dict[str, Any] | None = None
    artifact: dict[str, Any] | None = None
    cached: bool = False
    measurement_cached_from: Any = None
    quality_cached_from: Any = None
    stage_s: dict[str, Any] | None = None
    memory_estimate_error: float | None = None
    requeued: bool = False
    requeued_from: int | None = None
    quality_signal: str | None = None
    prescreen: dict[str, Any] | None = None
    #: the status attr as stored (None while the search has written none); `status` infers one
    written_status: str | None = None
    #: a multi-device trial's record per device (empty for a single-device trial); its
    #: headline figures above are then the worst over the devices, set only when every
    #: device measured it (`worst_over_devices`)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)

    @classmethod
    def read(cls, trial: FrozenTrial, names: list[str]) -> TrialRecord:
        """`trial` read through the schema; `names` are the study's `metric_names`."""
        attrs = trial.user_attrs
        constraints = [v for v in trial.constraints.values() if _number(v) is not None] if trial.constraints else []
        constraint = max(constraints) if constraints else None
        values: dict[str, float] = {}
        if trial.state == TrialState.COMPLETE and trial.values is not None:
            values = dict(zip(names, trial.values))
        stored = attrs.get("devices")
        devices = {str(name): DeviceRecord.from_attrs(r) for name, r in stored.items()} if isinstance(stored, dict) else {}
        worst = worst_over_devices(devices)

        def headline(key: str, own: Any) -> Any:  # a multi-device trial has no own figure: the worst device's
            own = _number(own)
            return own if own is not None else worst.get(key)

        return cls(
            number=trial.number,
            state=trial.state.name,
            status=_status(trial, constraint),
            values=values,
            constraint=constraint,
            duration_s=trial.duration.total_seconds() if trial.duration is not None else None,
            datetime_complete=trial.datetime_complete.isoformat() if trial.datetime_complete else None,
            spec=_dict(attrs.get("spec")),
            spec_key=_text(attrs.get("spec_key")),
            layout=_text(attrs.get("layout")),
            preset=_text(attrs.get("preset")),
            reason=_text(attrs.get("reason")),
            params=_count(attrs.get("params")),
            memory_estimate_bytes=_count(attrs.get("memory_estimate_bytes")),
            memory_estimate=_dict(attrs.get("memory_estimate")),
            footprint_bytes=headline("footprint_bytes", attrs.get("footprint_bytes")),
            peak_rss_bytes=headline("peak_rss_bytes", attrs.get("peak_rss_bytes")),
            # The objectives as told win over the attrs (they are what the sampler saw).
            prefill_ms=headline("prefill_ms", values.get("prefill_ms", attrs.get("prefill_ms"))),
            decode_ms=headline("decode_ms", values.get("decode_ms", attrs.get("decode_ms"))),
            prefill_stats=_dict(attrs.get("prefill_stats")),
            decode_stats=_dict(attrs.get("decode_stats")),
            quality=_number(values.get("quality", attrs.get("quality"))),
            quality_detail=attrs.get("quality_detail"),
            measurement=_dict(attrs.get("measurement")),
            artifact=_dict(attrs.get("artifact")),
            cached=bool(attrs.get("cached", False)),
            measurement_cached_from=attrs.get("measurement_cached_from"),
            quality_cached_from=attrs.get("quality_cached_from"),
            stage_s=_dict(attrs.get("stage_s")),
            memory_estimate_error=_number(attrs.get("memory_estimate_error")),
            requeued=bool(attrs.get("requeued", False)),
            requeued_from=_count(attrs.get("requeued_from")),
            quality_signal=_text(attrs.get("quality_signal")),
            prescreen=_dict(attrs.get("prescreen")),
            written_status=_text(attrs.get("status")),
            devices=devices,
        )

    @property
    def largest_footprint_bytes(self) -> int | None:
        """The trial's footprint; a multi-device trial's largest over the devices that measured it."""
        if self.footprint_bytes is not None:
            return self.footprint_bytes
        footprints = [r.footprint_bytes for r in self.devices.values() if r.footprint_bytes]
        return max(footprints) if footprints else None

    @property
    def measured(self) -> bool:
        """True when the trial has latencies (measured, within the budget or not)."""
        return self.state == "COMPLETE" and self.status in (TrialStatus.OK, TrialStatus.INFEASIBLE)

    def summary(self) -> dict[str, Any]:
        """The flat, JSON-ready row of the `study show` / `study export` tables."""
        return {
            "number": self.number,
            "state": self.state,
            "status": self.status.value,
            "preset": self.preset,
            "layout": self.layout,
            "spec_key": self.spec_key,
            "params": self.params,
            "quality": self.quality,
            "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms,
            "footprint_bytes": self.footprint_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "memory_estimate_bytes": self.memory_estimate_bytes,
            "memory_over_budget_bytes": self.constraint,
            "cached": self.cached,
            "duration_s": self.duration_s,
            "datetime_complete": self.datetime_complete,
            "reason": self.reason,
        }


def read_trials(study: optuna.Study) -> list[TrialRecord]:
    names = metric_names(study)
    return [TrialRecord.read(t, names) for t in study.get_trials(deepcopy=False)]


def trials_table(study: optuna.Study) -> pandas.DataFrame:
    """Every trial of `study` as one row (`TrialRecord.summary`), indexed by trial number.
    The objectives are the `quality`, `prefill_ms`, `decode_ms` columns (the values told to
    Optuna where the trial completed). pandas is imported here, not at import time."""
    import pandas

    rows = [record.summary() for record in read_trials(study)]
    if not rows:  # no trials yet: the same columns, no rows
        rows_columns = [k for k in TrialRecord(0, "", TrialStatus.RUNNING, {}, None, None, None).summary()]
        return pandas.DataFrame(columns=rows_columns).set_index("number")
    return pandas.DataFrame.from_records(rows).set_index("number")


# -- storage ---------------------------------------------------------------------------------


def missing_sqlite_file(url: str | None) -> Path | None:
    """The file of a `sqlite:///` URL when it does not exist (opening it would create an
    empty database, under a mistyped name as often as not), else None."""
    url = url or DEFAULT_STORAGE
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if str(path) not in ("", ":memory:") and not path.exists():
            return path
    return None


def open_storage(url: str | None, *, create: bool = False) -> optuna.storages.BaseStorage:
    """The storage at `url` (None: `DEFAULT_STORAGE`). The one rule: with `create=False`
    (every command but the one that starts a search) a SQLite or journal file must exist;
    with `create=True` its folder must. A bare path to an existing SQLite file is accepted.
    Bad input raises `UserError`; a database that does not answer, `EnvironmentFailure`."""
    url = url or DEFAULT_STORAGE
    if url.startswith("journal:") or ("://" not in url and url.endswith(JOURNAL_SUFFIXES)):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not create and not path.is_file():
            raise UserError(f"storage {url!r}: no journal file {path} (it does not exist, so it holds no study); run the search first, or {STORAGE_FORMS}")
        if not path.parent.is_dir():
            raise UserError(f"storage {url!r}: folder {path.parent} does not exist; create it, or {STORAGE_FORMS}")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        if Path(url).expanduser().is_file():  # a bare path to a SQLite file
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
        else:
            raise UserError(f"storage {url!r} is not a URL or an existing file; {STORAGE_FORMS}")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if str(path) not in ("", ":memory:"):
            if not create and not path.is_file():
                raise UserError(f"storage {url!r}: no database file: {path} does not exist, so it holds no study; run the search first, or check --storage")
            if create and not path.resolve().parent.is_dir():
                raise UserError(f"storage {url!r}: folder {path.parent} does not exist; create it, or {STORAGE_FORMS}")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except ImportError as exc:
        raise UserError(f"storage {url!r} needs a database driver that is not installed ({exc}); install it, or {STORAGE_FORMS}") from exc
    except Exception as exc:  # SQLAlchemy raises many kinds for a malformed or unreachable URL
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        if type(exc).__name__ == "OperationalError":  # the URL is fine; the database did not answer
            raise EnvironmentFailure(f"cannot open storage {url!r} ({type(exc).__name__}: {first_line}); check that the database is running and reachable") from exc
        raise UserError(f"cannot open storage {url!r} ({type(exc).__name__}: {first_line}); {STORAGE_FORMS}") from exc


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # The driver writes while `lfm2-nas dashboard`/`optuna-dashboard` read: wait for locks.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return optuna.get_all_study_names(storage)


def load_study(name: str, storage_url: str | None = None, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The study `name` from existing storage, or a `UserError` listing the studies there."""
    missing = missing_sqlite_file(storage_url) if storage is None else None
    if missing is not None:
        raise UserError(f"no study named {name!r}: no database file: {missing} does not exist; run the search first, or check --study and --storage")
    storage = storage or open_storage(storage_url)
    names = study_names(storage)
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UserError(f"no study named {name!r} in {storage_url or DEFAULT_STORAGE} (studies there: {known}); check --study and --storage")
    return optuna.load_study(study_name=name, storage=storage)


__all__ = [
    "ANCHOR_REFERENCE_ATTR",
    "METADATA_KEY",
    "MEMORY_CONSTRAINT",
    "DEFAULT_STORAGE",
    "STORAGE_FORMS",
    "TrialStatus",
    "StudyMetadata",
    "TrialRecord",
    "DeviceRecord",
    "worst_over_devices",
    "write_estimate_error_summary",
    "TRIAL_ATTRS",
    "check_trial_attrs",
    "write_trial_attrs",
    "write_trial_attrs_by_id",
    "metric_names",
    "read_trials",
    "trials_table",
    "missing_sqlite_file",
    "open_storage",
    "load_study",
    "study_names",
]
