"""Choosing one architecture from a finished (or running) search under deployment limits.

`pick(data, limits)` considers the feasible measured trials (within the study's memory
budget) and returns the best-quality one that meets every limit given; for a study
searched with `--quality none`, the one with the lowest decode latency. Ties go to lower
decode latency, then prefill latency, then memory, then the earlier trial. The best one
under the limits is always in the Pareto set: anything that beats it on every objective
meets the limits too.

When nothing meets the limits the result says which: a limit that no architecture meets
on its own (with the best figure there is), or, when each is met by some, that none
meets them together (with the closest architecture).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lfm2.errors import UserError
from reports.sizes import format_bytes
from reports.study_data import StudyData, TrialRow


@dataclass(frozen=True)
class Limits:
    max_decode_ms: float | None = None
    max_prefill_ms: float | None = None
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_decode_ms", "max_prefill_ms", "max_memory_bytes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name.replace('_bytes', '').replace('_', '-')} must be a positive number, got {value}")

    def checks(self) -> list[tuple[str, float, str]]:
        """(limit name, bound, the TrialRow field it bounds) for each limit given."""
        given = [("max-decode-ms", self.max_decode_ms, "decode_ms"), ("max-prefill-ms", self.max_prefill_ms, "prefill_ms"), ("budget", self.max_memory_bytes, "footprint_bytes")]
        return [(name, bound, attr) for name, bound, attr in given if bound is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"max_decode_ms": self.max_decode_ms, "max_prefill_ms": self.max_prefill_ms, "max_memory_bytes": self.max_memory_bytes}


@dataclass
class PickResult:
    trial: TrialRow | None
    limits: Limits
    ranked_by: str
    meeting: int  # how many feasible architectures meet every limit
    unmet: list[str] = field(default_factory=list)  # limit names nothing meets ("all-together" for the combination)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.trial is not None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"ok": self.ok, "limits": self.limits.to_dict(), "ranked_by": self.ranked_by, "meeting_limits": self.meeting, "message": self.message}
        t = self.trial
        if t is None:
            return result | {"unmet": self.unmet}
        return result | {
            "trial": t.number,
            "preset": t.preset,
            "spec_key": t.spec_key,
            "layout": t.layout,
            "params": t.params,
            "quality": t.quality,
            "prefill_ms": t.prefill_ms,
            "decode_ms": t.decode_ms,
            "footprint_bytes": t.footprint_bytes,
            # several devices: the figures above are the worst device's; each device's here
            **({"devices": {name: {k: r.get(k) for k in ("status", "prefill_ms", "decode_ms", "footprint_bytes")} for name, r in t.devices.items()}} if t.devices else {}),
            "on_pareto_set": t.on_pareto_set,
            "spec": t.spec,
        }


_FIGURE_NAMES = {"decode_ms": "decode", "prefill_ms": "prefill", "footprint_bytes": "memory"}


def _figure(trial: TrialRow, attr: str) -> float | None:
    return getattr(trial, attr)


def _meets(trial: TrialRow, bound: float, attr: str) -> bool:
    value = _figure(trial, attr)
    return value is not None and value <= bound


def _describe(attr: str, value: float | None) -> str:
    if value is None:
        return "unknown"
    return format_bytes(value) if attr == "footprint_bytes" else f"{value:.2f} ms"


def _bound(attr: str, bound: float) -> str:
    return format_bytes(bound) if attr == "footprint_bytes" else f"{bound:g} ms"


def preference_key(trial: Any, by_quality: bool = True) -> tuple:
    """The order in which architectures are preferred (smallest first): the highest quality
    (when ranked by it), then the lowest decode latency, prefill latency, memory, and the
    earlier trial. `trial` is any record with those figures (a `TrialRow`, or a
    `nas.study_schema.TrialRecord`: `lfm2-nas export --family 1` takes the same one)."""
    memory = trial.footprint_bytes if trial.footprint_bytes is not None else float("inf")
    latency = (trial.decode_ms if trial.decode_ms is not None else float("inf"), trial.prefill_ms if trial.prefill_ms is not None else float("inf"))
    quality = -(trial.quality if trial.quality is not None else float("-inf"))
    return ((quality,) if by_quality else ()) + latency + (memory, trial.number)


def pick(data: StudyData, limits: Limits) -> PickResult:
    """The best architecture of `data` within `limits` (see the module docstring)."""
    by_quality = data.has_quality
    ranked_by = "quality (highest)" if by_quality else "decode latency (lowest)"
    candidates = [t for t in data.trials if t.outcome == "feasible" and t.decode_ms is not None]
    if not candidates:
        message = f"study {data.name!r} has no feasible measured architecture yet ({len(data.trials)} trials); wait for the search, or check its memory budget"
        return PickResult(None, limits, ranked_by, 0, ["feasible"], message)
    checks = limits.checks()
    meeting = [t for t in candidates if all(_meets(t, bound, attr) for _name, bound, attr in checks)]
    if meeting:
        best = min(meeting, key=lambda t: preference_key(t, by_quality))
        return PickResult(best, limits, ranked_by, len(meeting), [], f"trial {best.number} is the best by {ranked_by} of {len(meeting)} architecture(s) within the limits")

    unmet, reasons = [], []
    for name, bound, attr in checks:
        if not any(_meets(t, bound, attr) for t in candidates):
            known = [(figure, t) for t in candidates if (figure := _figure(t, attr)) is not None]
            if known:
                least, best = min(known, key=lambda pair: pair[0])
                lowest = f"the lowest is {_describe(attr, least)} (trial {best.number})"
            else:
                lowest = "no trial recorded it"
            unmet.append(name)
            reasons.append(f"nothing meets --{name} {_bound(attr, bound)}: {lowest}")
    if not unmet:
        # Each limit alone is met by some architecture, but none meets them all: name the
        # one that misses by the least (largest relative excess over a bound, minimised).
        def excess(trial: TrialRow) -> float:
            # an unknown figure is as far off as can be; a measured 0 is not unknown
            return max(float("inf") if (value := _figure(trial, attr)) is None else value / bound for _name, bound, attr in checks)

        closest = min(candidates, key=excess)
        misses = ", ".join(f"{_FIGURE_NAMES[attr]} {_describe(attr, _figure(closest, attr))} > {_bound(attr, bound)}" for _n, bound, attr in checks if not _meets(closest, bound, attr))
        unmet.append("all-together")
        reasons.append(
            "each limit is met by some architecture, but none meets "
            + " and ".join(f"--{name} {_bound(attr, bound)}" for name, bound, attr in checks)
            + f" together; the closest is trial {closest.number} ({misses})"
        )
    return PickResult(None, limits, ranked_by, 0, unmet, "; ".join(reasons) + f" (among {len(candidates)} feasible architectures of study {data.name!r}); relax the limit(s)")


__all__ = ["Limits", "PickResult", "pick", "preference_key"]
