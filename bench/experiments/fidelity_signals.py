"""Candidate quality signals, judged against a fidelity run's references (pure numpy).

`bench/experiments/quality_fidelity.py` trains proxies and references and logs one row per job; this
module turns those rows into *signals* -- one number per architecture, higher meaning
"predicted to be the better language model" -- and says how well each ranks the
architectures as the references do:

* Spearman's rho with a bootstrap 95% interval (architectures resampled with replacement),
  and a paired bootstrap interval of its difference to the best free baseline;
* the same within the hybrids (layouts with both conv and attention layers), where a
  signal that only detects "has attention" has nothing left to say.

Signals: each proxy stage's seed-0 score; the MAD proxies' mean and best over seeds; their
learning speed on the recall tasks (area under the recall-accuracy curve); the LM proxies'
bits per byte; the free baselines (layout and parameter count, no training); and learned
combinations of those numbers, fitted by ridge regression and judged leave-one-out over
architectures (each prediction is made by a model that never saw that architecture, its
ridge strength chosen by an inner leave-one-out on the others), so only held-out
performance is reported.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The in-context recall tasks of the MAD suite (what an all-conv stack cannot learn).
RECALL_TASKS = ("recall", "noisy_recall", "fuzzy_recall")
#: Proxy stages whose score is a MAD accuracy (higher is better); the rest are LM proxies (bpb).
MAD_STAGES = ("mad", "mad_wide")
LM_STAGES = ("lm", "lm_long")
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0)
BOOTSTRAP = 10_000


# -- rank statistics -------------------------------------------------------------------------

def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their mean rank (works on a batch of rows)."""
    v = np.asarray(values, dtype=float)
    less = (v[..., None, :] < v[..., :, None]).sum(-1)
    equal = (v[..., None, :] == v[..., :, None]).sum(-1)
    return less + (equal - 1) / 2.0


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(-1) / np.where(denominator > 0, denominator, 1.0), np.nan)


def spearman(x, y) -> float:
    """Spearman's rho with average ranks for ties (nan when either side is constant)."""
    return float(_rowwise_pearson(average_ranks(np.asarray(x, float)), average_ranks(np.asarray(y, float))))


def bootstrap_indices(n: int, draws: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """`draws` resamples of n architectures with replacement (one shared set, so that every
    signal is judged on the same resamples and their differences are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap_spearman(x, y, indices: np.ndarray) -> np.ndarray:
    """Spearman of each resample (nan where a resample leaves one side constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return _rowwise_pearson(average_ranks(x[indices]), average_ranks(y[indices]))


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the finite draws (None when fewer than half are finite)."""
    finite = draws[np.isfinite(draws)]
    if len(finite) < len(draws) / 2:
        return None
    tail = (1 - level) / 2 * 100
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


# -- signals from the rows --------------------------------------------------------------------

def attention_layers(layout: str) -> int:
    return sum(op in "AS" for op in layout)  # full and sliding-window attention


def is_hybrid(layout: str) -> bool:
    """Both kinds of operator: some attention and some conv."""
    return 0 < attention_layers(layout) < len(layout)


def recall_auc(curve: list) -> float | None:
    """Learning speed on recall: the mean recall-task accuracy averaged over the training
    curve (trapezoids over steps, divided by the steps covered), from the rows' MAD curves
    ([step, score, task_accuracy]). High when recall is learned early, not just at the end."""
    points = [(step, float(np.mean([acc[t] for t in RECALL_TASKS if t in acc]))) for step, _, acc in curve
              if isinstance(acc, dict) and any(t in acc for t in RECALL_TASKS)]
    if len(points) < 2:
        return None
    steps, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points])
    if steps[-1] <= steps[0]:
        return None
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def _proxy_value(row: dict) -> float:
    return row["score"] if row["stage"] in MAD_STAGES else -row["bpb"]


def proxy_rows(rows: list[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """{stage: {architecture: {seed: row}}} of the finished proxy rows."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for row in rows:
        if row.get("ok") and row.get("stage") in MAD_STAGES + LM_STAGES:
            out.setdefault(row["stage"], {}).setdefault(row["arch"], {})[row.get("seed", 0)] = row
    return out


def signals(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{signal name: {architecture: value}}, higher = predicted better. Only architectures
    that have the signal appear in its dict."""
    out: dict[str, dict[str, float]] = {}
    for stage, by_arch in proxy_rows(rows).items():
        out[f"{stage} (seed 0)"] = {arch: _proxy_value(seeds[0]) for arch, seeds in by_arch.items() if 0 in seeds}
        several = {arch: seeds for arch, seeds in by_arch.items() if len(seeds) >= 2}
        if len(several) >= 5:  # judged over the architectures with >= 2 seeds (its n says how many)
            out[f"{stage}, mean over seeds"] = {arch: float(np.mean([_proxy_value(r) for r in seeds.values()])) for arch, seeds in several.items()}
            if stage in MAD_STAGES:  # a MAD score is bimodal over seeds (recall learned or not): the best of them is a signal of its own
                out[f"{stage}, best of seeds"] = {arch: float(max(_proxy_value(r) for r in seeds.values())) for arch, seeds in several.items()}
        if stage in MAD_STAGES:
            raw_aucs = {arch: recall_auc(seeds[0].get("curve", [])) for arch, seeds in by_arch.items() if 0 in seeds}
            aucs = {arch: value for arch, value in raw_aucs.items() if value is not None}
            if aucs:
                out[f"{stage} recall AUC (seed 0)"] = aucs
    return out


def baselines(layouts: dict[str, str], params: dict[str, float]) -> dict[str, dict[str, float]]:
    """The free signals: the layout and the parameter count alone, no training."""
    return {
        "number of attention layers": {a: float(attention_layers(layout)) for a, layout in layouts.items()},
        "has any attention layer": {a: float(attention_layers(layout) > 0) for a, layout in layouts.items()},
        "proxy parameter count": {a: float(params[a]) for a in layouts if a in params},
    }


# -- learned combinations ---------------------------------------------------------------------

def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float):
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    y_mean = y.mean()
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y_mean))
    return lambda q: ((q - mean) / scale) @ w + y_mean


def _loo_errors(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        errors.append(float(_ridge_fit(x[keep], y[keep], alpha)(x[i : i + 1])[0] - y[i]) ** 2)
    return float(np.mean(errors))


def loo_ridge_predictions(x, y, alphas=RIDGE_ALPHAS) -> tuple[np.ndarray, list[float]]:
    """Held-out predictions: for each architecture, a ridge regression fitted on the others
    (standardised features, strength chosen by leave-one-out within those others) predicts
    it. Returns the predictions and the chosen strength of each fold."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    predictions, chosen = np.empty(len(y)), []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        alpha = min(alphas, key=lambda a: _loo_errors(x[keep], y[keep], a))
        predictions[i] = _ridge_fit(x[keep], y[keep], alpha)(x[i : i + 1])[0]
        chosen.append(alpha)
    return predictions, chosen


def features(rows: list[dict], layouts: dict[str, str], params: dict[str, float]) -> dict[str, dict[str, list[float]]]:
    """{feature set: {architecture: feature vector}} for the learned combinations; an
    architecture missing any feature of a set is left out of that set."""
    free = {a: [float(attention_layers(layout)), float(attention_layers(layout) > 0), attention_layers(layout) / len(layout), float(len(layout)), math.log(params[a])]
            for a, layout in layouts.items() if a in params}
    by_stage = proxy_rows(rows)
    cheap: dict[str, list[float]] = {}
    for arch, base in free.items():
        mad = by_stage.get("mad", {}).get(arch, {}).get(0)
        wide = by_stage.get("mad_wide", {}).get(arch, {}).get(0)
        lm_long = by_stage.get("lm_long", {}).get(arch, {}).get(0)
        lm = by_stage.get("lm", {}).get(arch, {}).get(0)
        if not (mad and wide and lm_long and lm):
            continue
        tasks = sorted(mad["task_accuracy"])
        curve = [point[1] for point in lm_long.get("curve", []) if point[1] is not None]
        if len(curve) < 3:
            continue
        lm_points = [curve[0], curve[len(curve) // 2], curve[-1]]  # validation bpb early, midway and at the end
        auc = recall_auc(wide.get("curve", []))
        cheap[arch] = base + [mad["task_accuracy"][t] for t in tasks] + [wide["score"], auc if auc is not None else wide["score"]] + [-lm["bpb"]] + [-v for v in lm_points]
    # the cheapest trained combination: the free features and one trained proxy, the long LM
    # proxy, at three points of its curve averaged over its seeds (defined after the 23-architecture
    # run, which gave the long LM proxy 3 seeds; BENCHMARKS.md says so)
    free_lm: dict[str, list[float]] = {}
    for arch, base in free.items():
        seeds = by_stage.get("lm_long", {}).get(arch, {})
        curves = [[point[1] for point in row.get("curve", []) if point[1] is not None] for row in seeds.values()]
        curves = [c for c in curves if len(c) >= 3]
        if curves:
            free_lm[arch] = base + [-float(np.mean([c[i] for c in curves])) for i in (0, len(curves[0]) // 2, -1)]
    return {"free features (layout, parameters)": free, "all cheap signals (free + MAD tasks + wide MAD + LM at several points)": cheap,
            "free features + long LM proxy (3 points, mean over seeds)": free_lm}


# -- judging ----------------------------------------------------------------------------------

def judge(candidates: dict[str, dict[str, float]], reference_bpb: dict[str, float], layouts: dict[str, str],
          best_of: list[str], draws: int = BOOTSTRAP, seed: int = 0) -> dict[str, dict]:
    """For each signal: Spearman against -reference bpb with a bootstrap 95% interval over the
    architectures both have, the same within the hybrids, and -- on the architectures every
    one of `best_of` (the baselines) has -- a paired bootstrap interval of its difference to
    the best of them by point estimate."""
    out: dict[str, dict] = {}
    for name, values in candidates.items():
        archs = sorted(a for a in values if a in reference_bpb)
        if len(archs) < 3:
            continue
        x, y = [values[a] for a in archs], [-reference_bpb[a] for a in archs]
        idx = bootstrap_indices(len(archs), draws, seed)
        entry: dict[str, Any] = {"n": len(archs), "spearman": spearman(x, y), "ci95": interval(bootstrap_spearman(x, y, idx))}
        hybrids = [a for a in archs if is_hybrid(layouts[a])]
        if len(hybrids) >= 3:
            hx, hy = [values[a] for a in hybrids], [-reference_bpb[a] for a in hybrids]
            entry.update(n_hybrids=len(hybrids), spearman_hybrids=spearman(hx, hy),
                         ci95_hybrids=interval(bootstrap_spearman(hx, hy, bootstrap_indices(len(hybrids), draws, seed))))
        out[name] = entry
    baseline_names = [b for b in best_of if b in out and np.isfinite(out[b]["spearman"])]
    if baseline_names:
        best = max(baseline_names, key=lambda b: out[b]["spearman"])
        for name, entry in out.items():
            archs = sorted(a for a in candidates[name] if a in reference_bpb and a in candidates[best])
            if name == best or len(archs) < 3:
                continue
            idx = bootstrap_indices(len(archs), draws, seed)
            y = [-reference_bpb[a] for a in archs]
            same = [candidates[best][a] for a in archs]  # the baseline on the architectures this signal has
            diff = bootstrap_spearman([candidates[name][a] for a in archs], y, idx) - bootstrap_spearman(same, y, idx)
            # strict: the interval must clear the baseline's estimate over all architectures and over the same ones
            bar = max(out[best]["spearman"], spearman(same, y))
            entry["versus_best_baseline"] = {"baseline": best, "baseline_spearman": out[best]["spearman"], "baseline_spearman_same_archs": spearman(same, y),
                                             "difference_ci95": interval(diff), "beats_it": bool(entry["ci95"] is not None and entry["ci95"][0] > bar)}
    return out


def evaluate(rows: list[dict], reference_bpb: dict[str, float], layouts: dict[str, str], params: dict[str, float],
             draws: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Every signal judged (see `judge`), the learned combinations by their held-out
    predictions, and which signal (if any) beats the best baseline: its interval's lower end
    above that baseline's point estimate."""
    free = baselines(layouts, params)
    candidates = {**signals(rows)}
    combos = {}
    for name, table in features(rows, layouts, params).items():
        archs = sorted(a for a in table if a in reference_bpb)
        if len(archs) < 5:
            continue
        predictions, alphas = loo_ridge_predictions([table[a] for a in archs], [-reference_bpb[a] for a in archs])
        candidates[f"learned combination, held out: {name}"] = dict(zip(archs, map(float, predictions)))
        combos[name] = {"n": len(archs), "n_features": len(next(iter(table.values()))), "ridge_alphas_chosen": sorted(set(alphas))}
    judged = judge({**free, **candidates}, reference_bpb, layouts, best_of=list(free), draws=draws, seed=seed)
    winners = [name for name, e in judged.items() if name not in free and e.get("versus_best_baseline", {}).get("beats_it")]
    return {"signals": judged, "baseline_names": list(free), "combinations": combos, "winners": winners, "bootstrap_draws": draws}


__all__ = ["spearman", "average_ranks", "bootstrap_spearman", "interval", "recall_auc", "signals", "baselines", "features",
           "loo_ridge_predictions", "judge", "evaluate", "is_hybrid", "attention_layers", "RECALL_TASKS"]
