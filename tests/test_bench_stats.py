"""The benchmarks' statistics: ratios, 2x crossings, spreads, Kendall's tau, error summaries."""

import math

import pytest

from bench.stats import crossing, error_distribution, kendall_tau, median, quantile, relative_error, relative_spread, repeatability, speedup


def test_speedup_of_throughput_and_latency():
    assert speedup(100.0, 250.0) == pytest.approx(2.5)  # tok/s: higher is better
    assert speedup(40.0, 10.0, higher_is_better=False) == pytest.approx(4.0)  # ms: lower is better
    with pytest.raises(ValueError):
        speedup(0.0, 1.0)


def test_crossing_interpolates_in_log_context():
    # 1.5x at 1024, 2.5x at 4096: halfway in ratio is halfway in log2 context -> 2048
    result = crossing([512, 1024, 4096], [1.0, 1.5, 2.5])
    assert result["first_measured"] == 4096
    assert result["interpolated"] == pytest.approx(2048.0)


def test_crossing_unsorted_input_and_first_point():
    assert crossing([4096, 512], [3.0, 2.2]) == {"first_measured": 512, "interpolated": 512.0}


def test_crossing_not_reached_is_none():
    assert crossing([512, 2048, 8192], [1.1, 1.6, 1.99]) is None


def test_crossing_exact_threshold_counts():
    result = crossing([512, 2048], [1.0, 2.0])
    assert result["first_measured"] == 2048 and result["interpolated"] == pytest.approx(2048.0)


def test_crossing_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        crossing([1, 2], [1.0])


def test_relative_spread_is_symmetric():
    assert relative_spread(9.0, 11.0) == pytest.approx(0.2)
    assert relative_spread(11.0, 9.0) == relative_spread(9.0, 11.0)
    assert relative_spread(5.0, 5.0) == 0.0


def test_median_and_quantile_match_numpy():
    import numpy as np

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert median(values) == pytest.approx(float(np.median(values)))
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_kendall_tau_identical_and_reversed_rankings():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert kendall_tau(a, [10.0, 20.0, 30.0, 40.0, 50.0])["tau"] == pytest.approx(1.0)
    assert kendall_tau(a, a[::-1])["tau"] == pytest.approx(-1.0)
    # one adjacent swap among 5 items: 9 concordant, 1 discordant pair -> 0.8
    assert kendall_tau(a, [1.0, 3.0, 2.0, 4.0, 5.0])["tau"] == pytest.approx(0.8)


def test_repeatability_summary():
    first = [10.0, 20.0, 30.0, 40.0]
    second = [11.0, 20.0, 27.0, 44.0]
    result = repeatability(first, second)
    spreads = sorted([1 / 10.5, 0.0, 3 / 28.5, 4 / 42.0])
    assert result["median_relative_spread"] == pytest.approx((spreads[1] + spreads[2]) / 2)
    assert result["max_relative_spread"] == pytest.approx(spreads[-1])
    assert result["tau"] == pytest.approx(1.0)
    assert result["n"] == 4


def test_error_distribution():
    assert relative_error(120.0, 100.0) == pytest.approx(0.2)
    summary = error_distribution([0.05, -0.2, 0.3, 0.0])
    assert summary["n"] == 4
    assert summary["max_abs"] == pytest.approx(0.3)
    assert summary["within_10pct"] == pytest.approx(0.5)
    assert summary["within_25pct"] == pytest.approx(0.75)
    assert summary["overestimates"] == pytest.approx(0.5)
    assert summary["median"] == pytest.approx(0.025)
    assert not math.isnan(summary["p10"])
