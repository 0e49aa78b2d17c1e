"""Two models timed side by side in one process, as an anchored measurement times a candidate
and its anchor: does a run right after the other model's run slower than a run right after
its own?

An anchored point alternates which model runs first (C A, A C, C A, ...), so in every pair
one model runs right after itself ("warm") and the other right after the other model
("cold"). The ratio of a model's cold runs to its warm runs is the cost of sharing the
process: 1.0 means the pairs measure each model as if it ran alone. Each mode runs in a
fresh process (ONNX Runtime makes its global pools with its environment, at the first
session):

* `shared`: what the measuring child does, the backend's `share_threads` hook first
  (ONNX Runtime: one intra-op pool for every session of the process);
* `per-session`: no hook (ONNX Runtime: each session its own pool, the default before);
* `no-spin` (ONNX Runtime only): pools per session, their threads not spinning after a run.

Compiles into the cache like the benchmarks (the space's anchor and the first `--archs` of
the repeatability draw); prints a table and writes JSON. Read the gaps, not the absolute
times (this host drifts between processes).

    python -m bench.experiments.side_by_side_pools                        # onnx fp32, 2 candidates
    python -m bench.experiments.side_by_side_pools --backend llamacpp --quant q4_0 --archs 8   # the one of 8 it compiles
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.report import markdown_table

MODES = ("shared", "per-session", "no-spin")


def pairs_in_this_process(mode: str, candidate: str, anchor: str, threads: int, prefill: int, depth: int, pairs: int) -> dict:
    """The child's side: load both (after the hook, for `shared`), time alternating pairs."""
    import functools

    from devices.artifact import Artifact
    from devices.backends import backend_module, open_runner
    from devices.measure_child import pin_threads, timers
    from devices.protocol import Protocol
    from devices.sampling import AnchoredRun

    cpus = list(range(threads))
    pin_threads(cpus)
    candidate_artifact, anchor_artifact = Artifact.load(candidate, verify=False), Artifact.load(anchor, verify=False)
    module = backend_module(candidate_artifact.backend)
    if hasattr(module, "import_runtime"):
        module.import_runtime()
    if mode == "shared" and hasattr(module, "share_threads"):
        module.share_threads(threads)
    if mode == "no-spin":
        from devices.backends import onnx_runner

        own_options = onnx_runner.OnnxRunner._options

        def without_spinning(self):
            options = own_options(self)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return options

        onnx_runner.OnnxRunner._options = without_spinning  # type: ignore[method-assign]
    protocol = Protocol(prompt_lengths=(prefill,), decode_depths=(depth,), decode_tokens=16)
    runners = [open_runner(candidate_artifact, threads), open_runner(anchor_artifact, threads)]
    pin_threads(cpus)
    clocks = [timers(runner, runner.artifact.spec.vocab_size, protocol, seed) for seed, runner in enumerate(runners)]
    result = {"stack": runners[0].stack()}
    for kind, point, count in (("prefill", prefill, max(8, pairs // 3)), ("decode", depth, pairs)):
        mine, theirs = (functools.partial(clock[0] if kind == "prefill" else clock[1], point) for clock in clocks)
        for _ in range(3):  # warm-up, both
            mine(), theirs()
        run = AnchoredRun(mine, theirs)  # the pairs exactly as an anchored point takes them
        for _ in range(count + 1):
            run()
        timed = run.pairs  # (candidate ms, anchor ms); pair k even: the candidate first
        # pair k > 0 even: the candidate runs after itself (the previous pair ended with it), the anchor after it
        warm_c = [c for k, (c, _) in enumerate(timed) if k % 2 == 0 and k]
        cold_c = [c for k, (c, _) in enumerate(timed) if k % 2 == 1]
        warm_a = [a for k, (_, a) in enumerate(timed) if k % 2 == 1]
        cold_a = [a for k, (_, a) in enumerate(timed) if k % 2 == 0 and k]
        result[kind] = {
            "candidate_warm_ms": statistics.median(warm_c),
            "candidate_cold_ms": statistics.median(cold_c),
            "anchor_warm_ms": statistics.median(warm_a),
            "anchor_cold_ms": statistics.median(cold_a),
            "candidate_gap": statistics.median(cold_c) / statistics.median(warm_c),
            "anchor_gap": statistics.median(cold_a) / statistics.median(warm_a),
            "pairs": count,
        }
    for runner in runners:
        runner.close()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.side_by_side_pools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--quant", default="fp32")
    parser.add_argument("--archs", type=int, default=2, help="candidates: the first N of the repeatability benchmark's draw, those the backend compiles (default 2)")
    parser.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: all for onnx, shared for the others)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per candidate and mode (default 2)")
    parser.add_argument("--pairs", type=int, default=40, help="decode pairs per process (prefill: a third, at least 8)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="raw results (default bench/results/side_by_side_pools.json; _BACKEND_QUANT before .json for another backend)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CANDIDATE"), help=argparse.SUPPRESS)
    parser.add_argument("--anchor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(pairs_in_this_process(args.child[0], args.child[1], args.anchor, args.threads, args.prefill, args.depth, args.pairs), default=str))
        return 0

    from bench.harness import precompile
    from bench.models import anchor_spec, sample_space
    from bench.repeatability import protocol_for

    if args.results is None:
        args.results = Path("bench/results") / ("side_by_side_pools.json" if (args.backend, args.quant) == ("onnx", "fp32") else f"side_by_side_pools_{args.backend}_{args.quant}.json")
    modes = args.modes.split(",") if args.modes else (list(MODES) if args.backend == "onnx" else ["shared"])
    unknown = sorted(set(modes) - set(MODES)) + (["no-spin (ONNX Runtime only)"] if "no-spin" in modes and args.backend != "onnx" else [])
    if unknown:
        parser.error(f"unknown or unusable mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    specs = sample_space(args.archs, seed=0) + [anchor_spec()]
    compiled = precompile([(spec, args.backend, args.quant) for spec in specs], protocol_for(args.prefill, args.depth, args.threads, False), cache_dir=args.cache_dir)
    failed = [f"{spec.layout}: {c.get('error')}" for spec, c in zip(specs, compiled) if not c.get("ok")]
    if failed:  # e.g. llama.cpp refuses layouts that mix full and sliding-window attention
        print("did not compile (left out):\n  " + "\n  ".join(failed), file=sys.stderr)
    if not compiled[-1].get("ok") or not any(c.get("ok") for c in compiled[:-1]):
        print("the anchor or every candidate failed to compile: nothing to time", file=sys.stderr)
        return 1
    anchor = compiled[-1]["path"]
    specs, compiled = [s for s, c in zip(specs[:-1], compiled[:-1]) if c.get("ok")] + specs[-1:], [c for c in compiled[:-1] if c.get("ok")] + compiled[-1:]
    runs = []
    for repeat in range(args.repeats):
        for spec, artifact in zip(specs[:-1], compiled[:-1]):
            for mode in modes:  # modes interleaved, so drift of the host falls on all of them
                command = [sys.executable, "-m", "bench.experiments.side_by_side_pools", "--child", mode, artifact["path"], "--anchor", anchor, "--threads", str(args.threads),
                           "--prefill", str(args.prefill), "--depth", str(args.depth), "--pairs", str(args.pairs)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append({"mode": mode, "repeat": repeat, "layout": spec.layout, "d_model": spec.d_model, **result})
                print(f"{mode:12s} {spec.layout} d{spec.d_model}: " + "; ".join(f"{kind} gap candidate {result[kind]['candidate_gap']:.3f} anchor {result[kind]['anchor_gap']:.3f}" for kind in ("prefill", "decode")), flush=True)
    rows = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        for kind in ("prefill", "decode"):
            gaps = sorted(g for r in mine for g in (r[kind]["candidate_gap"], r[kind]["anchor_gap"]))
            rows.append([mode, kind, len(mine), f"{statistics.median(gaps):.3f}", f"{gaps[0]:.3f}-{gaps[-1]:.3f}",
                         f"{statistics.median(r[kind]['candidate_warm_ms'] for r in mine):.2f}", f"{statistics.median(r[kind]['anchor_warm_ms'] for r in mine):.2f}"])
    print(markdown_table(["mode", "point", "processes", "cold / warm (median of both models)", "range", "candidate warm ms (median)", "anchor warm ms (median)"], rows))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"backend": args.backend, "quant": args.quant, "prefill": args.prefill, "depth": args.depth, "threads": args.threads, "runs": runs}, indent=1, default=str))
    print(f"raw: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
