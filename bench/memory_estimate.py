"""Memory estimate: `search_space.costs.estimate_peak_memory` against the measured footprint.

The search prunes candidates with the analytic estimate before compiling anything, and
compares each measured footprint (the growth of the measuring process's peak RSS over
its baseline, `Measurement.memory["footprint_bytes"]`) with the budget. This reports
how far the estimate is from the measurement: (estimate - measured) / measured over the
architectures of `bench.repeatability` (its results file is reused when it is there;
otherwise they are measured here), plus whether the analytic lower bound ever exceeded
a measurement (it must not: the search would prune a model that fits).

    python -m bench.memory_estimate          # reuse bench/results/repeatability.json
    python -m bench.memory_estimate --quick  # the quick repeatability run's footprints (or measured here)
    python -m bench.memory_estimate --bench-json a.json,b.json   # full size: `lfm2-nas bench --json` outputs

Full size (`--bench-json`): each file is what `lfm2-nas bench MODEL --backend B --quant Q
--prompt P --depth D --json` printed (one model, one backend/precision, its measured
footprint and the RSS right after loading); every backend and precision at the size that
ships (LFM2-350M at context 2,048) is compared part by part: what loading adds (the
estimate's weights + runtime) and what the prefill and decode add on top (state +
activations). The table goes into its own BENCHMARKS.md block (`memory_estimate_full`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import BenchRun, base_parser, compile_and_measure, footprint_bytes, log
from bench.models import QUICK_BACKEND, QUICK_POINT, quick_models, sample_space
from bench.report import RESULTS_DIR, load_json, markdown_table, mib, pct
from bench.stats import error_distribution, median, relative_error
from lfm2.spec import ArchSpec
from search_space import costs

NAME = "memory_estimate"
#: The share of the estimated state a backend's runner touches while it loads the model:
#: ExecuTorch's `reset` zeroes its mutable buffers (the whole state); llama.cpp clears its K/V
#: buffer when the context is created (the live half of the estimate's state; the other half
#: is the runner's saved depth state, written while running).
STATE_AT_LOAD = {"executorch": 1.0, "llamacpp": 0.5}


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, default=None, help="a bench.repeatability results file to reuse (default bench/results/repeatability.json; with --quick, the quick run's)")
    parser.add_argument("--measure", action="store_true", help="measure here even when the results file exists")
    parser.add_argument("--archs", type=int, default=10)
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--quant", default="fp32")
    parser.add_argument("--bench-json", default=None, help="comma-separated `lfm2-nas bench --json` outputs: the full-size table, one row per file")
    return parser.parse_args(argv)


def estimate_row(spec: ArchSpec, backend: str, quant: str, max_context: int, prefill_tokens: int, measured: list[int]) -> dict:
    """The estimate and its parts for one architecture against its measured footprint(s)
    (the median when it was measured more than once)."""
    estimate = costs.estimate_peak_memory(spec, max_context, backend, quant, prefill_tokens=prefill_tokens)
    footprint = median(measured)
    return {
        "spec_key": spec.key,
        "layout": spec.layout,
        "parameters": costs.parameters(spec),
        "backend": backend,
        "quant": quant,
        "measured_bytes": footprint,
        "measured_all": measured,
        "estimate": estimate.to_dict(),
        "estimate_bytes": estimate.total_bytes,
        "lower_bound_bytes": estimate.lower_bound_bytes,
        "relative_error": relative_error(estimate.total_bytes, footprint),
        "lower_bound_violated": estimate.lower_bound_bytes > footprint,
    }


def rows_from_repeatability(data: dict) -> list[dict]:
    protocol = data["protocol"]
    max_context = max(max(protocol["prompt_lengths"]), max(protocol["decode_depths"]) + protocol["decode_tokens"])
    rows = []
    for item in data["rows"]:
        measured = [b for b in item["footprint_bytes"] if b]
        if measured:
            rows.append(estimate_row(ArchSpec.from_dict(item["spec"]), data["backend"], data["quant"], max_context, data["prefill_tokens"], measured))
    return rows


def row_from_bench(path: Path) -> dict:
    """One `lfm2-nas bench --json` output against the estimate for what it measured, with
    the footprint split into what loading added and what running added."""
    data = load_json(path)
    m = data["measurement"]
    if m.get("status") != "ok":
        raise SystemExit(f"{path}: the measurement did not finish ({m.get('status')}: {m.get('error')}); measure again")
    protocol = m["protocol"]
    context = max(max(protocol["prompt_lengths"]), max(protocol["decode_depths"]) + protocol["decode_tokens"])
    prefill = max(protocol["prompt_lengths"])
    spec = ArchSpec.from_dict(data["spec"])
    row = estimate_row(spec, m["backend"], m["quant"], context, prefill, [m["memory"]["footprint_bytes"]])
    memory = m["memory"]
    loaded = memory["rss_after_load_bytes"] - memory["baseline_rss_bytes"]
    e = row["estimate"]
    row.update(
        name=data.get("name", spec.layout),
        source=str(path),
        context=context,
        prefill_tokens=prefill,
        artifact_bytes=data["artifact"]["bytes"],
        measured_load_bytes=loaded,
        measured_run_bytes=row["measured_bytes"] - loaded,
    )
    # ExecuTorch (`reset` zeroes the mutable buffers) and llama.cpp (the K/V buffer is cleared
    # when the context is created) touch their whole state while loading; ONNX Runtime's and
    # eager's state grows with the prompt
    state_at_load = int(e["state_bytes"] * STATE_AT_LOAD.get(m["backend"], 0.0))
    row.update(
        state_at_load=bool(state_at_load),
        estimate_load_bytes=e["weights_bytes"] + e["runtime_overhead_bytes"] + state_at_load,
        estimate_run_bytes=e["state_bytes"] - state_at_load + e["activation_bytes"],
    )
    row["load_error"] = relative_error(row["estimate_load_bytes"], loaded)
    row["run_error"] = relative_error(row["estimate_run_bytes"], row["measured_run_bytes"]) if row["measured_run_bytes"] > 0 else None
    return row


def render_full(rows: list[dict]) -> str:
    how = (
        "How: each row is one `lfm2-nas bench MODEL --backend B --quant Q --prompt P --depth D --json` (compile, "
        "verification, measurement in a fresh process) against `estimate_peak_memory(spec, context, B, Q, prefill_tokens=P)` "
        "for the same context and prefill. Measured load = RSS right after loading the artifact minus the baseline "
        "(after the runtime's import); measured run = footprint (peak RSS growth) minus load. The estimate's "
        "weights + runtime overhead is compared with the load, its state + activations with the run; where the runner "
        "touches state while loading (marked *: ExecuTorch's `reset` zeroes all of it, llama.cpp clears its live K/V "
        "cache, half of its estimate; the other half is the runner's saved depth state), that part counts to the load. "
        "Error = (estimate - measured) / measured."
    )
    table = markdown_table(
        ["model", "backend / quant", "context / prefill", "artifact", "measured: load / run / footprint", "estimate: weights + runtime / state + activations / total", "error: load / run / total", "lower bound"],
        [
            [
                r["name"], f"{r['backend']} {r['quant']}", f"{r['context']:,} / {r['prefill_tokens']:,}", mib(r["artifact_bytes"]),
                f"{mib(r['measured_load_bytes'])} / {mib(r['measured_run_bytes'])} / {mib(r['measured_bytes'])}",
                f"{mib(r['estimate']['weights_bytes'])} + {mib(r['estimate']['runtime_overhead_bytes'])} / {mib(r['estimate']['state_bytes'])}{'*' if r.get('state_at_load') else ''} + {mib(r['estimate']['activation_bytes'])} / {mib(r['estimate_bytes'])}",
                f"{pct(r['load_error'], 1)} / {pct(r['run_error'], 1)} / {pct(r['relative_error'], 1)}",
                mib(r["lower_bound_bytes"]) + (" **above the measurement**" if r["lower_bound_violated"] else ""),
            ]
            for r in rows
        ],
    )
    return "\n\n".join([how, table])


def main_full(args) -> int:
    run = BenchRun(NAME + "_full", "Memory estimate at full size: every backend and precision against its measured footprint", args, module=NAME)
    rows = [row_from_bench(Path(p)) for p in args.bench_json.split(",") if p]
    summary = error_distribution([r["relative_error"] for r in rows]) if rows else None
    run.save({"source": args.bench_json, "summary": summary, "rows": rows})
    run.finish(render_full(rows), "python -m bench.memory_estimate --bench-json " + args.bench_json)
    return 0


def main(argv=None) -> int:
    from bench.repeatability import protocol_for

    args = parse_args(argv)
    if args.bench_json:
        return main_full(args)
    run = BenchRun(NAME, "Memory estimate: analytic peak memory against the measured footprint", args)
    source_path = args.source or (Path(tempfile.gettempdir()) / "lfm2-nas-bench-repeatability-quick.json" if args.quick else RESULTS_DIR / "repeatability.json")
    source = None
    if not args.measure and source_path.is_file():
        source = str(source_path)
        log(f"[{NAME}] reusing the footprints of {source_path}")
        data = load_json(source_path)
        rows = rows_from_repeatability(data)
        backend, quant = data["backend"], data["quant"]
    else:
        if args.quick:
            specs, prefill, depth = list(quick_models().values()), QUICK_POINT, QUICK_POINT
            backend, quant = QUICK_BACKEND
        else:
            specs, prefill, depth = sample_space(args.archs, seed=0), 512, 512
            backend, quant = args.backend, args.quant
        protocol = protocol_for(prefill, depth, args.threads, args.quick)
        rows = []
        for number, spec in enumerate(specs):
            log(f"[{NAME}] {number + 1}/{len(specs)}: {spec.layout} d={spec.d_model}")
            result = compile_and_measure(spec, backend, quant, protocol, cache_dir=args.cache_dir, threads=args.threads)
            if footprint := footprint_bytes(result):
                rows.append(estimate_row(spec, backend, quant, protocol.max_context, prefill, [footprint]))
            else:
                log(f"[{NAME}]   no footprint: {result.get('error', '')[:300]}")
    summary = error_distribution([r["relative_error"] for r in rows]) if rows else None
    run.save({"source": source, "backend": backend, "quant": quant, "summary": summary, "rows": rows})
    run.finish(render(rows, summary, source, backend, quant), "python -m bench.memory_estimate" + (" --quick" if args.quick else ""))
    return 0


def render(rows: list[dict], summary: dict | None, source: str | None, backend: str, quant: str) -> str:
    where = f"the footprints measured by `bench.repeatability` (`{Path(source).name}`; median of its two passes)" if source else "footprints measured in this run"
    how = (
        f"How: for each architecture, `estimate_peak_memory(spec, context, {backend!r}, {quant!r}, prefill_tokens=...)` "
        f"with the context and prefill length the artifact was measured at, against {where}: the growth of the "
        "measuring process's peak RSS over its baseline before the model was loaded (`footprint_bytes`). "
        "Error = (estimate - measured) / measured; positive means the estimate is too high (safe for a budget)."
    )
    if not rows or summary is None:  # no summary exactly when no rows
        return how + "\n\nNo footprint was measured: nothing to compare."
    s = summary
    summary_table = markdown_table(
        ["architectures", "median error", "p10 / p90", "median abs error", "max abs error", "within 10%", "within 25%", "overestimates", "lower bound above a measurement"],
        [[s["n"], pct(s["median"], 1), f"{pct(s['p10'], 1)} / {pct(s['p90'], 1)}", pct(s["median_abs"], 1), pct(s["max_abs"], 1), pct(s["within_10pct"]), pct(s["within_25pct"]), pct(s["overestimates"]), sum(r["lower_bound_violated"] for r in rows)]],
    )
    detail = markdown_table(
        ["layout", "params", "measured", "estimate", "error", "weights", "state", "activations", "runtime", "lower bound"],
        [
            [r["layout"], f"{r['parameters'] / 1e6:.1f}M", mib(r["measured_bytes"]), mib(r["estimate_bytes"]), pct(r["relative_error"], 1), mib(r["estimate"]["weights_bytes"]), mib(r["estimate"]["state_bytes"]), mib(r["estimate"]["activation_bytes"]), mib(r["estimate"]["runtime_overhead_bytes"]), mib(r["lower_bound_bytes"])]
            for r in rows
        ],
    )
    return "\n\n".join([how, summary_table, "<details><summary>Per architecture</summary>\n\n" + detail + "\n\n</details>"])


if __name__ == "__main__":
    raise SystemExit(main())
