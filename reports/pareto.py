"""Hypervolume over trials and 2-D fronts of projections.

The Pareto set itself is Optuna's (`study.best_trials`, read in `study_data`); the
hypervolume history is Optuna's too (`optuna.visualization.plot_hypervolume_history`, the
public entry to its WFG hypervolume), computed against a reference point chosen here.

Reference point (documented in the README and shown on the report): for each objective,
the worst value among the feasible measured trials, pushed 10% of that objective's
observed range further out (10% of the value itself when all trials agree, 1 when it is
0). Every feasible trial then adds volume, and the hypervolume is also reported as a
fraction of the box between the best value of each objective and the reference point, so
that 1.0 would be one architecture best at everything at once. The reference point moves
as the study finds worse trials, so compare fractions within one report, not across two.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence

import optuna

if TYPE_CHECKING:  # study_data calls in here; import its types only for annotations
    from reports.study_data import StudyData

REFERENCE_MARGIN = 0.10


def reference_point(data: StudyData) -> list[float] | None:
    """The reference point described in the module docstring, or None without feasible trials."""
    feasible = [t for t in data.trials if t.outcome == "feasible" and t.values]
    if not feasible:
        return None
    point = []
    for name, direction in zip(data.metric_names, data.directions):
        column = [t.values[name] for t in feasible]
        span = max(column) - min(column)
        margin = REFERENCE_MARGIN * (span if span > 0 else (abs(column[0]) or 1.0))
        point.append(min(column) - margin if direction == "maximize" else max(column) + margin)
    return point


def ideal_point(data: StudyData) -> list[float] | None:
    feasible = [t for t in data.trials if t.outcome == "feasible" and t.values]
    if not feasible:
        return None
    return [
        (max if direction == "maximize" else min)(t.values[name] for t in feasible)
        for name, direction in zip(data.metric_names, data.directions)
    ]


def hypervolume_history(study: optuna.Study, data: StudyData) -> dict | None:
    """Hypervolume of the feasible front after each completed trial (Optuna's computation).

    Returns `{"reference_point", "ideal_point", "trial_numbers", "hypervolume", "fraction"}`,
    or None when no trial is feasible yet.
    """
    reference, ideal = reference_point(data), ideal_point(data)
    if reference is None or ideal is None:  # both None together: no feasible trial
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figure = optuna.visualization.plot_hypervolume_history(study, reference_point=reference)
    trace = figure.data[0]
    numbers = [int(n) for n in trace.x]
    volumes = [float(v) for v in trace.y]
    box = math.prod((abs(r - i) for r, i in zip(reference, ideal)), start=1.0)
    fraction = [v / box if box > 0 else 0.0 for v in volumes]
    return {"reference_point": reference, "ideal_point": ideal, "trial_numbers": numbers, "hypervolume": volumes, "fraction": fraction}


def front_2d(points: Sequence[tuple[float, float, int]], maximize: tuple[bool, bool]) -> list[tuple[float, float, int]]:
    """The non-dominated points of a 2-D projection (x, y, trial number), sorted by x:
    the staircase a reader sees when only these two objectives matter."""
    sign_x = -1.0 if maximize[0] else 1.0
    sign_y = -1.0 if maximize[1] else 1.0
    ordered = sorted(points, key=lambda p: (sign_x * p[0], sign_y * p[1]))
    front: list[tuple[float, float, int]] = []
    best_y = math.inf
    for point in ordered:
        y = sign_y * point[1]
        if y < best_y:
            front.append(point)
            best_y = y
    return sorted(front, key=lambda p: p[0])


__all__ = ["reference_point", "ideal_point", "hypervolume_history", "front_2d", "REFERENCE_MARGIN"]
