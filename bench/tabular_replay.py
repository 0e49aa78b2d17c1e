"""Replaying searches against the tabular benchmark: samplers and pre-screening, offline.

Every search here is the project's search reduced to what a table can stand in for: an
Optuna study with the search's own sampler settings (`nas.objectives.make_sampler`), the
space's own trial encoding (`SearchSpace.sample`), the analytic pre-filter on the memory
lower bound, the memory constraint set on each trial (`trial.set_constraint`), and, where
switched on, the search's pre-screen (`nas.prescreen.Prescreen`, fitted online on the
replayed search's own "measurements"). A device measurement is a lookup in the table
(`bench.tabular`); an architecture met twice is measured once (the search's result cache).

Objectives, as the search uses them: prefill and decode latency (minimise, the table's
medians) and quality (maximise). The quality objective is a free signal, the number of
attention layers: BENCHMARKS.md's issue-26 section found that it ranks 20 layouts against
20x-longer-trained references (Spearman +0.85) as well as any trained proxy, and it needs
no training, so a table of it is exact. Memory: the table's footprint against `--budget`.

Hypervolume: of each search's feasible measured points, objectives normalised to [0, 1] by
the table's feasible range (quality negated), reference point 1.1 in each, divided by the
hypervolume of the table's whole feasible front: 1.0 means the search found the true front.
Reported: the mean over seeds against trials with a 95% bootstrap band, and the ratio of each
sampler's mean to random's at 25/50/100 trials with a 95% bootstrap interval (seeds
resampled); then searches with and without pre-screening against device measurements.

    python -m bench.tabular_replay                   # random, NSGA-II, TPE; with and without pre-screening; 20 seeds (~30 min on a loaded 2-core machine)
    python -m bench.tabular_replay --samplers random,gp --seeds 5 --trials 30 --without-prescreen-only \
        --results bench/results/tabular/replay_gp.json --no-write   # GP: ~15 s a proposal here
    python -m bench.tabular_replay --quick           # random and TPE, 3 seeds, 30 trials
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.harness import BenchRun, base_parser, log
from bench.report import markdown_table

NAME = "tabular_replay"
SAMPLERS = ("random", "nsga2", "tpe", "gp")
CHECKPOINTS = (25, 50, 100)
REFERENCE = 1.1
BOOTSTRAP = 2000


@dataclass
class Table:
    rows: dict  # spec key -> row
    budget_bytes: int
    lo: np.ndarray  # per objective (minimisation form) over the feasible table
    hi: np.ndarray
    optimum: float  # hypervolume of the feasible table
    prompt_tokens: int
    decode_depth: int
    context: int

    @classmethod
    def load(cls, path: Path, budget_bytes: int, calibrated: bool = True) -> Table:
        data = json.loads(Path(path).read_text())
        rows = {r["key"]: dict(r) for r in data["rows"] if r.get("status") == "ok"}
        if calibrated and data.get("anchor"):
            # As an anchored search stores its latencies: each point's ratio of lower quartiles
            # to the anchor timed beside it, times one reference for the anchor (its median
            # quartile over the table), so that the host's drift during the run is out.
            for name in ("prefill", "decode"):
                reference = float(np.median([r[f"{name}_anchor_quantile_ms"] for r in rows.values()]))
                for row in rows.values():
                    row[f"raw_{name}_ms"] = row[f"{name}_ms"]
                    row[f"{name}_ms"] = row[f"{name}_anchor_ratio"] * reference
        elif calibrated:
            # Latency relative to the machine's speed at the time: each measurement's own
            # calibration kernel (devices.sampling.Calibration, timed on the measuring core when
            # the process was ready) over its median across the table. The machine's load
            # drifted during the run (load average 9 to 23 on 2 cores); this takes most of that
            # drift out (the predictor's held-out error on prefill: median 24% raw, 12% calibrated).
            references = {k: r["stack"]["calibration"]["reference_ms"] for k, r in rows.items()}
            typical = float(np.median(list(references.values())))
            for key, row in rows.items():
                row["raw_prefill_ms"], row["raw_decode_ms"] = row["prefill_ms"], row["decode_ms"]
                row["prefill_ms"] *= typical / references[key]
                row["decode_ms"] *= typical / references[key]
        points = np.array([objectives(r) for r in rows.values() if r["footprint_bytes"] <= budget_bytes])
        lo, hi = points.min(axis=0), points.max(axis=0)
        proto = data["protocol"]
        table = cls(rows, budget_bytes, lo, hi, 1.0, proto["prompt_lengths"][0], proto["decode_depths"][0], proto["decode_depths"][0] + proto["decode_tokens"])
        table.optimum = table.hypervolume(points)
        return table

    def hypervolume(self, points: np.ndarray) -> float:
        from optuna._hypervolume import compute_hypervolume

        if len(points) == 0:
            return 0.0
        normalised = (np.asarray(points) - self.lo) / np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        return float(compute_hypervolume(normalised, np.full(normalised.shape[1], REFERENCE)))


def attention_layers(spec_dict: dict) -> int:
    return sum(op in ("attn", "swa") for op in spec_dict["layers"])


def objectives(row: dict) -> list[float]:
    """(-quality, prefill, decode): all minimised."""
    return [-attention_layers(row["spec"]), row["prefill_ms"], row["decode_ms"]]


def replay(table: Table, sampler: str, seed: int, *, max_trials: int, max_measurements: int, prescreen: bool, planned_trials: int | None = None) -> dict:
    """One search against the table. Returns per trial: measurements so far and the
    normalised hypervolume so far (of the feasible measured points). `planned_trials`: the
    trial count the sampler is configured for (NSGA-II's population, TPE's start-up), the
    same with and without pre-screening (default `max_trials`)."""
    import optuna
    from optuna.trial import TrialState

    from bench.tabular import table_space
    from nas.objectives import MEMORY_CONSTRAINT, make_sampler
    from nas.predictor import FeatureSet
    from nas.prescreen import Prescreen
    from search_space.costs import estimate_peak_memory

    space = table_space()
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler(sampler, seed, planned_trials or max_trials))
    screen = Prescreen(FeatureSet(table.prompt_tokens, table.decode_depth, "eager", "fp32", table.context), table.budget_bytes, quality="free") if prescreen else None
    measured: dict[str, dict] = {}
    front: list[list[float]] = []
    hv = 0.0
    curve_trials, curve_measurements, skips = [], [], {"over_budget": 0, "dominated": 0, "prefiltered": 0, "wrong_skips": 0}
    for _ in range(max_trials):
        if len(measured) >= max_measurements:
            break
        trial = study.ask()
        spec = space.sample(trial)
        row = table.rows.get(spec.key)
        if row is None:
            raise KeyError(f"{spec.layout} d={spec.d_model} is not in the table: the table and its space disagree")
        estimate = estimate_peak_memory(spec, table.context, "eager", "fp32", prefill_tokens=table.prompt_tokens)
        quality = float(attention_layers(row["spec"]))
        if estimate.lower_bound_bytes > table.budget_bytes:
            trial.set_constraint(MEMORY_CONSTRAINT, float(estimate.lower_bound_bytes - table.budget_bytes))
            study.tell(trial, state=TrialState.PRUNED)
            skips["prefiltered"] += 1
        elif screen is not None and spec.key not in measured and (verdict := screen.judge(spec, quality=quality)).skip:
            if verdict.rule is None or verdict.prediction is None:
                raise AssertionError(f"a skip verdict without its rule or prediction: {verdict}")
            if verdict.rule == "over_budget":
                trial.set_constraint(MEMORY_CONSTRAINT, float(verdict.prediction.intervals["footprint_bytes"][0] - table.budget_bytes))
            study.tell(trial, state=TrialState.PRUNED)
            skips[verdict.rule] += 1
            # a skip that threw away a point of the table's front-to-be: counted, for the record
            feasible = row["footprint_bytes"] <= table.budget_bytes
            if feasible and not any(all(f[i] <= o for i, o in enumerate(objectives(row))) for f in front):
                skips["wrong_skips"] += 1
        else:
            if spec.key not in measured:
                measured[spec.key] = row
                if screen is not None:
                    screen.add(spec, prefill_ms=row["prefill_ms"], decode_ms=row["decode_ms"], footprint_bytes=row["footprint_bytes"], quality=quality)
                if row["footprint_bytes"] <= table.budget_bytes:
                    front.append(objectives(row))
                    hv = table.hypervolume(np.array(front)) / table.optimum
            trial.set_constraint(MEMORY_CONSTRAINT, float(row["footprint_bytes"] - table.budget_bytes))
            study.tell(trial, [quality, row["prefill_ms"], row["decode_ms"]])
        curve_trials.append(hv)
        curve_measurements.append(len(measured))
    return {"sampler": sampler, "seed": seed, "prescreen": prescreen, "hv_by_trial": curve_trials, "measurements_by_trial": curve_measurements, "skips": skips}


def hv_at_measurements(result: dict, n: int) -> float:
    """The hypervolume a search had once it had used n device measurements (its last value
    if it stopped before)."""
    last = 0.0
    for hv, m in zip(result["hv_by_trial"], result["measurements_by_trial"], strict=True):
        if m > n:
            break
        last = hv
    return last


def hv_at_trial(result: dict, n: int) -> float:
    curve = result["hv_by_trial"]
    return curve[min(n, len(curve)) - 1] if curve else 0.0


def bootstrap_mean_ci(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    means = rng.choice(values, size=(BOOTSTRAP, len(values)), replace=True).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def bootstrap_ratio_ci(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of mean(a) / mean(b), seeds of each resampled independently."""
    ma = rng.choice(a, size=(BOOTSTRAP, len(a)), replace=True).mean(axis=1)
    mb = rng.choice(b, size=(BOOTSTRAP, len(b)), replace=True).mean(axis=1)
    ratios = ma / np.maximum(mb, 1e-12)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=None, help="the table (default bench/results/tabular/table.json)")
    parser.add_argument("--budget-mib", type=float, default=96.0, help="memory budget in MiB (default 96: about a third of the table is over it)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=100, help="trials of a search without pre-screening (default 100)")
    parser.add_argument("--samplers", default="random,nsga2,tpe", help=f"comma-separated, of {', '.join(SAMPLERS)} (default random,nsga2,tpe: GP takes ~15 s a proposal)")
    parser.add_argument("--raw", action="store_true", help="use the table's latencies as measured, not anchored (or calibrated, for a table without the anchor) to the machine's speed at the time")
    parser.add_argument("--without-prescreen-only", action="store_true", help="replay only searches without pre-screening (e.g. for the slow GP sampler)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import optuna

    from bench.tabular import TABLE_PATH

    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    run = BenchRun(NAME, "Tabular benchmark: samplers and pre-screening replayed on measured architectures", args)
    samplers = args.samplers.split(",")
    seeds, trials = (3, 30) if args.quick else (args.seeds, args.trials)
    if args.quick:
        samplers = [s for s in samplers if s in ("random", "tpe")]
    table_path = args.table or TABLE_PATH
    table = Table.load(table_path, int(args.budget_mib * 2**20), calibrated=not args.raw)
    data = json.loads(Path(table_path).read_text())
    results, seconds = [], {}
    for sampler in samplers:
        for prescreen in (False,) if args.without_prescreen_only else (False, True):
            started = time.perf_counter()
            for seed in range(seeds):
                # With pre-screening a search may ask many more trials than it measures: it runs
                # until it has used as many device measurements as the plain search's trials.
                results.append(replay(table, sampler, seed, max_trials=trials if not prescreen else 4 * trials, max_measurements=trials, prescreen=prescreen, planned_trials=trials))
            label = f"{sampler}+prescreen" if prescreen else sampler
            seconds[label] = (time.perf_counter() - started) / seeds
            log(f"[{NAME}] {label}: {seconds[label]:.1f} s per search")
    summary = summarise(results, samplers, trials, seeds)
    summary["predictor_on_table"] = predictor_accuracy(table)
    feasible = sum(r["footprint_bytes"] <= table.budget_bytes for r in table.rows.values())
    run.save({"table": str(table_path), "table_rows": len(table.rows), "feasible": feasible, "budget_mib": args.budget_mib, "seeds": seeds, "trials": trials,
              "seconds_per_search": seconds, "summary": summary, "results": results})
    run.finish(render(summary, table, data, feasible, seeds, trials, seconds, args), "python -m bench.tabular_replay" + (" --quick" if args.quick else ""))
    return 0


def predictor_accuracy(table: Table) -> dict:
    """The predictor fitted on the whole table, each architecture held out in turn."""
    from lfm2.spec import ArchSpec
    from nas.predictor import Observation, Predictor

    observations = [Observation(ArchSpec.from_dict(r["spec"]), r["prefill_ms"], r["decode_ms"], r["footprint_bytes"]) for r in table.rows.values()]
    predictor = Predictor.fit(observations, prompt_tokens=table.prompt_tokens, decode_depth=table.decode_depth, backend="eager", quant="fp32", context=table.context)
    return predictor.accuracy


def summarise(results: list[dict], samplers: list[str], trials: int, seeds: int) -> dict:
    rng = np.random.default_rng(0)
    by: dict[tuple[str, bool], list[dict]] = {(r["sampler"], r["prescreen"]): [] for r in results}
    for r in results:
        by[(r["sampler"], r["prescreen"])].append(r)
    checkpoints = [c for c in CHECKPOINTS if c <= trials]
    out: dict = {"by_trial": {}, "ratio_to_random": {}, "by_measurement": {}, "measurements_to_match": {}}
    for sampler in samplers:
        plain = by[(sampler, False)]
        curves = np.array([[hv_at_trial(r, n) for n in range(1, trials + 1)] for r in plain])
        bands = [bootstrap_mean_ci(curves[:, i], rng) for i in range(trials)]
        out["by_trial"][sampler] = {"mean": curves.mean(axis=0).tolist(), "low": [b[0] for b in bands], "high": [b[1] for b in bands]}
    if "random" in samplers:
        random_at = {c: np.array([hv_at_trial(r, c) for r in by[("random", False)]]) for c in checkpoints}
        for sampler in samplers:
            out["ratio_to_random"][sampler] = {}
            for c in checkpoints:
                values = np.array([hv_at_trial(r, c) for r in by[(sampler, False)]])
                low, high = bootstrap_ratio_ci(values, random_at[c], rng)
                out["ratio_to_random"][sampler][c] = {"mean_hv": float(values.mean()), "ratio": float(values.mean() / random_at[c].mean()), "low": low, "high": high}
    for sampler in samplers:
        if (sampler, True) not in by:
            continue
        for prescreen in (False, True):
            runs = by[(sampler, prescreen)]
            curve = np.array([[hv_at_measurements(r, n) for n in range(1, trials + 1)] for r in runs])
            bands = [bootstrap_mean_ci(curve[:, i], rng) for i in range(trials)]
            out["by_measurement"][f"{sampler}{'+prescreen' if prescreen else ''}"] = {
                "mean": curve.mean(axis=0).tolist(), "low": [b[0] for b in bands], "high": [b[1] for b in bands],
                "skips": {k: int(sum(r["skips"][k] for r in runs)) for k in runs[0]["skips"]},
                "trials_asked": float(np.mean([len(r["hv_by_trial"]) for r in runs])),
            }
        plain = out["by_measurement"][sampler]["mean"]
        screened = out["by_measurement"][f"{sampler}+prescreen"]["mean"]
        # The fewest measurements with pre-screening whose mean hypervolume reaches the plain
        # search's at n measurements, for each checkpoint n.
        out["measurements_to_match"][sampler] = {c: next((m + 1 for m, v in enumerate(screened) if v >= plain[c - 1]), None) for c in checkpoints}
    return out


def _latency_note(data: dict, raw: bool) -> str:
    if raw:
        return "Latencies as measured (--raw). "
    if data.get("anchor"):
        layout = "".join({"conv": "C", "attn": "A", "swa": "S"}.get(op, "?") for op in data["anchor"]["layers"])
        return (f"Latencies are anchored, as a search stores them: every sample a pair with the table space's anchor ({layout}, d {data['anchor']['d_model']}) in the same process, "
                "each point the ratio of the two lower quartiles times the anchor's median quartile over the table, which takes the host's drift during the run out. ")
    return ("Latencies are calibrated: each multiplied by the table's median calibration-kernel time over its own measurement's (the kernel timed on the measuring core "
            "when the process was ready), which takes out most of the machine's load drift during the run. ")


def render(summary: dict, table: Table, data: dict, feasible: int, seeds: int, trials: int, seconds: dict, args) -> str:
    machine = data.get("machine", {})
    how = (
        f"How: the table `bench/results/tabular/table.json` ({len(table.rows)} architectures of the table's space, every one measured once by `devices.measure` "
        f"on the {data['backend']} backend, prefill {table.prompt_tokens} tokens and decode at depth {table.decode_depth}, one thread on one pinned core, "
        f"measured {data.get('started')} to {data.get('finished', '?')} on {machine.get('cpu_model', machine.get('cpu', '?'))} at nice {data.get('nice', '?')}, "
        f"load average {data.get('load_before')} at the start; see `bench/tabular.py`). "
        + _latency_note(data, args.raw)
        + f"Budget {args.budget_mib:g} MiB: {feasible} of {len(table.rows)} architectures fit. "
        f"Objectives: attention-layer count (maximise; the free quality signal of issue 26), prefill and decode (minimise). Each search: an Optuna study with the search's "
        f"sampler settings (`make_sampler`), the space's encoding, the analytic pre-filter and the memory constraint; {seeds} seeds per sampler. "
        "Hypervolume: normalised objectives, reference 1.1, divided by the table's optimum (1.0 = the true front found). "
        "Bands and intervals: 95% bootstrap over seeds. With pre-screening, a search asks trials until it has used as many device measurements as the plain one's trials; "
        "the predictor is fitted online on the search's own measurements (active from the 10th)."
    )
    rows = []
    for sampler, ratios in summary["ratio_to_random"].items():
        cells = [sampler]
        for r in ratios.values():
            cells.append(f"{r['mean_hv']:.3f} / {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
        rows.append(cells)
    ratio_table = markdown_table(["sampler"] + [f"{c} trials: hypervolume / ratio to random [95% CI]" for c in CHECKPOINTS if c <= trials], rows)
    marks = [n for n in (10, 15, 20, 25, 35, 50, 75, 100) if n <= trials]
    curve_rows = []
    for sampler, curve in summary["by_trial"].items():
        curve_rows.append([sampler] + [f"{curve['mean'][n - 1]:.3f} [{curve['low'][n - 1]:.3f}, {curve['high'][n - 1]:.3f}]" for n in marks])
    curve_table = markdown_table(["sampler \\ trials"] + [str(n) for n in marks], curve_rows)
    screen_rows = []
    for name, curve in summary["by_measurement"].items():
        s = curve["skips"]
        screen_rows.append([name] + [f"{curve['mean'][n - 1]:.3f}" for n in marks] + [f"{curve['trials_asked']:.0f}", f"{s['prefiltered']}/{s['over_budget']}/{s['dominated']}/{s['wrong_skips']}"])
    screen_table = markdown_table(["search \\ device measurements"] + [str(n) for n in marks] + ["trials asked (mean)", "skips: prefilter / over budget / dominated / of a then-undominated point"], screen_rows)
    speed = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    accuracy = summary.get("predictor_on_table") or {}
    accuracy_table = markdown_table(["objective", "architectures", "within ±10%", "within ±25%", "median abs error", "max abs error"],
                                    [[t, a["n"], f"{a['within_10pct']:.0%}", f"{a['within_25pct']:.0%}", f"{a['median_abs_error']:.1%}", f"{a['max_abs_error']:.1%}"] for t, a in accuracy.items()])
    parts = [how, "The predictor (`nas.predictor`) on the table, each architecture held out in turn (what the pre-screen's intervals rest on):", accuracy_table,
             "Mean hypervolume against trials (without pre-screening), [95% band]:", curve_table, "Ratio of mean hypervolume to random search's:", ratio_table]
    if summary["measurements_to_match"]:
        match_rows = [[sampler] + [str(v) if v is not None else "not reached" for v in m.values()] for sampler, m in summary["measurements_to_match"].items()]
        match_table = markdown_table(["sampler"] + [f"plain at {c}: measurements with pre-screen to match" for c in next(iter(summary["measurements_to_match"].values()))], match_rows)
        parts += ["Mean hypervolume against device measurements, without and with pre-screening:", screen_table,
                  "Device measurements the pre-screened search needs to reach the plain search's mean hypervolume:", match_table]
    return "\n\n".join([*parts, f"Seconds per replayed search: {speed}."])


if __name__ == "__main__":
    raise SystemExit(main())
