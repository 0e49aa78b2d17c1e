"""A multi-device study seen one device at a time, and the candidates good everywhere.

A search over several devices (`--device pixel8,rpi5`) names its latency objectives after
each device (`prefill_ms@pixel8`), sets one memory constraint per device, and keeps each
device's figures in the trial attr `devices` (docs/study-schema.md). Optuna's
`best_trials` is then the joint Pareto set: feasible on every device, not beaten on all
objectives of all devices at once. A reader also wants each device's own front
(quality against that device's latencies, within that device's budget) and the
candidates that sit on every device's front; `device_view` turns the study into a
single-device `StudyData` per device, so the figures and tables of a single-device
report draw it unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from reports.study_data import StudyData, TrialRow

_MEASURED = ("ok", "infeasible")


def device_names(data: StudyData) -> list[str]:
    """The devices of a multi-device study, in search order; [] for a single-device one."""
    devices = data.facts.get("devices")
    if isinstance(devices, dict) and len(devices) > 1:
        return list(devices)
    names: list[str] = []
    for metric in data.metric_names:
        if "@" in metric and metric.split("@", 1)[1] not in names:
            names.append(metric.split("@", 1)[1])
    return names


def _device_outcome(trial: TrialRow, status: str | None) -> str:
    if status is None:  # never reached the devices: prefiltered everywhere, running, or failed before
        return trial.outcome
    return {"ok": "feasible", "infeasible": "infeasible", "prefiltered": "prefiltered", "oom": "oom"}.get(status, "failed")


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _byte_count(value: Any) -> int | None:
    """A recorded byte count (an int in the record; a float one, from JSON, taken whole)."""
    number = _number(value)
    return None if number is None else int(number)


def _row_on(trial: TrialRow, device: str, has_quality: bool) -> TrialRow:
    record = trial.devices.get(device) or {}
    status = record.get("status") if isinstance(record.get("status"), str) else None
    measured = status in _MEASURED and _number(record.get("prefill_ms")) is not None and _number(record.get("decode_ms")) is not None
    values: dict[str, float] = {}
    quality = trial.quality
    if measured and (not has_quality or quality is not None):
        values = {"quality": quality} if has_quality and quality is not None else {}
        values |= {"prefill_ms": record["prefill_ms"], "decode_ms": record["decode_ms"]}
    outcome = _device_outcome(trial, status)
    if status in _MEASURED and not values:
        outcome = "failed"  # measured here, but the trial has no quality score to place it by
    return dataclasses.replace(
        trial,
        # Measured on this device: a point of this device's front, whatever the others did.
        state="COMPLETE" if values else trial.state,
        status=status or trial.status,
        outcome=outcome,
        reason=record.get("reason") or (trial.reason if status is None else None),
        values=values,
        constraint=_number(record.get("over_budget_bytes")),
        on_pareto_set=False,
        prefill_ms=_number(record.get("prefill_ms")),
        decode_ms=_number(record.get("decode_ms")),
        prefill_stats=record.get("prefill_stats") if isinstance(record.get("prefill_stats"), dict) else None,
        decode_stats=record.get("decode_stats") if isinstance(record.get("decode_stats"), dict) else None,
        footprint_bytes=_byte_count(record.get("footprint_bytes")),
        peak_rss_bytes=_byte_count(record.get("peak_rss_bytes")),
        measurement=record.get("measurement") if isinstance(record.get("measurement"), dict) else None,
        cached=bool(record.get("cached_from")),
    )


def nondominated(trials: list[TrialRow], names: list[str], directions: list[str]) -> list[int]:
    """Numbers of the trials no other one beats: at least as good on every objective and
    better on one (the same definition as Optuna's `best_trials`)."""
    signs = [-1.0 if d == "maximize" else 1.0 for d in directions]
    points = [(t.number, [s * t.values[n] for s, n in zip(signs, names)]) for t in trials]

    def beats(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return sorted(number for number, point in points if not any(beats(other, point) for _n, other in points if other is not point))


def device_view(data: StudyData, device: str) -> StudyData:
    """The study as a single-device one on `device`: its latencies as `prefill_ms` and
    `decode_ms`, its budget, its feasibility, and its own Pareto set."""
    names = ["quality", "prefill_ms", "decode_ms"] if data.has_quality else ["prefill_ms", "decode_ms"]
    directions = ["maximize", "minimize", "minimize"] if data.has_quality else ["minimize", "minimize"]
    rows = [_row_on(t, device, data.has_quality) for t in data.trials]
    front = set(nondominated([t for t in rows if t.outcome == "feasible" and t.values], names, directions))
    rows = [dataclasses.replace(t, on_pareto_set=t.number in front) for t in rows]
    facts = dict(data.facts)
    budgets = facts.pop("budgets_bytes", None)
    devices = facts.pop("devices", None)
    facts["device"] = devices.get(device, {}) if isinstance(devices, dict) else {"name": device}
    facts["budget_bytes"] = budgets.get(device) if isinstance(budgets, dict) else facts.get("budget_bytes")
    return StudyData(
        name=f"{data.name} on {device}", metric_names=names, directions=directions, facts=facts, trials=rows,
        pareto_numbers=sorted(front), revision=data.revision, hypervolume=None,
    )


def on_every_front(views: dict[str, StudyData]) -> list[int]:
    """Trial numbers on every device's own Pareto set: the candidates with no better
    alternative on any device."""
    fronts = [set(view.pareto_numbers) for view in views.values()]
    return sorted(set.intersection(*fronts)) if fronts else []


__all__ = ["device_names", "device_view", "nondominated", "on_every_front"]
