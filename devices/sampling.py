"""How one measured point is sampled: warm-up until steady, timed runs until the median is
pinned down, an interference check around the point, and a re-measure when it was disturbed.

The search ranks candidates by the median latency of each point, so the question a
measurement must answer is "how sure is this median?". `median_interval` gives a
distribution-free confidence interval for it (order statistics of the samples: no
normality assumed, which timing samples with their long right tail do not satisfy), and
`timed_runs` keeps sampling until that interval is within `Protocol.ci_target` of the
median (relative half-width), bounded by `max_runs` and `max_seconds_per_point`.

A point measured while something else ran on its cores is slower for reasons that have
nothing to do with the model. `Calibration` times a fixed kernel (one thread of multiply-adds over
arrays larger than L2: arithmetic and memory traffic) once when the measuring process is
ready, and again around every point; a point around which the kernel ran more than
`disturbance_threshold` slower is re-measured (up to `max_remeasures` times) and, if it
stays disturbed, flagged `disturbed` rather than silently reported slower.

Nothing here knows about models or runtimes: `run_once` is any callable returning one
sample in milliseconds.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol as _Protocol

import numpy as np

from devices.protocol import Protocol, Stats

#: Confidence of the interval reported for every median.
CI_LEVEL = 0.95
#: Warm-up ends when two consecutive runs differ by less than this (relative).
STEADY_TOLERANCE = 0.05


@lru_cache(maxsize=256)
def _order_statistic_ranks(n: int, level: float) -> tuple[int, int, float]:
    """0-based ranks (lo, hi) of the sorted samples that bound the median with at least
    `level` confidence, and the exact coverage. The number B of samples below the true
    median is Binomial(n, 1/2), and the k-th smallest sample (0-based) lies above the median
    when B <= k, so [x_(k), x_(n-1-k)] covers it with probability 1 - 2 P(B <= k). With too
    few samples for `level` (n < 6 at 95%) it is [min, max] at its own, lower, coverage."""
    if n < 1:
        raise ValueError("no samples")
    cdf = 0.0
    k_best = 0
    for k in range((n - 1) // 2 + 1):
        cdf += math.comb(n, k) / 2**n
        if 1 - 2 * cdf < level:
            break
        k_best = k
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k_best + 1)) / 2**n
    return k_best, n - 1 - k_best, max(coverage, 0.0)


def median_interval(samples_ms: list[float] | np.ndarray, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage) of a distribution-free confidence interval for the median."""
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    lo, hi, coverage = _order_statistic_ranks(len(values), level)
    return float(values[lo]), float(values[hi]), coverage


def relative_half_width(samples_ms: list[float]) -> float:
    """Half the width of the median's interval over the median: +-x of the figure ranked."""
    low, high, _ = median_interval(samples_ms)
    median = float(np.median(samples_ms))
    return (high - low) / 2 / median if median > 0 else math.inf


def summarize(samples_ms: list[float], tokens: int, trim_fraction: float) -> Stats:
    """`Stats` of raw samples: median with its confidence interval, trimmed mean
    (`trim_fraction` cut from each end), p10/p90 (linear interpolation), coefficient of
    variation (sample std / mean)."""
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    cut = int(len(values) * trim_fraction)
    kept = values[cut : len(values) - cut] if len(values) - 2 * cut >= 1 else values
    mean = float(values.mean())
    cv = float(values.std(ddof=1) / mean) if len(values) > 1 and mean > 0 else 0.0
    low, high, coverage = median_interval(values)
    median = float(np.median(values))
    return Stats(
        median_ms=median,
        trimmed_mean_ms=float(kept.mean()),
        p10_ms=float(np.percentile(values, 10)),
        p90_ms=float(np.percentile(values, 90)),
        cv=cv,
        samples_ms=[float(v) for v in samples_ms],
        tokens=tokens,
        ci_low_ms=low,
        ci_high_ms=high,
        ci_level=round(coverage, 4),
    )


class SlowdownProbe(_Protocol):
    """What `measure_point` needs of a calibration (`Calibration` here, the adb runner's on a phone)."""

    def slowdown(self) -> float: ...


class Calibration:
    """A fixed kernel (a few milliseconds) timed on the measuring process's own cores: the
    reference when the process is ready (the best of three medians), then around each point.
    `slowdown()` is the kernel's current time over the reference: ~1 on a quiet machine, ~2
    with a CPU hog sharing the core.

    The kernel is numpy element-wise arithmetic, which runs on one thread: a BLAS GEMM would
    start its own thread pool, whose threads then compete with the runtime's (ONNX Runtime's
    spin-waiting workers, XNNPACK's pool) and make a quiet machine look disturbed."""

    #: The kernel: multiply-adds over arrays of this size (larger than L2, so it reads L3 or
    #: memory as a decode step does), this many passes.
    ARRAY_BYTES = 4 << 20
    PASSES = 6
    REPEATS = 5

    def __init__(self, take_reference: bool = True) -> None:
        """Allocate and touch the kernel's arrays; with `take_reference`, also time the
        reference (else call `take_reference()` when the process is ready).

        The arrays are built in place, without a temporary: glibc raises its mmap threshold
        to the size of any freed mapped block, after which the measured runtime's buffers
        below that size can come from the heap, where freed memory stays resident
        (`np.linspace(..., dtype=float32)` freed an 8 MiB float64 temporary; with the old
        kernel made after loading, a bare ONNX runner grew by 10 MiB more than the arrays:
        BENCHMARKS.md, "ONNX int8 fourth pass"). The measuring child makes them before its
        baseline, so that the footprint is the model's, not the harness's."""
        n = self.ARRAY_BYTES // 4
        self._a = np.arange(n, dtype=np.float32)
        self._a *= np.float32(1.0 / max(n - 1, 1))
        self._b = np.full(n, 0.5, dtype=np.float32)
        self._out = np.zeros(n, dtype=np.float32)
        self._out += 0.0  # touch every page now: first touches are not part of any figure
        self.reference_ms = float("nan")
        if take_reference:
            self.take_reference()

    def take_reference(self) -> None:
        self.time_ms()  # caches warm
        # the best of several: a reference taken during a passing spike would make every
        # later point look faster than it is, and hide a real disturbance
        self.reference_ms = min(self.time_ms() for _ in range(3))

    def _kernel_once(self) -> float:
        start = time.perf_counter_ns()
        for _ in range(self.PASSES):
            np.multiply(self._a, self._b, out=self._out)
            np.add(self._out, self._a, out=self._out)
        float(self._out[:: 1 << 12].sum())
        return (time.perf_counter_ns() - start) / 1e6

    def time_ms(self) -> float:
        """The median of a few runs of the kernel."""
        return float(np.median([self._kernel_once() for _ in range(self.REPEATS)]))

    def slowdown(self) -> float:
        return self.time_ms() / self.reference_ms

    def describe(self) -> dict:
        return {
            "kernel": f"{self.PASSES} passes of fp32 multiply-add over {self.ARRAY_BYTES >> 20} MiB arrays (one thread), median of {self.REPEATS}",
            "reference_ms": round(self.reference_ms, 4),
        }


def warm_up(run_once: Callable[[], float], protocol: Protocol) -> int:
    """At least `warmup_runs` runs, then more until two consecutive runs agree within
    STEADY_TOLERANCE (caches, lazily packed weights and thread pools settled), at most
    `max_warmup_runs` runs and half the point's time budget. Returns the runs made."""
    limit = max(protocol.warmup_runs, protocol.max_warmup_runs)
    runs = 0
    previous = None
    start = time.perf_counter()
    while runs < limit:
        sample = run_once()
        runs += 1
        if runs >= protocol.warmup_runs:
            if previous is not None and abs(sample - previous) <= STEADY_TOLERANCE * previous:
                break
            if time.perf_counter() - start >= protocol.max_seconds_per_point / 2:
                break
        previous = sample
    return runs


def timed_runs(run_once: Callable[[], float], protocol: Protocol) -> list[float]:
    """At least `min_runs`; then stop as soon as the median's interval is within
    `ci_target`, or at `max_runs`, or once the point has used `max_seconds_per_point`."""
    samples: list[float] = []
    start = time.perf_counter()
    gc.collect()
    gc.disable()  # a collection inside a timed run is noise, not model latency
    try:
        while len(samples) < protocol.max_runs:
            samples.append(run_once())
            if len(samples) < protocol.min_runs:
                continue
            if time.perf_counter() - start >= protocol.max_seconds_per_point:
                break
            if len(samples) >= 2 and relative_half_width(samples) <= protocol.ci_target:
                break
    finally:
        gc.enable()
    return samples


def _interval_width(stats: Stats) -> float:
    if stats.ci_low_ms is None or stats.ci_high_ms is None:
        raise ValueError("a sampled point without its median's interval; `summarize` gives every point one")
    return stats.ci_high_ms - stats.ci_low_ms


def _slowdown(stats: Stats) -> float:
    """The calibration slowdown of a disturbed attempt (only a calibrated one can be disturbed)."""
    if stats.calibration_slowdown is None:
        raise ValueError("a disturbed attempt without its calibration slowdown; only calibrated attempts are checked for disturbance")
    return stats.calibration_slowdown


def measure_point(run_once: Callable[[], float], protocol: Protocol, tokens: int, calibration: SlowdownProbe | None = None) -> Stats:
    """Warm up, then sample the point; re-measure (at most `max_remeasures` times) while it
    was disturbed (the calibration kernel ran more than `disturbance_threshold` slower around
    it than at the reference) or its CV is over `cv_threshold`. Keeps the best attempt (an
    undisturbed one first, then the tightest interval); flags `disturbed` if every attempt
    was, and `noisy` if the kept interval is still wider than `ci_target`."""
    warmups = warm_up(run_once, protocol)
    attempts: list[Stats] = []
    for _ in range(1 + protocol.max_remeasures):
        if calibration is None:
            stats = summarize(timed_runs(run_once, protocol), tokens, protocol.trim_fraction)
        else:
            before = calibration.slowdown()
            stats = summarize(timed_runs(run_once, protocol), tokens, protocol.trim_fraction)
            slowdown = round(max(before, calibration.slowdown()), 4)
            stats.calibration_slowdown = slowdown
            stats.disturbed = protocol.disturbance_threshold > 0 and slowdown > 1 + protocol.disturbance_threshold
        attempts.append(stats)
        if not stats.disturbed and stats.cv <= protocol.cv_threshold:
            break
    clean = [s for s in attempts if not s.disturbed]
    if clean:  # the tightest undisturbed attempt
        best = min(clean, key=_interval_width)
    else:  # every attempt disturbed: the least disturbed one
        best = min(attempts, key=_slowdown)
    best.remeasured = len(attempts) - 1
    best.warmup_runs = warmups
    best.disturbances = [_slowdown(s) for s in attempts if s.disturbed]
    best.noisy = relative_half_width(best.samples_ms) > protocol.ci_target
    return best


__all__ = ["CI_LEVEL", "Calibration", "median_interval", "relative_half_width", "summarize", "timed_runs", "warm_up", "measure_point"]
