"""What the search optimises, and how an outcome becomes values and a constraint.

Objectives (their names and directions are stored in the study, see docs/study-schema.md):
maximise the quality score, minimise prefill latency at the context, minimise decode
latency per token at the context. Peak memory is a constraint, not an objective: a model
either fits the budget or it does not, and among those that fit the user wants the
fastest and best, not the smallest.
"""

from __future__ import annotations

import optuna

QUALITY_KINDS = ("layout", "mad", "lm", "none")  # the first is the default (nas/quality/layout.py says why)


def objective_names(quality: str) -> list[str]:
    return ["prefill_ms", "decode_ms"] if quality == "none" else ["quality", "prefill_ms", "decode_ms"]


def directions(quality: str) -> list[str]:
    return ["minimize", "minimize"] if quality == "none" else ["maximize", "minimize", "minimize"]


def objective_values(quality: str, quality_score: float | None, prefill_ms: float, decode_ms: float) -> list[float]:
    if quality == "none":
        return [prefill_ms, decode_ms]
    return [float(quality_score), prefill_ms, decode_ms]


SAMPLERS = ("nsga2", "tpe", "gp", "random")

#: The name of the memory constraint each trial carries (`trial.set_constraint`): the
#: footprint minus the budget in bytes, feasible when <= 0. Optuna 5 reads constraints from
#: the trial itself, so every sampler (random included) and `study.best_trials` honour it.
MEMORY_CONSTRAINT = "memory_over_budget_bytes"


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


__all__ = ["objective_names", "directions", "objective_values", "make_sampler", "SAMPLERS", "QUALITY_KINDS", "MEMORY_CONSTRAINT"]
