"""Facts about the machine and the process a measurement runs in: CPU, cores, memory, OS,
runtime versions (`machine_facts`), the device fingerprint results are cached under,
thermal state (CPU frequency and temperature where the OS exposes them), and the
process's own memory (RSS, its high-water mark, PSS) read from /proc.

Everything here is cheap, reads only, and imports no runtime: the measurement child calls
it before and after loading a model.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

from devices.artifact import toolchain_versions
from devices.profiles import cpu_model

#: CPU features that change which kernels a runtime picks (x86 and Arm).
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp", "asimdhp")


def cpu_flags() -> list[str]:
    """The performance-relevant CPU features /proc/cpuinfo lists (empty where it has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                present = set(value.split())
                return [flag for flag in _CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def machine_facts() -> dict[str, Any]:
    """What this machine is: CPU model and features, cores, memory, OS, runtime versions."""
    import psutil
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "arch": platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cpus": usable_cpus(),
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.system(),
        "os_release": platform.release(),
        "libc": "-".join(platform.libc_ver()) or "unknown",
        "python": platform.python_version(),
        "runtimes": toolchain_versions(),
    }


#: The facts a fingerprint hashes: what makes two measurements comparable. Hostname, usable
#: cores and the kernel release are left out (they change without the numbers changing);
#: profile, emulation and limits are in when the caller's facts carry them.
FINGERPRINT_FIELDS = ("cpu_model", "cpu_flags", "arch", "logical_cores", "physical_cores", "memory_bytes", "os", "runtimes", "profile", "emulated", "limits", "threads", "cpus")


def device_fingerprint(facts: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of the comparable part of `facts` (see FINGERPRINT_FIELDS);
    the search keys cached measurements by it."""
    payload = {name: facts[name] for name in FINGERPRINT_FIELDS if name in facts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agent_fingerprint(machine: dict[str, Any], profile: str | None, emulated: bool | None, limits: dict[str, Any]) -> str:
    """The fingerprint of an agent that measures on its own host: the host's facts
    (`machine_facts`), the profile, emulation and the limits (not the timeout, which does not
    change the numbers). The agent computes it (`AgentConfig.fingerprint`) and the search
    recomputes it from the agent's `/v1/info` when an older agent sends none: one rule."""
    kept = {k: v for k, v in (limits or {}).items() if k != "timeout_s"}
    return device_fingerprint({**(machine or {}), "profile": profile, "emulated": emulated, "limits": kept})


# -- thermal --------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def thermal_snapshot(cpus: list[int] | None = None) -> dict[str, Any]:
    """CPU frequency (MHz) of the given cores and every temperature sensor the OS exposes.

    `source` says where the numbers come from; a VM usually exposes no cpufreq and no
    thermal zones, and /proc/cpuinfo's MHz there is the nominal clock, not a live one."""
    import psutil
    snapshot: dict[str, Any] = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    cpus = cpus if cpus is not None else usable_cpus()
    freqs = {}
    for cpu in cpus:
        khz = _read_int(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq")
        if khz is not None:
            freqs[str(cpu)] = round(khz / 1000.0, 1)
    if freqs:
        snapshot["cpu_freq_mhz"] = freqs
        snapshot["cpu_freq_source"] = "/sys/devices/system/cpu/*/cpufreq/scaling_cur_freq"
    else:
        try:
            per_cpu = psutil.cpu_freq(percpu=True) or []
        except (OSError, NotImplementedError):
            per_cpu = []
        if per_cpu:
            snapshot["cpu_freq_mhz"] = {str(cpu): round(per_cpu[cpu].current, 1) for cpu in cpus if cpu < len(per_cpu)}
            snapshot["cpu_freq_source"] = "psutil.cpu_freq (on Linux without cpufreq: /proc/cpuinfo, often the nominal clock)"
        else:
            snapshot["cpu_freq_mhz"] = None
            snapshot["cpu_freq_source"] = "unavailable"
    temperatures = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        milli = _read_int(f"{zone}/temp")
        if milli is not None:
            try:
                kind = Path(f"{zone}/type").read_text().strip()
            except OSError:
                kind = Path(zone).name
            temperatures[f"{Path(zone).name}:{kind}"] = milli / 1000.0
    if not temperatures and hasattr(psutil, "sensors_temperatures"):
        try:
            for chip, readings in (psutil.sensors_temperatures() or {}).items():
                for i, reading in enumerate(readings):
                    temperatures[f"{chip}:{reading.label or i}"] = reading.current
        except (OSError, NotImplementedError):
            pass
    snapshot["temperatures_c"] = temperatures or None
    snapshot["temperature_source"] = "/sys/class/thermal or psutil" if temperatures else "unavailable"
    return snapshot


# -- the process's memory -------------------------------------------------------------------


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM, ...); None where /proc lacks it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int:
    import psutil
    kib = status_kib("VmRSS")
    return kib * 1024 if kib is not None else psutil.Process().memory_info().rss


def peak_rss_bytes() -> tuple[int, str]:
    """The high-water mark of this process's RSS and where it comes from: VmHWM (which
    `reset_peak_rss` can reset), else ru_maxrss (the whole process lifetime)."""
    kib = status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (maxrss if sys.platform == "darwin" else maxrss * 1024), "ru_maxrss"


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _smaps_rollup_bytes(field: str) -> int | None:
    """A field of /proc/self/smaps_rollup (kB there), in bytes; None where /proc lacks it."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pss_bytes() -> int | None:
    """Proportional set size (shared pages split among their users), where /proc gives it."""
    return _smaps_rollup_bytes("Pss")


#: prctl(2) options: a per-process switch that keeps the kernel from giving it transparent huge
#: pages (even where memory was madvise(MADV_HUGEPAGE)d), and its reading.
_PR_SET_THP_DISABLE, _PR_GET_THP_DISABLE = 41, 42


def allow_huge_pages(allowed: bool) -> bool:
    """Let the kernel give this process transparent huge pages for memory it faults in from now
    on, or not (prctl PR_SET_THP_DISABLE; pages already faulted stay as they are). True if the
    switch took (Linux >= 3.15); False where there is no such switch."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    if libc.prctl(_PR_SET_THP_DISABLE, 0 if allowed else 1, 0, 0, 0) != 0:
        return False
    return bool(libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0)) == (not allowed)


def anon_huge_pages_bytes() -> int | None:
    """Anonymous memory this process holds in transparent huge pages (0 where the kernel gave
    none: THP off, or nothing asked for them), where /proc gives it."""
    return _smaps_rollup_bytes("AnonHugePages")


__all__ = [
    "allow_huge_pages",
    "anon_huge_pages_bytes",
    "machine_facts",
    "device_fingerprint",
    "FINGERPRINT_FIELDS",
    "cpu_flags",
    "usable_cpus",
    "thermal_snapshot",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "pss_bytes",
]
