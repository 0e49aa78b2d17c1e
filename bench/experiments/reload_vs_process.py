"""Where does the process-to-process spread of an anchored ratio come from: the memory the
models were loaded into, or the process?

A decode ratio (candidate / anchor, timed side by side) moves ~5-6% from one fresh process to
the next on this machine, against a +-3% interval inside one (BENCHMARKS.md, "One ONNX
Runtime thread pool per process"). If the cause is where the two models' weights and buffers
landed (cache sets, pages), loading them again inside the same process moves the ratio as
much as a new process does, and a measurement could reload instead of paying for a new
process; if reloads agree with each other and processes do not, it is the process.

Each fresh process loads the candidate and the anchor, times an anchored point
(`devices.sampling.measure_anchored_point`, as a measurement does), then closes both and
loads them again, `--reloads` times. Reported per point: the standard deviation of the log
ratio between the loads of one process, between the processes (their first loads), and the
sampling noise the ratio's own interval implies.

    python -m bench.experiments.reload_vs_process                  # onnx fp32, 6 candidates x 3 processes x 3 loads
    python -m bench.experiments.reload_vs_process --huge-pages     # the same with the children's memory in huge pages
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from bench.report import markdown_table


def loads_in_this_process(candidate: str, anchor: str, threads: int, prefill: int, depth: int, loads: int, seconds: float) -> dict:
    """The child's side: the anchored point timed after each of `loads` loads of both models."""
    import functools

    from devices.artifact import Artifact
    from devices.backends import backend_module, open_runner
    from devices.measure_child import pin_threads, timers
    from devices.protocol import Protocol
    from devices.sampling import measure_anchored_point

    cpus = list(range(threads))
    pin_threads(cpus)
    artifacts = [Artifact.load(candidate, verify=False), Artifact.load(anchor, verify=False)]
    module = backend_module(artifacts[0].backend)
    if hasattr(module, "import_runtime"):
        module.import_runtime()
    if hasattr(module, "share_threads"):
        module.share_threads(threads)
    protocol = Protocol(prompt_lengths=(prefill,), decode_depths=(depth,), decode_tokens=16, max_seconds_per_point=seconds, max_remeasures=0)
    result: dict = {"prefill": [], "decode": []}
    for _ in range(loads):
        runners = [open_runner(artifact, threads) for artifact in artifacts]
        pin_threads(cpus)
        clocks = [timers(runner, artifact.spec.vocab_size, protocol, seed) for seed, (runner, artifact) in enumerate(zip(runners, artifacts))]
        for kind, point, tokens in (("prefill", prefill, prefill), ("decode", depth, 1)):
            mine, theirs = (functools.partial(clock[0] if kind == "prefill" else clock[1], point) for clock in clocks)
            stats = measure_anchored_point(mine, theirs, protocol, tokens)
            anchor_stats = stats.anchor or {}
            result[kind].append({"ratio": anchor_stats["ratio"], "low": anchor_stats["ratio_ci_low"], "high": anchor_stats["ratio_ci_high"], "pairs": len(stats.samples_ms)})
        for runner in runners:
            runner.close()
    return result


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def summarize(runs: list[dict], kind: str) -> dict:
    """Standard deviations of the log ratio (~ relative): between loads of one process (pooled
    over processes and candidates), between processes (first loads), and what the intervals say."""
    by_candidate: dict[str, list[list[float]]] = {}
    implied = []
    for run in runs:
        logs = [math.log(load["ratio"]) for load in run[kind]]
        by_candidate.setdefault(run["layout"], []).append(logs)
        implied += [(load["high"] - load["low"]) / 2 / load["ratio"] / 1.96 for load in run[kind]]
    within = [_sd(logs) for processes in by_candidate.values() for logs in processes]
    between = [_sd([logs[0] for logs in processes]) for processes in by_candidate.values()]
    return {
        "between_loads_sd": math.sqrt(statistics.mean(v * v for v in within if not math.isnan(v))),
        "between_processes_sd": math.sqrt(statistics.mean(v * v for v in between if not math.isnan(v))),
        "sampling_sd": math.sqrt(statistics.mean(v * v for v in implied)),
        "candidates": len(by_candidate),
        "processes": len(runs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.reload_vs_process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--quant", default="fp32")
    parser.add_argument("--archs", type=int, default=6, help="candidates: the first N of the repeatability benchmark's draw (default 6)")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per candidate (default 3)")
    parser.add_argument("--loads", type=int, default=3, help="loads of both models per process (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time cap of each anchored point (default 3, as the repeatability benchmark per process)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--huge-pages", action="store_true", help="the children's allocations in transparent huge pages (glibc.malloc.hugetlb=1, as Protocol.huge_pages)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="raw results (default bench/results/reload_vs_process.json)")
    parser.add_argument("--child", metavar="CANDIDATE", help=argparse.SUPPRESS)
    parser.add_argument("--anchor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(loads_in_this_process(args.child, args.anchor, args.threads, args.prefill, args.depth, args.loads, args.seconds)))
        return 0

    from bench.harness import precompile
    from bench.models import anchor_spec, sample_space
    from bench.repeatability import protocol_for

    variant = ("" if (args.backend, args.quant) == ("onnx", "fp32") else f"_{args.backend}_{args.quant}") + ("_huge_pages" if args.huge_pages else "")
    results = args.results or Path("bench/results") / f"reload_vs_process{variant}.json"
    from devices.measure import child_env

    env = child_env(args.threads, args.huge_pages)
    specs = sample_space(args.archs, seed=0) + [anchor_spec()]
    compiled = precompile([(spec, args.backend, args.quant) for spec in specs], protocol_for(args.prefill, args.depth, args.threads, False), cache_dir=args.cache_dir)
    if not all(c.get("ok") for c in compiled):
        print("did not compile: " + "; ".join(f"{s.layout}: {c.get('error')}" for s, c in zip(specs, compiled) if not c.get("ok")), file=sys.stderr)
        return 1
    anchor = compiled[-1]["path"]
    runs = []
    for process in range(args.processes):  # candidates interleaved: drift of the host falls on all of them
        for spec, artifact in zip(specs[:-1], compiled[:-1]):
            command = [sys.executable, "-m", "bench.experiments.reload_vs_process", "--child", artifact["path"], "--anchor", anchor, "--threads", str(args.threads),
                       "--prefill", str(args.prefill), "--depth", str(args.depth), "--loads", str(args.loads), "--seconds", str(args.seconds)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"layout": spec.layout, "d_model": spec.d_model, "process": process, **result})
            print(f"process {process + 1} {spec.layout} d{spec.d_model}: decode ratios " + ", ".join(f"{load['ratio']:.3f}" for load in result["decode"])
                  + "; prefill " + ", ".join(f"{load['ratio']:.3f}" for load in result["prefill"]), flush=True)
    summary = {kind: summarize(runs, kind) for kind in ("prefill", "decode")}
    rows = [[kind, s["candidates"], s["processes"], f"{100 * s['between_loads_sd']:.1f}%", f"{100 * s['between_processes_sd']:.1f}%", f"{100 * s['sampling_sd']:.1f}%"] for kind, s in summary.items()]
    print(markdown_table(["point", "candidates", "processes", "sd between loads of one process", "sd between processes (first loads)", "sd the intervals imply"], rows))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"backend": args.backend, "quant": args.quant, "huge_pages": args.huge_pages, "prefill": args.prefill, "depth": args.depth, "threads": args.threads, "loads": args.loads,
                                   "seconds": args.seconds, "summary": summary, "runs": runs}, indent=1))
    print(f"raw: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
