"""devices.sampling: the median's interval, sampling until it is tight, warm-up until
steady, and a point measured under interference re-measured and flagged. The hog in the
interference tests is a real process pinned to the measured core; no test asserts a timing."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from devices.protocol import Protocol, Stats
from devices.sampling import Calibration, measure_point, median_interval, relative_half_width, summarize, warm_up


def test_the_median_interval_uses_the_binomial_order_statistics():
    # n = 6: the smallest n with a 95% interval, [min, max] at 1 - 2/64
    low, high, coverage = median_interval([6, 1, 5, 2, 4, 3])
    assert (low, high) == (1, 6) and coverage == pytest.approx(1 - 2 / 64)
    # n = 20: the textbook ranks 6 and 15 (1-based), coverage 0.9586
    low, high, coverage = median_interval(list(range(1, 21)))
    assert (low, high) == (6, 15) and coverage == pytest.approx(0.9586, abs=1e-4)
    # too few samples for 95%: [min, max] at the coverage it has
    low, high, coverage = median_interval([3.0, 1.0, 2.0])
    assert (low, high) == (1.0, 3.0) and coverage == pytest.approx(0.75)


def test_the_interval_covers_the_median_as_often_as_it_says():
    rng = np.random.default_rng(0)
    true_median = np.log(2)  # of the exponential distribution, skewed like latencies
    hits = 0
    for _ in range(2000):
        low, high, _ = median_interval(rng.exponential(size=15))
        hits += low <= true_median <= high
    assert 0.95 <= hits / 2000 <= 0.995  # n = 15: exact coverage 0.965


def test_summarize_reports_the_interval_and_it_round_trips():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 100.0, 3.0, 2.0, 4.0, 3.0], tokens=7, trim_fraction=0.2)
    assert stats.ci_low_ms <= stats.median_ms == 3.0 <= stats.ci_high_ms and stats.ci_level >= 0.95
    again = Stats.from_dict(stats.to_dict())
    assert again == stats and stats.to_dict()["ci_half_width_rel"] == pytest.approx(stats.ci_half_width_rel)
    old = {k: v for k, v in stats.to_dict().items() if not k.startswith("ci_") and k not in ("warmup_runs", "calibration_slowdown", "disturbed", "disturbances")}
    assert Stats.from_dict(old).ci_half_width_rel is None  # results stored before intervals still load


def test_sampling_stops_as_soon_as_the_median_is_pinned_down():
    protocol = Protocol(warmup_runs=0, max_warmup_runs=0, min_runs=6, max_runs=200, max_seconds_per_point=60, ci_target=0.02, max_remeasures=0, disturbance_threshold=0)
    steady = measure_point(lambda: 2.0, protocol, tokens=1)
    assert len(steady.samples_ms) == 6 and not steady.noisy
    rng = np.random.default_rng(1)
    jittery = measure_point(lambda: float(rng.uniform(1.0, 1.1)), protocol, tokens=1)
    assert 6 < len(jittery.samples_ms) < 200 and not jittery.noisy
    assert relative_half_width(jittery.samples_ms) <= 0.02
    wild = measure_point(lambda: float(rng.choice([1.0, 50.0])), protocol, tokens=1)
    assert len(wild.samples_ms) == 200 and wild.noisy  # never tight: bounded by max_runs, and flagged


def test_warm_up_runs_until_two_runs_agree():
    protocol = Protocol(warmup_runs=1, max_warmup_runs=10)
    times = iter([10.0, 8.0, 5.0, 2.0, 2.02, 2.0, 2.0])
    assert warm_up(lambda: next(times), protocol) == 5
    assert warm_up(lambda: 3.0, Protocol(warmup_runs=3, max_warmup_runs=10)) == 3  # the minimum first
    never = iter(float(i) for i in range(1, 100))
    assert warm_up(lambda: next(never) * 10, Protocol(warmup_runs=1, max_warmup_runs=4)) == 4  # bounded


# -- interference ------------------------------------------------------------------------------


def _core() -> int:
    return sorted(os.sched_getaffinity(0))[-1]


class _Hog:
    """Busy loops pinned to `core` (three: a clear share of the core even on a machine that
    is busy already), each ending by itself after 60 s at the latest; `stop()` ends them
    sooner (a context manager: they never outlive the test)."""

    def __init__(self, core: int, processes: int = 3):
        # monotonic: a wall clock stepped forward (a VM's clock resynchronised) must not end
        # the hogs in the middle of the test
        code = f"import os, time; os.sched_setaffinity(0, [{core}]); end = time.monotonic() + 60\nwhile time.monotonic() < end: pass"
        self.processes = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()

    def __enter__(self) -> _Hog:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def pinned():
    """This process pinned to one core (as a measurement child is), restored afterwards."""
    before = os.sched_getaffinity(0)
    core = _core()
    os.sched_setaffinity(0, [core])
    yield core
    os.sched_setaffinity(0, before)


def _work() -> float:
    """A model-like sample: GEMMs on the pinned core, in milliseconds."""
    import time

    a = np.ones((192, 192), dtype=np.float32)
    start = time.perf_counter_ns()
    for _ in range(8):
        a = (a @ a) * (1 / 192)
    return (time.perf_counter_ns() - start) / 1e6


PROTOCOL = Protocol(warmup_runs=1, max_warmup_runs=3, min_runs=5, max_runs=10, max_seconds_per_point=2, max_remeasures=2, disturbance_threshold=0.3, cv_threshold=100)


def test_a_point_measured_under_a_cpu_hog_is_remeasured_and_flagged(pinned):
    calibration = Calibration()  # the reference, taken while the core is quiet
    with _Hog(pinned):
        stats = measure_point(_work, PROTOCOL, tokens=1, calibration=calibration)
    assert stats.remeasured == PROTOCOL.max_remeasures  # every attempt was disturbed
    assert stats.disturbed and len(stats.disturbances) == 1 + PROTOCOL.max_remeasures
    assert stats.calibration_slowdown > 1 + PROTOCOL.disturbance_threshold


def test_a_disturbance_that_passes_is_remeasured_and_the_clean_attempt_kept(pinned):
    class HogForOneAttempt(Calibration):
        """Ends the hog once the first attempt has been checked (its before and after)."""

        checks = 0

        def slowdown(self) -> float:
            value = super().slowdown()
            self.checks += 1
            if self.checks == 2:
                hog.stop()
            return value

    calibration = HogForOneAttempt()
    with _Hog(pinned) as hog:
        stats = measure_point(_work, PROTOCOL, tokens=1, calibration=calibration)
    assert stats.remeasured >= 1 and stats.disturbances[0] > 1 + PROTOCOL.disturbance_threshold  # the hogged attempt was seen
    # and not kept: a clean attempt if the machine is otherwise quiet, else the least disturbed
    assert not stats.disturbed or stats.calibration_slowdown < stats.disturbances[0]


def test_the_calibration_arrays_are_made_apart_from_the_reference_and_touched_whole():
    """The measuring child makes the kernel's arrays before its baseline (they are the
    harness's memory, not the model's) and times the reference once the model is loaded."""
    # Residency in a fresh process: in this one, earlier tests' freed heap can hold the arrays
    # without the RSS growing (seen in the full suite's order).
    probe = (
        "from devices import stack\n"
        "from devices.sampling import Calibration\n"
        "before = stack.rss_bytes()\n"
        "calibration = Calibration(take_reference=False)\n"
        "print(stack.rss_bytes() - before, Calibration.ARRAY_BYTES)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, array_bytes = map(int, done.stdout.split())
    assert grown >= 3 * array_bytes * 0.9  # a, b and out resident now, not at the first timing
    calibration = Calibration(take_reference=False)
    assert np.isnan(calibration.reference_ms)
    assert calibration._a[0] == 0.0 and abs(float(calibration._a[-1]) - 1.0) < 1e-6  # 0..1, as before
    calibration.take_reference()
    assert calibration.reference_ms > 0 and calibration.slowdown() > 0
