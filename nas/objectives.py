"""What the search optimises, and how an outcome becomes values and a constraint.

Objectives (their names and directions are stored in the study, see docs/study-schema.md):
maximise the quality score, minimise prefill latency at the context, minimise decode
latency per token at the context. Peak memory is a constraint, not an objective: a model
either fits the budget or it does not, and among those that fit the user wants the
fastest and best, not the smallest.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

QUALITY_KINDS = ("mad", "lm", "none")


def objective_names(quality: str) -> list[str]:
    return ["prefill_ms", "decode_ms"] if quality == "none" else ["quality", "prefill_ms", "decode_ms"]


def directions(quality: str) -> list[str]:
    return ["minimize", "minimize"] if quality == "none" else ["maximize", "minimize", "minimize"]


def objective_values(quality: str, quality_score: float | None, prefill_ms: float, decode_ms: float) -> list[float]:
    if quality == "none":
        return [prefill_ms, decode_ms]
    return [float(quality_score), prefill_ms, decode_ms]


def memory_constraint(trial: FrozenTrial) -> Sequence[float]:
    """Optuna's `constraints_func`: footprint minus budget (feasible when <= 0), which the
    driver stores in the trial's `constraint` user attr before telling the study."""
    return trial.user_attrs.get("constraint", [0.0])


SAMPLERS = ("nsga2", "tpe", "gp", "random")


def make_sampler(name: str, seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    """A fresh sampler (never shared between studies) that honours the memory constraint.

    Optuna's RandomSampler takes no `constraints_func`, so "random" is TPE kept in its
    random start-up phase for the whole run: the same uniform sampling, with the
    constraint recorded so that the study's Pareto set excludes infeasible trials.
    """
    if name == "nsga2":
        population = max(4, min(50, n_trials // 2 or 4))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=memory_constraint)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=memory_constraint, n_startup_trials=min(10, max(2, n_trials // 3)))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=memory_constraint, n_startup_trials=min(10, max(2, n_trials // 3)))
    if name == "random":
        return optuna.samplers.TPESampler(seed=seed, constraints_func=memory_constraint, n_startup_trials=10**9)
    raise ValueError(name)


__all__ = ["objective_names", "directions", "objective_values", "memory_constraint", "make_sampler", "SAMPLERS", "QUALITY_KINDS"]
