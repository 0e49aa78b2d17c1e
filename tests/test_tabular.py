"""bench.tabular / bench.tabular_replay: the table's space is enumerated exactly, and a
replayed search measures each architecture once, never beats the table's optimum, and with
pre-screening skips without measuring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.tabular import enumerate_specs, protocol, table_space
from bench.tabular_replay import Table, hv_at_measurements, main, replay


def test_the_table_space_is_enumerated_exactly_and_every_sample_is_in_it():
    import optuna

    specs = enumerate_specs()
    keys = {s.key for s in specs}
    assert len(specs) == len(keys) == 2**4 + 2**5 + 2**6
    space = table_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert all(space.sample(study.ask()).key in keys for _ in range(200))


@pytest.fixture
def synthetic_table(tmp_path):
    """Every architecture of the table's space on a synthetic device: attention costs more
    in both latencies and memory, so the front trades quality (attention count) for speed."""
    rng = np.random.default_rng(0)
    rows = []
    for spec in enumerate_specs():
        attention = sum(op == "attn" for op in spec.layers)
        rows.append({
            "key": spec.key, "layout": spec.layout, "spec": spec.to_dict(), "status": "ok",
            "prefill_ms": (20 * len(spec.layers) + 15 * attention) * rng.normal(1, 0.02),
            "decode_ms": (2 * len(spec.layers) + 3 * attention) * rng.normal(1, 0.02),
            "footprint_bytes": (60 + 3 * len(spec.layers) + 4 * attention) * 2**20 * rng.normal(1, 0.005),
            "stack": {"calibration": {"reference_ms": 10.0}},
        })
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"protocol": protocol().to_dict(), "backend": "eager", "rows": rows, "machine": {}, "started": "now"}))
    return path


def test_a_replayed_search_measures_each_architecture_once_and_stays_below_the_optimum(synthetic_table):
    table = Table.load(synthetic_table, budget_bytes=90 * 2**20)
    result = replay(table, "random", 0, max_trials=150, max_measurements=150, prescreen=False)
    hv, measured = np.array(result["hv_by_trial"]), np.array(result["measurements_by_trial"])
    assert (np.diff(hv) >= -1e-12).all() and hv[-1] <= 1.0 + 1e-9 and hv[-1] > 0.5
    assert measured[-1] <= len(table.rows) and measured[-1] < len(hv)  # 150 draws from 112: repeats are not measured again


def test_pre_screening_skips_without_measuring_and_reaches_the_plain_hypervolume_sooner(synthetic_table):
    table = Table.load(synthetic_table, budget_bytes=90 * 2**20)
    plain = [replay(table, "random", seed, max_trials=60, max_measurements=60, prescreen=False) for seed in range(3)]
    screened = [replay(table, "random", seed, max_trials=480, max_measurements=60, prescreen=True) for seed in range(3)]
    assert all(sum(r["skips"][k] for k in ("over_budget", "dominated")) > 0 for r in screened)
    for r in screened:  # a skipped trial adds no measurement
        assert len(r["hv_by_trial"]) > r["measurements_by_trial"][-1]
    at = 40
    assert np.mean([hv_at_measurements(r, at) for r in screened]) >= np.mean([hv_at_measurements(r, at) for r in plain])


def test_the_replay_command_writes_its_results(synthetic_table, tmp_path):
    out = tmp_path / "replay.json"
    assert main(["--quick", "--table", str(synthetic_table), "--budget-mib", "90", "--results", str(out), "--no-write"]) == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]["ratio_to_random"]) == {"random", "tpe"}
    assert data["summary"]["ratio_to_random"]["random"]["25"]["ratio"] == pytest.approx(1.0)


def test_an_anchored_table_ranks_by_the_ratio_to_its_anchor_not_by_the_drifting_milliseconds(synthetic_table, tmp_path):
    """A table measured beside the anchor: rows whose raw milliseconds a slow host inflated
    (anchor slowed alike) load at their ratio times one anchor reference, so two rows of the
    same ratio load equal whatever the drift; `--raw` (calibrated=False) keeps the milliseconds."""
    data = json.loads(synthetic_table.read_text())
    data["anchor"] = table_space().anchor_spec().to_dict()
    for i, row in enumerate(data["rows"]):
        drift = 1.5 if i % 2 else 1.0  # every other architecture measured while the host was 1.5x slower
        for name, anchor_ms in (("prefill", 100.0), ("decode", 10.0)):
            row[f"{name}_anchor_ratio"] = row[f"{name}_ms"] / anchor_ms
            row[f"{name}_anchor_quantile_ms"] = anchor_ms * drift
            row[f"{name}_ms"] *= drift
    path = tmp_path / "anchored.json"
    path.write_text(json.dumps(data))
    plain = Table.load(synthetic_table, budget_bytes=90 * 2**20)
    anchored = Table.load(path, budget_bytes=90 * 2**20)
    raw = Table.load(path, budget_bytes=90 * 2**20, calibrated=False)
    reference = {"prefill": np.median([100.0, 150.0] * 56), "decode": np.median([10.0, 15.0] * 56)}
    for key, row in anchored.rows.items():
        for name in ("prefill", "decode"):
            assert row[f"{name}_ms"] == pytest.approx(plain.rows[key][f"{name}_ms"] * reference[name] / (100.0 if name == "prefill" else 10.0))
            assert raw.rows[key][f"{name}_ms"] == pytest.approx(row[f"raw_{name}_ms"])
    slowed = [key for i, key in enumerate(r["key"] for r in data["rows"]) if i % 2]
    assert any(raw.rows[k]["prefill_ms"] > 1.4 * plain.rows[k]["prefill_ms"] for k in slowed)
