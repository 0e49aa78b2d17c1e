"""LFM2 against the paper's comparison class: prefill and decode throughput on this CPU.

The LFM2 report claims up to 2x faster prefill and decode on CPUs than similarly sized
models. This measures, side by side in one run and with random weights:

* LFM2-350M against its same-size all-attention twin and a Qwen3-0.6B-shaped model;
* (with --full) LFM2-1.2B against its twin and a Llama-3.2-1B-shaped model;

compiled with the project's own toolchain (`devices.compile`) for ExecuTorch 8da4w,
ExecuTorch fp32 and ONNX Runtime int8, and measured with `devices.measure` (a fresh
process per artifact): prefill tokens/s at 512..8192 tokens, decode tokens/s at context
depth 512..8192, and the model's memory footprint. It prints the ratios (LFM2 / other),
the context at which LFM2 reaches 2x if it does, and the FLOPs and bytes of each model,
so that a reader can tell what the ratio should be from arithmetic alone.

    python -m bench.lfm2_vs_attention            # defaults sized for 10 minutes (see --help)
    python -m bench.lfm2_vs_attention --full     # everything the issue lists (hours on 2 cores)
    python -m bench.lfm2_vs_attention --quick    # tiny LFM2 vs its twin, one point

`--full` is hours on 2 cores; `--merge` lets it be done in parts: each part measures some
backends and points (every model of a pair in the same run, so each ratio is still measured
side by side) and the last one folds the earlier parts' results files into one table, the
newest run winning where two measured the same point.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.harness import BenchRun, base_parser, compile_and_measure, footprint_bytes, log, measured_ms, precompile
from bench.models import MODELS, PAIRS, QUICK_BACKEND, QUICK_DECODE_TOKENS, QUICK_POINT, WEIGHT_PRECISION, arithmetic, quick_models
from bench.report import fmt, load_json, markdown_table, mib
from bench.stats import crossing, speedup

NAME = "lfm2_vs_attention"

ALL_BACKENDS = ("executorch:8da4w", "executorch:fp32", "onnx:int8", "llamacpp:q4_0")
ALL_PREFILL = (512, 2048, 4096, 8192)
ALL_DECODE = (512, 4096, 8192)

#: The defaults: what fits in ~10 minutes on a 2-core machine (BENCHMARKS.md says why).
DEFAULT_PAIRS = ("LFM2-350M",)
DEFAULT_BACKENDS = ("onnx:int8",)
DEFAULT_PREFILL = (512, 2048)
DEFAULT_DECODE = (512, 4096, 8192)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help=f"both pairs, backends {','.join(ALL_BACKENDS)}, prefill {ALL_PREFILL}, decode {ALL_DECODE}")
    parser.add_argument("--pairs", type=_names, default=DEFAULT_PAIRS, help=f"LFM2 models to compare, of {', '.join(PAIRS)} (default {','.join(DEFAULT_PAIRS)})")
    parser.add_argument("--backends", type=_names, default=DEFAULT_BACKENDS, help=f"backend:quant pairs of {', '.join(ALL_BACKENDS)} (default {','.join(DEFAULT_BACKENDS)})")
    parser.add_argument("--prefill", type=_ints, default=DEFAULT_PREFILL, help=f"prefill lengths (default {','.join(map(str, DEFAULT_PREFILL))})")
    parser.add_argument("--decode", type=_ints, default=DEFAULT_DECODE, help=f"decode context depths (default {','.join(map(str, DEFAULT_DECODE))})")
    parser.add_argument("--compare-with", type=_names, default=None, help=f"override the models each LFM2 model is compared with (names from {', '.join(MODELS)})")
    parser.add_argument("--merge", type=_names, default=(), help="results files of earlier runs to fold into this one (comma-separated, oldest first)")
    parser.add_argument("--merge-only", action="store_true", help="measure nothing: fold the --merge files into one table (and results file)")
    parser.add_argument("--min-runs", type=int, default=2, help="timed runs per point after one warm-up (default 2: an 8,192-token prefill of a 0.6B model takes a minute)")
    args = parser.parse_args(argv)
    if args.merge_only and not args.merge:
        parser.error("--merge-only needs --merge FILES (the results files to fold)")
    missing = [path for path in args.merge if not Path(path).is_file()]
    if missing:
        parser.error(f"--merge: no results file at {', '.join(missing)} (give the --results files of earlier runs)")
    if args.full:
        args.pairs, args.backends, args.prefill, args.decode = tuple(PAIRS), ALL_BACKENDS, ALL_PREFILL, ALL_DECODE
    return args


def ratio_table(models: dict[str, dict], lfm2: str, other: str, points: tuple[int, ...], kind: str) -> list[float | None]:
    """LFM2's throughput over `other`'s at each point (tok/s ratio = latency ratio inverted)."""
    out = []
    for point in points:  # never a ratio of two runs' numbers: the newest run that measured both, if any
        xs, ys = _values_by_run(models[lfm2], kind, point), _values_by_run(models[other], kind, point)
        common = set(xs) & set(ys)
        out.append(speedup(ys[max(common)], xs[max(common)]) if common else None)
    return out


def _values_by_run(m: dict, kind: str, point: int) -> dict[int, float]:
    """A model's numbers at one point by the run that measured them (one run when not merged)."""
    if "by_run" in m:
        return m["by_run"].get(kind, {}).get(point, {})
    value = m[kind].get(point)
    return {} if value is None else {0: value}


def throughput(result: dict, kind: str, point: int, tokens: int) -> float | None:
    """tokens/s of a prefill of `point` tokens (tokens = point) or of decode (1 token a step)."""
    ms = measured_ms(result, kind, point)
    return tokens / (ms / 1e3) if ms else None


def _backend_quant(pair: str) -> tuple[str, str]:
    """`backend:quant` (a --backends entry) as its two parts."""
    backend, quant = pair.split(":")
    return backend, quant


def main(argv=None) -> int:
    from devices.protocol import Protocol

    args = parse_args(argv)
    run = BenchRun(NAME, "LFM2 against all-attention models of its size: prefill and decode on this CPU", args)
    if args.merge_only:
        run.load_before = []  # nothing measured now: the block lists each measuring run's own load
    pairs: dict[str, tuple[str, ...]]
    backends: tuple[str, ...]
    if args.quick:
        models = quick_models()
        pairs = {"tiny-LFM2": ("tiny-LFM2-attn",)}
        backends, prefill, decode = (":".join(QUICK_BACKEND),), (QUICK_POINT,), (QUICK_POINT,)
    else:
        unknown = [p for p in args.pairs if p not in PAIRS]
        if unknown:
            raise SystemExit(f"unknown pair(s) {unknown}: choose from {', '.join(PAIRS)}")
        pairs = {p: args.compare_with or PAIRS[p] for p in args.pairs}
        unknown = [m for others in pairs.values() for m in others if m not in MODELS]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
        models = {name: MODELS[name] for p, others in pairs.items() for name in (p, *others)}
        backends, prefill, decode = (() if args.merge_only else tuple(args.backends)), args.prefill, args.decode
    protocol = Protocol(prompt_lengths=prefill, decode_depths=decode, decode_tokens=8 if not args.quick else QUICK_DECODE_TOKENS, warmup_runs=1, min_runs=args.min_runs, max_runs=5, max_seconds_per_point=20.0 if not args.quick else 2.0, measure_memory=True, threads=args.threads)

    jobs = [(spec, *_backend_quant(pair)) for pair in backends for spec in models.values()]
    compiled = {(spec.key, backend, quant): row for (spec, backend, quant), row in zip(jobs, precompile(jobs, protocol, cache_dir=args.cache_dir))}
    measured: dict[str, dict[str, dict]] = {}  # backend -> model -> {"prefill": {T: tok/s}, "decode": {C: tok/s}, "footprint": bytes}
    raw: dict[str, dict[str, dict]] = {}
    for pair in backends:
        backend, quant = pair.split(":")
        measured[pair], raw[pair] = {}, {}
        for name, spec in models.items():
            log(f"[{NAME}] {pair}: {name} (compile, then measure prefill {prefill} and decode at {decode})")
            result = compile_and_measure(spec, backend, quant, protocol, cache_dir=args.cache_dir, threads=args.threads, timeout_s=3600.0, precompiled=compiled[(spec.key, backend, quant)])
            if not result["ok"]:
                log(f"[{NAME}]   failed at {result.get('stage')}: {result.get('error', '')[:300]}")
            raw[pair][name] = result
            measured[pair][name] = {
                "prefill": {t: throughput(result, "prefill", t, t) for t in prefill},
                "decode": {c: throughput(result, "decode", c, 1) for c in decode},
                "footprint": footprint_bytes(result),
                "error": None if result["ok"] else f"{result.get('stage')}: {result.get('error', '')[:300]}",
                "compile_wall_s": result.get("compile_wall_s"),
                "verification": (result.get("artifact") or {}).get("verification"),
            }

    runs = [{"date": run.date, "argv": sys.argv[1:], "backends": list(backends), "prefill": list(prefill), "decode": list(decode),
             "load_before": run.load_before, "wall_s": round(run.elapsed_s(), 1)}]
    raw_runs = [raw]
    if args.merge:
        this_run = [] if args.merge_only else [{"models": {n: s.to_dict() for n, s in models.items()}, "pairs": pairs, "measured": measured, "runs": runs, "raw_runs": raw_runs}]
        merged = merge_results([load_json(path) for path in args.merge] + this_run)
        models, pairs, measured, runs, raw_runs = merged["models"], merged["pairs"], merged["measured"], merged["runs"], merged["raw_runs"]
        backends, prefill, decode = merged["backends"], merged["prefill"], merged["decode"]
    arith = {pair: {name: arithmetic(spec, prefill, decode, WEIGHT_PRECISION[_backend_quant(pair)]) for name, spec in models.items()} for pair in backends}
    ratios = {}
    for pair in backends:
        for lfm2, others in pairs.items():
            for other in others:
                if lfm2 not in measured[pair] or other not in measured[pair]:  # a merged backend one of the two was never measured on
                    continue
                entry = {}
                for kind, points in (("prefill", prefill), ("decode", decode)):
                    values = ratio_table(measured[pair], lfm2, other, points, kind)
                    if kind == "prefill":
                        expected = [arith[pair][other]["prefill_flops"][t] / arith[pair][lfm2]["prefill_flops"][t] for t in points]
                    else:
                        expected = [arith[pair][other]["decode_bytes"][c] / arith[pair][lfm2]["decode_bytes"][c] for c in points]
                    usable = [(p, r) for p, r in zip(points, values) if r is not None]
                    entry[kind] = {"points": list(points), "measured": values, "expected_from_arithmetic": expected, "two_x": crossing([p for p, _ in usable], [r for _, r in usable], 2.0) if usable else None}
                ratios[f"{pair} {lfm2} vs {other}"] = entry

    run.save({"models": {n: s.to_dict() for n, s in models.items()}, "pairs": pairs, "backends": list(backends), "prefill": list(prefill), "decode": list(decode), "protocol": protocol.to_dict(),
              "measured": measured, "arithmetic": arith, "ratios": ratios, "runs": runs, "raw_runs": raw_runs})
    run.finish(render(args, models, pairs, backends, prefill, decode, measured, arith, ratios, runs), "python -m bench.lfm2_vs_attention" + (" --quick" if args.quick else " --full" if args.full or args.merge else ""))
    return 0


def _run_entry(data: dict) -> list[dict]:
    """The runs a results file holds: its own list when it is itself a merge, else the one run."""
    if "runs" in data:
        return data["runs"]
    return [{"date": data.get("date"), "argv": data.get("argv", []), "backends": data["backends"], "prefill": data["prefill"], "decode": data["decode"],
             "load_before": data.get("load_before"), "wall_s": data.get("wall_s")}]


def merge_results(parts: list[dict]) -> dict:
    """Fold results of several runs (oldest first) into one: per backend, model and point the
    newest run that measured it wins; every run measured all models of its pairs, so each
    ratio still compares numbers measured side by side."""
    from lfm2.spec import ArchSpec

    out: dict = {"models": {}, "pairs": {}, "measured": {}, "runs": [], "raw_runs": [], "backends": [], "prefill": set(), "decode": set()}
    for data in parts:
        offset = len(out["runs"])  # a merged file's own run indices count from its first run
        run_index = offset + len(_run_entry(data)) - 1
        for name, spec in data["models"].items():
            spec = spec if isinstance(spec, ArchSpec) else ArchSpec.from_dict(spec)
            if name in out["models"] and out["models"][name].key != spec.key:  # one name, two models: their rows must not share a table
                raise SystemExit(f"--merge: the runs define {name!r} differently ({out['models'][name].key} vs {spec.key}); merge only runs of the same models")
            out["models"][name] = spec
        for lfm2, others in data["pairs"].items():
            known = out["pairs"].setdefault(lfm2, [])
            known += [o for o in others if o not in known]
        for pair, by_model in data["measured"].items():
            if pair not in out["backends"]:
                out["backends"].append(pair)
            for name, m in by_model.items():
                slot = out["measured"].setdefault(pair, {}).setdefault(name, {"prefill": {}, "decode": {}, "footprint": None, "error": None, "source": {"prefill": {}, "decode": {}}})
                for kind in ("prefill", "decode"):
                    points = {int(point): value for point, value in m[kind].items()}
                    sources = {int(point): offset + run for point, run in m.get("source", {}).get(kind, {}).items()}
                    out[kind] |= set(points)
                    for point, value in points.items():
                        if value is not None:  # every run's number, for ratios of a pair measured together
                            slot.setdefault("by_run", {}).setdefault(kind, {}).setdefault(point, {})[sources.get(point, run_index)] = value
                        if value is not None or point not in slot[kind]:  # a point this run could not measure keeps an older value
                            slot[kind][point] = value
                            slot["source"][kind][point] = sources.get(point, run_index)
                if not m.get("error"):
                    slot.update({key: m.get(key) for key in ("footprint", "compile_wall_s", "verification")}, error=None)
                elif not any(slot["prefill"].values()) and not any(slot["decode"].values()):
                    slot["error"] = m["error"]
                else:  # older runs measured some points: keep them, and say why this run's are missing
                    slot.setdefault("missing", []).append(f"run {run_index + 1}: {m['error']}")
        out["runs"] += _run_entry(data)
        out["raw_runs"] += data.get("raw_runs", [data.get("raw")])
    out["pairs"] = {k: tuple(v) for k, v in out["pairs"].items()}
    out["prefill"], out["decode"] = tuple(sorted(out["prefill"])), tuple(sorted(out["decode"]))
    return out


def check_cell(check: dict | None) -> str:
    """The check against eager in a table cell: passed, or failed with its figures."""
    if not check:
        return "-"
    figures = f"cos {check['min_cosine']:.3f}" if check.get("min_cosine") is not None else ""
    return ("passed " if check.get("passed") else "FAILED ") + figures


def render(args, models, pairs, backends, prefill, decode, measured, arith, ratios, runs=()) -> str:
    parts = []
    ran = f"Ran: backends {', '.join(backends)}; models {', '.join(models)}; prefill {', '.join(map(str, prefill))} tokens; decode at depth {', '.join(map(str, decode))}."
    missing_backends = [b for b in ALL_BACKENDS if b not in backends]
    missing_prefill = [t for t in ALL_PREFILL if t not in prefill]
    missing_decode = [c for c in ALL_DECODE if c not in decode]
    missing_pairs = [p for p in PAIRS if p not in pairs]
    not_ran = []
    if missing_pairs:
        not_ran.append(f"pairs {', '.join(missing_pairs)}")
    if missing_backends:
        not_ran.append(f"backends {', '.join(missing_backends)}")
    if missing_prefill:
        not_ran.append(f"prefill at {', '.join(map(str, missing_prefill))}")
    if missing_decode:
        not_ran.append(f"decode at {', '.join(map(str, missing_decode))}")
    if not_ran and not args.quick:
        ran += (
            " Not run by default: " + "; ".join(not_ran) + ". Why: on 2 cores one ExecuTorch lowering of a 350M-parameter model takes "
            "minutes per method (each prefill length is its own static graph), and one 8,192-token prefill of the Qwen3-shaped model "
            "is ~15 TFLOP, over a minute per run; all of it does not fit in 10 minutes. `--full` runs everything."
        )
    how = (
        "How: random weights (seed 0); each model compiled with `devices.compile`, checked against eager (a prefill and 8 decode "
        "steps; 'vs eager' gives the smallest cosine of the logits: a quantised model of random weights that fails the check is "
        "still timed, since latency does not depend on the weights' values) and measured with "
        f"`devices.measure` in a fresh process, {args.threads} threads, one warm-up then {args.min_runs}-5 timed runs per point (median). "
        "Prefill tok/s = T / latency of a T-token prefill; decode tok/s = 1 / latency of one step at that context depth. "
        "Footprint = growth of the measuring process's peak RSS over its baseline (the runtime's own import excluded). "
        "Ratios are LFM2's throughput over the other model's (>1: LFM2 faster). The arithmetic ratio is the other model's "
        "FLOPs (prefill) or bytes read per step (decode: weights at the backend's precision + fp32 K/V) over LFM2's: what "
        "the ratio would be if time followed arithmetic alone."
    )
    parts += [ran, how]
    if len(runs) > 1:
        lines = [f"Merged from {len(runs)} runs (`--merge`; where two measured the same point, the later one is shown; each ratio divides two numbers of one run, the newest that measured both models):", ""]
        for i, r in enumerate(runs, 1):
            load = f", load before {r['load_before'][0]:.2f}" if r.get("load_before") else ""
            wall = f", {r['wall_s'] / 60:.0f} min" if r.get("wall_s") else ""
            lines.append(f"{i}. {r['date']}{wall}{load}: {', '.join(r['backends'])}; prefill {', '.join(map(str, r['prefill']))}; decode {', '.join(map(str, r['decode']))} "
                         f"(`{' '.join(r['argv']) or 'defaults'}`)")
        parts.append("\n".join(lines))

    for pair in backends:
        headers = ["model", "params", "attention layers"] + [f"prefill {t} tok/s" for t in prefill] + [f"decode @{c} tok/s" for c in decode] + ["footprint", "vs eager"]
        rows = []
        missing = []
        for name in [n for n in models if n in measured[pair]]:
            m, a = measured[pair][name], arith[pair][name]
            missing += [f"{name}, {why}" for why in m.get("missing", [])]
            if m["error"] and any(v is not None for v in (*m["prefill"].values(), *m["decode"].values())):
                missing.append(f"{name}: {m['error']}")  # failed part-way: the points it finished are shown
            elif m["error"]:
                rows.append([name, fmt(a["parameters"]), a["attention_layers"]] + ["failed"] * (len(prefill) + len(decode)) + [m["error"][:100], check_cell(m["verification"])])
                continue
            rows.append([name, fmt(a["parameters"]), a["attention_layers"]] + [fmt(m["prefill"].get(t)) for t in prefill] + [fmt(m["decode"].get(c)) for c in decode] + [mib(m["footprint"]), check_cell(m["verification"])])
        parts.append(f"### {pair}\n\n" + markdown_table(headers, rows) + "".join(f"\n\nNot measured ('-'): {why}" for why in missing))
        ratio_rows = []
        for key, entry in ratios.items():
            if not key.startswith(pair + " "):
                continue
            cells = [key.removeprefix(pair + " ")]
            for kind in ("prefill", "decode"):
                e = entry[kind]
                for value, expected in zip(e["measured"], e["expected_from_arithmetic"]):
                    cells.append(f"{fmt(value)}x ({expected:.2f}x)" if value else f"- ({expected:.2f}x)")
                two = e["two_x"]
                cells.append("not reached" if two is None else f"{two['first_measured']} (~{two['interpolated']:.0f})")
            ratio_rows.append(cells)
        ratio_headers = ["LFM2 vs"] + [f"prefill {t}" for t in prefill] + ["prefill 2x at"] + [f"decode @{c}" for c in decode] + ["decode 2x at"]
        parts.append("Measured speedup of LFM2 (arithmetic expectation in parentheses); '2x at' is the first measured context where LFM2 is at least 2x faster (interpolated in log-context between points):\n\n" + markdown_table(ratio_headers, ratio_rows))

    first = backends[0]
    arith_rows = []
    for name in models:
        a = arith[first][name]
        arith_rows.append([name, fmt(a["parameters"])] + [fmt(a["prefill_flops"][t] / 1e9) for t in prefill] + [f"{a['decode_bytes'][c] / 1e6:.0f}" for c in decode] + [f"{a['kv_cache_bytes_fp32'][max(decode)] / 1e6:.0f}"])
    parts.append(
        f"Arithmetic (from `search_space.costs`; decode bytes at {first}'s weight precision):\n\n"
        + markdown_table(["model", "params"] + [f"prefill {t} GFLOP" for t in prefill] + [f"decode @{c} MB/step" for c in decode] + [f"K/V @{max(decode)} MB (fp32)"], arith_rows)
    )
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
