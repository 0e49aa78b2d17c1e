"""What the search optimises, and how an outcome becomes values and a constraint.

Objectives (their names and directions are stored in the study, see docs/study-schema.md):
maximise the quality score, minimise prefill latency at the context, minimise decode
latency per token at the context. Peak memory is a constraint, not an objective: a model
either fits the budget or it does not, and among those that fit the user wants the
fastest and best, not the smallest.

Several devices (`--device pixel8,rpi5`): each device keeps its own two latency
objectives, named `prefill_ms@pixel8`, `decode_ms@pixel8`, ... after the shared quality,
and its own memory constraint, `memory_over_budget_bytes@pixel8` against its own budget;
a trial is feasible when it fits every device. Why not one worst-case latency across the
devices: milliseconds on a phone and on a board are not on one scale (the slowest device
would decide alone), and which layout is fastest differs between runtimes and cores, which
is the reason to measure on several devices at all; per-device objectives keep every
trade-off for the report's per-device fronts. The price is 2 objectives per device, which
NSGA-II handles for the few devices a search measures on (its non-dominated sorting and
crowding distance work in any dimension; the joint front grows with the objectives, but
latencies on two CPUs are strongly correlated, so it stays small). With one device the names stay `prefill_ms`/`decode_ms` and the constraint
`memory_over_budget_bytes`: single-device studies keep the layout they always had.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import optuna

Direction = Literal["minimize", "maximize"]  # an objective's direction, as Optuna takes it

QUALITY_KINDS = ("layout", "mad", "lm", "none")  # the first is the default (nas/quality/layout.py says why)


def device_metric(metric: str, device: str | None) -> str:
    """`prefill_ms` for a single-device search, `prefill_ms@pixel8` for one of several."""
    return metric if device is None else f"{metric}@{device}"


def objective_names(quality: str, devices: list[str] | None = None) -> list[str]:
    """`devices`: the device names of a multi-device search; None (or one) for a single device."""
    per_device = [None] if not devices or len(devices) == 1 else devices
    latencies = [device_metric(m, d) for d in per_device for m in ("prefill_ms", "decode_ms")]
    return latencies if quality == "none" else ["quality", *latencies]


def directions(quality: str, devices: list[str] | None = None) -> list[Direction]:
    return ["maximize" if name == "quality" else "minimize" for name in objective_names(quality, devices)]


def objective_values(quality: str, quality_score: float | None, prefill_ms: float, decode_ms: float, more: Sequence[tuple[float, float]] = ()) -> list[float]:
    """The values in `objective_names` order; `more`: (prefill, decode) of the second and later devices."""
    latencies = [prefill_ms, decode_ms, *(v for pair in more for v in pair)]
    if quality == "none":
        return latencies
    if quality_score is None:
        raise ValueError(f"quality proxy {quality!r} is an objective, but the trial has no quality score; score it before telling the study")
    return [float(quality_score), *latencies]


SAMPLERS = ("nsga2", "tpe", "gp", "random")

#: The name of the memory constraint each trial carries (`trial.set_constraint`): the
#: footprint minus the budget in bytes, feasible when <= 0. Optuna 5 reads constraints from
#: the trial itself, so every sampler (random included) and `study.best_trials` honour it.
MEMORY_CONSTRAINT = "memory_over_budget_bytes"


def memory_constraint(device: str | None) -> str:
    """The constraint's name for one device of several (None: a single-device search)."""
    return device_metric(MEMORY_CONSTRAINT, device)


def make_sampler(name: str, seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    """A fresh sampler for one study (samplers keep per-study state: never share one)."""
    if name == "nsga2":
        population = max(4, min(50, n_trials // 2 or 4))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    startup = min(10, max(2, n_trials // 3))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(name)


__all__ = ["objective_names", "directions", "objective_values", "device_metric", "memory_constraint", "make_sampler", "SAMPLERS", "QUALITY_KINDS", "MEMORY_CONSTRAINT"]
