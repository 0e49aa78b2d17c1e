"""One point measured in several fresh processes, combined into one figure with one interval.

Why: on this machine the spread of an anchored decode ratio between two fresh processes
(5-6%, BENCHMARKS.md "One ONNX Runtime thread pool per process") is about twice the
interval of the ratio inside one process (+-3%), and it is the same for processes back to
back as for processes ten minutes apart: each process lands in a host state (which cores,
whose caches, the neighbours' memory traffic) that it keeps for the seconds it runs and that
moves candidate and anchor by different amounts. More samples in the same process do not
average it; more processes do. `Protocol.processes` says how many a point may use.

How the processes' figures are combined: as the studies of a random-effects meta-analysis
(DerSimonian and Laird, 1986), on the log scale (a ratio's error is relative). Each process
gives an estimate y_i = log(figure) with a within-process variance v_i from its own interval
(its relative half-width over z);
the between-process variance tau^2 is estimated from how far the estimates disagree beyond
what their own intervals explain (zero when they agree), and the combined figure is the
mean weighted by 1 / (v_i + tau^2), with standard error 1 / sqrt(sum of weights). So two
processes that agree give an interval about 1/sqrt(2) of one process's, and two that
disagree give one as wide as their disagreement. With 2-3 processes tau^2 is itself
uncertain and the interval covers less than its nominal 95% when the process effect is
large (a known property of the method: ~82% for three processes at a 5% effect and +-3%
inside each, ~95% without an effect; tests/test_measure_processes.py). Intervals that cover
at 95% with so few processes (Hartung-Knapp's t with k-1 degrees of freedom) are +-10% or
wider there, too wide to order anything; a variance pooled over a study's many points gives
both: the report widens each point's interval to the between-load spread pooled over the study
(reports.intervals; the point's own figure is unchanged). The repeatability benchmark, which compares
whole measurements, is the check of the figure itself.

The figures combined: an anchored point's candidate/anchor ratio (what a search ranks by)
and every point's median milliseconds. A process whose point was `disturbed` (the
calibration kernel saw another process on the cores) is left out when any other was not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm

from devices.protocol import Stats
from devices.sampling import summarize

#: Confidence of the intervals (the same as a single process's, devices.sampling.CI_LEVEL).
LEVEL = 0.95
#: A within-process variance no smaller than this (log scale): an interval of identical
#: samples is [x, x], which would give one process all the weight.
MIN_VARIANCE = 1e-8


def _z(level: float) -> float:
    return float(norm.ppf(0.5 + level / 2))


def random_effects(estimates: Sequence[float], lows: Sequence[float], highs: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """Combine positive estimates with their `level` intervals (DerSimonian-Laird, log scale).
    Returns the combined estimate, its interval, tau (between-process standard deviation, log
    scale: ~ the relative spread between processes) and the number of estimates."""
    if not estimates or len(estimates) != len(lows) or len(lows) != len(highs):
        raise ValueError("random_effects needs one interval per estimate, and at least one estimate")
    if min(estimates) <= 0:
        raise ValueError(f"random_effects combines positive figures on the log scale, got estimates {list(estimates)}")
    z = _z(level)
    figures = np.asarray(estimates, dtype=np.float64)
    y = np.log(figures)
    # the within-process standard error on the log scale from the relative half-width (a
    # relative error is a log error to first order; a ratio's interval from few samples can
    # reach below zero, where its log would not exist)
    relative_half = (np.asarray(highs, dtype=np.float64) - np.asarray(lows, dtype=np.float64)) / 2 / figures
    v = np.maximum((relative_half / z) ** 2, MIN_VARIANCE)
    w = 1 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (len(y) - 1)) / c) if c > 0 else 0.0
    w_star = 1 / (v + tau2)
    mean = float(np.sum(w_star * y) / np.sum(w_star))
    se = 1 / math.sqrt(float(np.sum(w_star)))
    return {"estimate": math.exp(mean), "low": math.exp(mean - z * se), "high": math.exp(mean + z * se), "tau": math.sqrt(tau2), "n": len(y)}


def _kept(per_process: Sequence[Stats]) -> list[Stats]:
    """The processes whose point counts: the undisturbed ones, or all if every one was disturbed."""
    clean = [s for s in per_process if not s.disturbed]
    return clean or list(per_process)


def process_summary(stats: Stats) -> dict[str, Any]:
    """What one process said of a point, as kept in the combined `Stats.processes`."""
    entry: dict[str, Any] = {"median_ms": stats.median_ms, "ci_low_ms": stats.ci_low_ms, "ci_high_ms": stats.ci_high_ms, "samples": len(stats.samples_ms), "disturbed": stats.disturbed,
                             "calibration_slowdown": stats.calibration_slowdown}
    if stats.anchor is not None:
        entry.update(ratio=stats.anchor["ratio"], ratio_ci_low=stats.anchor["ratio_ci_low"], ratio_ci_high=stats.anchor["ratio_ci_high"])
    if stats.loads:  # a process's figure that combines its loads: theirs stay with it
        entry["loads"] = stats.loads
    return entry


def combine_point(per_process: Sequence[Stats], ci_target: float, trim_fraction: float, over: str = "processes") -> Stats:
    """One `Stats` for a point measured in each of `per_process`'s processes (in order), or,
    with `over="loads"`, after each of the loads of the model inside one process (the same
    arithmetic: each load lands the weights somewhere else, as each process does).

    The median milliseconds and (anchored) the ratio are the random-effects combination of the
    kept processes' (see the module doc), with its interval; p10/p90, the trimmed mean
    (`trim_fraction` cut from each end) and the CV are of all the kept samples together;
    `processes` (or `loads`) keeps each one's own figures; `noisy` says the combined interval (the
    ratio's, when anchored) is still wider than `ci_target`: the point wants another process. One process: its `Stats`, unchanged but for `processes`."""
    if over not in ("processes", "loads"):
        raise ValueError(f"combine_point combines over processes or loads, not {over!r}")
    if not per_process:
        raise ValueError(f"combine_point needs at least one Stats to combine over {over}")
    if len(per_process) == 1:
        only = Stats.from_dict(per_process[0].to_dict())
        setattr(only, over, [process_summary(only)])
        return only
    kept = _kept(per_process)
    samples = [x for s in kept for x in s.samples_ms]
    combined = summarize(samples, kept[0].tokens, trim_fraction)
    ms = random_effects([s.median_ms for s in kept], [s.ci_low_ms or s.median_ms for s in kept], [s.ci_high_ms or s.median_ms for s in kept])
    combined.median_ms, combined.ci_low_ms, combined.ci_high_ms, combined.ci_level = ms["estimate"], ms["low"], ms["high"], LEVEL
    combined.warmup_runs = sum(s.warmup_runs or 0 for s in per_process)
    combined.remeasured = sum(s.remeasured for s in per_process)
    combined.pooled_attempts = sum(s.pooled_attempts for s in kept)
    combined.disturbances = [d for s in per_process for d in s.disturbances]
    combined.disturbed = all(s.disturbed for s in per_process)
    slowdowns = [s.calibration_slowdown for s in kept if s.calibration_slowdown is not None]
    combined.calibration_slowdown = max(slowdowns) if slowdowns else None
    setattr(combined, over, [process_summary(s) for s in per_process])
    half = (ms["high"] - ms["low"]) / 2 / ms["estimate"]
    if all(s.anchor is not None for s in kept):
        ratio = random_effects([s.anchor["ratio"] for s in kept], [s.anchor["ratio_ci_low"] for s in kept], [s.anchor["ratio_ci_high"] for s in kept])  # type: ignore[index]
        theirs = [x for s in kept for x in s.anchor["anchor_samples_ms"]]  # type: ignore[index]
        quantile = kept[0].anchor["quantile"]  # type: ignore[index]
        combined.anchor = {
            "quantile": quantile,
            "ratio": ratio["estimate"],
            "ratio_ci_low": ratio["low"],
            "ratio_ci_high": ratio["high"],
            "ratio_ci_level": LEVEL,
            "ratio_tau": ratio["tau"],
            "combined": f"random effects (DerSimonian-Laird, log scale) over the {over}' ratios",
            "candidate_quantile_ms": float(np.quantile(samples, quantile)),
            "anchor_quantile_ms": float(np.quantile(theirs, quantile)),
            "anchor_median_ms": float(np.median(theirs)),
            "anchor_samples_ms": theirs,
        }
        half = (ratio["high"] - ratio["low"]) / 2 / ratio["estimate"]
    combined.noisy = half > ci_target
    return combined


__all__ = ["LEVEL", "combine_point", "process_summary", "random_effects"]
