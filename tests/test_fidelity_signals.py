"""bench/experiments/fidelity_signals.py: the statistics that judge candidate quality signals (rank
correlation with ties, bootstrap intervals, held-out learned combinations, learning speed)."""

from __future__ import annotations


import numpy as np
import pytest

from bench.experiments import fidelity_signals as fs
from bench.experiments import quality_fidelity as fidelity


def test_spearman_agrees_with_the_benchmarks_own_on_ties_and_batches():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 5, size=12).astype(float), rng.normal(size=12)  # many ties in x
        assert fs.spearman(x, y) == pytest.approx(fidelity.spearman(list(x), list(y)))
    batch = rng.normal(size=(4, 9))
    assert np.array_equal(fs.average_ranks(batch), np.stack([fs.average_ranks(row) for row in batch]))
    assert np.isnan(fs.spearman([1, 1, 1], [1, 2, 3]))  # a constant signal ranks nothing


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_agreement():
    rng = np.random.default_rng(0)
    x = np.arange(20.0)
    idx = fs.bootstrap_indices(20, 2000)
    assert fs.interval(fs.bootstrap_spearman(x, x, idx)) == (1.0, 1.0)
    noisy = x + rng.normal(scale=8, size=20)
    low, high = fs.interval(fs.bootstrap_spearman(noisy, x, idx))
    assert low < fs.spearman(noisy, x) < high and high - low > 0.2
    assert fs.interval(np.full(10, np.nan)) is None


def test_recall_auc_rewards_learning_recall_early():
    def curve(recall_by_step):
        return [[step, 0.0, {"recall": r, "noisy_recall": r, "fuzzy_recall": r, "memorisation": 1.0}] for step, r in recall_by_step]

    early = fs.recall_auc(curve([(250, 0.9), (500, 0.9), (1000, 0.9)]))
    late = fs.recall_auc(curve([(250, 0.0), (500, 0.0), (1000, 0.9)]))
    assert early == pytest.approx(0.9) and late == pytest.approx(0.9 * 0.5 / 2 / 0.75 * 1)  # one trapezoid over the last half
    assert fs.recall_auc(curve([(250, 0.5)])) is None and fs.recall_auc([[1, 0.1, None], [2, 0.2, None]]) is None


def test_a_held_out_prediction_never_sees_its_own_architecture():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 3))
    y = 2 * x[:, 0] - x[:, 1] + rng.normal(scale=0.01, size=15)
    predictions, alphas = fs.loo_ridge_predictions(x, y)
    assert fs.spearman(predictions, y) > 0.95 and set(alphas) <= set(fs.RIDGE_ALPHAS)
    moved = y.copy()
    moved[4] += 100.0  # an architecture's own target cannot change its own prediction
    assert fs.loo_ridge_predictions(x, moved)[0][4] == pytest.approx(predictions[4])


def _rows(n: int = 12) -> tuple[list[dict], dict[str, float], dict[str, str]]:
    """n architectures: the more attention the better the reference, plus noise the proxy
    `mad_wide` sees through and `mad` does not."""
    rng = np.random.default_rng(5)
    layouts = {f"a{i}": "A" * (i % 4) + "C" * (6 - i % 4) for i in range(n)}
    quality = {a: layouts[a].count("A") + rng.normal(scale=0.3) for a in layouts}
    rows = []
    for i, a in enumerate(layouts):
        base = {"arch": a, "layout": layouts[a], "ok": True, "proxy_parameters": 1000 + i}
        acc = lambda v: {"recall": v, "noisy_recall": v, "fuzzy_recall": v, "selective_copy": v, "compression": v, "memorisation": 1.0}  # noqa: E731
        rows.append({**base, "stage": "mad_wide", "seed": 0, "score": quality[a], "task_accuracy": acc(0.5),
                     "curve": [[250, 0.2, acc(0.1 * quality[a])], [1000, quality[a], acc(0.2 * quality[a])]]})
        rows += [{**base, "stage": "mad", "seed": s, "score": float(rng.random()), "task_accuracy": acc(0.3)} for s in ((0, 1) if i < 6 else (0,))]
        rows.append({**base, "stage": "lm_long", "seed": 0, "score": -2.0, "bpb": 2.0 - 0.01 * quality[a],
                     "curve": [[s, 2.5 - 0.01 * quality[a] * k, 2.5] for k, s in enumerate((100, 200, 300), 1)]})
        rows.append({**base, "stage": "lm", "seed": 0, "score": -2.5, "bpb": 2.5})
    return rows, {a: 2.0 - 0.1 * q for a, q in quality.items()}, layouts


def test_signals_judged_side_by_side_with_the_free_baselines():
    rows, reference, layouts = _rows()
    params = {a: 1000.0 + i for i, a in enumerate(layouts)}
    result = fs.evaluate(rows, reference, layouts, params, draws=500)
    judged = result["signals"]
    assert judged["mad_wide (seed 0)"]["spearman"] == pytest.approx(1.0) and judged["mad_wide recall AUC (seed 0)"]["spearman"] == pytest.approx(1.0)
    assert judged["mad, best of seeds"]["n"] == 6 and judged["mad (seed 0)"]["n"] == 12  # the seed statistics only where >= 2 seeds
    assert judged["has any attention layer"].get("spearman_hybrids") != judged["has any attention layer"].get("spearman_hybrids")  # constant in hybrids: nan
    assert judged["mad_wide (seed 0)"]["n_hybrids"] == sum(fs.is_hybrid(layout) for layout in layouts.values())
    versus = judged["mad_wide (seed 0)"]["versus_best_baseline"]
    assert versus["baseline"] == "number of attention layers" and versus["difference_ci95"][0] >= 0
    assert versus["beats_it"] == (judged["mad_wide (seed 0)"]["ci95"][0] > versus["baseline_spearman"])
    assert not set(result["winners"]) & set(result["baseline_names"])  # a baseline is never a winner
    held_out = [name for name in judged if name.startswith("learned combination")]
    assert len(held_out) == 3 and all(judged[name]["n"] == 12 for name in held_out)
    assert "lm_long, mean over seeds" not in judged  # one seed each: no seed statistic


def test_an_lm_proxy_is_averaged_over_its_seeds_and_never_ranked_by_its_best_seed():
    rows, reference, layouts = _rows()
    rows += [{**row, "seed": 1, "bpb": row["bpb"] + 0.001} for row in rows if row["stage"] == "lm_long" and row["arch"] in ("a0", "a1", "a2", "a3", "a4")]
    found = fs.signals(rows)
    mean = found["lm_long, mean over seeds"]
    assert set(mean) == {"a0", "a1", "a2", "a3", "a4"} and "lm_long, best of seeds" not in found
    seed0 = {row["arch"]: row["bpb"] for row in rows if row["stage"] == "lm_long" and row["seed"] == 0}
    assert mean["a0"] == pytest.approx(-(seed0["a0"] + 0.0005))  # minus the mean bpb: higher is better
    table = fs.features(rows, layouts, {a: 1000.0 + i for i, a in enumerate(layouts)})["free features + long LM proxy (3 points, mean over seeds)"]
    assert len(table["a0"]) == 5 + 3 and len(table) == 12
