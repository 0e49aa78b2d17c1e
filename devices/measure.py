"""`measure(artifact, protocol, limits)`: latency and memory of one artifact, measured in a
fresh child process (`devices.measure_child`) under limits the OS enforces.

The parent never runs the model and never crashes because of the child. It checks the
artifact and the request, takes the measurement cores (a file lock per core, so that two
of our measurements never share a core), starts the child with its cores, threads and
limits, watches it, and turns whatever happens into a `Measurement`:

* `ok`: the child finished and wrote its result.
* `oom`: the candidate does not fit: the child's RSS went over `limits.memory_bytes`
  (killed by the watchdog, or seen afterwards in its peak RSS from wait4), it failed
  to allocate (MemoryError, std::bad_alloc, ...), or it was SIGKILLed by someone else
  (the kernel's OOM killer).
* `timeout`: it ran past `limits.timeout_s` (wall clock, import and load included).
* `error`: anything else (a crash, an exception), with the tail of its stderr.

With `Protocol.processes` > 1 the parent starts another fresh child for the points whose
figure (the anchored ratio, else the median) is still less sure than `ci_target`, at most
`processes` children in all, under the same core locks and the same overall timeout; the
later children skip the memory pass, and each point's figures are combined
(`devices.processes`). A later child that fails gives the measurement its status, with the
points the earlier ones measured kept.

How the memory cap is enforced, and why. RLIMIT_AS caps address space, and runtimes
reserve far more of it than they touch (thread stacks, allocator arenas, mapped files):
a cap on it refuses models that fit. A cgroup memory limit is the right tool where one
can be created, but that needs a writable cgroup (v2 delegation, or root on v1) that a
phone or a shared host does not give. So the cap is on what the device would feel, the
RSS: the parent polls the child's RSS (psutil, every 25 ms) and SIGKILLs it over the cap;
a spike between two polls is caught afterwards from the child's own peak RSS (VmHWM,
read at each poll and reported by the child at its end; ru_maxrss of wait4 where /proc
does not exist, since on Linux it includes the parent's peak), so it is reported as `oom`
too (only a little late). RLIMIT_DATA, set in the child
at 1.25x the cap + 256 MiB, is a backstop against runaway allocation: an allocation past
it fails inside the child (MemoryError / bad_alloc -> `oom`) before the host suffers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devices.artifact import Artifact, ArtifactError
from devices.measure_child import mentions_out_of_memory
from devices.protocol import Limits, Measurement, Protocol, Stats
from devices.stack import device_fingerprint, machine_facts, status_kib, usable_cpus
from lfm2.errors import UserError
from lfm2.sizes import format_size

if TYPE_CHECKING:  # psutil is imported where it is used: `import devices` must stay cheap
    import psutil

#: How often the parent samples the child's RSS when a memory cap is set.
POLL_S = 0.025
#: An anchored measurement loads the anchor beside the candidate once the memory pass is done:
#: the watchdog's cap is raised by this allowance for it (twice the larger of its files and its
#: fp32 weights, since an eager artifact builds its weights when loaded, plus the runtime's
#: buffers), and the candidate is judged against the cap by its memory pass's peak, so that a
#: candidate that fits is never failed for the anchor's memory.
ANCHOR_ALLOWANCE_FACTOR = 2
ANCHOR_ALLOWANCE_FIXED = 64 << 20
#: RLIMIT_DATA backstop = cap * DATA_LIMIT_FACTOR + DATA_LIMIT_HEADROOM (see module doc).
DATA_LIMIT_FACTOR = 1.25
DATA_LIMIT_HEADROOM = 256 << 20
#: Characters of the child's stderr kept in an error.
STDERR_TAIL = 4000
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ChildOutcome:
    """What happened to a child process, as the parent saw it."""

    returncode: int | None  # None: it did not end on its own
    signal: int | None  # the signal that ended it, if any
    killed_for: str | None  # "oom" | "timeout" when the parent killed it
    max_rss_bytes: int  # wait4's ru_maxrss: on Linux it includes the PARENT's peak RSS (see peak_rss_bytes)
    watched_rss_bytes: int  # the largest RSS the watchdog saw
    watched_hwm_bytes: int | None  # the largest VmHWM (the child's own peak RSS) the watchdog read; None off Linux
    wall_s: float
    stdout: str
    stderr: str
    result: dict[str, Any] | None  # RESULT.json, if it wrote one
    partial: dict[str, Any] | None  # PARTIAL.json: the measurement so far

    @property
    def peak_rss_bytes(self) -> int:
        """The child's own peak RSS over its life.

        Not ru_maxrss on Linux: exec folds the old address space's high-water mark into it,
        and after fork/vfork that is the parent's, so a small child of a 2 GB parent "peaks" at
        2 GB. The child's VmHWM belongs to its own post-exec address space; the watchdog reads
        it at every poll (it is a running maximum, so spikes between polls are in it) and the
        child reports its last value (`memory.peak_rss_end_bytes`) for the window after the
        last poll. The child resets VmHWM once, after its baseline; the running maximum here
        keeps what came before."""
        if self.watched_hwm_bytes is None:
            return max(self.max_rss_bytes, self.watched_rss_bytes)
        reported = ((self.result or self.partial or {}).get("memory") or {}).get("peak_rss_end_bytes") or 0
        return max(self.watched_hwm_bytes, self.watched_rss_bytes, int(reported))

    @property
    def last_phase(self) -> str | None:
        for line in reversed(self.stdout.strip().splitlines()):
            try:
                progress = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(progress, dict):
                continue
            # only what our child writes (a phase name, numbers): this text reaches results
            phase = progress.get("phase")
            phase = phase if isinstance(phase, str) and re.fullmatch(r"[a-z_ ]{1,40}", phase) else "?"
            detail = ", ".join(f"{k} {v}" for k, v in progress.items() if k not in ("phase", "t") and re.fullmatch(r"[a-z_]{1,40}", str(k)) and isinstance(v, (int, float)) and not isinstance(v, bool))
            return phase + (f" ({detail})" if detail else "")
        return None


# -- the child process ------------------------------------------------------------------------


def _tree_rss(process: psutil.Process) -> int:
    import psutil
    try:
        return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def supervise(command: list[str], workdir: Path, *, memory_bytes: int | None = None, timeout_s: float | None = None, env: dict[str, str] | None = None) -> ChildOutcome:
    """Run `command` in its own session under an RSS cap and a wall-clock timeout; reap it
    with wait4 (for its peak RSS) and collect its output and result files from `workdir`.

    The command's stdout/stderr go to files (a pipe could fill up and stall it)."""
    import psutil
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s else None
    killed_for = None
    watched = 0
    watched_hwm: int | None = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True, close_fds=True)
    watcher = psutil.Process(process.pid)
    status = rusage = None
    try:
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if memory_bytes is not None:
                rss = _tree_rss(watcher)
                watched = max(watched, rss)
                hwm_kib = status_kib("VmHWM", process.pid)
                if hwm_kib is not None:
                    watched_hwm = max(watched_hwm or 0, hwm_kib * 1024)
                if rss > memory_bytes:
                    killed_for = "oom"
            if killed_for is None and deadline is not None and time.monotonic() > deadline:
                killed_for = "timeout"
            if killed_for:
                _kill_group(process.pid)
                _, status, rusage = os.wait4(process.pid, 0)
                break
            time.sleep(POLL_S if memory_bytes is not None else 0.1)
    except BaseException:
        _kill_group(process.pid)  # never leave a child behind (KeyboardInterrupt included)
        with contextlib.suppress(ChildProcessError):
            os.wait4(process.pid, 0)
        raise
    finally:
        process.returncode = -1  # reaped here with wait4; stop Popen from waiting on it again
    _kill_group(process.pid)  # anything the child left in its session
    returncode = os.waitstatus_to_exitcode(status)
    ended_by = -returncode if returncode < 0 else None
    return ChildOutcome(
        returncode=returncode if killed_for is None else None,
        signal=ended_by,
        killed_for=killed_for,
        max_rss_bytes=rusage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        watched_rss_bytes=watched,
        watched_hwm_bytes=watched_hwm,
        wall_s=time.monotonic() - start,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        result=_read_json(workdir / "result.json"),
        partial=_read_json(workdir / "partial.json"),
    )


# -- owning the cores -------------------------------------------------------------------------


def _lock_dir() -> Path:
    path = Path(os.environ.get("LFM2_NAS_LOCKS") or Path(tempfile.gettempdir()) / "lfm2-nas-locks")
    path.mkdir(parents=True, exist_ok=True)
    return path


class CoresBusy(Exception):
    """The measurement cores stayed locked by someone else for the whole wait allowed."""

    def __init__(self, cpus: list[int], waited_s: float):
        super().__init__(f"cores {sorted(cpus)} stayed locked by another measurement or process for {waited_s:.0f} s")
        self.cpus, self.waited_s = cpus, waited_s


#: How often a held core lock is tried again while waiting (a flock wait cannot time out).
LOCK_POLL_S = 0.05


@contextlib.contextmanager
def own_cores(cpus: list[int], timeout_s: float | None = None) -> Iterator[float]:
    """Hold an exclusive lock per core (in order, so two callers cannot deadlock) while a
    measurement runs: no other measurement of ours uses these cores meanwhile. Yields the
    seconds spent waiting. With `timeout_s`, gives up after that long (`CoresBusy`): the
    lock folder is shared by every user of the host, and any process holding a lock file
    would otherwise stall the measurement with no limit."""
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s is not None else None
    handles = []
    try:
        for cpu in sorted(cpus):
            handle = open(_lock_dir() / f"cpu{cpu}.lock", "a+")
            handles.append(handle)
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:  # type: ignore[operator]
                        raise CoresBusy(cpus, time.monotonic() - start) from None
                    time.sleep(LOCK_POLL_S)
        yield time.monotonic() - start
    finally:
        for handle in reversed(handles):
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


# -- the request ------------------------------------------------------------------------------


def _check_request(artifact: Artifact, protocol: Protocol, limits: Limits) -> tuple[list[int], int]:
    """Validate what can be checked before a process starts; returns (cpus, threads)."""
    if artifact.max_context < protocol.max_context:
        raise UserError(
            f"the artifact holds {artifact.max_context} tokens of context, the protocol needs {protocol.max_context} "
            f"(longest prompt, or deepest decode depth + decode_tokens): compile with max_context >= {protocol.max_context}"
        )
    dynamic = artifact.backend in ("eager", "onnx") or artifact.manifest.get("dynamic_prompt_lengths")
    missing = sorted(set(protocol.prompt_lengths) - set(artifact.prompt_lengths))
    if missing and not dynamic:
        raise UserError(f"the {artifact.backend} artifact has prefill graphs for {list(artifact.prompt_lengths)} only, not {missing}: compile with those prompt lengths")
    available = usable_cpus()
    cpus = list(limits.cpus or protocol.cpus or available)
    unknown = sorted(set(cpus) - set(available))
    if unknown:
        raise UserError(f"CPUs {unknown} are not usable by this process (usable: {available}); pick cores from that list")
    threads = limits.threads or protocol.threads or len(cpus)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    if limits.memory_bytes is not None and limits.memory_bytes < 1:
        raise UserError(f"the memory cap must be a positive number of bytes, got {limits.memory_bytes}")
    if limits.timeout_s is not None and limits.timeout_s <= 0:
        raise UserError(f"the timeout must be positive seconds, got {limits.timeout_s}")
    return cpus, threads


def _check_anchor(anchor: Artifact | str | Path, artifact: Artifact, protocol: Protocol, limits: Limits) -> Artifact:
    """The anchor, loaded and verified: it must run the same runtime at the same precision
    (else the ratio mixes two runtimes' drift) and hold every point of the protocol."""
    if not isinstance(anchor, Artifact):
        anchor = Artifact.load(anchor)
    else:
        anchor.verify()
    if (anchor.backend, anchor.quant) != (artifact.backend, artifact.quant):
        raise UserError(
            f"the anchor is a {anchor.backend} {anchor.quant} artifact and the candidate a {artifact.backend} {artifact.quant} one: "
            "an anchor tracks drift only for the same runtime and precision; compile the anchor spec for this backend and quant"
        )
    try:
        _check_request(anchor, protocol, limits)
    except UserError as exc:
        raise UserError(f"the anchor cannot run this protocol: {exc}") from exc
    return anchor


#: glibc's tunable that madvise(MADV_HUGEPAGE)s malloc's large mappings (glibc >= 2.35; an older
#: glibc ignores it, and the child's `stack.anon_huge_pages_bytes` then says 0).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def child_env(threads: int, huge_pages: bool = False) -> dict[str, str]:
    """The environment of a measuring child: this one's, with the runtimes' thread counts, the
    project on the path, and glibc's huge-pages tunable when asked (Protocol.huge_pages)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    if huge_pages:  # read by glibc when the child starts: it cannot be asked for later
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE) if t)
    return env


def _fmt_bytes(n: int | None) -> str:
    return format_size(n, unit="MiB", digits=0, missing="?")


def _to_measurement(outcome: ChildOutcome, limits: Limits, facts: dict[str, Any]) -> Measurement:
    """Turn what the child did into a Measurement (see the module doc for the statuses)."""
    cap = limits.memory_bytes
    data = dict(outcome.result or outcome.partial or {})
    data.pop("status", None)
    error = data.pop("error", None)
    where = f" during {outcome.last_phase}" if outcome.last_phase else ""
    stderr_tail = outcome.stderr[-STDERR_TAIL:]
    # with an anchor, the candidate's own peak is its memory pass's (the anchor loads after it)
    own_peak = (data.get("memory") or {}).get("peak_rss_bytes") if facts.get("anchored") else outcome.peak_rss_bytes
    if outcome.killed_for == "timeout":
        status, error = "timeout", f"the measurement ran past its {limits.timeout_s:g} s wall-clock limit{where}; it was killed"
    elif outcome.killed_for == "oom" and facts.get("anchored") and own_peak is not None and cap is not None and own_peak <= cap:
        status, error = "error", (
            f"the child went over the cap with the anchor loaded{where} (peak {_fmt_bytes(outcome.peak_rss_bytes)}), while the candidate's own peak "
            f"({_fmt_bytes(own_peak)}) was within the {_fmt_bytes(cap)} cap: measure without the anchor, or with a larger cap"
        )
    elif outcome.killed_for == "oom":
        peak = outcome.peak_rss_bytes
        status, error = "oom", f"the child's RSS went over the {_fmt_bytes(cap)} cap{where} (peak {_fmt_bytes(peak)}): the candidate does not fit; it was killed"
    elif outcome.result is not None:
        status = outcome.result.get("status", "error")
        if status == "ok" and cap is not None and own_peak is not None and own_peak > cap:
            status, error = "oom", f"the child's peak RSS was {_fmt_bytes(own_peak)}, over the {_fmt_bytes(cap)} cap (a spike between two watchdog polls): the candidate does not fit"
        elif status != "ok":
            status = "oom" if status == "oom" else "error"
            # The first line is ours (what and where); the exception's own text, which an
            # artifact can fill with anything, follows as detail (see the agent's results).
            raised = str(error or "").split(":", 1)[0].strip()
            raised = raised if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,80}", raised) else "an exception"
            summary = "ran out of memory" if status == "oom" else "raised"
            error = f"the measurement child {summary} ({raised}){where}\n{error or ''}"
    elif outcome.signal == signal.SIGKILL:
        status, error = "oom", f"the child was SIGKILLed by someone other than the measurement{where}: most likely the kernel's OOM killer (the candidate does not fit in this machine's memory)"
    elif mentions_out_of_memory(stderr_tail):
        status, error = "oom", f"the child failed to allocate memory{where}:\n{stderr_tail}"
    elif outcome.signal is not None:
        try:
            name = signal.Signals(outcome.signal).name
        except ValueError:
            name = f"signal {outcome.signal}"
        status, error = "error", f"the child crashed with {name}{where}; its stderr ends with:\n{stderr_tail}"
    else:
        status, error = "error", f"the child exited with status {outcome.returncode} without a result{where}; its stderr ends with:\n{stderr_tail}"
    if status == "error" and error and stderr_tail and stderr_tail not in error:
        error = f"{error}\n--- child stderr (tail) ---\n{stderr_tail}"
    memory = dict(data.get("memory") or {})
    memory.update(child_peak_rss_bytes=outcome.peak_rss_bytes, child_max_rss_bytes=outcome.max_rss_bytes, cap_bytes=cap, cap_method=facts["cap_method"])
    data["memory"] = memory
    data["stack"] = {**(data.get("stack") or {}), "lock_wait_s": facts["lock_wait_s"], "child_wall_s": round(outcome.wall_s, 3)}
    data["device"] = facts["device"]
    data["wall_time_s"] = facts["wall_time_s"]
    data["error"] = None if status == "ok" else error
    data["status"] = status  # a failure keeps what was measured before it, for the record
    known = set(Measurement.__dataclass_fields__)
    return Measurement.from_dict({k: v for k, v in data.items() if k in known})


def _run_one_child(job: dict[str, Any], limits: Limits, threads: int, left_s: float | None, watched: int | None, workdir: Path) -> ChildOutcome:
    workdir.mkdir()
    (workdir / "job.json").write_text(json.dumps(job))
    command = [sys.executable, "-m", "devices.measure_child", str(workdir / "job.json"), str(workdir / "result.json"), str(workdir / "partial.json")]
    huge_pages = bool(job["protocol"].get("huge_pages"))
    return supervise(command, workdir, memory_bytes=watched, timeout_s=left_s, env=child_env(threads, huge_pages))


def _unsure_points(outcomes: list[ChildOutcome], protocol: Protocol) -> tuple[list[int], list[int]]:
    """(prefill lengths, decode depths) whose figure, combined over the processes so far, is
    still less sure than `protocol.ci_target`: what the next process measures."""
    from devices.processes import combine_point

    unsure: tuple[list[int], list[int]] = ([], [])
    for kind, points, out in (("prefill", protocol.prompt_lengths, unsure[0]), ("decode", protocol.decode_depths, unsure[1])):
        for point in points:
            taken = [Stats.from_dict(stats) for o in outcomes if (stats := ((o.result or {}).get(kind) or {}).get(str(point)))]
            if not taken or combine_point(taken, protocol.ci_target, protocol.trim_fraction).noisy:
                out.append(point)
    return unsure


def _run_processes(job: dict[str, Any], protocol: Protocol, limits: Limits, threads: int, watched: int | None, lock_wait_s: float, scratch: Path) -> list[ChildOutcome]:
    """Run the measurement child once, then (`protocol.processes` > 1) again in fresh processes
    for the points still unsure (`devices.processes`), at most `processes` in all and within
    the measurement's timeout; stops at the first process that does not finish ok. Each child's
    files go to its own folder under `scratch`."""
    deadline = None if limits.timeout_s is None else time.monotonic() + max(0.001, limits.timeout_s - lock_wait_s)
    outcomes: list[ChildOutcome] = []
    this_job = job
    for index in range(protocol.processes):
        left_s = None if deadline is None else max(0.001, deadline - time.monotonic())
        outcome = _run_one_child(this_job, limits, threads, left_s, watched, scratch / f"process{index + 1}")
        outcomes.append(outcome)
        if outcome.killed_for or (outcome.result or {}).get("status") != "ok":
            break
        prefill, decode = _unsure_points(outcomes, protocol)
        if not prefill and not decode:
            break
        this_job = {**job, "measure_memory": False, "prefill_points": prefill, "decode_points": decode}
    return outcomes


def _combine_processes(measurement: Measurement, later: list[Measurement], protocol: Protocol) -> None:
    """Fold the later processes' measurements into the first's: each point's figures combined
    (`devices.processes.combine_point`), the processes' walls and statuses in `stack`; a later
    process that failed makes the measurement's status its own (what it finished is kept)."""
    from devices.processes import combine_point

    everyone = [measurement, *later]
    for kind in ("prefill", "decode"):
        table = getattr(measurement, kind)
        for point in list(table):
            table[point] = combine_point([getattr(m, kind)[point] for m in everyone if point in getattr(m, kind)], protocol.ci_target, protocol.trim_fraction)
    measurement.stack["processes"] = [
        {"status": m.status, "child_wall_s": m.stack.get("child_wall_s"), "pid": m.stack.get("pid"), "prefill_points": sorted(m.prefill), "decode_points": sorted(m.decode),
         "calibration_reference_ms": (m.stack.get("calibration") or {}).get("reference_ms")}
        for m in everyone
    ]
    measurement.stack["child_wall_s"] = round(sum(m.stack.get("child_wall_s") or 0 for m in everyone), 3)
    failed = next((m for m in later if m.status != "ok"), None)
    if failed is not None and measurement.status == "ok":
        measurement.status = failed.status
        measurement.error = f"in fresh process {everyone.index(failed) + 1} of up to {protocol.processes} (the points measured before it are kept): {failed.error}"


def measure(
    artifact: Artifact | str | Path,
    protocol: Protocol | None = None,
    limits: Limits | None = None,
    device: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    scratch_dir: str | Path | None = None,
    anchor: Artifact | str | Path | None = None,
) -> Measurement:
    """Measure `artifact` under `protocol` in a fresh child process, within `limits`.

    Raises `UserError` (ArtifactError for a missing, truncated or tampered artifact) for
    a request that cannot run; everything that goes wrong in the child comes back as a
    Measurement with status oom, timeout or error. The wait for the cores counts against
    `limits.timeout_s`: cores held elsewhere for all of it give status `timeout`. The
    child's files go to a folder under `scratch_dir` (default: the system temp folder);
    an agent gives its workdir, so that it can clean up after being killed.

    `anchor`: an artifact of the same backend and precision timed side by side with this one
    (loaded after the memory pass; each sample a pair): every point then also carries the
    ratio of the two, which the host's drift between measurements does not move
    (`devices.sampling.measure_anchored_point`). The anchor's memory counts against
    `limits.memory_bytes` (it is loaded in the same process), never in the footprint."""
    start = time.monotonic()
    protocol = protocol or Protocol()
    limits = limits or Limits()
    if protocol.anchor_sha256 is not None and anchor is None:
        raise UserError("the protocol names an anchor artifact (anchor_sha256) but none was given: pass anchor= (an agent finds it among its uploaded artifacts)")
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)  # verifies every file's size and sha256
    else:
        artifact.verify()
    cpus, threads = _check_request(artifact, protocol, limits)
    anchor_artifact = None if anchor is None else _check_anchor(anchor, artifact, protocol, limits)
    cap = limits.memory_bytes
    allowance = 0
    if anchor_artifact is not None and cap:
        from lfm2.flops import parameters

        allowance = ANCHOR_ALLOWANCE_FACTOR * max(anchor_artifact.size_bytes, 4 * parameters(anchor_artifact.spec)) + ANCHOR_ALLOWANCE_FIXED
    watched = cap + allowance if cap else None  # the candidate's own peak is held to `cap` (_to_measurement)
    data_limit = int(watched * DATA_LIMIT_FACTOR + DATA_LIMIT_HEADROOM) if watched else None
    job = {
        "artifact": str(Path(artifact.path).resolve()),
        "protocol": protocol.to_dict(),
        "cpus": cpus,
        "threads": threads,
        "seed": seed,
        "data_limit_bytes": data_limit,
        "anchor": None if anchor_artifact is None else str(Path(anchor_artifact.path).resolve()),
    }
    facts = dict(machine_facts())
    device_facts = dict(device or {})
    device_facts.setdefault("fingerprint", device_fingerprint({**facts, "limits": limits.to_dict(), "threads": threads, "cpus": cpus}))
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # the scratch folder first: an agent killed while this waits for the cores leaves it in its
        # workdir, where the agent's next start cleans it up
        with tempfile.TemporaryDirectory(prefix="lfm2-measure-", dir=scratch_dir) as tmp, own_cores(cpus, limits.timeout_s) as lock_wait_s:
            outcomes = _run_processes(job, protocol, limits, threads, watched, lock_wait_s, Path(tmp))
    except CoresBusy as busy:
        return Measurement.failure(
            "timeout",
            f"{busy}, the whole {limits.timeout_s:g} s wall-clock limit of the measurement; nothing was run (free the cores, see LFM2_NAS_LOCKS)",
            artifact_sha256="",
            backend=artifact.backend,
            quant=artifact.quant,
            spec_key=artifact.spec.key,
            protocol=protocol.to_dict(),
            device=device_facts,
            wall_time_s=round(time.monotonic() - start, 3),
        )
    cap_method = (
        f"RSS watchdog every {POLL_S * 1000:.0f} ms + the child's own peak RSS (VmHWM, else wait4) + RLIMIT_DATA backstop at {_fmt_bytes(data_limit)}" if cap else "no cap"
    )
    if allowance:
        cap_method += f"; anchored: the watchdog at the cap + {_fmt_bytes(allowance)} for the anchor, the candidate held to the cap by its memory pass's peak"
    facts = {"cap_method": cap_method, "lock_wait_s": round(lock_wait_s, 3), "device": device_facts, "wall_time_s": round(time.monotonic() - start, 3), "anchored": allowance > 0}
    measurement = _to_measurement(outcomes[0], limits, facts)
    if len(outcomes) > 1:
        _combine_processes(measurement, [_to_measurement(outcome, limits, facts) for outcome in outcomes[1:]], protocol)
    if not measurement.spec_key:
        measurement.spec_key, measurement.backend, measurement.quant = artifact.spec.key, artifact.backend, artifact.quant
        measurement.protocol = measurement.protocol or protocol.to_dict()
        measurement.artifact_bytes = artifact.size_bytes
    measurement.stack.setdefault("limits", limits.to_dict())
    return measurement


__all__ = ["measure", "machine_facts", "device_fingerprint", "supervise", "child_env", "HUGE_PAGES_TUNABLE", "own_cores", "CoresBusy", "ChildOutcome", "ArtifactError"]
