"""Measure a llama.cpp artifact on a phone over adb: the same `Measurement` as a local agent's.

`Phone` is one attached phone with a runner build that fits it (`Phone.open` checks the
connection, reads the phone's facts and refuses a runner of another ABI). `Phone.measure`:

1. checks the request (the protocol's context fits the artifact, the cores exist on the phone);
2. pushes the runner folder and the GGUF, each once, under content-addressed names in
   `/data/local/tmp/lfm2-nas/` (a push goes to a temporary name and is renamed when complete,
   so a cable pulled mid-push leaves nothing that looks whole); the free space is checked first;
3. waits for the phone to cool down (`devices.adb.phone.CoolDown`) and records the zones;
4. starts the runner pinned to the cores (`taskset MASK`) with the thread count, and drives
   the protocol the local child runs (devices/measure_child.py): a memory pass of one run per
   point (peak = the runner's VmHWM, reset after its baseline), then per point warm-up and
   timed runs until the median's interval is tight, re-measured when the phone's own
   calibration kernel ran slower around it (`devices.sampling.measure_point`, unchanged);
5. reads the temperatures again and stops the runner.

Statuses: `ok`; `oom` (the runner's peak RSS over the agent's cap, or the runner killed by a
SIGKILL: on a phone, Android's low-memory killer); `timeout` (past the job's wall-clock
limit); `error` (the runner or llama.cpp refused, a full phone, anything else). A phone
that is not reachable (absent, unauthorised, offline, disconnected mid-run) raises
`DeviceUnavailable`: the agent's worker puts the job back in the queue, and reports it
`lost` with the reason if the phone does not come back.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.adb.phone import CoolDown, device_facts, free_bytes, thermal_zones
from devices.adb.runner_build import MANIFEST, PROGRAM, RunnerBuild
from devices.adb.session import RunnerDied, RunnerError, RunnerSession, RunnerTimeout
from devices.adb.transport import AdbError, Transport
from devices.artifact import Artifact
from devices.protocol import Limits, Measurement, Protocol
from devices.sampling import measure_point
from lfm2.errors import UserError

REMOTE_ROOT = "/data/local/tmp/lfm2-nas"
#: Space left free on the phone beyond what a push needs.
SPACE_MARGIN_BYTES = 64 << 20
#: Seconds one runner command may take at most (besides the job's own wall-clock limit).
COMMAND_TIMEOUT_S = 600.0
PUSH_BYTES_PER_S = 5 << 20  # a slow USB 2 link: bounds a push's timeout


class PhoneCalibration:
    """`devices.sampling.Calibration`, run by the runner on the phone's cores."""

    def __init__(self, session: RunnerSession):
        self.session = session
        self.reference_ms = min(self.time_ms() for _ in range(3))

    def time_ms(self) -> float:
        return float(self.session.request("calibrate", 120)["ms"])

    def slowdown(self) -> float:
        return self.time_ms() / self.reference_ms

    def describe(self) -> dict:
        return {"kernel": "6 passes of fp32 multiply-add over 4 MiB arrays (one thread), median of 5, run by lfm2-runner on the phone", "reference_ms": round(self.reference_ms, 4)}


def _mask(cpus: list[int]) -> str:
    return format(sum(1 << c for c in cpus), "x")


@dataclass
class Phone:
    transport: Transport
    runner: RunnerBuild
    facts: dict[str, Any]
    cooldown: CoolDown = field(default_factory=CoolDown)
    root: str = REMOTE_ROOT

    @classmethod
    def open(cls, transport: Transport, runner: RunnerBuild, cooldown: CoolDown | None = None) -> Phone:
        """Check the phone is there and authorised, read its facts, refuse a runner of another ABI."""
        transport.state()
        facts = device_facts(transport)
        if runner.abi not in facts["abis"]:
            raise AdbError(
                "wrong_abi",
                f"the runner at {runner.path} is built for {runner.abi}, phone {transport.serial} runs {', '.join(facts['abis']) or 'an unknown ABI'}: "
                f"build it for the phone (lfm2-nas agent build-runner --android-ndk NDK --abi {facts['abis'][0] if facts['abis'] else 'arm64-v8a'} --llama-cpp-source SRC)",
            )
        return cls(transport, runner, facts, cooldown or CoolDown())

    def describe(self) -> dict[str, Any]:
        """What every result from this phone carries in `device`."""
        keys = ("model", "manufacturer", "soc", "abi", "android_release", "sdk", "cores", "memory_bytes", "build_fingerprint")
        return {**self.transport.describe(), "phone": {k: self.facts.get(k) for k in keys}, "runner": {"abi": self.runner.abi, "version": self.runner.version}}

    # -- files on the phone ---------------------------------------------------------------

    def _exists(self, remote: str, size: int) -> bool:
        out = self.transport.shell(f"stat -c %s {shlex.quote(remote)} 2>/dev/null", check=False).stdout.strip()
        return out.isdigit() and int(out) == size

    def _check_space(self, needed: int, what: str) -> None:
        free = free_bytes(self.transport, "/data/local/tmp")
        if free is not None and free < needed + SPACE_MARGIN_BYTES:
            raise AdbError(
                "no_space",
                f"phone {self.transport.serial} has {free / 2**20:.0f} MiB free in /data/local/tmp, {what} needs {(needed + SPACE_MARGIN_BYTES) / 2**20:.0f} MiB "
                f"(with a {SPACE_MARGIN_BYTES >> 20} MiB margin): free space on the phone, or delete {self.root}/artifacts",
            )

    def _push(self, local: Path, remote: str) -> None:
        """Push to a temporary name, then rename: a broken push leaves no whole-looking file."""
        size = local.stat().st_size
        if self._exists(remote, size):
            return
        self._check_space(size, f"pushing {local.name}")
        partial = f"{remote}.partial"
        self.transport.shell(f"mkdir -p {shlex.quote(str(Path(remote).parent))}")
        self.transport.push(local, partial, timeout_s=60 + size / PUSH_BYTES_PER_S)
        self.transport.shell(f"mv {shlex.quote(partial)} {shlex.quote(remote)}")

    def install_runner(self) -> str:
        """The runner folder on the phone (pushed once per build)."""
        folder = f"{self.root}/runner/{self.runner.key}"
        for path in self.runner.files:
            self._push(path, f"{folder}/{path.name}")
        self.transport.shell(f"chmod 755 {folder}/{PROGRAM}")
        return folder

    def install_artifact(self, artifact: Artifact) -> str:
        gguf = artifact.manifest["llamacpp"]["gguf"]
        digest = artifact.files[gguf]["sha256"]  # content-addressed: the same GGUF is pushed once
        remote = f"{self.root}/artifacts/{digest}.gguf"
        self._push(artifact.file(gguf), remote)
        return remote

    # -- the measurement ------------------------------------------------------------------

    def _check_request(self, artifact: Artifact, protocol: Protocol, limits: Limits) -> tuple[list[int], int]:
        if artifact.backend != "llamacpp":
            raise UserError(f"the adb agent measures llamacpp artifacts (its runner is llama.cpp's); this one is {artifact.backend}: compile with --backend llamacpp")
        if artifact.max_context < protocol.max_context:
            raise UserError(f"the artifact holds {artifact.max_context} tokens of context, the protocol needs {protocol.max_context}: compile with max_context >= {protocol.max_context}")
        cpus = self.check_cores(limits.cpus or protocol.cpus)
        threads = limits.threads or protocol.threads or len(cpus)
        return cpus, threads

    def check_cores(self, cpus: tuple[int, ...] | list[int] | None) -> list[int]:
        """The cores to pin to (every core of the phone when None); refuses cores it lacks."""
        cores = sorted(int(c) for c in self.facts.get("core_max_freq_hz", {})) or list(range(int(self.facts.get("cores") or 1)))
        chosen = list(cpus or cores)
        unknown = sorted(set(chosen) - set(cores))
        if unknown:
            raise UserError(f"cores {unknown} do not exist on phone {self.transport.serial} (it has {cores}); pick cores from that list (--cpus, or the profile's affinity)")
        return chosen

    def measure(self, artifact: Artifact | str | Path, protocol: Protocol | None = None, limits: Limits | None = None, device: dict[str, Any] | None = None, *, seed: int = 0,
                anchor: Artifact | str | Path | None = None, **_: Any) -> Measurement:
        start = time.monotonic()
        protocol, limits = protocol or Protocol(), limits or Limits()
        if anchor is not None or protocol.anchor_sha256 is not None:
            raise UserError(
                f"phone {self.transport.serial}: anchored measurements (an anchor artifact timed beside each candidate) are not supported by the phone's runner yet; "
                "measure without an anchor (lfm2-nas search --no-anchor)"
            )
        if protocol.processes > 1:
            raise UserError(
                f"phone {self.transport.serial}: a point in several fresh processes (protocol processes {protocol.processes}) is not supported by the phone's runner yet; "
                "measure with processes 1 (lfm2-nas bench --processes 1)"
            )
        if protocol.loads > 1 or protocol.huge_pages:
            raise UserError(
                f"phone {self.transport.serial}: reloading the model between timings (protocol loads {protocol.loads}) and glibc's huge pages (protocol huge_pages "
                f"{str(protocol.huge_pages).lower()}) are not supported by the phone's runner yet; measure with loads 1 and huge_pages false (lfm2-nas search --loads 1 --no-huge-pages)"
            )
        if isinstance(artifact, Artifact):
            artifact.verify()
        else:
            artifact = Artifact.load(artifact)  # verifies every file's size and sha256
        cpus, threads = self._check_request(artifact, protocol, limits)
        deadline = start + limits.timeout_s if limits.timeout_s else None
        result: dict[str, Any] = {
            "backend": artifact.backend, "quant": artifact.quant, "spec_key": artifact.spec.key, "protocol": protocol.to_dict(),
            "artifact_bytes": artifact.size_bytes, "prefill": {}, "decode": {}, "memory": {}, "thermal": {},
        }  # fmt: skip
        device_facts_ = {**(device or {}), **self.describe()}
        self.transport.state()
        try:
            folder = self.install_runner()
            model = self.install_artifact(artifact)
        except AdbError as exc:
            if exc.kind == "no_space":
                return self._failure("error", f"no_space: {exc}", result, device_facts_, start)
            raise
        result["thermal"]["before"] = self.cooldown.wait(self.transport)
        command = (
            f"cd {folder} && LD_LIBRARY_PATH={folder} exec taskset {_mask(cpus)} ./{PROGRAM} "
            f"--model {shlex.quote(model)} --ctx {artifact.max_context} --threads {threads} --seed {int(seed)}"
        )
        session = RunnerSession(self.transport, command)
        phase = "load"

        def left(cap: float = COMMAND_TIMEOUT_S) -> float:
            if deadline is None:
                return cap
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunnerTimeout(f"the measurement ran past its {limits.timeout_s:g} s wall-clock limit during {phase}")
            return min(cap, remaining)

        try:
            ready = session.read("loading the model", left())
            session.pid = int(ready.get("pid") or 0) or None
            result["load_time_s"] = float(ready["load_ms"]) / 1000
            baseline = int(ready["baseline_rss_bytes"])
            memory = result["memory"]
            memory.update(baseline_rss_bytes=baseline, rss_after_load_bytes=ready.get("rss_after_load_bytes"), modules_in_baseline=["llama.cpp (linked into lfm2-runner)"])
            result["stack"] = self._stack(ready, artifact, cpus, threads)

            def prefill_once(n: int) -> float:
                return float(session.request(f"prefill {n}", left())["ms"])

            def decode_once(depth: int) -> float:
                return float(session.request(f"decode {depth} {protocol.decode_tokens}", left())["ms"])

            calibration = None
            if protocol.disturbance_threshold > 0:
                phase = "calibrate"
                calibration = PhoneCalibration(session)
                result["stack"]["calibration"] = calibration.describe()
            if protocol.measure_memory:
                phase = "memory"
                for n in protocol.prompt_lengths:
                    prefill_once(n)
                for depth in protocol.decode_depths:
                    decode_once(depth)
                peak = int(session.request("memory", left())["hwm_bytes"])
                memory.update(
                    peak_rss_bytes=peak,
                    footprint_bytes=max(0, peak - baseline),
                    method=(
                        "a pass of one run per point right after loading; peak from the runner's VmHWM on the phone"
                        + (" reset after the baseline (/proc/self/clear_refs)" if ready.get("peak_reset") else " (NOT reset: includes the backend's start-up)")
                        + "; footprint = peak - baseline (the runner's RSS after initialising llama.cpp, before loading)"
                    ),
                )
                if limits.memory_bytes is not None and peak > limits.memory_bytes:
                    return self._failure("oom", f"the runner's peak RSS on the phone was {peak / 2**20:.0f} MiB, over the {limits.memory_bytes / 2**20:.0f} MiB cap: the candidate does not fit", result, device_facts_, start)
            for n in protocol.prompt_lengths:
                phase = f"prefill (length {n})"
                result["prefill"][n] = measure_point(functools.partial(prefill_once, n), protocol, n, calibration)
            for depth in protocol.decode_depths:
                phase = f"decode (depth {depth})"
                result["decode"][depth] = measure_point(functools.partial(decode_once, depth), protocol, 1, calibration)
            end = session.request("memory", left())
            memory["peak_rss_end_bytes"] = int(end["hwm_bytes"])
            memory["child_peak_rss_bytes"] = max(int(end["hwm_bytes"]), int(memory.get("peak_rss_bytes") or 0))
            memory["cap_bytes"] = limits.memory_bytes
            memory["cap_method"] = "the runner's VmHWM read after the memory pass and at the end" if limits.memory_bytes else "no cap"
            result["thermal"]["after"] = {"zones": thermal_zones(self.transport)}
            if limits.memory_bytes is not None and memory["child_peak_rss_bytes"] > limits.memory_bytes:
                return self._failure("oom", f"the runner's peak RSS on the phone reached {memory['child_peak_rss_bytes'] / 2**20:.0f} MiB during the timed runs, over the {limits.memory_bytes / 2**20:.0f} MiB cap: the candidate does not fit", result, device_facts_, start)
        except RunnerTimeout as exc:
            return self._failure("timeout", f"{exc}; the runner was stopped", result, device_facts_, start)
        except RunnerError as exc:
            return self._failure("error", f"the runner refused during {phase}: {exc}", result, device_facts_, start)
        except RunnerDied as exc:
            if exc.killed:
                return self._failure("oom", f"the runner was SIGKILLed during {phase}: most likely Android's low-memory killer (the candidate does not fit in the phone's memory)", result, device_facts_, start)
            return self._failure("error", f"{exc}".replace("while running", f"during {phase}, running", 1), result, device_facts_, start)
        finally:
            session.close()
        result.update(status="ok", device=device_facts_, wall_time_s=round(time.monotonic() - start, 3))
        return Measurement(**result)

    def _stack(self, ready: dict[str, Any], artifact: Artifact, cpus: list[int], threads: int) -> dict[str, Any]:
        return {
            "backend": "llamacpp",
            "quant": artifact.quant,
            "artifact_key": artifact.key,
            "runtime": f"llama.cpp in lfm2-runner {ready.get('version')} ({self.runner.facts.get('llama_cpp')})",
            "runner": {"version": ready.get("version"), "abi": self.runner.abi, "compiler": self.runner.facts.get("compiler"), "build_key": self.runner.key},
            "system_info": str(ready.get("system_info", "")).strip(),
            "delegate": "ggml CPU backend",
            "threads": threads,
            "affinity": cpus,
            "pinning": f"taskset {_mask(cpus)}",
            "n_batch": 2048,
            "n_ubatch": 512,
            "kv_cache_type": "f16",
            "flash_attn": "auto",
            "weights": "memory-mapped GGUF (load_mode mmap); CPU repacking on (llama.cpp default)",
            "model_bytes": ready.get("model_bytes"),
            "timer": "std::chrono::steady_clock on the phone (the adb round trip is not timed)",
            "depth_context": "built once per depth by a prefill, then restored from a saved sequence state (as llama-bench)",
            "transport": self.transport.describe(),
            "os": f"Android {self.facts.get('android_release')} (SDK {self.facts.get('sdk')}), {self.facts.get('kernel')}",
            "cpu_model": self.facts.get("soc"),
            "device_model": self.facts.get("model"),
            "core_max_freq_hz": self.facts.get("core_max_freq_hz"),
            "memory_bytes": self.facts.get("memory_bytes"),
        }

    def _failure(self, status: str, error: str, result: dict[str, Any], device: dict[str, Any], start: float) -> Measurement:
        with contextlib.suppress(AdbError):
            result["thermal"].setdefault("after", {"zones": thermal_zones(self.transport)})
        result.update(status=status, error=error, device=device, wall_time_s=round(time.monotonic() - start, 3))
        return Measurement(**result)


__all__ = ["Phone", "PhoneCalibration", "REMOTE_ROOT", "MANIFEST"]
