"""Pure statistics the benchmarks report: ratios, where a ratio crosses a threshold,
spreads between repeated measurements, rank agreement, and error distributions.

Nothing here measures or reads files; the tests check these functions directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def speedup(baseline_value: float, candidate_value: float, *, higher_is_better: bool = True) -> float:
    """How many times better `candidate_value` is than `baseline_value`: for a throughput
    (tok/s, higher is better) candidate / baseline; for a latency baseline / candidate."""
    if baseline_value <= 0 or candidate_value <= 0:
        raise ValueError(f"a speedup needs positive values, got {baseline_value} and {candidate_value}")
    return candidate_value / baseline_value if higher_is_better else baseline_value / candidate_value


def crossing(xs: Sequence[float], ratios: Sequence[float], threshold: float = 2.0) -> dict | None:
    """Where `ratios` (measured at increasing `xs`) first reach `threshold`.

    Returns None when no measured ratio reaches it. Otherwise `first_measured` is the
    first x whose ratio is >= threshold, and `interpolated` the x at which the straight
    line between it and the previous point (linear in log x: contexts double) reaches the
    threshold; equal to `first_measured` when the first point already reaches it.
    """
    if len(xs) != len(ratios):
        raise ValueError(f"xs and ratios differ in length: {len(xs)} vs {len(ratios)}")
    points = sorted(zip(xs, ratios))
    for index, (x, ratio) in enumerate(points):
        if ratio >= threshold:
            if index == 0:
                return {"first_measured": x, "interpolated": float(x)}
            x0, r0 = points[index - 1]
            if ratio == r0:
                return {"first_measured": x, "interpolated": float(x)}
            fraction = (threshold - r0) / (ratio - r0)
            log_x = math.log(x0) + fraction * (math.log(x) - math.log(x0))
            return {"first_measured": x, "interpolated": math.exp(log_x)}
    return None


def relative_spread(first: float, second: float) -> float:
    """|a - b| / mean(a, b): how far two measurements of one thing disagree (0 = equal)."""
    mean = (first + second) / 2
    if mean <= 0:
        raise ValueError(f"relative spread needs positive values, got {first} and {second}")
    return abs(first - second) / mean


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the median of no values is undefined")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("a quantile of no values is undefined")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def kendall_tau(first: Sequence[float], second: Sequence[float]) -> dict:
    """Kendall's tau-b between two measurements of the same items (scipy), with its p-value:
    1 means both runs rank the architectures identically."""
    from scipy.stats import kendalltau

    if len(first) != len(second):
        raise ValueError(f"the two runs measured different numbers of items: {len(first)} vs {len(second)}")
    if len(first) < 2:
        raise ValueError("Kendall's tau needs at least two items")
    result = kendalltau(first, second)
    return {"tau": float(result.statistic), "p_value": float(result.pvalue), "n": len(first)}


def repeatability(first: Sequence[float], second: Sequence[float]) -> dict:
    """Median (and p90, max) relative spread between paired measurements, and Kendall's tau."""
    spreads = [relative_spread(a, b) for a, b in zip(first, second, strict=True)]
    return {
        "median_relative_spread": median(spreads),
        "p90_relative_spread": quantile(spreads, 0.9),
        "max_relative_spread": max(spreads),
        **kendall_tau(first, second),
    }


def relative_error(estimate: float, measured: float) -> float:
    """(estimate - measured) / measured: positive when the estimate is too high."""
    if measured <= 0:
        raise ValueError(f"a relative error needs a positive measured value, got {measured}")
    return (estimate - measured) / measured


def error_distribution(errors: Sequence[float]) -> dict:
    """Signed relative errors summarised: median, p10/p90, the largest |error|, and how
    many are within 10% and 25%."""
    if not errors:
        raise ValueError("no errors to summarise")
    absolute = [abs(e) for e in errors]
    return {
        "n": len(errors),
        "median": median(errors),
        "p10": quantile(errors, 0.1),
        "p90": quantile(errors, 0.9),
        "median_abs": median(absolute),
        "max_abs": max(absolute),
        "within_10pct": sum(a <= 0.10 for a in absolute) / len(absolute),
        "within_25pct": sum(a <= 0.25 for a in absolute) / len(absolute),
        "overestimates": sum(e > 0 for e in errors) / len(errors),
    }


__all__ = [
    "speedup",
    "crossing",
    "relative_spread",
    "median",
    "quantile",
    "kendall_tau",
    "repeatability",
    "relative_error",
    "error_distribution",
]
