"""What every benchmark script shares: its command-line flags, compiling and measuring one
architecture through the project's own `devices.compile` / `devices.measure`, and
putting its BENCHMARKS.md block together (date, machine facts, load, how to reproduce).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import BENCHMARKS_MD, RESULTS_DIR, load_average, machine_facts, machine_markdown, save_json, today, write_block


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def base_parser(name: str, description: str, package: str = "bench") -> argparse.ArgumentParser:
    """The flags every script shares; `package`: where the script lives (`bench.experiments`
    for the one-off experiments), for the usage line."""
    parser = argparse.ArgumentParser(prog=f"python -m {package}.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a minute or two: tiny models, one point; writes no BENCHMARKS.md unless --benchmarks is given")
    parser.add_argument("--no-write", action="store_true", help="print the BENCHMARKS.md block instead of writing it")
    parser.add_argument("--benchmarks", type=Path, default=None, help=f"the markdown file to rewrite the block of (default {BENCHMARKS_MD.name} at the repository root; none with --quick)")
    parser.add_argument("--results", type=Path, default=None, help=f"where to save the raw results as JSON (default {RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent)}/{name}.json; a temporary file with --quick)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="compile cache (default: the project's, $LFM2_NAS_CACHE or ~/.cache/lfm2-nas)")
    parser.add_argument("--note", default=None, help="a sentence to put in the BENCHMARKS.md block (e.g. why this run deviates from the defaults)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="runtime threads per measurement (default: every usable core)")
    return parser


@dataclass
class BenchRun:
    """One invocation of a benchmark: its flags, the machine, the load before and after."""

    name: str
    title: str
    args: argparse.Namespace
    started: float = field(default_factory=time.perf_counter)
    date: str = field(default_factory=today)
    load_before: list[float] = field(default_factory=load_average)
    facts: dict[str, Any] = field(default_factory=machine_facts)
    module: str | None = None  # the `<package>.<module>` that ran, where it differs from the block's name
    package: str = "bench"  # `bench.experiments` for the one-off experiments

    @property
    def quick(self) -> bool:
        return bool(getattr(self.args, "quick", False))

    @property
    def results_path(self) -> Path:
        if self.args.results is not None:
            return self.args.results
        if self.quick:
            return Path(tempfile.gettempdir()) / f"lfm2-nas-bench-{self.name}-quick.json"
        return RESULTS_DIR / f"{self.name}.json"

    @property
    def benchmarks_path(self) -> Path | None:
        if self.args.no_write:
            return None
        if self.args.benchmarks is not None:
            return self.args.benchmarks
        return None if self.quick else BENCHMARKS_MD

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def save(self, results: dict[str, Any]) -> Path:
        data = {"benchmark": self.name, "date": self.date, "argv": sys.argv[1:], "machine": self.facts, "load_before": self.load_before, "load_after": load_average(), "wall_s": round(self.elapsed_s(), 1), **results}
        return save_json(self.results_path, data)

    def finish(self, body: str, reproduce: str) -> str:
        """Compose the block (title, date, machine, body, how to reproduce), print it, and
        write it into BENCHMARKS.md unless this is a quick or --no-write run."""
        load_after = load_average()
        block = "\n\n".join(
            [
                f"## {self.title}",
                f"Run {self.date}, {self.elapsed_s() / 60:.1f} minutes. {machine_markdown(self.facts, self.load_before, load_after)}",
                body.strip() + (f"\n\n**Note on this run:** {self.args.note}" if getattr(self.args, "note", None) else ""),
                f"Reproduce (one command, from the repository root with the project's venv active):\n\n```bash\n{reproduce}\n```\n\n"
                + (f"This run: `python -m {self.package}.{self.module or self.name} {' '.join(sys.argv[1:])}`. " if sys.argv[1:] and sys.argv[1:] != ["--quick"] else "")
                + f"Raw results: `{_shown_path(self.results_path)}`.",
            ]
        )
        print(block)
        target = self.benchmarks_path
        if target is not None:
            write_block(self.name, block, target)
            print(f"\n[wrote the {self.name!r} block of {target}]")
        else:
            print(f"\n[not written to BENCHMARKS.md: {'--quick' if self.quick else '--no-write'}]")
        return block


def _shown_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(RESULTS_DIR.parent.parent))
    except ValueError:
        return str(path)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- compile + measure -----------------------------------------------------------------------


#: What a benchmark keeps of a check against eager.
CHECK_FIELDS = ("passed", "max_abs_diff", "min_cosine", "top1_agreement")


def check_against_eager(artifact) -> dict[str, Any]:
    """The artifact's check against eager (`devices.compile.verify_against_eager`) as data:
    the manifest's when compile already ran it, else run now in a fresh process. A failed
    check is recorded, not raised: latency does not depend on the weights' values, so a
    quantised model of random weights whose logits drift from eager is still timed, and the
    table says so. In its own process because the check loads the whole artifact (every
    static prefill method's planned buffers: gigabytes for an fp32 0.6B model at 8,192
    tokens) beside an eager copy, memory this benchmark process would otherwise keep: the
    fp32 comparison was OOM-killed at 24 GB after three such checks."""
    if artifact.manifest.get("verification"):
        return {k: v for k, v in artifact.manifest["verification"].items() if k in CHECK_FIELDS}
    return _in_fresh_process(_check_worker, str(artifact.path), died="the check process died (killed by the OS: most likely out of memory)")


def _check_worker(path: str) -> dict[str, Any]:
    from devices.artifact import Artifact
    from devices.compile import CompileError, VerificationError, verify_against_eager

    artifact = Artifact.load(path, verify=False)
    try:
        report = verify_against_eager(artifact, artifact.manifest.get("seed", 0) or 0)
    except VerificationError as exc:
        return {**{k: v for k, v in exc.report.items() if k in CHECK_FIELDS}, "passed": False, "error": str(exc)[:500]}
    except CompileError as exc:
        return {"passed": False, "error": str(exc)[:500]}
    return {k: v for k, v in report.items() if k in CHECK_FIELDS}


def compile_and_measure(spec, backend: str, quant: str, protocol, *, cache_dir: Path | None = None, threads: int | None = None, timeout_s: float | None = 900.0,
                        precompiled: dict[str, Any] | None = None, anchor: Any = None) -> dict[str, Any]:
    """Compile `spec` (cached; normally already done by `precompile`), check it against
    eager (recorded, see `check_against_eager`) and measure it in a fresh child process
    (`devices.measure`).

    `precompiled`: this job's row from `precompile`. When that compile failed, this one
    reports it and does not compile again: here the compile would run in the benchmark's own
    process, and a compile that was killed for memory in its own process would take the
    whole benchmark with it (an fp32 0.6B ExecuTorch export with four prefill lengths needs
    more than this machine's 24 GB).

    `anchor`: an artifact (or its path) timed side by side with this one, sample by sample
    (`devices.measure`'s anchor): each point then carries the ratio to it.

    Returns plain data: `ok`, `compile_wall_s`, `artifact` facts with `verification`, the
    `measurement` dict, or `error` with the stage. A failure is data, not an exception:
    a benchmark reports it and goes on.
    """
    from devices.compile import compile as compile_artifact
    from devices.measure import measure
    from devices.protocol import Limits

    result: dict[str, Any] = {"spec_key": spec.key, "backend": backend, "quant": quant}
    if precompiled is not None and not precompiled.get("ok"):
        result.update(ok=False, stage="compile", error=f"{precompiled.get('error')} (in precompile; not compiled again)"[:2000])
        return result
    start = time.perf_counter()
    try:
        artifact = compile_artifact(spec, backend, quant, protocol.max_context, protocol.prompt_lengths, cache_dir=cache_dir, verify=False)
    except Exception as exc:  # a compile failure is a result to report
        result.update(ok=False, stage="compile", error=f"{type(exc).__name__}: {exc}"[:2000])
        return result
    compile_wall = time.perf_counter() - start
    manifest = artifact.manifest
    result["compile_wall_s"] = round(compile_wall, 2)
    result["artifact"] = {
        "path": str(artifact.path),
        "bytes": artifact.size_bytes,
        "compile_s": manifest.get("compile_s"),
        "stages_s": manifest.get("stages_s"),
        "not_delegated_ops": manifest.get("not_delegated_ops"),
        "verification": check_against_eager(artifact),
    }
    try:
        measurement = measure(artifact, protocol, Limits(threads=threads, timeout_s=timeout_s), anchor=anchor)
    except Exception as exc:
        result.update(ok=False, stage="measure", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"[:2000])
        return result
    result["measurement"] = measurement.to_dict()
    result["ok"] = measurement.ok
    if not measurement.ok:
        result.update(stage="measure", error=f"{measurement.status}: {measurement.error}"[:2000])
    return result


def verified(result: dict[str, Any]) -> bool | None:
    """Whether the measured artifact passed its check against eager (None: not compiled)."""
    check = (result.get("artifact") or {}).get("verification")
    return None if check is None else bool(check.get("passed"))


def _compile_worker(spec_dict: dict, backend: str, quant: str, max_context: int, prompt_lengths: tuple[int, ...], cache_dir: str | None, verify: bool) -> dict[str, Any]:
    import torch

    from devices.compile import compile as compile_artifact
    from lfm2.spec import ArchSpec

    torch.set_num_threads(1)  # one compile per core: two workers must not fight over both
    start = time.perf_counter()
    try:
        artifact = compile_artifact(ArchSpec.from_dict(spec_dict), backend, quant, max_context, prompt_lengths, cache_dir=cache_dir, verify=verify)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "wall_s": time.perf_counter() - start}
    return {"ok": True, "path": str(artifact.path), "compile_s": artifact.manifest.get("compile_s"), "wall_s": time.perf_counter() - start}


#: Peak memory of exporting a model, as a multiple of its fp32 weights, plus a fixed part.
#: Measured here: ExecuTorch 8da4w of a 0.6B model peaked at ~12 GB (OOM-killed beside a
#: second compile), ONNX int8 of LFM2-350M at ~6 GB.
COMPILE_MEMORY_FACTOR = 6.0
COMPILE_MEMORY_FIXED = 1 << 30


def compile_memory_estimate(spec) -> int:
    from search_space.costs import parameters

    return int(COMPILE_MEMORY_FACTOR * 4 * parameters(spec) + COMPILE_MEMORY_FIXED)


def _in_fresh_process(worker, *args, died: str) -> dict[str, Any]:
    """`worker(*args)` in a fresh (spawned) process: its memory goes back to the system when
    it ends, and if the OS kills it (out of memory) that is a failed row, not a crash of the
    whole benchmark."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(worker, *args).result()
        except BrokenProcessPool:
            return {"ok": False, "passed": False, "error": died, "wall_s": time.perf_counter() - start}


def _compile_isolated(call: tuple, worker=None) -> dict[str, Any]:
    """One compile in a fresh process (`_in_fresh_process`)."""
    return _in_fresh_process(worker or _compile_worker, *call, died="the compile process died (killed by the OS: most likely out of memory)")


def precompile(jobs, protocol, *, cache_dir: Path | None = None, workers: int | None = None, verify: bool = False) -> list[dict[str, Any]]:
    """Compile every (spec, backend, quant) of `jobs` into the cache before anything is
    measured, `workers` at a time (default: one per usable core; compiling is mostly
    single-threaded Python) but no more than the free memory holds (`compile_memory_estimate`
    of the largest job each), so that the measurements that follow find their artifacts
    ready and own the cores alone. Returns one result per job (`ok`, `wall_s`, `error`).
    The check against eager is left to `compile_and_measure` (`verify=False`), which
    records its outcome instead of discarding a compiled artifact that fails it."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    jobs = list(jobs)
    if not jobs:
        return []
    largest = max(compile_memory_estimate(spec) for spec, _, _ in jobs)
    fit = max(1, int(psutil.virtual_memory().available // largest))
    workers = max(1, min(workers or usable_cores(), len(jobs), fit))
    calls = [(spec.to_dict(), backend, quant, protocol.max_context, tuple(protocol.prompt_lengths), str(cache_dir) if cache_dir else None, verify) for spec, backend, quant in jobs]
    log(f"[bench] compiling {len(calls)} artifact(s), {workers} at a time (cached ones return at once; the largest may need ~{largest / 2**30:.1f} GiB)")
    with ThreadPoolExecutor(max_workers=workers) as threads:  # each compile in its own process
        return list(threads.map(_compile_isolated, calls))


def measured_ms(result: dict[str, Any], kind: str, point: int) -> float | None:
    """The median latency in ms of `kind` ('prefill' or 'decode') at `point`, or None.

    A measurement that failed part-way (say OOM-killed at the longest prefill) still gives the
    points it finished before: each was timed in full, and its failure is reported beside it."""
    measurement = result.get("measurement") or {}
    stats = measurement.get(kind, {}).get(str(point)) or measurement.get(kind, {}).get(point)
    return None if stats is None else stats["median_ms"]


def anchor_ratio(result: dict[str, Any], kind: str, point: int) -> float | None:
    """The candidate/anchor ratio of `kind` at `point` (an anchored measurement), or None."""
    stats = ((result.get("measurement") or {}).get(kind) or {}).get(str(point))
    return None if not stats or not stats.get("anchor") else float(stats["anchor"]["ratio"])


def footprint_bytes(result: dict[str, Any]) -> int | None:
    if not result.get("ok"):
        return None
    return (result["measurement"].get("memory") or {}).get("footprint_bytes")


__all__ = ["base_parser", "BenchRun", "compile_and_measure", "check_against_eager", "verified", "precompile", "measured_ms", "anchor_ratio", "footprint_bytes", "usable_cores", "log"]
