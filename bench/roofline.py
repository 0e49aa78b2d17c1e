"""Roofline: how close each backend comes to what this machine can do.

Measures the machine's read bandwidth and fp32 GEMM rate (numpy and torch, 1 and N
threads), then compiles a few architectures of the small search space for every backend
and measures them through `devices.measure`:

* decode: bytes a step must read (weights at the backend's precision, the tied head, the
  K/V of the context; `bench.models.decode_bytes_per_token`) / time per token, as a
  fraction of the bandwidth;
* prefill: algorithmic FLOPs (`search_space.costs.prefill_flops`) / time, as a fraction
  of the fp32 GEMM rate.

The ceilings are measured before and after the backends; the higher of the two is the
roof (the machine is shared, so a single reading can be low).

    python -m bench.roofline            # 3 architectures x 4 backend/quant pairs (5 with llama.cpp installed)
    python -m bench.roofline --quick    # 1 tiny model, ONNX Runtime fp32 only
"""

from __future__ import annotations

import importlib.util

from bench.ceilings import measure_ceilings
from bench.harness import BenchRun, base_parser, compile_and_measure, log, measured_ms, precompile
from bench.models import QUICK_BACKEND, QUICK_DECODE_TOKENS, QUICK_POINT, WEIGHT_PRECISION, by_size, decode_bytes_per_token, quick_models, sample_space
from bench.report import fmt, markdown_table, pct
from search_space import costs

NAME = "roofline"
BACKENDS: tuple[tuple[str, str], ...] = (("executorch", "fp32"), ("executorch", "8da4w"), ("onnx", "fp32"), ("onnx", "int8"))
if importlib.util.find_spec("llama_cpp") is not None:  # the optional extra: pip install -e ".[llamacpp]"
    BACKENDS += (("llamacpp", "q4_0"),)


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--draw", type=int, default=20, help="architectures drawn from the small space (seed 0) to pick from (default 20, as bench.repeatability --archs 20)")
    parser.add_argument("--archs", type=int, default=3, help="architectures of the small space, spread over its sizes (default 3)")
    parser.add_argument("--prefill", type=int, default=512, help="prefill length in tokens (default 512)")
    parser.add_argument("--depth", type=int, default=512, help="decode context depth (default 512)")
    parser.add_argument("--backends", default=",".join(f"{b}:{q}" for b, q in BACKENDS), help="comma-separated backend:quant pairs")
    return parser.parse_args(argv)


def runnable_draw(draw: int, wanted: int, backends: set[str]) -> list:
    """`draw` architectures of the small space (seed 0) that every one of `backends` can run,
    drawing further in the same seeded sequence until at least `wanted` qualify: llama.cpp
    refuses layouts that mix full and sliding-window attention, and a roofline compares the
    backends on the same architectures."""
    from devices.backends import backend_module

    checks = [check for check in (getattr(backend_module(b), "unsupported_reason", None) for b in sorted(backends)) if check is not None]
    count = draw
    while True:
        specs = [spec for spec in sample_space(count, seed=0) if not any(check(spec) for check in checks)]
        if len(specs) >= wanted or count >= 50 * draw:
            return specs
        count *= 2


def roofline_row(spec, backend: str, quant: str, prefill_ms: float | None, decode_ms: float | None, prefill_tokens: int, depth: int, bandwidth_GBps: float, gemm_GFLOPs: float) -> dict:
    """The achieved rates of one measured artifact and their fractions of the roofs."""
    flops = costs.prefill_flops(spec, prefill_tokens)
    moved = decode_bytes_per_token(spec, WEIGHT_PRECISION[(backend, quant)], depth)
    row = {"backend": backend, "quant": quant, "spec_key": spec.key, "layout": spec.layout, "parameters": costs.parameters(spec), "prefill_flops": flops, "decode_bytes": moved, "prefill_ms": prefill_ms, "decode_ms": decode_ms}
    if prefill_ms:
        row["prefill_GFLOPs"] = flops / (prefill_ms / 1e3) / 1e9
        row["prefill_fraction_of_gemm"] = row["prefill_GFLOPs"] / gemm_GFLOPs
    if decode_ms:
        row["decode_GBps"] = moved / (decode_ms / 1e3) / 1e9
        row["decode_fraction_of_bandwidth"] = row["decode_GBps"] / bandwidth_GBps
    return row


def main(argv=None) -> int:
    from devices.protocol import Protocol

    args = parse_args(argv)
    run = BenchRun(NAME, "Roofline: backends against the machine's bandwidth and GEMM rate", args)
    if args.quick:
        specs, pairs, prefill, depth = [quick_models()["tiny-LFM2"]], [QUICK_BACKEND], QUICK_POINT, QUICK_POINT
    else:
        pairs = [tuple(p.split(":")) for p in args.backends.split(",")]
        specs = by_size(runnable_draw(args.draw, args.archs, {backend for backend, _ in pairs}), args.archs)
        prefill, depth = args.prefill, args.depth
    protocol = Protocol(prompt_lengths=(prefill,), decode_depths=(depth,), decode_tokens=QUICK_DECODE_TOKENS if args.quick else 16, min_runs=3, max_runs=10, max_seconds_per_point=5.0 if not args.quick else 2.0, measure_memory=False, threads=args.threads)

    log(f"[{NAME}] measuring the machine's ceilings ({args.threads} threads)")
    before = measure_ceilings(args.threads, quick=args.quick)
    compiled = iter(precompile([(spec, backend, quant) for backend, quant in pairs for spec in specs], protocol, cache_dir=args.cache_dir))
    results = []
    for backend, quant in pairs:
        for spec in specs:  # the order precompile was given
            log(f"[{NAME}] {backend}/{quant} {spec.layout} d={spec.d_model} ({costs.parameters(spec) / 1e6:.1f}M)")
            results.append(compile_and_measure(spec, backend, quant, protocol, cache_dir=args.cache_dir, threads=args.threads, precompiled=next(compiled)))
            if not results[-1]["ok"]:
                log(f"[{NAME}]   failed at {results[-1].get('stage')}: {results[-1].get('error', '')[:300]}")
    log(f"[{NAME}] measuring the ceilings again")
    after = measure_ceilings(args.threads, quick=args.quick)
    bandwidth = max(before["bandwidth_GBps"], after["bandwidth_GBps"])
    gemm = max(before["gemm_GFLOPs"], after["gemm_GFLOPs"])

    rows = []
    for spec_result, (backend, quant, spec) in zip(results, [(b, q, s) for b, q in pairs for s in specs]):
        row = roofline_row(spec, backend, quant, measured_ms(spec_result, "prefill", prefill), measured_ms(spec_result, "decode", depth), prefill, depth, bandwidth, gemm)
        row["error"] = None if spec_result["ok"] else f"{spec_result.get('stage')}: {spec_result.get('error', '')[:200]}"
        rows.append(row)

    run.save({"ceilings_before": before, "ceilings_after": after, "bandwidth_GBps": bandwidth, "gemm_GFLOPs": gemm, "prefill_tokens": prefill, "decode_depth": depth, "protocol": protocol.to_dict(), "rows": rows, "raw": results})
    body = render(before, after, bandwidth, gemm, rows, prefill, depth, args)
    run.finish(body, "python -m bench.roofline" + (" --quick" if args.quick else ""))
    return 0


def render(before: dict, after: dict, bandwidth: float, gemm: float, rows: list[dict], prefill: int, depth: int, args) -> str:
    ceiling_rows = []
    for kind, unit in (("bandwidth", "GB/s"), ("gemm", "GFLOP/s")):
        for b, a in zip(before[kind], after[kind]):
            key = "best_GBps" if kind == "bandwidth" else "best_GFLOPs"
            med = "median_GBps" if kind == "bandwidth" else "median_GFLOPs"
            ceiling_rows.append([f"{'read bandwidth' if kind == 'bandwidth' else 'fp32 GEMM'} ({b['tool']})", b["threads"], f"{fmt(b[key])} / {fmt(a[key])} {unit}", f"{fmt(b[med])} / {fmt(a[med])} {unit}"])
    table_rows = []
    for r in rows:
        if r["error"]:
            table_rows.append([f"{r['backend']} {r['quant']}", r["layout"], fmt(r["parameters"]), "failed", "-", "-", "-", "-", "-", r["error"][:120]])
            continue
        table_rows.append(
            [
                f"{r['backend']} {r['quant']}",
                r["layout"],
                fmt(r["parameters"]),
                fmt(r["prefill_ms"]),
                fmt(r.get("prefill_GFLOPs")),
                pct(r.get("prefill_fraction_of_gemm")),
                fmt(r["decode_ms"]),
                f"{r['decode_bytes'] / 1e6:.1f}",
                fmt(r.get("decode_GBps")),
                pct(r.get("decode_fraction_of_bandwidth")),
            ]
        )
    notes = (
        f"How: the ceilings are the best of {before['repeats']} repetitions: a float32 sum over {before['megabytes']} MiB "
        f"(read bandwidth) and a {before['n']}x{before['n']} fp32 matmul (GEMM), measured before and after the backends "
        f"(shown as before / after); the roof is the higher reading: **{bandwidth:.1f} GB/s** and **{gemm:.0f} GFLOP/s** "
        f"at {args.threads} threads. Each architecture ({'the quick run: one tiny LFM2' if args.quick else 'from the small search space, spread over its sizes'}) is compiled "
        f"with `devices.compile` and measured with `devices.measure` in a fresh process: prefill of {prefill} tokens, "
        f"decode per token at depth {depth} (medians). Decode bytes/token = linear weights and LM head at the backend's "
        "precision + norms + one embedding row + fp32 K/V of the context; prefill FLOPs are algorithmic "
        "(`search_space.costs.prefill_flops`, 2 per MAC). The GEMM roof is fp32: an int8/int4 kernel may exceed it, "
        "so a quantised backend's prefill fraction above 100% is possible and not an error."
    )
    return "\n\n".join(
        [
            notes,
            markdown_table(["ceiling", "threads", "best (before / after)", "median (before / after)"], ceiling_rows),
            markdown_table(["backend", "layout", "params", "prefill ms", "prefill GFLOP/s", "of GEMM roof", "decode ms/token", "decode MB/token", "decode GB/s", "of bandwidth roof"], table_rows),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
