"""The report's intervals: each point's own, widened to the between-load spread pooled over
the study (reports.intervals), and why: with 3 loads a point's own random-effects interval
covers too rarely."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from devices.processes import random_effects
from reports import read_study
from reports.intervals import LoadSpread, load_groups, measured_interval, pooled_load_spread
from testkit.reports import write_handmade_study

Z95 = 1.959964


def _load(ratio: float, half: float = 0.02, disturbed: bool = False) -> dict:
    return {"ratio": ratio, "ratio_ci_low": ratio * (1 - half), "ratio_ci_high": ratio * (1 + half), "median_ms": 10 * ratio, "disturbed": disturbed}


def _point(load_ratios: list[float], half: float = 0.02) -> dict:
    """A point as a search stores it after several loads: the loads' DerSimonian-Laird combination and each load's figures."""
    loads = [_load(r, half) for r in load_ratios]
    combined = random_effects([e["ratio"] for e in loads], [e["ratio_ci_low"] for e in loads], [e["ratio_ci_high"] for e in loads])
    return {"median_ms": 10 * combined["estimate"], "ci_low_ms": 10 * combined["low"], "ci_high_ms": 10 * combined["high"],
            "anchor": {"ratio": combined["estimate"], "ratio_ci_low": combined["low"], "ratio_ci_high": combined["high"]}, "loads": loads}


def _simulated(rng: np.random.Generator, truth: float, load_sd: float, loads: int = 3) -> dict:
    return _point([truth * math.exp(rng.normal(0, load_sd) + rng.normal(0, 0.01)) for _ in range(loads)])


def test_the_pooled_spread_is_the_between_load_sd_of_the_log_figures_and_needs_enough_loads():
    points = [_point([1.0, 1.1, 1.21]), _point([2.0, 2.0 * 1.1]), {"median_ms": 3.0}, None]
    spread = pooled_load_spread(points)
    assert spread is None  # 2 + 1 degrees of freedom: too few to trust
    many = [_point([1.0, 1.1, 1.21]) for _ in range(5)] + [_point([2.0, 2.2])] * 2
    spread = pooled_load_spread(many)
    # each 3-load point: deviations of log(1.1) from the middle, twice; each 2-load point: half of log(1.1), twice
    expected = math.sqrt((5 * 2 * math.log(1.1) ** 2 + 2 * 2 * (math.log(1.1) / 2) ** 2) / (5 * 2 + 2 * 1))
    assert spread == LoadSpread(sd=pytest.approx(expected), degrees_of_freedom=12, points=7)


def test_a_disturbed_load_is_left_out_as_the_measurement_left_it_out_and_processes_are_their_own_groups():
    point = {"anchor": {"ratio": 1.0}, "loads": [_load(1.0), _load(1.5, disturbed=True), _load(1.02)]}
    assert load_groups(point) == [[1.0, 1.02]]
    several = {"median_ms": 5.0, "processes": [{"loads": [_load(1.0), _load(1.1)]}, {"loads": [_load(2.0)]}, {"median_ms": 4.0}]}
    assert load_groups(several) == [[10.0, 11.0], [20.0]]  # not anchored: the loads' medians


def test_the_interval_is_widened_to_the_pooled_spread_never_narrowed_and_scaled_to_the_plotted_value():
    point = _point([1.0, 1.01, 0.99])  # three loads that happened to agree: a narrow interval of their own
    own_below, own_above = measured_interval(point, 30.0)
    spread = LoadSpread(sd=0.06, degrees_of_freedom=60, points=30)
    below, above = measured_interval(point, 30.0, spread)
    assert 30.0 + above == pytest.approx(30.0 * math.exp(Z95 * 0.06 / math.sqrt(3)), rel=1e-4)
    assert 30.0 - below == pytest.approx(30.0 * math.exp(-Z95 * 0.06 / math.sqrt(3)), rel=1e-4)
    assert below > own_below and above > own_above
    wide = _point([1.0, 1.3, 0.8])  # loads that disagreed: its own interval is wider than the pool's and stays
    assert measured_interval(wide, 1.0, spread) == measured_interval(wide, 1.0)
    assert measured_interval({"median_ms": 5.0}, 5.0, spread) is None  # no interval stored: none drawn


def test_with_three_loads_the_pooled_interval_covers_a_second_measurement_as_honest_ones_do_and_the_points_own_does_not():
    """Two measurements of each of 400 architectures, 3 loads each, a 6% load effect (as a
    decode ratio has here) and +-2% inside a load: a second measurement should fall inside the
    first's 95% interval for ~83% of them (two estimates of equal precision); the points' own
    random-effects intervals manage far fewer, the pooled ones about that."""
    rng = np.random.default_rng(7)
    truths = rng.uniform(0.6, 2.0, size=400)
    first = [_simulated(rng, t, 0.06) for t in truths]
    second = [_simulated(rng, t, 0.06) for t in truths]
    spread = pooled_load_spread(first)
    assert spread is not None and spread.sd == pytest.approx(math.hypot(0.06, 0.01), rel=0.1)

    def inside(own: dict, other: dict, with_spread: LoadSpread | None) -> bool:
        below, above = measured_interval(own, own["anchor"]["ratio"], with_spread)
        return own["anchor"]["ratio"] - below <= other["anchor"]["ratio"] <= own["anchor"]["ratio"] + above

    own = np.mean([inside(a, b, None) for a, b in zip(first, second)])
    pooled = np.mean([inside(a, b, spread) for a, b in zip(first, second)])
    assert own < 0.72 and 0.78 <= pooled <= 0.9


def test_a_report_of_a_study_whose_points_had_several_loads_draws_the_pooled_intervals(tmp_path):
    from reports.figures import front_figure

    data = read_study(write_handmade_study(f"sqlite:///{tmp_path / 'loads.db'}"))
    rng = np.random.default_rng(3)
    rows = []
    for trial in data.trials:
        if trial.measured:
            stats = _simulated(rng, trial.values["decode_ms"], 0.06)
            trial = dataclasses.replace(trial, decode_stats=stats)
        rows.append(trial)
    data = dataclasses.replace(data, trials=rows)
    spread = data.load_spreads["decode_ms"]
    measured = [t for t in rows if t.measured]
    assert spread is not None and spread.points == len(measured) and spread.degrees_of_freedom == 2 * len(measured)
    assert data.load_spreads["prefill_ms"] is None  # the handmade prefill stats have no loads
    figure = front_figure(data, "prefill_ms", "decode_ms")
    checked = 0
    for trace in (t for t in figure.data if t.mode == "markers" and len(t.x)):
        for i, number in enumerate(trace.customdata):
            row = next(t for t in rows if t.number == number)
            below, above = measured_interval(row.decode_stats, row.values["decode_ms"], spread)
            assert (trace.error_y.arrayminus[i], trace.error_y.array[i]) == (pytest.approx(below), pytest.approx(above))
            assert above >= row.values["decode_ms"] * (math.exp(Z95 * spread.sd / math.sqrt(3)) - 1) * 0.999
            checked += 1
    assert checked >= len([t for t in measured if "decode_ms" in t.values and "prefill_ms" in t.values])
