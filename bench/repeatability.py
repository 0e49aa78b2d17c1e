"""Repeatability: the same architectures measured twice, each time in a fresh process.

Draws architectures from the small search space (seeded, so always the same ones),
compiles each once, then measures each twice through `devices.measure`, which runs every
measurement in its own child process. `--order sequential` (the default) measures all of
them (pass 1), then all of them again (pass 2): the passes are minutes apart, so drift of
the machine between them shows up. `--order interleaved` measures each architecture's two
passes back to back (A A B B ...): only process-to-process differences remain, so the two
orders side by side separate drift from process noise, and the median's own confidence
interval (reported per measurement) gives the within-process sampling noise.
Reported for prefill and decode: the median relative spread |a - b| / mean(a, b) over
the architectures and Kendall's tau between the two passes' rankings (what a search
needs: the same order, even when absolute numbers drift).

    python -m bench.repeatability           # 10 architectures (--archs 20 for the full count)
    python -m bench.repeatability --quick   # the tiny LFM2 and its twin, short prompts

The raw results (with the memory pass's footprints) are what `bench.memory_estimate`
reads.
"""

from __future__ import annotations

import argparse

from bench.harness import BenchRun, anchor_ratio, base_parser, compile_and_measure, footprint_bytes, log, measured_ms, precompile
from bench.models import QUICK_BACKEND, QUICK_DECODE_TOKENS, QUICK_POINT, anchor_spec, quick_models, sample_space
from bench.report import fmt, markdown_table, pct
from bench.stats import repeatability
from reports.intervals import measured_interval, pooled_load_spread
from search_space import costs

NAME = "repeatability"


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, default=10, help="architectures drawn from the small space (default 10 to fit 10 minutes; the issue asks for 20: --archs 20)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the draw (default 0)")
    parser.add_argument("--backend", default="onnx", help="backend (default onnx: see BENCHMARKS.md for why)")
    parser.add_argument("--quant", default="fp32", help="precision (default fp32)")
    parser.add_argument("--prefill", type=int, default=512, help="prefill length in tokens (default 512)")
    parser.add_argument("--depth", type=int, default=512, help="decode context depth (default 512)")
    parser.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                        help="time every point side by side with the space's anchor architecture (as a search does) and report the repeatability of the ratio of "
                             "lower quartiles beside the milliseconds' (default); --no-anchor: the milliseconds alone, the protocol of before")
    parser.add_argument("--processes", type=int, default=1,
                        help="fresh processes a point may use (devices.processes: the points still unsure after one are measured again in another, the figures combined; "
                             "default 1: several loads in one process buy the same for less, BENCHMARKS.md \"Load to load\"; with several processes, 3 s per point in each)")
    parser.add_argument("--loads", type=int, default=3,
                        help="loads of the model (and the anchor) inside each process, every point timed after each and the loads' figures combined "
                             "(devices.processes; where the weights land in memory moves a decode ratio from load to load); default 3, as a search, with 1.5 s per point in each")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                        help="the measuring processes' allocations in transparent huge pages (Protocol.huge_pages), as a search; --no-huge-pages: 4 KiB pages")
    parser.add_argument("--seconds", type=float, default=None,
                        help="the time cap of a point in each process (and each load); default 6 s for one process and one load, 3 s for several processes, 1.5 s for several loads")
    parser.add_argument("--order", choices=("sequential", "interleaved"), default="sequential",
                        help="sequential: pass 1 over all, then pass 2 (drift + process noise); interleaved: each architecture's passes back to back (process noise only)")
    return parser.parse_args(argv)


def variant_flags(args) -> list[str]:
    """The flags that make this run a variant of the default one (its own block and results
    file, so that the ONNX run, the ExecuTorch run and the interleaved run stand side by side)."""
    flags = []
    if not args.quick and (args.backend, args.quant) != ("onnx", "fp32"):
        flags += ["--backend", args.backend, "--quant", args.quant]
    if args.order != "sequential":
        flags += ["--order", args.order]
    if not args.quick and args.processes != 1:
        flags += ["--processes", str(args.processes)]
    if args.loads != 3:
        flags += ["--loads", str(args.loads)]
    if not args.huge_pages:
        flags += ["--no-huge-pages"]
    if not args.quick and args.seconds is not None:
        flags += ["--seconds", f"{args.seconds:g}"]
    if not args.anchor:
        flags += ["--no-anchor"]
    return flags


#: flags whose value is a count, and its unit (singular, plural) in a variant's words
COUNTED_FLAGS = {"--processes": ("process", "processes"), "--loads": ("load", "loads"), "--seconds": ("s", "s")}


def variant_words(args) -> list[str]:
    """The variant's words: the values of its flags, and `plain` for --no-anchor."""
    flags = variant_flags(args)
    words = []
    for at, item in enumerate(flags):
        if item.startswith("--"):
            continue
        unit = COUNTED_FLAGS.get(flags[at - 1])  # a bare number says nothing: "1_process", "3_loads"
        words.append(item if unit is None else f"{item}_{unit[item != '1']}")
    return words + (["4k_pages"] if "--no-huge-pages" in flags else []) + (["plain"] if "--no-anchor" in flags else [])


def block_name(args) -> str:
    return "_".join([NAME, *variant_words(args)])


def title(args) -> str:
    what = "Repeatability: the same architectures measured twice in separate processes"
    words = variant_words(args)
    return what if not words else f"{what} ({' '.join(words)})"


def protocol_for(prefill: int, depth: int, threads: int, quick: bool, processes: int = 1, loads: int = 1, huge_pages: bool = False, seconds: float | None = None):
    from devices.protocol import Protocol

    # The protocol's defaults otherwise: sampling until the median's interval is within +-2%,
    # warm-up until steady, the calibration check around every point. Several processes: a
    # shorter time in each (past ~2-3 s a process's own samples no longer move the spread
    # between measurements of a decode ratio: BENCHMARKS.md, "A point in several processes").
    # Several loads: 1.5 s in each (BENCHMARKS.md, "Load to load").
    if seconds is None:
        seconds = 2.0 if quick else (1.5 if loads > 1 else 3.0 if processes > 1 else 6.0)
    return Protocol(prompt_lengths=(prefill,), decode_depths=(depth,), decode_tokens=QUICK_DECODE_TOKENS if quick else 16, max_seconds_per_point=seconds, measure_memory=True, threads=threads,
                    processes=processes, loads=loads, huge_pages=huge_pages)


def point_stats(result: dict, kind: str, point: int) -> dict | None:
    stats = (result.get("measurement") or {}).get(kind, {}).get(str(point))
    return stats if isinstance(stats, dict) else None


def within_process(results: list[dict], kind: str, point: int) -> dict | None:
    """The sampling noise inside one process: the median over measurements of the median's
    95% interval half-width (relative), the timed runs it took, and the points flagged."""
    stats = [s for s in (point_stats(r, kind, point) for r in results) if s and s.get("ci_half_width_rel") is not None]
    if not stats:
        return None
    widths = sorted(s["ci_half_width_rel"] for s in stats)
    runs = sorted(len(s["samples_ms"]) for s in stats)
    return {
        "n": len(stats),
        "median_ci_half_width": widths[len(widths) // 2],
        "max_ci_half_width": widths[-1],
        "median_runs": runs[len(runs) // 2],
        "noisy": sum(bool(s.get("noisy")) for s in stats),
        "disturbed": sum(bool(s.get("disturbed")) for s in stats),
        "remeasured": sum(int(s.get("remeasured") or 0) for s in stats),
    }


def processes_used(results: list[dict], kind: str, point: int, over: str = "processes") -> dict | None:
    """How many fresh processes (or loads of the first process) the points took (1 where a point was sure after one)."""
    def count(stats: dict) -> int:
        entries = stats.get(over)
        if entries is None and over == "loads":  # a point of several processes keeps the first one's loads in its summary
            entries = (stats.get("processes") or [{}])[0].get("loads")
        return len(entries or [None])

    counts = sorted(count(s) for s in (point_stats(r, kind, point) for r in results) if s)
    return None if not counts else {"median": counts[len(counts) // 2], "min": counts[0], "max": counts[-1]}


def first_processes_ratio(result: dict, kind: str, point: int, count: int, over: str = "processes") -> float | None:
    """The anchored ratio had the point stopped after its first `count` processes (or loads):
    the same combination (devices.processes) over fewer of the stored per-process (per-load)
    figures, so that one run says what each extra process or load bought."""
    from devices.processes import random_effects

    stats = point_stats(result, kind, point)
    taken = [p for p in (stats or {}).get(over) or [] if p.get("ratio") is not None][:count]
    if len(taken) < count:
        return None
    kept = [p for p in taken if not p.get("disturbed")] or taken
    return random_effects([p["ratio"] for p in kept], [p["ratio_ci_low"] for p in kept], [p["ratio_ci_high"] for p in kept])["estimate"]


def interval_coverage(passes: list[list[dict]], kind: str, point: int) -> dict | None:
    """How often the other pass's anchored ratio fell inside this pass's 95% interval (both
    ways round): the point's own interval, and the one a report draws, widened to the run's
    pooled between-load spread (reports.intervals). Honest intervals of two equally precise
    estimates give ~83%; fewer says the intervals claim more than the measurements hold."""
    stats = [[point_stats(r, kind, point) for r in taken] for taken in passes]
    spread = pooled_load_spread(s for taken in stats for s in taken)
    hits: dict[str, list[bool]] = {"own": [], "pooled": []}
    for mine, theirs in ((stats[0], stats[1]), (stats[1], stats[0])):
        for a, b in zip(mine, theirs):
            if not a or not b or not a.get("anchor") or not b.get("anchor"):
                continue
            ratio, other = a["anchor"]["ratio"], b["anchor"]["ratio"]
            for name, with_spread in (("own", None), ("pooled", spread)):
                interval = measured_interval(a, ratio, with_spread)
                if interval is not None:
                    hits[name].append(ratio - interval[0] <= other <= ratio + interval[1])
    if not hits["own"]:
        return None
    return {"n": len(hits["own"]), "own": sum(hits["own"]) / len(hits["own"]), "pooled": sum(hits["pooled"]) / len(hits["pooled"]) if spread else None,
            "pooled_load_sd": spread.sd if spread else None}


def anchor_ms(result: dict, kind: str, point: int) -> float | None:
    """The anchor's own lower quartile in this measurement: how far the host drifted between passes."""
    stats = point_stats(result, kind, point)
    return None if not stats or not stats.get("anchor") else float(stats["anchor"]["anchor_quantile_ms"])


def pair_metrics(first: list[float | None], second: list[float | None]) -> dict | None:
    """`bench.stats.repeatability` over the items measured in both passes (None: failed)."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    return repeatability([a for a, _ in pairs], [b for _, b in pairs])


def main(argv=None) -> int:
    args = parse_args(argv)
    run = BenchRun(block_name(args), title(args), args, module=NAME)
    if args.quick:
        specs, prefill, depth = list(quick_models().values()), QUICK_POINT, QUICK_POINT
        args.backend, args.quant = QUICK_BACKEND
    else:
        specs, prefill, depth = sample_space(args.archs, seed=args.seed), args.prefill, args.depth
    protocol = protocol_for(prefill, depth, args.threads, args.quick, 2 if args.quick else args.processes, args.loads, args.huge_pages, args.seconds)

    anchor = None if not args.anchor else anchor_spec()
    jobs = [(spec, args.backend, args.quant) for spec in specs] + ([(anchor, args.backend, args.quant)] if anchor else [])
    compiled = precompile(jobs, protocol, cache_dir=args.cache_dir)
    anchor_artifact = None
    if anchor is not None:
        if not compiled[-1].get("ok"):
            log(f"[{NAME}] the anchor {anchor.layout} did not compile: {compiled[-1].get('error')}")
            return 1
        anchor_artifact = compiled[-1]["path"]
    results: dict[tuple[int, int], dict] = {}  # (pass, architecture number) -> its result
    order = [(index, number) for index in range(2) for number in range(len(specs))]
    if args.order == "interleaved":
        order = [(index, number) for number in range(len(specs)) for index in range(2)]
    point_seconds = []
    for index, number in order:
        spec = specs[number]
        log(f"[{NAME}] pass {index + 1}, {number + 1}/{len(specs)}: {spec.layout} d={spec.d_model} ({costs.parameters(spec) / 1e6:.1f}M)")
        result = compile_and_measure(spec, args.backend, args.quant, protocol, cache_dir=args.cache_dir, threads=args.threads, precompiled=compiled[number], anchor=anchor_artifact)
        if not result["ok"]:
            log(f"[{NAME}]   failed at {result.get('stage')}: {result.get('error', '')[:300]}")
        elif (result.get("measurement") or {}).get("wall_time_s"):
            point_seconds.append(result["measurement"]["wall_time_s"] / 2)  # a measurement is two points (prefill, decode)
        results[index, number] = result
    passes = [[results[index, number] for number in range(len(specs))] for index in range(2)]

    metrics = {}
    for kind, point in (("prefill", prefill), ("decode", depth)):
        first = [measured_ms(r, kind, point) for r in passes[0]]
        second = [measured_ms(r, kind, point) for r in passes[1]]
        metrics[kind] = pair_metrics(first, second)
        if anchor is not None:
            metrics[f"{kind}_anchored"] = pair_metrics([anchor_ratio(r, kind, point) for r in passes[0]], [anchor_ratio(r, kind, point) for r in passes[1]])
            metrics[f"{kind}_anchor_itself"] = pair_metrics([anchor_ms(r, kind, point) for r in passes[0]], [anchor_ms(r, kind, point) for r in passes[1]])
            for count in range(1, protocol.processes):
                metrics[f"{kind}_anchored_first_{count}"] = pair_metrics([first_processes_ratio(r, kind, point, count) for r in passes[0]],
                                                                          [first_processes_ratio(r, kind, point, count) for r in passes[1]])
            if protocol.processes == 1:
                for count in range(1, protocol.loads):
                    metrics[f"{kind}_anchored_first_{count}_loads"] = pair_metrics([first_processes_ratio(r, kind, point, count, "loads") for r in passes[0]],
                                                                                   [first_processes_ratio(r, kind, point, count, "loads") for r in passes[1]])
    footprints = [(footprint_bytes(a), footprint_bytes(b)) for a, b in zip(*passes)]
    fp_pairs = [(a, b) for a, b in footprints if a and b]
    metrics["footprint"] = pair_metrics([a for a, _ in fp_pairs], [b for _, b in fp_pairs]) if len(fp_pairs) >= 2 else None
    metrics["within_process"] = {kind: within_process(passes[0] + passes[1], kind, point) for kind, point in (("prefill", prefill), ("decode", depth))}
    metrics["coverage"] = {kind: interval_coverage(passes, kind, point) for kind, point in (("prefill", prefill), ("decode", depth))}
    metrics["processes_allowed"] = protocol.processes
    metrics["processes"] = {kind: processes_used(passes[0] + passes[1], kind, point) for kind, point in (("prefill", prefill), ("decode", depth))}
    metrics["loads_allowed"] = protocol.loads
    metrics["seconds_cap"] = protocol.max_seconds_per_point
    metrics["huge_pages"] = protocol.huge_pages
    metrics["loads"] = {kind: processes_used(passes[0] + passes[1], kind, point, "loads") for kind, point in (("prefill", prefill), ("decode", depth))}
    metrics["seconds_per_point"] = sorted(point_seconds)[len(point_seconds) // 2] if point_seconds else None
    metrics["order"] = args.order

    rows = []
    for spec, a, b in zip(specs, *passes):
        rows.append(
            {
                "spec": spec.to_dict(),
                "spec_key": spec.key,
                "layout": spec.layout,
                "parameters": costs.parameters(spec),
                "prefill_ms": [measured_ms(a, "prefill", prefill), measured_ms(b, "prefill", prefill)],
                "decode_ms": [measured_ms(a, "decode", depth), measured_ms(b, "decode", depth)],
                "footprint_bytes": [footprint_bytes(a), footprint_bytes(b)],
                "prefill_anchor_ratio": [anchor_ratio(a, "prefill", prefill), anchor_ratio(b, "prefill", prefill)],
                "decode_anchor_ratio": [anchor_ratio(a, "decode", depth), anchor_ratio(b, "decode", depth)],
                "errors": [r.get("error") for r in (a, b) if not r["ok"]],
            }
        )
    run.save({"backend": args.backend, "quant": args.quant, "prefill_tokens": prefill, "decode_depth": depth, "protocol": protocol.to_dict(), "anchor": None if anchor is None else anchor.to_dict(),
              "metrics": metrics, "rows": rows, "raw": passes})
    command = ["python -m bench.repeatability"] + (["--quick"] if args.quick else []) + ([f"--archs {args.archs}"] if not args.quick and args.archs != 10 else []) + variant_flags(args)
    run.finish(render(metrics, rows, args, prefill, depth), " ".join(command))
    return 0


def anchor_layout(args) -> str:
    spec = anchor_spec()
    return f"{spec.layout}, d {spec.d_model}, {costs.parameters(spec) / 1e6:.0f}M parameters"


def render(metrics: dict, rows: list[dict], args, prefill: int, depth: int) -> str:
    summary = []
    for kind, label in (("prefill", f"prefill {prefill} tokens"), ("decode", f"decode per token at depth {depth}"), ("footprint", "memory footprint")):
        m = metrics.get(kind)
        if m is None:
            summary.append([label, "-", "-", "-", "-", "-", "fewer than 2 architectures measured twice"])
        else:
            summary.append([label, m["n"], pct(m["median_relative_spread"], 1), pct(m["p90_relative_spread"], 1), pct(m["max_relative_spread"], 1), f"{m['tau']:.3f}", f"{m['p_value']:.2g}"])
    for kind, label in (("prefill", f"prefill {prefill} tokens"), ("decode", f"decode per token at depth {depth}")):
        stages = [(f"_anchored_first_{count}", f"relative to the anchor, had the point stopped after its first {count} process{'es' if count > 1 else ''}") for count in range(1, args.processes)]
        stages += [(f"_anchored_first_{count}_loads", f"relative to the anchor, had the point stopped after its first {count} load{'s' if count > 1 else ''}") for count in range(1, args.loads)]
        for suffix, what in (*stages, ("_anchored", "relative to the anchor (candidate / anchor lower quartiles, sampled side by side)"), ("_anchor_itself", "the anchor's own ms beside each candidate (the drift)")):
            m = metrics.get(kind + suffix)
            if m is not None:
                summary.append([f"{label}: {what}", m["n"], pct(m["median_relative_spread"], 1), pct(m["p90_relative_spread"], 1), pct(m["max_relative_spread"], 1), f"{m['tau']:.3f}", f"{m['p_value']:.2g}"])
    for kind, label in (("prefill", f"prefill {prefill} tokens"), ("decode", f"decode per token at depth {depth}")):
        w = (metrics.get("within_process") or {}).get(kind)
        if w:
            summary.append([f"{label}: inside one process (median's 95% CI, +-)", w["n"], pct(w["median_ci_half_width"], 1), "-", pct(w["max_ci_half_width"], 1), "-",
                            f"{w['median_runs']} runs (median); {w['noisy']} noisy, {w['disturbed']} disturbed, {w['remeasured']} re-measures"])
        covered = (metrics.get("coverage") or {}).get(kind)
        if covered:
            pooled = "-" if covered["pooled"] is None else f"{pct(covered['pooled'], 0)} widened to the pooled load spread ({pct(covered['pooled_load_sd'], 1)})"
            summary.append([f"{label}: the other pass inside this one's 95% interval (honest: ~83%)", covered["n"], pct(covered["own"], 0), "-", "-", "-", f"own interval; {pooled}"])
        used = (metrics.get("processes") or {}).get(kind)
        if used and used["max"] > 1:
            summary.append([f"{label}: fresh processes per point", "-", str(used["median"]), "-", str(used["max"]), "-", f"min {used['min']}"])
        loads = (metrics.get("loads") or {}).get(kind)
        if loads and loads["max"] > 1:
            summary.append([f"{label}: loads per point (first process)", "-", str(loads["median"]), "-", str(loads["max"]), "-", f"min {loads['min']}"])
    detail = []
    for r in rows:
        p, d, f = r["prefill_ms"], r["decode_ms"], r["footprint_bytes"]
        ratios = [" / ".join("-" if x is None else f"{x:.3f}" for x in r.get(name) or (None, None)) for name in ("prefill_anchor_ratio", "decode_anchor_ratio")]
        detail.append([r["layout"], fmt(r["parameters"]), f"{fmt(p[0])} / {fmt(p[1])}", f"{fmt(d[0])} / {fmt(d[1])}", *(ratios if args.anchor else []),
                       " / ".join("-" if x is None else f"{x / 2**20:.0f}" for x in f), "; ".join(e[:80] for e in r["errors"]) or ""])
    failed = sum(1 for r in rows if r["errors"])
    how = (
        ("How: the quick run's tiny LFM2 and its all-attention twin, " if args.quick else f"How: {len(rows)} architectures drawn uniformly from the small search space (Optuna random sampler, seed {args.seed}), ")
        + f"compiled once for {args.backend} {args.quant} (two compiles at a time, before any measurement), then measured twice "
        + ("back to back (interleaved: A A B B ..., process-to-process noise only)" if metrics.get("order") == "interleaved" else "in two passes over all of them (sequential: drift between passes included)")
        + f", every measurement in a fresh child process (`devices.measure`; {args.threads} threads; warm-up until steady, then timed runs until the median's 95% interval "
        f"is within +-2% or the point's time cap; a point disturbed per the calibration kernel is re-measured). "
        + (
            f"A point may take up to {metrics['processes_allowed']} fresh processes: after the first, the points whose figure is still less sure than +-2% are measured again "
            "in another, and the processes' figures combined (random effects, devices.processes); a process then re-measures a point only when disturbed. "
            if (metrics.get("processes_allowed") or 1) > 1
            else ""
        )
        + (
            f"Inside each process the candidate and the anchor are loaded up to {metrics['loads_allowed']} times, every point timed after each load ({metrics['seconds_cap']:g} s "
            "at most each), the loads' figures combined as processes' are; from the second load on, a point whose combined figure is within +-2% is not timed again. "
            if (metrics.get("loads_allowed") or 1) > 1
            else ""
        )
        + ("The measuring processes' allocations are in transparent huge pages (glibc.malloc.hugetlb=1). " if metrics.get("huge_pages") else "")
        + (
            f"Anchored: every timed sample is a pair, the candidate's run and the anchor's ({anchor_layout(args)}, compiled for the same backend and precision) back to back, "
            "and sampling stops when the ratio of their lower quartiles is pinned down (devices.sampling.ANCHOR_QUANTILE: interference only adds time, in bursts); "
            "the ratio is what drift of the host between the passes should not move. "
            if args.anchor
            else ""
        )
        + (f"Median wall time per measured point: {metrics['seconds_per_point']:.1f} s. " if metrics.get("seconds_per_point") else "")
        + "Relative spread = |pass 1 - pass 2| / mean; Kendall's tau-b (scipy) between the two passes' orderings "
        f"(1 = identical ranking). {failed} architecture(s) failed in at least one pass."
        + (
            " The backend is ONNX Runtime because the default must finish in 10 minutes: ONNX export takes seconds per "
            "architecture, ExecuTorch lowering tens of seconds; `--backend executorch --quant 8da4w` measures the search's default."
            if args.backend == "onnx" and not args.quick
            else ""
        )
    )
    return "\n\n".join(
        [
            how,
            markdown_table(["what", "architectures", "median spread", "p90 spread", "max spread", "Kendall tau", "p-value"], summary),
            "<details><summary>Per architecture (pass 1 / pass 2)</summary>\n\n"
            + markdown_table(["layout", "params", "prefill ms", "decode ms/token", *(["prefill / anchor", "decode / anchor"] if args.anchor else []), "footprint MiB", "error"], detail)
            + "\n\n</details>",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
