"""The measurement child: `python -m devices.measure_child JOB.json RESULT.json PARTIAL.json`.

`devices.measure.measure` starts one of these per artifact, so that every measurement
starts from a fresh process (no warm caches, allocator state or threads left by an
earlier model) and a candidate that crashes or runs out of memory takes down only this
process. Data goes in and out as JSON files, never pickle.

The order of work (see DESIGN.md, "Measurement protocol"):

1. pin every thread to the job's cores; cap the data segment if asked (a backstop; the
   parent's RSS watchdog is the cap that counts);
2. import the backend's runtime (and, where it would give each loaded model its own thread
   pool, make one pool for the process: `share_threads`), allocate the calibration kernel's arrays (the harness's,
   not the model's) and record the baseline RSS: what the process holds before the model
   (`import executorch` alone is ~355 MiB; a C++ runner would not pay it);
3. load the artifact (the load time is reported apart);
4. MEMORY PASS: one run of every point (each prefill length; each decode depth), with the
   RSS high-water mark reset after the baseline, so that peak - baseline is the model's
   own footprint (weights, runtime buffers, the state at the deepest context);
5. TIMING (`devices.sampling`): a calibration kernel is timed once as the reference; per
   point, warm-up until steady (discarded), then timed runs until the median's confidence
   interval is within the protocol's target (bounded by count and time); a point around
   which the calibration kernel ran slower than the threshold (another process on these
   cores) or whose CV is high is measured again (bounded); it is flagged `disturbed` or
   `noisy` if that does not help.

With an anchor (job "anchor": a second artifact of the same backend and precision), the
anchor is loaded after the memory pass (the footprint stays the candidate's own) and every
timed sample is a pair: the candidate's run and the anchor's run at the same point, back to
back; the sampling targets their ratio (`devices.sampling.measure_anchored_point`), which
drift of the host between measurements does not move (DESIGN.md, "Measurement protocol").

Decode at depth C, per run: `reset()`, one untimed decode at position C-1 (it gives the
state of a C-token context; decode latency does not depend on the state's values), then
`decode_tokens` timed decodes at positions C .. C+decode_tokens-1. A sample is the mean
latency per token of the run, so `Stats.tokens` is 1 for decode and `tokens_per_s` is the
decode rate. Prefill: random tokens (tokenisation and sampling are not part of it).

With `Protocol.loads` > 1, after every point has been timed the model (and the anchor) is
closed and loaded again, and every point timed again, at most `loads` times: a point's
figure combines its loads' (`devices.processes.combine_point`), and from the second load on
a point whose combined figure is within `ci_target` is left out. Where the weights land in
memory moves a decode ratio from load to load as much as from process to process.

A later process of a point measured in several (`Protocol.processes`, `devices.processes`)
gets `measure_memory: false` and the points still unsure (`prefill_points`,
`decode_points`) in its job: it times those only.

A progress line (JSON) goes to stdout at each phase, and the measurement so far to
PARTIAL.json after each point, so the parent can say where a timeout or kill struck.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: How allocation failures read, in lower case: Python's MemoryError, std::bad_alloc from ONNX
#: Runtime or ExecuTorch, torch's DefaultCPUAllocator, ENOMEM. The one list: the child checks
#: its own exceptions with it, the parent (`devices.measure`) the child's stderr.
OOM_MARKERS = ("memoryerror", "bad_alloc", "out of memory", "cannot allocate memory", "can't allocate memory", "failed to allocate", "not enough memory", "unable to allocate")


def mentions_out_of_memory(text: str) -> bool:
    """True when `text` (an exception, a stderr tail) reports an allocation failure."""
    lowered = text.lower()
    return any(marker in lowered for marker in OOM_MARKERS)


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or a runtime's allocation failure raised as an ordinary exception."""
    return isinstance(exc, MemoryError) or mentions_out_of_memory(f"{type(exc).__name__}: {exc}")


def pin_threads(cpus: list[int]) -> None:
    """Pin every thread of this process (those that exist now; later ones inherit it)."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that has just ended


class Child:
    def __init__(self, job: dict[str, Any], result_path: Path, partial_path: Path):
        self.job = job
        self.result_path = result_path
        self.partial_path = partial_path
        self.result: dict[str, Any] = {"prefill": {}, "decode": {}, "memory": {}, "stack": {}, "thermal": {}}
        self.cpus: list[int] = job["cpus"]

    def progress(self, phase: str, **facts: Any) -> None:
        print(json.dumps({"phase": phase, "t": round(time.monotonic(), 3), **facts}), flush=True)

    def checkpoint(self) -> None:
        write_json(self.partial_path, self.result)

    # -- phases -----------------------------------------------------------------------------

    def run(self) -> None:
        from devices import stack
        from devices.artifact import Artifact
        from devices.backends import backend_module, open_runner
        from devices.processes import combine_point
        from devices.protocol import Protocol, Stats
        from devices.sampling import Calibration, measure_anchored_point, measure_point

        job = self.job
        protocol = Protocol.from_dict(job["protocol"])
        artifact = Artifact.load(job["artifact"], verify=False)  # the parent checked the hashes
        self.result.update(backend=artifact.backend, quant=artifact.quant, spec_key=artifact.spec.key, protocol=protocol.to_dict(), artifact_bytes=artifact.size_bytes)
        self.result["thermal"]["before"] = stack.thermal_snapshot(self.cpus)

        measure_memory = job.get("measure_memory", protocol.measure_memory)
        # with huge pages (Protocol.huge_pages), the memory pass still counts the 4 KiB pages a
        # deployment without them would hold (2 MiB pages round the baseline and the peak up,
        # each by a varying amount): they are kept off from here, before the runtime's import,
        # until the pass is done, and the model is then loaded again
        held_back = protocol.huge_pages and measure_memory and stack.allow_huge_pages(False)
        self.progress("import_runtime")
        module = backend_module(artifact.backend)
        if hasattr(module, "import_runtime"):  # a backend whose runtime is imported lazily
            module.import_runtime()
        if hasattr(module, "share_threads"):  # one pool for the candidate and the anchor, before either loads
            module.share_threads(job["threads"])
        # the calibration kernel's arrays are the harness's, not the model's: made before the
        # baseline (its reference is timed once the model is loaded, below)
        calibration = Calibration(take_reference=False) if protocol.disturbance_threshold > 0 else None
        baseline = stack.rss_bytes()
        peak_was_reset = stack.reset_peak_rss()
        heavy = [name for name in ("torch", "executorch", "onnxruntime", "torchao", "llama_cpp") if name in sys.modules]
        memory = self.result["memory"]
        memory.update(baseline_rss_bytes=baseline, modules_in_baseline=heavy)

        def opened(which: Artifact, seed: int):
            """`which` loaded, the threads it made pinned, and its (prefill, decode) timers."""
            loaded = open_runner(which, job["threads"])
            pin_threads(self.cpus)
            return loaded, *timers(loaded, which.spec.vocab_size, protocol, seed)

        seed = job.get("seed", 0)
        self.progress("load")
        start = time.perf_counter()
        runner = open_runner(artifact, job["threads"])
        self.result["load_time_s"] = time.perf_counter() - start
        pin_threads(self.cpus)  # any thread the runtime made while loading
        memory["rss_after_load_bytes"] = stack.rss_bytes()
        self.result["stack"] = self.stack_facts(runner, artifact)
        self.checkpoint()

        prefill_once, decode_once = timers(runner, artifact.spec.vocab_size, protocol, seed)

        if calibration is not None:
            self.progress("calibrate")
            calibration.take_reference()
            self.result["stack"]["calibration"] = calibration.describe()
        # a later process of a point measured in several (devices.processes) times only the
        # points still unsure, and leaves the memory pass to the first
        if measure_memory:
            self.progress("memory")
            for n in protocol.prompt_lengths:
                prefill_once(n)
            for depth in protocol.decode_depths:
                decode_once(depth)
            peak, source = stack.peak_rss_bytes()
            memory.update(
                peak_rss_bytes=peak,
                footprint_bytes=max(0, peak - baseline),
                pss_bytes=stack.pss_bytes(),
                rss_after_memory_pass_bytes=stack.rss_bytes(),
                method=(
                    f"a pass of one run per point right after loading; peak from {source}"
                    + (" reset after the baseline (/proc/self/clear_refs)" if peak_was_reset and source == "VmHWM" else " (NOT reset: includes the runtime import's peak)")
                    + "; footprint = peak - baseline (RSS after importing the runtime, before loading); pss at the end of the pass"
                ),
            )
            self.checkpoint()
        if held_back and stack.allow_huge_pages(True):
            self.progress("reload_in_huge_pages")
            runner.close()
            runner, prefill_once, decode_once = opened(artifact, seed)

        anchor = Artifact.load(job["anchor"], verify=False) if job.get("anchor") else None  # the parent checked it too
        anchor_runner = None
        if anchor is not None:
            self.progress("load_anchor")
            anchor_runner, anchor_prefill, anchor_decode = opened(anchor, seed + 1)
            self.result["stack"]["anchor"] = {"artifact_key": anchor.key, "spec_key": anchor.spec.key, "backend": anchor.backend, "quant": anchor.quant}
        self.result["stack"]["huge_pages"] = {"asked": protocol.huge_pages, "anon_huge_pages_bytes_after_load": stack.anon_huge_pages_bytes(),
                                              "off_for_the_memory_pass": bool(held_back)}

        def sample(kind: str, point: int, tokens: int) -> Stats:
            own = functools.partial(prefill_once if kind == "prefill" else decode_once, point)
            if anchor_runner is None:
                return measure_point(own, protocol, tokens, calibration)
            theirs = functools.partial(anchor_prefill if kind == "prefill" else anchor_decode, point)
            return measure_anchored_point(own, theirs, protocol, tokens, calibration)

        # every point after each load (devices.protocol.Protocol.loads): a point's figure is
        # its loads' combination, and from the second load on a point already sure is not
        # timed again
        points = [("prefill", n, n) for n in job.get("prefill_points", protocol.prompt_lengths)] + [("decode", d, 1) for d in job.get("decode_points", protocol.decode_depths)]
        per_load: dict[tuple[str, int], list[Stats]] = {}
        for load in range(protocol.loads):
            if load > 0:
                self.progress("reload", load=load + 1)
                runner.close()
                runner, prefill_once, decode_once = opened(artifact, seed)
                if anchor is not None and anchor_runner is not None:
                    anchor_runner.close()
                    anchor_runner, anchor_prefill, anchor_decode = opened(anchor, seed + 1)
            for kind, point, tokens in points:
                self.progress(kind, **({"length": point} if kind == "prefill" else {"depth": point}), load=load + 1)
                taken = per_load.setdefault((kind, point), [])
                taken.append(sample(kind, point, tokens))
                figure = taken[0] if protocol.loads == 1 else combine_point(taken, protocol.ci_target, protocol.trim_fraction, over="loads")
                self.result[kind][str(point)] = figure.to_dict()
                self.checkpoint()
            self.result["stack"]["loads"] = load + 1
            if load >= 1:  # two loads or more: the combined interval has seen the load effect
                points = [(kind, point, tokens) for kind, point, tokens in points if self.result[kind][str(point)]["noisy"]]
            if not points:
                break

        memory["peak_rss_end_bytes"] = stack.peak_rss_bytes()[0]
        self.result["thermal"]["after"] = stack.thermal_snapshot(self.cpus)
        self.result["stack"]["loadavg_after"] = self.result["thermal"]["after"].get("loadavg")
        runner.close()
        if anchor_runner is not None:
            anchor_runner.close()

    def stack_facts(self, runner, artifact) -> dict[str, Any]:
        from devices import stack

        machine = stack.machine_facts()
        facts = {
            **machine,
            **runner.stack(),
            "backend": artifact.backend,
            "quant": artifact.quant,
            "artifact_key": artifact.key,
            "threads": self.job["threads"],
            "affinity": sorted(os.sched_getaffinity(0)),
            "thread_env": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
            "data_limit_bytes": self.job.get("data_limit_bytes"),
            "gc": "collected before and disabled during timed runs",
            "timer": "time.perf_counter_ns",
            "pid": os.getpid(),
            "loadavg_before": self.result["thermal"]["before"].get("loadavg"),
        }
        return facts


def timers(runner, vocab_size: int, protocol, seed: int):
    """(prefill_once(n), decode_once(depth)) of `runner`: one timed run each, in ms (decode:
    per token). Random tokens from `seed`: tokenisation and sampling are not part of it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = {n: rng.integers(0, vocab_size, size=(1, n), dtype="int64") for n in protocol.prompt_lengths}
    decode_tokens = rng.integers(0, vocab_size, size=(1, protocol.decode_tokens + 1), dtype="int64")

    def prefill_once(n: int) -> float:
        start = time.perf_counter_ns()
        runner.prefill(prompts[n])
        return (time.perf_counter_ns() - start) / 1e6

    def decode_once(depth: int) -> float:
        runner.reset()
        runner.decode(decode_tokens[:, :1], depth - 1)  # untimed: the state of a depth-token context
        start = time.perf_counter_ns()
        for i in range(protocol.decode_tokens):
            runner.decode(decode_tokens[:, i + 1 : i + 2], depth + i)
        return (time.perf_counter_ns() - start) / 1e6 / protocol.decode_tokens

    return prefill_once, decode_once


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: the parent never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m devices.measure_child JOB.json RESULT.json PARTIAL.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    pin_threads(job["cpus"])
    if job.get("data_limit_bytes"):
        limit = int(job["data_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    child = Child(job, Path(argv[1]), Path(argv[2]))
    try:
        child.run()
        child.result["status"] = "ok"
    except BaseException as exc:  # report every failure as data; the parent decides what it means
        child.result["status"] = "oom" if is_out_of_memory(exc) else "error"
        child.result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
    write_json(Path(argv[1]), child.result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
