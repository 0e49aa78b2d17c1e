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

The host under a VM drifts over minutes (neighbouring machines on the same host: the same
architecture 1.2-1.9x slower an hour later, with nothing else running in the VM; BENCHMARKS.md,
"Measurement noise"), and the calibration kernel does not track that drift. `AnchoredRun`
times a fixed anchor artifact of the same runtime back to back with the candidate, sample by
sample, and `measure_anchored_point` samples their ratio: drift that slows both cancels, so
two measurements of a candidate minutes or hours apart agree on the ratio when they disagree
on milliseconds.

Nothing here knows about models or runtimes: `run_once` is any callable returning one
sample in milliseconds.
"""

from __future__ import annotations

import functools
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


@lru_cache(maxsize=1024)
def _quantile_ranks(n: int, q: float, level: float) -> tuple[int, int, float]:
    """0-based ranks (lo, hi) of the sorted samples that bound the q-quantile with at least
    `level` confidence (equal tails), and the exact coverage. The number of samples below the
    true quantile is Binomial(n, q); [x_(lo), x_(hi)] covers it with probability
    P(lo < B <= hi). With too few samples for `level`, [min, max] at its own coverage."""
    from scipy.stats import binom

    tail = (1 - level) / 2
    lo = int(binom.ppf(tail, n, q)) - 1  # P(B <= lo) <= tail
    hi = int(binom.ppf(1 - tail, n, q))  # P(B <= hi) >= 1 - tail
    lo, hi = max(lo, 0), min(hi, n - 1)
    coverage = float(binom.cdf(hi, n, q) - binom.cdf(lo, n, q)) if n > 1 else 0.0
    return lo, hi, max(coverage, 0.0)


def quantile_interval(samples_ms: list[float] | np.ndarray, q: float, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage) of a distribution-free confidence interval for the q-quantile."""
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    lo, hi, coverage = _quantile_ranks(len(values), q, level)
    return float(values[lo]), float(values[hi]), coverage


def median_interval(samples_ms: list[float] | np.ndarray, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage) of a distribution-free confidence interval for the median."""
    return quantile_interval(samples_ms, 0.5, level)


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
    #: memory as a decode step does), this many passes: ~10 ms a run, longer than the
    #: scheduler's slices, so that a hog sharing the core cannot fall between runs. At 6
    #: passes (~1.7 ms) the median of five runs read 1.25x with three hogs on the core
    #: (the tests' hog check failed in a README test run) while the model's runs took ~4x.
    ARRAY_BYTES = 4 << 20
    PASSES = 36
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


def timed_runs(run_once: Callable[[], float], protocol: Protocol, precision: Callable[[list[float]], float] = relative_half_width) -> list[float]:
    """At least `min_runs`; then stop as soon as `precision` of the samples (default: the
    median's relative interval) is within `ci_target`, or at `max_runs`, or once the point
    has used `max_seconds_per_point`."""
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
            if len(samples) >= 2 and precision(samples) <= protocol.ci_target:
                break
    finally:
        gc.enable()
    return samples


def _slowdown(stats: Stats) -> float:
    """The calibration slowdown of a disturbed attempt (only a calibrated one can be disturbed)."""
    if stats.calibration_slowdown is None:
        raise ValueError("a disturbed attempt without its calibration slowdown; only calibrated attempts are checked for disturbance")
    return stats.calibration_slowdown


def measure_point(run_once: Callable[[], float], protocol: Protocol, tokens: int, calibration: SlowdownProbe | None = None,
                  precision: Callable[[list[float]], float] = relative_half_width, pool: bool = False) -> Stats:
    """Warm up, then sample the point; re-measure (at most `max_remeasures` times) while it
    was disturbed (the calibration kernel ran more than `disturbance_threshold` slower around
    it than at the reference) or its CV is over `cv_threshold`. Keeps the best attempt (an
    undisturbed one first, then the tightest by `precision`: by default the median's relative
    interval); flags `disturbed` if every attempt was, and `noisy` if the kept attempt's
    precision is still worse than `ci_target`.

    With `pool` (an anchored point, whose ratio the host's drift between attempts does not
    move), the undisturbed attempts' samples are pooled instead of all but one thrown away,
    and a re-measure is asked for by the pooled `precision` (the figure ranked), not by the
    CV of the raw milliseconds: on a noisy host the CV of drifting milliseconds triggered a
    re-measure at nearly every point, and the second attempt's samples were then dropped.

    With `protocol.processes` or `protocol.loads` > 1 the point is re-measured only when
    disturbed: its precision is then sought in further loads of the model or fresh processes
    (`devices.measure_child`, `devices.measure`, `devices.processes`)."""
    warmups = warm_up(run_once, protocol)
    attempts: list[Stats] = []
    for _ in range(1 + protocol.max_remeasures):
        earlier = (_pooled(attempts) or []) if pool else []
        # a pooled re-measure stops once the pool is tight, not once it alone would be
        judged = functools.partial(_precision_after, precision, earlier) if earlier else precision
        if calibration is None:
            stats = summarize(timed_runs(run_once, protocol, judged), tokens, protocol.trim_fraction)
        else:
            before = calibration.slowdown()
            stats = summarize(timed_runs(run_once, protocol, judged), tokens, protocol.trim_fraction)
            slowdown = round(max(before, calibration.slowdown()), 4)
            stats.calibration_slowdown = slowdown
            stats.disturbed = protocol.disturbance_threshold > 0 and slowdown > 1 + protocol.disturbance_threshold
        attempts.append(stats)
        if protocol.processes > 1 or protocol.loads > 1:
            # what is left after a load's own samples is load to load and process to process
            # (devices.processes): a re-measure here only for a disturbance
            if not stats.disturbed:
                break
        elif pool:
            pooled = _pooled(attempts)
            if pooled is not None and precision(pooled) <= protocol.ci_target:
                break
        elif not stats.disturbed and stats.cv <= protocol.cv_threshold:
            break
    clean = [s for s in attempts if not s.disturbed]
    if pool and len(clean) > 1:  # the undisturbed attempts together
        best = summarize([x for s in clean for x in s.samples_ms], tokens, protocol.trim_fraction)
        slowdowns = [s.calibration_slowdown for s in clean if s.calibration_slowdown is not None]
        best.calibration_slowdown = max(slowdowns) if slowdowns else None
        best.pooled_attempts = len(clean)
    elif clean:  # the tightest undisturbed attempt
        best = min(clean, key=lambda attempt: precision(attempt.samples_ms))
    else:  # every attempt disturbed: the least disturbed one
        best = min(attempts, key=_slowdown)
    best.remeasured = len(attempts) - 1
    best.warmup_runs = warmups
    best.disturbances = [_slowdown(s) for s in attempts if s.disturbed]
    best.noisy = precision(best.samples_ms) > protocol.ci_target
    return best


def _precision_after(precision: Callable[[list[float]], float], earlier: list[float], samples: list[float]) -> float:
    return precision(earlier + samples)


def _pooled(attempts: list[Stats]) -> list[float] | None:
    """The samples of the undisturbed attempts, in the order taken; None if every one was disturbed."""
    clean = [s for s in attempts if not s.disturbed]
    return [x for s in clean for x in s.samples_ms] if clean else None


#: The quantile an anchored point ranks by: the host's interference only ever adds time, in
#: bursts, so the lower quartile of a point's samples is the candidate's uninterfered time
#: pinned down with far fewer samples than the median under a noisy host, and the ratio of
#: the two lower quartiles is what drift between measurements does not move (BENCHMARKS.md,
#: "Measurement noise": 20 architectures on a noisy host, spread between passes 8% -> 3%
#: prefill and 15% -> 5% decode against the medians of the raw milliseconds).
ANCHOR_QUANTILE = 0.25


class AnchoredRun:
    """A `run_once` of pairs: one run of the candidate and one of the anchor back to back
    (which goes first alternates, so that neither always runs on caches the other warmed),
    returning the candidate's time. Every pair is kept, in order, so that the pairs behind an
    attempt can be found again (`pairs_of`) and their ratio judged (`precision`)."""

    def __init__(self, candidate: Callable[[], float], anchor: Callable[[], float], quantile: float = ANCHOR_QUANTILE) -> None:
        self.candidate = candidate
        self.anchor = anchor
        self.quantile = quantile
        self.pairs: list[tuple[float, float]] = []

    def __call__(self) -> float:
        if len(self.pairs) % 2 == 0:
            candidate_ms = self.candidate()
            anchor_ms = self.anchor()
        else:
            anchor_ms = self.anchor()
            candidate_ms = self.candidate()
        if anchor_ms <= 0:
            raise ValueError(f"the anchor ran in {anchor_ms} ms: a timer without resolution cannot normalise anything")
        self.pairs.append((candidate_ms, anchor_ms))
        return candidate_ms

    def pairs_of(self, samples: list[float]) -> list[tuple[float, float]]:
        """The pairs whose candidate times are `samples`: one attempt's run of consecutive
        samples, or several attempts' runs one after another (a pooled point)."""
        mine = [c for c, _ in self.pairs]
        found: list[tuple[float, float]] = []
        done = 0
        while done < len(samples):
            # the longest run of consecutive pairs that continues `samples` from `done`; the
            # attempt asked about is usually the last, so the search starts from the end
            best_start, best_length = -1, 0
            for start in range(len(mine) - 1, -1, -1):
                length = 0
                while done + length < len(samples) and start + length < len(mine) and mine[start + length] == samples[done + length]:
                    length += 1
                if length > best_length:
                    best_start, best_length = start, length
                    if done + length == len(samples):
                        break
            if best_length == 0:
                raise ValueError("these samples were not taken by this run")
            found.extend(self.pairs[best_start : best_start + best_length])
            done += best_length
        return found

    def ratio(self, pairs: list[tuple[float, float]]) -> tuple[float, float, float, float]:
        """(ratio, low, high, coverage): the candidate's `quantile` over the anchor's, and an
        interval for it (each quantile's distribution-free interval, relative half-widths
        combined in quadrature: the two are sampled apart, so their errors add so)."""
        mine, theirs = [c for c, _ in pairs], [a for _, a in pairs]
        q_mine, q_theirs = float(np.quantile(mine, self.quantile)), float(np.quantile(theirs, self.quantile))
        lo_m, hi_m, cov_m = quantile_interval(mine, self.quantile)
        lo_t, hi_t, cov_t = quantile_interval(theirs, self.quantile)
        half = math.hypot((hi_m - lo_m) / 2 / q_mine, (hi_t - lo_t) / 2 / q_theirs)
        ratio = q_mine / q_theirs
        return ratio, ratio * (1 - half), ratio * (1 + half), min(cov_m, cov_t)

    def precision(self, samples: list[float]) -> float:
        """The ratio's relative half-width over the pairs behind `samples` (the stopping rule)."""
        ratio, low, high, _ = self.ratio(self.pairs_of(samples))
        return (high - low) / 2 / ratio


def measure_anchored_point(candidate: Callable[[], float], anchor: Callable[[], float], protocol: Protocol, tokens: int, calibration: SlowdownProbe | None = None,
                           quantile: float = ANCHOR_QUANTILE) -> Stats:
    """`measure_point` on pairs of the candidate and the anchor: warm-up, sampling until the
    ratio of their `quantile`s is pinned down (within `ci_target`), the calibration check and
    re-measures as for a plain point. Returns the candidate's own `Stats` (milliseconds,
    median and interval of the kept attempt) and, under `anchor`, the ratio with its interval
    and both quantiles and medians: the figure to rank by is the ratio (times a fixed
    reference of the anchor, the same for every candidate compared)."""
    run = AnchoredRun(candidate, anchor, quantile)
    stats = measure_point(run, protocol, tokens, calibration, precision=run.precision, pool=True)
    pairs = run.pairs_of(stats.samples_ms)
    ratio, low, high, coverage = run.ratio(pairs)
    theirs = [a for _, a in pairs]
    stats.anchor = {
        "quantile": quantile,
        "ratio": ratio,
        "ratio_ci_low": low,
        "ratio_ci_high": high,
        "ratio_ci_level": round(coverage, 4),
        "candidate_quantile_ms": float(np.quantile(stats.samples_ms, quantile)),
        "anchor_quantile_ms": float(np.quantile(theirs, quantile)),
        "anchor_median_ms": float(np.median(theirs)),
        "anchor_samples_ms": theirs,
    }
    return stats


__all__ = ["ANCHOR_QUANTILE", "CI_LEVEL", "AnchoredRun", "quantile_interval", "Calibration", "median_interval", "measure_anchored_point", "relative_half_width", "summarize", "timed_runs", "warm_up", "measure_point"]
