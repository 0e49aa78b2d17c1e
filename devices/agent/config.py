"""What an agent is and what its measurement children may use: flags -> `AgentConfig`.

The rules, in one place:
- threads: `--threads`, else the profile's recommended threads;
- CPU affinity: `--cpus`, else (real device) the profile's affinity if those cores exist
  here, else (`--emulate`) the first `threads` cores this process may use;
- memory cap: `--memory-limit`, else (`--emulate`) the profile's memory budget, else none
  (a real device's own memory is the limit: going over it gives `oom` all the same);
- timeout: `--job-timeout` per measurement child;
- a phone over adb (`--adb SERIAL`): measurements run on the phone (devices.adb); the cores
  are the phone's (the profile's affinity unless `--cpus`), no memory cap unless
  `--memory-limit`, and the fingerprint is the phone's, not this host's.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from devices.profiles import DeviceProfile, get_profile
from devices.protocol import Limits
from lfm2.sizes import parse_size
from devices.stack import agent_fingerprint, device_fingerprint, machine_facts
from devices.stack import usable_cpus as stack_usable_cpus
from lfm2.errors import UserError

API_VERSION = "v1"
DEFAULT_PORT = 7341
DEFAULT_MAX_UPLOAD = 8 << 30
DEFAULT_JOB_TIMEOUT_S = 1800.0
#: Jobs waiting at most: beyond it a submission gets 429 with Retry-After. A search keeps a
#: few jobs in flight per device; hundreds waiting are a client gone wrong (or an attack).
DEFAULT_MAX_QUEUE = 256
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def agent_version() -> str:
    try:
        return metadata.version("lfm2-nas")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def default_workdir(name: str) -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "lfm2-nas" / "agents" / name


def parse_cpus(text: str | None) -> tuple[int, ...] | None:
    """`0,1`, `0-3`, `0-3,6`: core ids, as `taskset -c` spells them."""
    if text is None or not text.strip():
        return None
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UserError(f"--cpus {text!r}: {part!r} is not a core id or range; write e.g. 0,1 or 0-3,6")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise UserError(f"--cpus {text!r}: the range {part!r} runs backwards")
        cpus.extend(range(low, high + 1))
    return tuple(dict.fromkeys(cpus))


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on (`devices.stack.usable_cpus`, as a tuple)."""
    return tuple(stack_usable_cpus())


@dataclass
class AgentConfig:
    name: str
    workdir: Path
    profile: DeviceProfile
    emulate: bool = False
    limits: Limits = field(default_factory=Limits)
    max_upload: int = DEFAULT_MAX_UPLOAD
    cooldown_s: float = 0.0
    max_queue: int = DEFAULT_MAX_QUEUE
    notes: list[str] = field(default_factory=list)  # why a limit is what it is
    adb: AdbSettings | None = None  # measure on a phone over adb instead of this host

    def transport_facts(self) -> dict[str, Any]:
        """Which device and transport measure: stamped on every result."""
        if self.adb is None:
            return {"transport": "local"}
        return self.adb.phone().describe()

    def machine(self) -> dict[str, Any]:
        """This host, as `devices.stack` (and so every measurement) describes it."""
        return {**machine_facts(), "hostname": platform.node()}

    @property
    def fingerprint(self) -> str:
        """Identifies "where the numbers come from": the hardware and runtimes, the profile,
        whether it is emulated, and the limits (not the timeout). Any of these changing
        makes earlier results incomparable; `devices.stack.device_fingerprint` hashes it."""
        limits = {k: v for k, v in self.limits.to_dict().items() if k != "timeout_s"}
        if self.adb is not None:  # the phone measures, not this host
            phone = self.adb.phone()
            facts = {k: v for k, v in phone.facts.items() if k != "memory_available_bytes"}
            return device_fingerprint({"phone": facts, "runner": phone.runner.version, "profile": self.profile.name, "emulated": False, "limits": limits})
        return agent_fingerprint(machine_facts(), self.profile.name, self.emulate, self.limits.to_dict())

    def device_facts(self) -> dict[str, Any]:
        """Stamped on every Measurement this agent returns."""
        return {
            "name": self.name,
            "profile": self.profile.name,
            "emulated": self.emulate,
            "fingerprint": self.fingerprint,
            "agent_version": agent_version(),
            "limits": self.limits.to_dict(),
            **self.transport_facts(),
        }


@dataclass
class AdbSettings:
    """A phone measured over adb: its serial, the runner build pushed to it, the thermal rule."""

    serial: str
    runner_dir: Path
    thermal_target_c: float
    thermal_timeout_s: float
    _phone: Any = field(default=None, repr=False)

    def phone(self):
        """The phone, checked (there, authorised, the runner's ABI) and described; opened once."""
        if self._phone is None:
            from devices.adb.measure import Phone
            from devices.adb.phone import CoolDown
            from devices.adb.runner_build import load_runner
            from devices.adb.transport import AdbTransport

            runner = load_runner(self.runner_dir)
            self._phone = Phone.open(AdbTransport(self.serial), runner, CoolDown(self.thermal_target_c, self.thermal_timeout_s))
        return self._phone


def build_config(
    name: str,
    workdir: str | Path | None = None,
    profile: str = "local",
    cpus: str | tuple[int, ...] | None = None,
    threads: int | None = None,
    memory_limit: str | int | None = None,
    emulate: bool = False,
    max_upload: str | int = DEFAULT_MAX_UPLOAD,
    cooldown_s: float = 0.0,
    job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
    profiles_files: tuple[str | Path, ...] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    adb_serial: str | None = None,
    adb_runner: str | Path | None = None,
    thermal_target_c: float | None = None,
    thermal_timeout_s: float | None = None,
) -> AgentConfig:
    if not AGENT_NAME.match(name or ""):
        raise UserError(f"agent name {name!r} must be letters, digits, '.', '_' or '-' (at most 64), e.g. pixel8-lab")
    device_profile = get_profile(profile, profiles_files)
    if emulate and device_profile.name == "local":
        raise UserError("--emulate needs a --profile to emulate (e.g. --profile pixel8); `local` is this machine already")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if cooldown_s < 0:
        raise UserError(f"--cooldown must be >= 0 seconds, got {cooldown_s}")
    if not job_timeout_s > 0 or job_timeout_s == float("inf"):
        raise UserError(f"--job-timeout must be a finite number of seconds > 0, got {job_timeout_s}")
    if not 1 <= max_queue <= 100_000:
        raise UserError(f"--max-queue must be in 1-100000 jobs, got {max_queue}")
    notes: list[str] = []
    if adb_serial is not None:
        return _adb_config(name, workdir, device_profile, cpus, threads, memory_limit, emulate, max_upload, cooldown_s, job_timeout_s, max_queue, adb_serial, adb_runner, thermal_target_c, thermal_timeout_s)
    if adb_runner is not None:
        raise UserError("--adb-runner goes with --adb SERIAL (the phone to measure on)")
    available = usable_cpus()
    chosen_cpus = parse_cpus(cpus) if isinstance(cpus, str) or cpus is None else tuple(cpus)
    if chosen_cpus is not None:
        missing = sorted(set(chosen_cpus) - set(available))
        if missing:
            raise UserError(f"--cpus names core(s) {missing} that this process cannot use; usable here: {list(available)}")
    run_threads = threads or device_profile.threads
    if chosen_cpus is None:
        if emulate:
            chosen_cpus = available[: max(1, min(run_threads, len(available)))]
            notes.append(f"emulating {device_profile.name}: pinned to the first {len(chosen_cpus)} usable core(s) of this host")
        elif device_profile.affinity is not None and set(device_profile.affinity) <= set(available):
            chosen_cpus = device_profile.affinity
        elif device_profile.affinity is not None:
            notes.append(f"profile {device_profile.name} recommends cores {list(device_profile.affinity)}, which this host lacks: not pinned")
    if emulate and run_threads > len(available):
        notes.append(f"{device_profile.name} runs {run_threads} threads; this host has {len(available)} usable cores: threads share cores")
    if memory_limit is not None:
        memory_bytes: int | None = parse_size(memory_limit, "--memory-limit", require_unit=isinstance(memory_limit, str))  # a flag: 500 is not 500 bytes
        if memory_bytes == 0:
            raise UserError("--memory-limit must be larger than 0; leave it out for no cap")
    elif emulate:
        memory_bytes = device_profile.memory_budget_bytes
        notes.append(f"emulating {device_profile.name}: memory capped at its budget of {memory_bytes} bytes")
    else:
        memory_bytes = None
    workdir = Path(workdir).expanduser() if workdir else default_workdir(name)
    return AgentConfig(
        name=name,
        workdir=workdir.resolve(),
        profile=device_profile,
        emulate=emulate,
        limits=Limits(cpus=chosen_cpus, threads=run_threads, memory_bytes=memory_bytes, timeout_s=float(job_timeout_s)),
        max_upload=parse_size(max_upload, "--max-upload", require_unit=isinstance(max_upload, str)),
        cooldown_s=float(cooldown_s),
        max_queue=int(max_queue),
        notes=notes,
    )


def _adb_config(name, workdir, profile, cpus, threads, memory_limit, emulate, max_upload, cooldown_s, job_timeout_s, max_queue, serial, runner, target_c, timeout_s) -> AgentConfig:
    """`build_config` for a phone over adb: its cores are the phone's, not this host's."""
    from devices.adb.phone import DEFAULT_COOLDOWN_TIMEOUT_S, DEFAULT_TARGET_C

    if emulate:
        raise UserError("--adb measures on the phone itself; --emulate is for emulating a profile on this host: use one or the other")
    if runner is None:
        raise UserError("--adb needs --adb-runner DIR: a build of lfm2-runner for the phone's ABI (lfm2-nas agent build-runner --android-ndk NDK ...; see the README)")
    chosen_cpus = parse_cpus(cpus) if isinstance(cpus, str) or cpus is None else tuple(cpus)
    notes = []
    if chosen_cpus is None and profile.affinity is not None:
        chosen_cpus = profile.affinity
        notes.append(f"pinned to {profile.name}'s cores {list(chosen_cpus)} on the phone (taskset)")
    memory_bytes = parse_size(memory_limit, "--memory-limit") if memory_limit is not None else None
    target = DEFAULT_TARGET_C if target_c is None else float(target_c)
    wait = DEFAULT_COOLDOWN_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if wait < 0:
        raise UserError(f"--thermal-timeout must be >= 0 seconds, got {wait}")
    workdir = Path(workdir).expanduser() if workdir else default_workdir(name)
    return AgentConfig(
        name=name,
        workdir=workdir.resolve(),
        profile=profile,
        # the `local` profile describes this host, not the phone: then every phone core, one thread each
        limits=Limits(cpus=chosen_cpus, threads=threads or (profile.threads if profile.name != "local" else None), memory_bytes=memory_bytes, timeout_s=float(job_timeout_s)),
        max_upload=parse_size(max_upload, "--max-upload"),
        cooldown_s=float(cooldown_s),
        max_queue=int(max_queue),
        notes=notes + [f"measuring on phone {serial} over adb; before each measurement the hottest CPU zone must cool to {target:g} C (waiting at most {wait:g} s)"],
        adb=AdbSettings(serial=serial, runner_dir=Path(runner).expanduser().resolve(), thermal_target_c=target, thermal_timeout_s=wait),
    )


__all__ = ["AgentConfig", "AdbSettings", "build_config", "parse_cpus", "usable_cpus", "agent_version", "default_workdir", "API_VERSION", "DEFAULT_PORT", "DEFAULT_MAX_UPLOAD", "DEFAULT_MAX_QUEUE"]
