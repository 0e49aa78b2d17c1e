"""Fidelity of the quality proxies: do they rank architectures as a longer training does?

For each architecture -- the LFM2-350M layout, the same stack all-conv, its all-attention
twin, and seeded random points of an LFM2-like space -- this runs

* the MAD proxy   (`nas.quality.score(spec, "mad", settings)`),
* the LM proxy    (`nas.quality.score(spec, "lm", settings)`), and
* the reference: the same proxy-width byte-level model trained on the same corpus at one
  fixed learning rate (`--reference-lr`) for `--reference-factor` (20) times as many tokens
  as the costlier proxy trains on (all learning rates counted; `--reference-of lm`: as the
  LM proxy trains on), in batches of `--reference-batch` windows; its validation bits per
  byte is the "true" quality (20x the costlier proxy is ~30 passes over a stdlib-sized
  corpus and over-fits: BENCHMARKS.md shows the curves),

and, as candidate quality signals (`--stages`), the MAD proxy at twice the width
(`mad_wide`: head_dim 16 under `default()`) and the LM proxy at the MAD proxy's token budget
on the reference's corpus (`lm_long`), see `stage_settings`;

then reports Spearman's rank correlation between each proxy score and minus the
reference's validation loss (so +1 means the proxy orders architectures exactly as the
long run does), with the raw pairs.

Jobs run in `--workers` processes on one device (small models leave a GPU mostly idle
between kernel launches, so several processes share it well), of which `--long-workers`
run the long reference jobs and the rest the proxies: a reference shared many ways would
finish late or not at all, so only a few run at once while the short jobs fill the gaps.
Every finished job is appended to `<out>/fidelity.jsonl` at once, so a run cut short keeps
what it finished and `--resume` continues it (in another session, too).

`--import-from DIR` copies an earlier run's finished rows (its references, say) into this run
when their recipe matches, so that 20 architectures need only the new ones' references.
A run with candidate stages is judged by `bench/experiments/fidelity_signals.py`: every signal (and the
free baselines, and learned combinations held out architecture by architecture) with a
bootstrap 95% interval, within the hybrids too.

`--seed-repeats N` scores the proxies of the first `--repeat-archs` architectures again with
seeds 1..N: their spread is the proxies' noise floor, to hold against the spread between
architectures before trusting a ranking.

    # the real run (one H200: the 12 references side by side take ~23 min, the proxies as much
    # again; --resume continues a run cut short, --summarise-only rebuilds its reports):
    python -m bench.experiments.quality_fidelity --device cuda --workers 16 --long-workers 12 --threads 1 --archs 12 --compile --reference-corpus python-sources --out bench_out
    # the candidate signals over 20 architectures, the first 12's references imported (BENCHMARKS.md):
    python -m bench.experiments.quality_fidelity --device cuda --archs 20 --stages long,mad_wide,lm_long,mad,lm --workers 17 --long-workers 8 --threads 1 --compile --reference-corpus python-sources --import-from bench/results/fidelity_ref307 --import-stages long,mad,lm --deadline-s 1150 --stop-s 1440 --out bench_out
    # a smoke run on a CPU (a few minutes; numbers meaningless):
    python -m bench.experiments.quality_fidelity --device cpu --settings cpu_small --archs 3 --reference-factor 2 --steps-scale 0.1 --workers 1 --timing --out /tmp/fid
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.experiments import fidelity_signals
from lfm2.corpus import CORPORA
from lfm2.presets import presets
from lfm2.spec import ArchSpec

LONG_RUN_LR = 2e-3  # the default rate of every reference run: between the two the default sweep tries
REFERENCE_OF = {"costlier": "costlier proxy", "lm": "LM proxy"}  # --reference-of: whose tokens the factor multiplies
INVOCATION_FACTS = ("date", "machine", "torch", "python", "workers", "compile")  # what may differ between the invocations of one --resume'd run
REFERENCE_EVALS = 8  # validation (and train-window) bpb measured this many times along a reference run


def random_arch(rng: np.random.Generator) -> ArchSpec:
    """A seeded random point of an LFM2-like space (depth, width, FFN ratio, GQA ratio,
    number and placement of attention layers, some sliding-window, conv kernel)."""
    n_layers = int(rng.choice([8, 10, 12, 16]))
    d_model = int(rng.choice([768, 1024, 1536]))
    n_heads = d_model // 64
    n_kv_heads = int(rng.choice([k for k in (2, 4, 8) if n_heads % k == 0]))
    ffn_dim = int(round(d_model * float(rng.choice([3.0, 4.5, 6.0])) / 256) * 256)
    n_attention = int(rng.integers(0, n_layers // 2 + 1))
    at = set(rng.choice(n_layers, size=n_attention, replace=False).tolist())
    swa = rng.random() < 0.3
    layers = tuple(("swa" if swa and rng.random() < 0.5 else "attn") if i in at else "conv" for i in range(n_layers))
    window = int(rng.choice([32, 64])) if "swa" in layers else 0
    return ArchSpec(vocab_size=65_536, d_model=d_model, layers=layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=64,
                    ffn_dim=ffn_dim, conv_kernel=int(rng.choice([3, 3, 4, 5])), swa_window=window)


def architectures(count: int, seed: int = 0) -> list[tuple[str, ArchSpec]]:
    base = presets["LFM2-350M"]
    archs = [("LFM2-350M", base), ("all-conv-16", base.replace(layers=("conv",) * 16)), ("all-attn-16", presets["LFM2-350M-attn"])]
    rng = np.random.default_rng(seed)
    seen = {spec.key for _, spec in archs}
    while len(archs) < count:
        spec = random_arch(rng)
        if spec.key not in seen:
            seen.add(spec.key)
            archs.append((f"random-{len(archs) - 2:02d}", spec))
    return archs[:count]


def _ranks(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    order = v.argsort(kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # average ranks for ties
        tie = v == value
        r[tie] = r[tie].mean()
    return r


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_p_value(x: list[float], y: list[float], permutations: int = 20_000, seed: int = 0) -> float:
    """Two-sided permutation p-value of `spearman(x, y)`: the share of random pairings of the
    same values whose |rho| is at least as large (12 pairs are too few for the t approximation).
    Ranking commutes with shuffling, so the ranks are shuffled, all pairings at once."""
    observed = abs(spearman(x, y))
    if not np.isfinite(observed):
        return float("nan")
    zx, zy = (_ranks(v) for v in (x, y))
    zx, zy = (zx - zx.mean()) / zx.std(), (zy - zy.mean()) / zy.std()
    shuffled = np.random.default_rng(seed).permuted(np.tile(zy, (permutations, 1)), axis=1)
    rho = shuffled @ zx / len(zx)  # Pearson of standardised ranks: Spearman of each pairing
    hits = int(np.count_nonzero(np.abs(rho) >= observed - 1e-12))
    return (hits + 1) / (permutations + 1)


def _settings(name: str, steps_scale: float = 1.0):
    from nas.quality import QualitySettings

    settings = QualitySettings.named(name)
    if steps_scale != 1.0:  # smoke runs only: the numbers then mean nothing
        settings = settings.replace(name=f"{name}*{steps_scale}", mad_steps=max(2, round(settings.mad_steps * steps_scale)),
                                    lm_steps=max(2, round(settings.lm_steps * steps_scale)), eval_every=max(1, round(settings.eval_every * steps_scale)))
    return settings


def proxy_tokens(settings) -> dict[str, int]:
    """Tokens each proxy trains on, over all learning rates of its sweep (what the reference is
    measured against: a reference "20x longer" sees 20x the tokens of the costlier proxy)."""
    from nas.quality.training import steps_over_all_rates

    def total_steps(steps: int) -> int:
        return steps_over_all_rates(steps, len(settings.learning_rates), settings.sweep_fraction)

    n_tasks = len(settings.tasks)
    mad_per_step = (settings.mad_batch_size // n_tasks) * n_tasks * settings.task_config.seq_len
    return {"mad": total_steps(settings.mad_steps) * mad_per_step, "lm": total_steps(settings.lm_steps) * settings.lm_batch_size * settings.lm_seq_len}


PROXY_STAGES = ("mad", "lm", "mad_wide", "lm_long")  # every stage but the reference ("long")
STAGE_KIND = {"mad": "mad", "lm": "lm", "mad_wide": "mad", "lm_long": "lm"}


def stage_settings(stage: str, settings, corpus: str | None = None):
    """The settings of a proxy stage, derived from the base `settings`:

    * `mad`, `lm`: the base settings (the search's proxies as they are);
    * `mad_wide`: the MAD proxy at twice the width (1/4 of the candidate's under `default()`,
      so head_dim 16 instead of 8: at head_dim 8 all-attention stacks never learned recall),
      evaluated twice as often (its curve gives the learning speed);
    * `lm_long`: the LM proxy at the largest budget that still keeps the reference at its
      factor: as many tokens over its whole learning-rate sweep as the MAD proxy trains on,
      on `corpus` (the reference's own, so the proxy is a short copy of the reference run).
    """
    from nas.quality.training import steps_over_all_rates

    if stage in ("mad", "lm"):
        return settings
    if stage == "mad_wide":
        return settings.replace(name=f"{settings.name}-wide", width_factor=min(1.0, 2 * settings.width_factor), eval_every=max(1, settings.eval_every // 2))
    if stage == "lm_long":
        budget = proxy_tokens(settings)["mad"]
        per_step = settings.lm_batch_size * settings.lm_seq_len
        steps = settings.lm_steps
        while steps_over_all_rates(steps + 1, len(settings.learning_rates), settings.sweep_fraction) * per_step <= budget:
            steps += 1
        return settings.replace(name=f"{settings.name}-lm-long", lm_steps=steps, eval_every=max(1, -(-steps // REFERENCE_EVALS)), lm_corpus=corpus or settings.lm_corpus)
    raise ValueError(f"unknown stage {stage!r}; one of long, {', '.join(PROXY_STAGES)}")


def reference_settings(settings, factor: float, batch_rows: int, lr: float = LONG_RUN_LR, of: str = "costlier", corpus: str | None = None):
    """The reference run: the LM task at one learning rate, `factor` x the tokens of the costlier
    proxy (`of="costlier"`) or of the LM proxy (`of="lm"`, the run the reference is a longer
    copy of: a 20x-the-costlier run over-fits a stdlib-sized corpus, see BENCHMARKS.md), on
    `corpus` (default: the proxies' own; "python-sources" has ~10x the stdlib's text)."""
    tokens = factor * (max(proxy_tokens(settings).values()) if of == "costlier" else proxy_tokens(settings)[of])
    steps = max(1, int(np.ceil(tokens / (batch_rows * settings.lm_seq_len))))
    # evaluated at 8 points along the way: a reference whose validation loss turns up again
    # (many epochs over a small corpus) shows it in its curve
    return settings.replace(name=f"{settings.name}-reference{factor:g}x", lm_steps=steps, lm_batch_size=batch_rows, learning_rates=(lr,),
                            eval_every=max(1, -(-steps // REFERENCE_EVALS)), lm_eval_windows=max(settings.lm_eval_windows, 1024),
                            lm_corpus=corpus or settings.lm_corpus)


def run_job(job: dict) -> dict:
    """One (architecture, stage) job; runs in a worker process."""
    import torch

    from nas.quality import score

    torch.set_num_threads(job["threads"])
    if job.get("compile"):
        # a worker runs several jobs: graphs compiled for earlier proxies count against dynamo's
        # recompile limit (8 per function), past which Block.forward silently runs eagerly --
        # slower, and rounded differently from the jobs that were compiled (seen on the H200)
        torch._dynamo.reset()
    from nas.quality import QualitySettings

    spec = ArchSpec.from_dict(job["spec"])
    if job["stage"] == "long":  # the reference's settings, as main() derived them once
        settings, kind = QualitySettings.from_dict(job["reference"]), "lm"
    elif job.get("proxy_settings"):  # a proxy stage's settings, as main() derived them once
        settings, kind = QualitySettings.from_dict(job["proxy_settings"]), STAGE_KIND[job["stage"]]
    else:
        settings, kind = _settings(job["settings"], job.get("steps_scale", 1.0)), job["stage"]
    if job.get("start_before") is not None and time.time() > job["start_before"]:
        return {**_job_facts(job), "ok": False, "skipped": True}  # past the deadline: not started, not logged
    started = time.perf_counter()
    report = None
    if job["stage"] == "long":  # a reference runs for many minutes: say how far it got at each evaluation
        def report(step: int, value: float) -> None:
            print(f"  {job['arch']:12s} long seed {job.get('seed', 0)}: step {step}/{settings.lm_steps} validation bpb {-value:.4f} "
                  f"after {time.perf_counter() - started:.0f} s", flush=True)
    try:
        result = score(spec, kind, device=job["device"], settings=settings, seed=job.get("seed", 0), report=report, compile=job.get("compile", False))
    except Exception as exc:  # a failed job is a row, not a crashed benchmark
        return {**_job_facts(job), "ok": False, "error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - started}
    d = result.detail
    row = {**_job_facts(job), "ok": True, "score": result.score, "wall_s": d["wall_s"], "steps": d["steps"], "steps_trained": d["steps_trained"],
           "tokens": d["tokens"], "lr": d["lr"], "proxy_parameters": d["proxy_parameters"], "device_name": d["device"]}
    if kind == "lm":
        row["bpb"] = d["bpb"]
        row["train_bpb"] = d["train_bpb"]
        row["corpus"] = d["corpus"]["fingerprint"]
        row["epochs"] = d["tokens"] / d["corpus"]["train_bytes"]  # passes over the train split
        row["curve"] = [[step, c.get("bpb"), c.get("train_bpb")] for (step, _), c in zip(d["curve"], d["curve_details"])]
    else:
        row["task_accuracy"] = d["task_accuracy"]
        # the accuracies along the way (after the sweep, then every eval_every steps): learning speed
        row["curve"] = [[step, value, c.get("task_accuracy")] for (step, value), c in zip(d["curve"], d["curve_details"])]
    return row


def _job_facts(job: dict) -> dict:
    spec = ArchSpec.from_dict(job["spec"])
    return {"arch": job["arch"], "stage": job["stage"], "seed": job.get("seed", 0), "layout": spec.layout, "spec_key": spec.key}


def job_key(row_or_job: dict) -> tuple:
    spec_key = row_or_job.get("spec_key") or ArchSpec.from_dict(row_or_job["spec"]).key
    return row_or_job["arch"], row_or_job["stage"], row_or_job.get("seed", 0), spec_key


def proxy_scores_by_seed(rows: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """{stage: {architecture: {seed: value}}} of the finished proxy rows (`mad`: mean task
    accuracy, `lm`: bits per byte)."""
    scores: dict[str, dict[str, dict[int, float]]] = {}
    for row in rows:
        if row.get("ok") and row["stage"] in PROXY_STAGES:
            value = row["score"] if STAGE_KIND[row["stage"]] == "mad" else row["bpb"]
            scores.setdefault(row["stage"], {}).setdefault(row["arch"], {})[row.get("seed", 0)] = value
    return scores


def seed_noise(rows: list[dict]) -> dict:
    """Per architecture scored under several seeds: each proxy's scores, their spread, and the
    spread between architectures (seed 0) to hold it against."""
    out: dict[str, dict] = {}
    for stage, by_arch in proxy_scores_by_seed(rows).items():
        repeated = {arch: values for arch, values in by_arch.items() if len(values) > 1}
        if not repeated:
            continue
        first = [values[0] for values in by_arch.values() if 0 in values]
        per_arch = {arch: {"scores": [values[k] for k in sorted(values)], "std": float(np.std(list(values.values()), ddof=1)),
                           "range": float(max(values.values()) - min(values.values()))} for arch, values in repeated.items()}
        out[stage] = {
            "per_arch": per_arch,
            "median_seed_std": float(np.median([entry["std"] for entry in per_arch.values()])),
            "between_arch_std": float(np.std(first, ddof=1)) if len(first) > 1 else None,
            "n_archs": len(first),
        }
    return out


def summarise(rows: list[dict]) -> dict:
    by_arch: dict[str, dict] = {}
    for row in rows:
        if row.get("ok") and row.get("seed", 0) == 0:  # the ranking uses seed 0; other seeds measure noise
            by_arch.setdefault(row["arch"], {"layout": row["layout"]})[row["stage"]] = row
    pairs = []  # every architecture with a score; those without a finished reference are listed, not ranked
    for arch, stages in by_arch.items():
        long = stages.get("long", {})
        valid = [point[1] for point in long.get("curve", []) if point[1] is not None]
        some = long or next(stages[stage] for stage in PROXY_STAGES if stage in stages)
        pairs.append({
            "arch": arch, "layout": stages["layout"], "long_bpb": long.get("bpb"),
            "long_min_bpb": min(valid) if valid else None, "long_train_bpb": long.get("train_bpb"), "long_epochs": long.get("epochs"),
            "mad": stages["mad"]["score"] if "mad" in stages else None,
            "lm_bpb": stages["lm"]["bpb"] if "lm" in stages else None,
            "mad_wide": stages["mad_wide"]["score"] if "mad_wide" in stages else None,
            "lm_long_bpb": stages["lm_long"]["bpb"] if "lm_long" in stages else None,
            "params": some["proxy_parameters"],
        })
    out: dict[str, Any] = {"pairs": pairs}
    for proxy in ("mad", "lm_bpb"):
        usable = [p for p in pairs if p[proxy] is not None and p["long_bpb"] is not None]
        if len(usable) >= 3:
            proxy_score = [p[proxy] if proxy == "mad" else -p[proxy] for p in usable]
            out[f"spearman_{proxy}"] = spearman(proxy_score, [-p["long_bpb"] for p in usable])
            out[f"spearman_p_{proxy}"] = spearman_p_value(proxy_score, [-p["long_bpb"] for p in usable])
            out[f"n_{proxy}"] = len(usable)
            if all(p["long_min_bpb"] is not None for p in usable):  # the early-stopped reference: its best validation point
                out[f"spearman_min_{proxy}"] = spearman(proxy_score, [-p["long_min_bpb"] for p in usable])
    out.update(seed_mean_ranking(rows, {p["arch"]: p["long_bpb"] for p in pairs if p["long_bpb"] is not None}))
    # free baselines a proxy has to beat to be worth its GPU time (the layout alone, no training)
    ranked = [p for p in pairs if p["long_bpb"] is not None]
    if len(ranked) >= 3:
        reference = [-p["long_bpb"] for p in ranked]
        out["baselines"] = {name: spearman([feature(p) for p in ranked], reference) for name, feature in BASELINES.items()}
        out["baselines_p"] = {name: spearman_p_value([feature(p) for p in ranked], reference) for name, feature in BASELINES.items()}
    out["seed_noise"] = seed_noise(rows)
    if any(row.get("stage") in ("mad_wide", "lm_long") for row in rows):  # a run of the candidate signals: judge them all side by side
        out["signals"] = fidelity_signals.evaluate(rows, {p["arch"]: p["long_bpb"] for p in ranked}, {p["arch"]: p["layout"] for p in pairs},
                                                   {p["arch"]: p["params"] for p in pairs})
        out["reference_corpora"] = sorted({row["corpus"] for row in rows if row.get("ok") and row.get("stage") == "long" and row.get("corpus")})
        out["stage_cost"] = stage_cost(rows)
    imported: dict[str, dict[str, int]] = {}
    for row in rows:
        if row.get("imported_from"):
            by_stage = imported.setdefault(row["imported_from"], {})
            by_stage[row["stage"]] = by_stage.get(row["stage"], 0) + 1
    if imported:
        out["imported"] = imported
    return out


def stage_cost(rows: list[dict]) -> dict[str, dict]:
    """Per stage, what one job cost in this run: the median wall time of this session's rows
    (several processes sharing one device, so an upper bound of the time alone) and the
    steps over all learning rates."""
    out: dict[str, dict] = {}
    for stage in ("long", *PROXY_STAGES):
        done = [row for row in rows if row.get("ok") and row["stage"] == stage and not row.get("imported_from")]
        if done:
            out[stage] = {"n": len(done), "median_wall_s": float(np.median([row["wall_s"] for row in done])),
                          "max_wall_s": float(max(row["wall_s"] for row in done)), "steps_trained": int(np.median([row["steps_trained"] for row in done]))}
    return out


def signals_markdown(summary: dict) -> list[str]:
    """The candidate signals side by side: Spearman with its bootstrap interval, within the
    hybrids, and the paired difference to the best free baseline."""
    judged = summary["signals"]
    baselines = set(judged.get("baseline_names", []))
    lines = ["", f"Candidate signals against -reference bpb (bootstrap 95% intervals over architectures, {judged['bootstrap_draws']:,} resamples; "
             "*italics*: free baselines, no training; learned combinations: leave-one-out predictions, never fitted on the architecture they rank):", "",
             "| signal | n | Spearman | 95% CI | within hybrids: n | Spearman | 95% CI | best baseline on the same n | minus best baseline: 95% CI |",
             "|---|---:|---:|---|---:|---:|---|---:|---|"]

    def ci(value) -> str:
        return "-" if value is None else f"[{value[0]:+.2f}, {value[1]:+.2f}]"

    def rho(value) -> str:
        return "-" if value is None or not np.isfinite(value) else f"{value:+.3f}"

    for name, e in judged["signals"].items():
        label = f"*{name}*" if name in baselines else name
        versus = e.get("versus_best_baseline")
        lines.append(f"| {label} | {e['n']} | {rho(e['spearman'])} | {ci(e['ci95'])} | {e.get('n_hybrids', '-')} | {rho(e.get('spearman_hybrids'))} | "
                     f"{ci(e.get('ci95_hybrids'))} | {rho(versus['baseline_spearman_same_archs']) if versus else '-'} | {ci(versus['difference_ci95']) if versus else '-'} |")
    best = next((e["versus_best_baseline"] for e in judged["signals"].values() if e.get("versus_best_baseline")), None)
    if best:
        lines.append("")
        lines.append(f"Best free baseline: {best['baseline']} ({best['baseline_spearman']:+.3f}). "
                     + (f"Signals whose interval lies above it: {', '.join(judged['winners'])}." if judged["winners"]
                        else "No signal's interval lies above it: nothing here ranks clearly better than the best free baseline."))
    for name, c in judged.get("combinations", {}).items():
        lines.append(f"- learned combination `{name}`: {c['n_features']} features over {c['n']} architectures; ridge strengths chosen {c['ridge_alphas_chosen']}")
    if len(summary.get("reference_corpora", [])) > 1:
        lines.append(f"- WARNING: the references were trained on corpora with different fingerprints {summary['reference_corpora']}")
    for stage, c in summary.get("stage_cost", {}).items():
        lines.append(f"- cost of `{stage}` in this run: median {c['median_wall_s']:.0f} s (max {c['max_wall_s']:.0f} s) per job over {c['n']} jobs, "
                     f"{c['steps_trained']} steps over all learning rates, with the other jobs sharing the device")
    return lines


def seed_mean_ranking(rows: list[dict], reference_bpb: dict[str, float]) -> dict:
    """Spearman of each proxy's mean over every seed it was scored with (where some
    architecture has more than one) against the reference: what ranking by the mean of a few
    seeds would buy over one seed."""
    out: dict = {}
    scores = proxy_scores_by_seed(rows)
    for stage, proxy, sign in (("mad", "mad", 1.0), ("lm", "lm_bpb", -1.0)):  # higher is better: minus bpb
        values = {arch: by_seed for arch, by_seed in scores.get(stage, {}).items() if arch in reference_bpb}
        counts = [len(v) for v in values.values()]
        if len(values) < 3 or max(counts) < 2:
            continue
        archs = sorted(values)
        means = [sign * float(np.mean(list(values[arch].values()))) for arch in archs]
        reference = [-reference_bpb[arch] for arch in archs]
        out[f"spearman_seed_mean_{proxy}"] = spearman(means, reference)
        out[f"spearman_p_seed_mean_{proxy}"] = spearman_p_value(means, reference)
        out[f"seeds_{proxy}"] = [min(counts), max(counts)]
        out[f"n_seed_mean_{proxy}"] = len(archs)
    return out


def _attention_layers(layout: str) -> int:
    return sum(op in "AS" for op in layout)  # full and sliding-window attention


BASELINES = {
    "number of attention layers": lambda p: _attention_layers(p["layout"]),
    "has any attention layer": lambda p: float(_attention_layers(p["layout"]) > 0),
    "proxy parameter count": lambda p: p["params"],
}


def markdown(summary: dict, facts: dict, timing: dict | None) -> str:
    lines = [f"Run {facts['date']} on {facts['machine']}; torch {facts['torch']}, Python {facts['python']}; settings `{facts['settings']}`"
             + (f" with every step count x{facts['steps_scale']}" if facts.get("steps_scale", 1.0) != 1.0 else "") + ", "
             f"reference run {facts['reference_factor']:g}x the {REFERENCE_OF[facts.get('reference_of', 'costlier')]}'s tokens ({facts['reference_tokens'] / 1e6:.1f} M tokens: {facts['reference_steps']} steps of "
             f"{facts['reference_batch']} x {facts['lm_seq_len']} bytes of the {facts.get('reference_corpus', 'stdlib')} corpus) at lr {facts.get('reference_lr', LONG_RUN_LR):g}; proxies' tokens: {facts['proxy_tokens']}; "
             f"{facts['workers']} worker processes sharing the device"
             + "".join(f"; earlier invocation: {e.get('date')}, {e.get('machine')}, {e.get('workers')} workers" for e in facts.get("earlier", [])) + ".", ""]
    for source, counts in summary.get("imported", {}).items():
        lines += [f"Rows imported from the earlier run `{source}` (same recipe): {', '.join(f'{n} {stage}' for stage, n in counts.items())}.", ""]
    if timing:
        lines += ["Time per candidate (one process alone on the device, `score(LFM2-350M, kind, settings)`):", ""]
        for kind, t in timing.items():
            lines.append(f"- `{kind}`: {t['wall_s']:.1f} s ({t['steps_trained']} steps over all learning rates, {t['tokens'] / 1e6:.1f} M tokens for the chosen one)")
        lines.append("")
    for proxy, label in (("mad", "MAD proxy (mean task accuracy)"), ("lm_bpb", "LM proxy (-bits per byte)")):
        if f"spearman_{proxy}" in summary:
            p_value = summary.get(f"spearman_p_{proxy}")
            lowest = summary.get(f"spearman_min_{proxy}")
            lines.append(f"- Spearman({label}, -reference bpb) = **{summary[f'spearman_{proxy}']:+.3f}** over {summary[f'n_{proxy}']} architectures"
                         + (f" (permutation p = {p_value:.3f})" if p_value is not None else "")
                         + (f"; against the lowest validation bpb along the run {lowest:+.3f}" if lowest is not None else ""))
        if f"spearman_seed_mean_{proxy}" in summary:
            low, high = summary[f"seeds_{proxy}"]
            lines.append(f"  - ranked by the mean over {low if low == high else f'{low}-{high}'} seeds per architecture: **{summary[f'spearman_seed_mean_{proxy}']:+.3f}** "
                         f"over {summary[f'n_seed_mean_{proxy}']} (permutation p = {summary[f'spearman_p_seed_mean_{proxy}']:.3f})")
    for name, rho in (summary.get("baselines") or {}).items():
        p_value = (summary.get("baselines_p") or {}).get(name)
        lines.append(f"- baseline, {name}: Spearman {rho:+.3f}" + (f" (permutation p = {p_value:.3f})" if p_value is not None else "")
                     + "; no training: a proxy should beat this")
    if summary.get("signals"):
        lines += signals_markdown(summary)
    candidates = bool(summary.get("signals"))  # a run of the candidate signals: their columns too
    lines += ["", "| architecture | layout | proxy params | MAD score | LM proxy bpb | " + ("wide MAD score | long LM proxy bpb | " if candidates else "")
              + "reference bpb | lowest along the run | train windows |", "|---|---|---:|---:|---:|" + ("---:|---:|" if candidates else "") + "---:|---:|---:|"]

    def cell(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for p in sorted(summary["pairs"], key=lambda p: (p["long_bpb"] is None, p["long_bpb"] or 0.0)):  # unfinished references last
        lines.append(f"| {p['arch']} | `{p['layout']}` | {p['params']:,} | {cell(p['mad'])} | {cell(p['lm_bpb'])} | "
                     + (f"{cell(p.get('mad_wide'))} | {cell(p.get('lm_long_bpb'))} | " if candidates else "")
                     + f"{cell(p['long_bpb'])} | {cell(p.get('long_min_bpb'))} | {cell(p.get('long_train_bpb'))} |")
    epochs = [p["long_epochs"] for p in summary["pairs"] if p.get("long_epochs")]
    if epochs:
        lines.append(f"\nEach reference made {max(epochs):.1f} passes over the corpus's train split (validation is other files).")
    noise = summary.get("seed_noise") or {}
    if noise:
        lines += ["", "Seed noise (the same architecture's proxy under seeds 0, 1, ...; std over seeds against the std between architectures at seed 0):", "",
                  "| proxy | architecture | scores by seed | std | range |", "|---|---|---|---:|---:|"]
        for stage, entry in noise.items():
            for arch, e in entry["per_arch"].items():
                lines.append(f"| {stage} | {arch} | {', '.join(f'{v:.3f}' for v in e['scores'])} | {e['std']:.4f} | {e['range']:.4f} |")
        lines.append("")
        for stage, entry in noise.items():
            between = entry["between_arch_std"]
            lines.append(f"- `{stage}`: median std over seeds {entry['median_seed_std']:.4f}; std between {entry['n_archs']} architectures "
                         + (f"{between:.4f} (ratio {between / entry['median_seed_std']:.1f})" if between and entry["median_seed_std"] else "-"))
    return "\n".join(lines) + "\n"


def machine_facts(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({os.cpu_count()} CPU cores)"
    from devices.profiles import cpu_model  # the one reading of the CPU's name

    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.quality_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--settings", default="default", choices=["default", "cpu_small"])
    parser.add_argument("--archs", type=int, default=12)
    parser.add_argument("--arch-seed", type=int, default=0)
    parser.add_argument("--reference-factor", type=float, default=20.0, help="reference tokens / the costlier proxy's tokens")
    parser.add_argument("--reference-of", default="costlier", choices=sorted(REFERENCE_OF), help="whose tokens --reference-factor multiplies: the costlier proxy's or the LM proxy's")
    parser.add_argument("--reference-corpus", default=None, choices=sorted(CORPORA), help="the reference's corpus (default: the proxies' own; python-sources: ~10x the stdlib, so a long reference does not over-fit)")
    parser.add_argument("--reference-lr", type=float, default=LONG_RUN_LR, help="the reference run's one learning rate (peak of its warm-up and cosine)")
    parser.add_argument("--only", default=None, help="comma-separated architecture names of the --archs list to run (default: all)")
    parser.add_argument("--reference-batch", type=int, default=256, help="windows per reference step (large: the GPU is launch-bound at small batches)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each proxy block (faster on a GPU; under bf16 it changes rounding, which moves short MAD scores as a seed would)")
    parser.add_argument("--resume", action="store_true", help="keep the finished jobs of <out>/fidelity.jsonl and run only the rest")
    parser.add_argument("--workers", type=int, default=6, help="processes in all (1: every job in this process, one after another)")
    parser.add_argument("--long-workers", type=int, default=2, help="of --workers, how many run the long reference jobs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    parser.add_argument("--timing", action="store_true", help="first time one candidate per kind, alone on the device")
    parser.add_argument("--stages", default="long,mad,lm")
    parser.add_argument("--seed-repeats", type=int, default=0, help="score the proxies of the first --repeat-archs architectures again with seeds 1..N")
    parser.add_argument("--repeat-archs", default="3", help="how many architectures (the first N) or which (comma-separated names) --seed-repeats repeats")
    parser.add_argument("--repeat-stages", default=None, help="comma-separated proxy stages --seed-repeats repeats (default: every proxy stage of --stages)")
    parser.add_argument("--import-from", default=None, help="an earlier run's --out: copy its finished rows of --import-stages for these architectures into this run "
                        "(only if its reference recipe and settings match), so that they are not run again")
    parser.add_argument("--import-stages", default="long", help="comma-separated stages --import-from copies")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no job after this many seconds")
    parser.add_argument("--long-deadline-s", type=float, default=None, help="start no reference job after this many seconds (default: --deadline-s)")
    parser.add_argument("--stop-s", type=float, default=None, help="drop the jobs still running after this many seconds (default: wait for them)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (smoke runs only)")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--summarise-only", action="store_true", help="run nothing: rewrite <out>/summary.json and fidelity.md from its rows and facts")
    args = parser.parse_args(argv)
    if args.summarise_only:
        return summarise_only(Path(args.out))
    stages = [stage for stage in args.stages.split(",") if stage]
    unknown_stages = [stage for stage in stages if stage not in ("long", *PROXY_STAGES)]
    if unknown_stages:
        parser.error(f"--stages {','.join(unknown_stages)}: not a stage; use long, {', '.join(PROXY_STAGES)}")
    if args.workers > 1 and not 1 <= args.long_workers < args.workers:
        parser.error(f"--long-workers {args.long_workers} must be at least 1 and fewer than --workers {args.workers} (the rest run the proxies)")

    archs = architectures(args.archs, args.arch_seed)
    if args.only:  # checked before anything is written to --out
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in dict(archs)]
        if unknown:
            parser.error(f"--only {', '.join(unknown)}: not among the {args.archs} architectures ({', '.join(name for name, _ in archs)})")
        archs = [(name, spec) for name, spec in archs if name in wanted]

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    facts = {"date": datetime.date.today().isoformat(), "machine": machine_facts(args.device), "torch": torch.__version__, "python": platform.python_version(),
             "settings": args.settings, "workers": args.workers, "archs": args.archs, "arch_seed": args.arch_seed, "steps_scale": args.steps_scale, "compile": args.compile}
    settings = _settings(args.settings, args.steps_scale)
    reference = reference_settings(settings, args.reference_factor, args.reference_batch, args.reference_lr, args.reference_of, args.reference_corpus)
    facts.update(reference_factor=args.reference_factor, reference_batch=args.reference_batch, reference_lr=args.reference_lr, reference_of=args.reference_of, reference_corpus=reference.lm_corpus, reference_steps=reference.lm_steps,
                 reference_tokens=reference.lm_steps * reference.lm_batch_size * reference.lm_seq_len, lm_seq_len=reference.lm_seq_len,
                 proxy_tokens=proxy_tokens(settings), settings_key=settings.key)
    # each proxy stage's settings, derived once here (the jobs carry them); their keys name the recipes
    proxy_settings = {stage: stage_settings(stage, settings, reference.lm_corpus) for stage in PROXY_STAGES}
    extra = [stage for stage in stages if stage in ("mad_wide", "lm_long")]
    if extra:
        facts["stage_settings_keys"] = {stage: proxy_settings[stage].key for stage in extra}
        facts["stage_tokens"] = {stage: proxy_tokens(proxy_settings[stage])[STAGE_KIND[stage]] for stage in extra}
    if args.resume and (out / "facts.json").is_file():
        earlier = json.loads((out / "facts.json").read_text())
        changed = [k for k in ("settings_key", "reference_tokens", "reference_batch", "reference_lr", "reference_corpus", "arch_seed")
                   if earlier.get(k, {"reference_lr": LONG_RUN_LR, "reference_corpus": "stdlib"}.get(k)) != facts.get(k)]
        if changed:  # rows of two recipes would be ranked as one
            raise SystemExit(f"--resume: {out} holds a run with other {', '.join(changed)} ({', '.join(f'{k}={earlier.get(k)!r}' for k in changed)}); "
                             f"give the same settings, or another --out for a new run")
        # the invocations before this one, so that their machine and worker count are not lost
        facts["earlier"] = earlier.get("earlier", []) + [{k: earlier[k] for k in INVOCATION_FACTS if k in earlier}]
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts), flush=True)

    timing = None
    if args.timing:
        timing = {}
        for kind in ("mad", "lm"):
            row = run_job({"arch": "LFM2-350M", "stage": kind, "spec": presets["LFM2-350M"].to_dict(), "settings": args.settings, "device": args.device,
                           "threads": args.threads, "steps_scale": args.steps_scale, "compile": args.compile})
            timing[kind] = row
            print("timing", json.dumps(row), flush=True)
        (out / "timing.json").write_text(json.dumps(timing, indent=1))

    def wall_clock_at(seconds: float | None) -> float | None:  # jobs run in other processes: they compare against time.time()
        return None if seconds is None else time.time() + seconds - (time.perf_counter() - started)

    start_before = wall_clock_at(args.deadline_s)
    long_start_before = wall_clock_at(args.long_deadline_s) if args.long_deadline_s is not None else start_before
    common = {"settings": args.settings, "device": args.device, "threads": args.threads, "reference": reference.to_dict(), "steps_scale": args.steps_scale,
              "compile": args.compile, "start_before": start_before}
    # architecture by architecture: a run cut short leaves whole architectures, not a stage of each;
    # the seed repeats come last (they measure noise, the ranking needs seed 0 first)
    def make_job(name: str, spec: ArchSpec, stage: str, seed: int) -> dict:
        return {"arch": name, "stage": stage, "seed": seed, "spec": spec.to_dict(), **common,
                **({"start_before": long_start_before} if stage == "long" else {"proxy_settings": proxy_settings[stage].to_dict()})}

    jobs = [make_job(name, spec, stage, 0) for name, spec in archs for stage in stages]
    repeat_stages = [stage for stage in (args.repeat_stages or args.stages).split(",") if stage in stages and stage != "long"]
    repeated = archs[: int(args.repeat_archs)] if args.repeat_archs.isdigit() else [(n, s) for n, s in archs if n in args.repeat_archs.split(",")]
    jobs += [make_job(name, spec, stage, seed) for seed in range(1, args.seed_repeats + 1) for name, spec in repeated for stage in repeat_stages]
    rows: list[dict] = []
    log_path = out / "fidelity.jsonl"
    if args.resume and log_path.exists():
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        done = {job_key(row) for row in rows if row.get("ok")}
        jobs = [job for job in jobs if job_key(job) not in done]
        print(f"resume: {len(done)} finished jobs kept, {len(jobs)} to run", flush=True)
    elif log_path.exists():
        log_path.unlink()  # a fresh run: rows of an earlier one would mix settings
    imported = import_rows(Path(args.import_from), facts, dict(archs), args.import_stages.split(","),
                           {job_key(row) for row in rows if row.get("ok")}) if args.import_from else []
    if imported:
        with log_path.open("a") as log:
            log.writelines(json.dumps(row) + "\n" for row in imported)
        rows += imported
        done = {job_key(row) for row in imported}
        jobs = [job for job in jobs if job_key(job) not in done]
        print(f"imported {len(imported)} rows from {args.import_from}, {len(jobs)} jobs to run", flush=True)
    log = log_path.open("a")
    lock = threading.Lock()
    finished = 0

    def keep(row: dict) -> None:
        nonlocal finished
        with lock:  # called from the pools' result threads
            finished += 1
            if row.get("skipped"):
                return
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"[{time.perf_counter() - started:6.0f}s] {row['arch']:12s} {row['stage']:4s} seed {row.get('seed', 0)} ok={row['ok']} "
                  f"score={row.get('score', float('nan')):.4f} wall={row.get('wall_s', 0):.1f}s", flush=True)

    def past(limit: float | None) -> bool:
        return limit is not None and time.perf_counter() - started > limit

    if args.workers <= 1:
        for job in jobs:
            if past(args.stop_s):
                break
            keep(run_job(job))  # a job past its deadline returns at once, unlogged
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        long_pool = ctx.Pool(args.long_workers, maxtasksperchild=1)
        short_pool = ctx.Pool(args.workers - args.long_workers, maxtasksperchild=6)
        for job in jobs:
            pool = long_pool if job["stage"] == "long" else short_pool
            pool.apply_async(run_job, (job,), callback=keep, error_callback=lambda exc: keep({"arch": "?", "stage": "?", "ok": False, "error": repr(exc)}))
        while finished < len(jobs) and not past(args.stop_s):
            time.sleep(0.5)
        if finished < len(jobs):
            print(f"stopped at --stop-s {args.stop_s}: {len(jobs) - finished} unfinished jobs dropped", flush=True)
        for pool in (long_pool, short_pool):
            pool.terminate()
    log.close()
    write_reports(out, rows, facts, timing)
    return 0


#: What an imported row's run must share with this one for its rows to be comparable.
IMPORT_MUST_MATCH = {"long": ("reference_tokens", "reference_batch", "reference_lr", "reference_corpus", "lm_seq_len"), "mad": ("settings_key",), "lm": ("settings_key",)}


def import_rows(source: Path, facts: dict, archs: dict[str, ArchSpec], stages: list[str], done: set) -> list[dict]:
    """The finished rows of `stages` that the run in `source` made for these architectures
    (same name and spec), marked `imported_from`; refused when its recipe differs."""
    if not (source / "facts.json").is_file() or not (source / "fidelity.jsonl").is_file():
        raise SystemExit(f"--import-from {source}: no facts.json and fidelity.jsonl there; give the --out of an earlier run")
    earlier = json.loads((source / "facts.json").read_text())
    for stage in stages:
        if stage not in IMPORT_MUST_MATCH:
            raise SystemExit(f"--import-stages {stage}: only {', '.join(IMPORT_MUST_MATCH)} can be imported")
        changed = [k for k in IMPORT_MUST_MATCH[stage] if earlier.get(k, {"reference_corpus": "stdlib", "reference_lr": LONG_RUN_LR}.get(k)) != facts.get(k)]
        if changed:
            raise SystemExit(f"--import-from {source}: its {stage} rows were made with other {', '.join(f'{k}={earlier.get(k)!r} (here {facts.get(k)!r})' for k in changed)}")
    rows = [json.loads(line) for line in (source / "fidelity.jsonl").read_text().splitlines() if line.strip()]
    return [{**row, "imported_from": source.name} for row in rows
            if row.get("ok") and row["stage"] in stages and row["arch"] in archs and row["spec_key"] == archs[row["arch"]].key and job_key(row) not in done]


def write_reports(out: Path, rows: list[dict], facts: dict, timing: dict | None) -> None:
    """`<out>/summary.json` and `<out>/fidelity.md` from the rows (also printed)."""
    summary = summarise(rows)
    summary["facts"] = facts
    summary["timing"] = {k: {"wall_s": v["wall_s"], "steps_trained": v.get("steps_trained"), "tokens": v.get("tokens")} for k, v in (timing or {}).items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary, facts, {k: v for k, v in (timing or {}).items() if v.get("ok")} or None)
    (out / "fidelity.md").write_text(text)
    print(text, flush=True)


def summarise_only(out: Path) -> int:
    """Rewrite the reports of a finished (or cut-short) run from its files, running nothing:
    for a summary that gained a statistic, on any machine (the facts stay the run's own)."""
    missing = [name for name in ("facts.json", "fidelity.jsonl") if not (out / name).is_file()]
    if missing:
        raise SystemExit(f"--summarise-only: {out} has no {' or '.join(missing)}; give the --out of an earlier run")
    rows = [json.loads(line) for line in (out / "fidelity.jsonl").read_text().splitlines() if line.strip()]
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else None
    write_reports(out, rows, json.loads((out / "facts.json").read_text()), timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
