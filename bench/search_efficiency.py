"""Search efficiency: the default sampler (NSGA-II) against random sampling on this machine.

Runs the project's own search (`nas.search.run_search`, the code behind `lfm2-nas
search`) over the small space on the local device: N trials with each sampler, for 3
seeds, every search in its own study of one SQLite file. Reported:

* the final hypervolume of each study's feasible front (Optuna's, through
  `optuna.visualization.plot_hypervolume_history`), all against ONE reference point (the
  worst feasible value of each objective over every study, 10% further out), and the
  ratio NSGA-II / random per seed;
* device utilisation: the seconds the device spent measuring over the search's wall time;
* wall time per trial split by stage: compile, measure, quality (from each trial's
  `stage_s` user attr) and the rest (waiting and driver overhead).

All searches of one run share a fresh result/artifact cache (`$LFM2_NAS_CACHE`), so an
architecture met twice is measured once, as in real use; the cached trials are counted.

    python -m bench.search_efficiency           # eager backend, N=8, 3 seeds (~10 minutes)
    python -m bench.search_efficiency --backend onnx --quant fp32 --trials 20   # the real toolchain (hours)
    python -m bench.search_efficiency --quick   # N=2, 1 seed
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from bench.harness import BenchRun, base_parser, log
from bench.report import fmt, markdown_table, pct
from bench.stats import median

NAME = "search_efficiency"
SAMPLERS = ("nsga2", "random")
REFERENCE_MARGIN = 0.10


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per search (default 8: 6 searches in ~10 minutes)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per sampler (default 3)")
    parser.add_argument("--backend", default="eager", help="backend of the searches (default eager: see BENCHMARKS.md)")
    parser.add_argument("--quant", default="fp32")
    parser.add_argument("--context", type=int, default=256, help="prefill length and decode depth measured (default 256)")
    parser.add_argument("--quality", default="none", help="quality signal: none (default), layout (free), mad or lm")
    parser.add_argument("--quality-settings", default="cpu_small")
    parser.add_argument("--budget", default="1GB", help="memory budget (default 1GB)")
    return parser.parse_args(argv)


def reference_point(fronts: list[list[list[float]]], directions: Sequence[str]) -> list[float] | None:
    """One reference point for every study: per objective, the worst feasible value over
    all of them pushed REFERENCE_MARGIN of the observed range further out."""
    values = [v for front in fronts for v in front]
    if not values:
        return None
    point = []
    for index, direction in enumerate(directions):
        column = [v[index] for v in values]
        span = max(column) - min(column)
        margin = REFERENCE_MARGIN * (span if span > 0 else (abs(column[0]) or 1.0))
        point.append(min(column) - margin if direction == "maximize" else max(column) + margin)
    return point


def final_hypervolume(study, reference: list[float]) -> float:
    """Optuna's hypervolume of the study's feasible trials against `reference` (0 when none)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figure = optuna.visualization.plot_hypervolume_history(study, reference_point=reference)
    ys = figure.data[0].y if figure.data else None
    return float(ys[-1]) if ys is not None and len(ys) else 0.0


def feasible_values(study) -> list[list[float]]:
    from optuna.trial import TrialState

    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.values and trial.user_attrs.get("status") == "ok":
            out.append(list(trial.values))
    return out


def stage_split(study) -> dict:
    """Per finished trial: its wall time (start to complete) and stage seconds; the rest is
    waiting (for the device or a worker) and driver overhead."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)):
        if trial.datetime_start is None or trial.datetime_complete is None:
            continue
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        stages = trial.user_attrs.get("stage_s") or {}
        rows.append({"number": trial.number, "status": trial.user_attrs.get("status"), "cached": bool(trial.user_attrs.get("cached")), "wall_s": wall, **{k: float(stages.get(k, 0.0)) for k in ("compile", "measure", "quality")}})
    for row in rows:
        row["other"] = max(0.0, row["wall_s"] - row["compile"] - row["measure"] - row["quality"])
    return {"trials": rows}


def run_with_retry(run_search, config, config_class, attempts: int = 3):
    """Run one search; when it fails (on a loaded machine Ray's start-up can time out),
    shut Ray down and try again, resuming the study if it was created. Returns
    (study or None, the last error or None)."""
    import optuna
    import ray

    error = None
    for attempt in range(attempts):
        try:
            exists = config.study in optuna.study.get_all_study_names(config.storage)
        except Exception:  # no database yet
            exists = False
        try:
            return run_search(config_class(**{**config.__dict__, "resume": exists})), None
        except Exception as exc:  # report the failure and go on with the other searches
            error = f"{type(exc).__name__}: {exc}"[:1000]
            log(f"[{NAME}]   attempt {attempt + 1} failed: {error}")
            if ray.is_initialized():
                ray.shutdown()
            time.sleep(10)
    return None, error


def main(argv=None) -> int:
    import optuna

    from lfm2.sizes import parse_size
    from nas.objectives import directions as objective_directions
    from nas.search import SearchConfig, run_search

    args = parse_args(argv)
    run = BenchRun(NAME, "Search efficiency: NSGA-II against random sampling on the local device", args)
    trials, seeds = (2, 1) if args.quick else (args.trials, args.seeds)
    work = Path(tempfile.mkdtemp(prefix="lfm2-nas-bench-search-"))
    cache = args.cache_dir or work / "cache"
    os.environ["LFM2_NAS_CACHE"] = str(cache)  # before Ray starts: its workers inherit it
    storage = f"sqlite:///{work / 'studies.db'}"
    searches = []
    for seed in range(seeds):
        for sampler in SAMPLERS:
            name = f"{sampler}-seed{seed}"
            log(f"[{NAME}] search {name}: {trials} trials, {args.backend}/{args.quant}, context {args.context}, quality {args.quality}")
            config = SearchConfig(device="local", budget_bytes=parse_size(args.budget, what="--budget"), trials=trials, study=name, storage=storage, space="small", backend=args.backend, quant=args.quant, context=args.context, quality=args.quality, quality_settings=args.quality_settings, sampler=sampler, seed=seed)
            started = time.perf_counter()
            study, error = run_with_retry(run_search, config, SearchConfig)
            searches.append({"name": name, "sampler": sampler, "seed": seed, "wall_s": time.perf_counter() - started, "study": study, "error": error})

    directions = objective_directions(args.quality)
    reference = reference_point([feasible_values(s["study"]) for s in searches if s["study"] is not None], directions)
    summaries = []
    for s in searches:
        summary = {k: s[k] for k in ("name", "sampler", "seed", "wall_s", "error")}
        if s["study"] is not None:
            study = s["study"]
            split = stage_split(study)
            measure_s = sum(t["measure"] for t in split["trials"])
            summary.update(
                hypervolume=final_hypervolume(study, reference) if reference else 0.0,
                feasible=len(feasible_values(study)),
                finished=len(split["trials"]),
                statuses={st: sum(1 for t in split["trials"] if t["status"] == st) for st in {t["status"] for t in split["trials"]}},
                cached=sum(1 for t in split["trials"] if t["cached"]),
                device_busy_s=measure_s,
                utilisation=measure_s / s["wall_s"] if s["wall_s"] > 0 else None,
                trials=split["trials"],
                pareto=[list(t.values) for t in study.best_trials],
            )
        summaries.append(summary)
    ratios = []
    for seed in range(seeds):
        by = {x["sampler"]: x for x in summaries if x["seed"] == seed}
        hv_n, hv_r = by.get("nsga2", {}).get("hypervolume"), by.get("random", {}).get("hypervolume")
        ratios.append({"seed": seed, "nsga2": hv_n, "random": hv_r, "ratio": hv_n / hv_r if hv_n is not None and hv_r else None})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run.save({"trials": trials, "seeds": seeds, "backend": args.backend, "quant": args.quant, "context": args.context, "quality": args.quality, "budget": args.budget, "storage": storage, "reference_point": reference, "directions": directions, "searches": summaries, "hypervolume_ratios": ratios})
    run.finish(render(args, trials, seeds, reference, summaries, ratios), "python -m bench.search_efficiency" + (" --quick" if args.quick else ""))
    return 0


def render(args, trials: int, seeds: int, reference, summaries: list[dict], ratios: list[dict]) -> str:
    how = (
        f"How: `nas.search.run_search` on `--device local` (measurements own half the cores, compiles the other half), "
        f"space `small`, backend {args.backend} {args.quant}, latencies at context {args.context}, quality {args.quality}, budget {args.budget}; "
        f"{trials} trials per search, samplers NSGA-II (the default) and random, seeds 0..{seeds - 1}; all searches in one run share a fresh result cache. "
        "With one seed, NSGA-II's first generation draws the same architectures as the random sampler (common random numbers), "
        "so the second search of a seed finds them in the cache with identical values: the two differ only by what NSGA-II "
        "proposes after its first generation (population max(4, N/2)). "
        f"Hypervolume: Optuna's, of each study's feasible trials, against one reference point for all ({', '.join(f'{x:.4g}' for x in reference) if reference else 'none: no feasible trial'}; "
        "the worst feasible value of each objective over all studies, 10% of the range further out). Utilisation = seconds the device "
        "spent measuring / the search's wall time (Ray start-up included). Stage split per finished trial from its `stage_s` user attr; "
        "'other' = the trial's wall time minus its stages (waiting for a free device or worker, driver overhead)."
    )
    if args.backend == "eager":
        how += (
            " The default backend is eager because an ONNX or ExecuTorch compile of one small-space candidate takes ~1 minute on this "
            "2-core machine with one core for compiles: 6 searches would then hold ~2 trials each in 10 minutes. Eager latency is a "
            "real measurement of a real model, but bound by Python overhead in decode; `--backend onnx --quant fp32` runs the deployed toolchain."
        )
    rows = []
    for s in summaries:
        if s.get("error"):
            rows.append([s["name"], "failed", "-", "-", "-", "-", "-", s["error"][:120]])
            continue
        rows.append([s["name"], f"{s['hypervolume']:.4g}", s["feasible"], s["finished"], s["cached"], f"{s['wall_s']:.0f}", pct(s["utilisation"]), ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items(), key=lambda kv: str(kv[0])))])
    ratio_rows = [[r["seed"], fmt(r["nsga2"]), fmt(r["random"]), "-" if r["ratio"] is None else f"{r['ratio']:.3f}"] for r in ratios]
    valid = [r["ratio"] for r in ratios if r["ratio"] is not None]
    headline = f"NSGA-II / random final hypervolume: median {median(valid):.3f} over {len(valid)} seed(s)." if valid else "No seed gave a hypervolume ratio."
    stage_rows = []
    for sampler in SAMPLERS:
        trials_all = [t for s in summaries if s["sampler"] == sampler and not s.get("error") for t in s["trials"] if not t["cached"]]
        if trials_all:
            stage_rows.append([sampler, len(trials_all)] + [f"{median([t[k] for t in trials_all]):.1f}" for k in ("wall_s", "compile", "measure", "quality", "other")])
    return "\n\n".join(
        [
            how,
            headline,
            markdown_table(["seed", "NSGA-II hypervolume", "random hypervolume", "ratio"], ratio_rows),
            markdown_table(["search", "final hypervolume", "feasible", "finished", "cached", "wall s", "device utilisation", "statuses"], rows),
            "Median seconds per trial by stage (trials not served from the cache):\n\n"
            + markdown_table(["sampler", "trials", "wall", "compile", "measure", "quality", "other"], stage_rows),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
