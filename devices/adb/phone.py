"""What a phone is (getprop, sysfs, /proc/meminfo) and how warm it is (thermal zones), read
over a `Transport`.

Phones throttle: a measurement started on a hot phone runs at lower clocks and is slower for
reasons that have nothing to do with the model. `cool_down` reads the thermal zones and
waits (polling) until the hottest CPU zone is at or under a set temperature, with a timeout;
the temperatures before and after, and the wait, are recorded with every result. A phone
that does not cool down in time is measured anyway and the result says `hot`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from devices.adb.transport import Transport

#: Properties recorded with every result (the ABI list decides which runner build fits).
PROPS = {
    "model": "ro.product.model",
    "manufacturer": "ro.product.manufacturer",
    "device": "ro.product.device",
    "soc_model": "ro.soc.model",
    "soc_manufacturer": "ro.soc.manufacturer",
    "hardware": "ro.hardware",
    "board_platform": "ro.board.platform",
    "abi": "ro.product.cpu.abi",
    "abilist": "ro.product.cpu.abilist",
    "android_release": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "build_fingerprint": "ro.build.fingerprint",
}
#: Thermal zones whose type names one of these are the CPU's (others: battery, skin, modem...).
CPU_ZONE_MARKERS = ("cpu", "soc", "big", "little", "mid", "tsens", "cluster", "core")
#: The hottest CPU zone must be at or under this before a measurement (degrees C).
DEFAULT_TARGET_C = 40.0
DEFAULT_COOLDOWN_TIMEOUT_S = 300.0
POLL_S = 5.0

_FACTS_SCRIPT = (
    "echo ===props; " + "; ".join(f"echo {key}=$(getprop {prop})" for key, prop in PROPS.items()) + "; "
    "echo ===cpus; for c in /sys/devices/system/cpu/cpu[0-9]*; do echo ${c##*/} $(cat $c/cpufreq/cpuinfo_max_freq 2>/dev/null || echo ?); done; "
    "echo ===meminfo; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo; "
    "echo ===uname; uname -srm"
)
_THERMAL_SCRIPT = "for z in /sys/class/thermal/thermal_zone*; do [ -r $z/temp ] && echo ${z##*/} $(cat $z/type 2>/dev/null | tr ' ' _) $(cat $z/temp 2>/dev/null); done; true"


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("==="):
            current = sections.setdefault(line[3:], [])
        elif current is not None and line.strip():
            current.append(line)
    return sections


def device_facts(transport: Transport) -> dict[str, Any]:
    """The phone's model, SoC, ABIs, cores with their max frequencies, memory and kernel."""
    sections = _sections(transport.shell(_FACTS_SCRIPT).stdout)
    props = {}
    for line in sections.get("props", []):
        key, _, value = line.partition("=")
        props[key] = value.strip()
    cores = {}
    for line in sections.get("cpus", []):
        name, _, freq = line.partition(" ")
        if re.fullmatch(r"cpu\d+", name):
            cores[int(name[3:])] = int(freq) * 1000 if freq.strip().isdigit() else None
    memory = {}
    for line in sections.get("meminfo", []):
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            memory[match[1]] = int(match[2]) * 1024
    abis = [abi for abi in (props.get("abilist") or props.get("abi") or "").split(",") if abi]
    return {
        **{key: props.get(key) or None for key in PROPS if key not in ("abilist",)},
        "abis": abis,
        "soc": props.get("soc_model") or props.get("board_platform") or props.get("hardware") or None,
        "cores": len(cores),
        "core_max_freq_hz": {str(core): freq for core, freq in sorted(cores.items())},
        "memory_bytes": memory.get("MemTotal"),
        "memory_available_bytes": memory.get("MemAvailable"),
        "kernel": uname[0] if (uname := sections.get("uname")) else None,
    }


def thermal_zones(transport: Transport) -> dict[str, dict[str, Any]]:
    """{zone: {"type", "temp_c"}} of every readable thermal zone (millidegrees converted)."""
    zones = {}
    for line in transport.shell(_THERMAL_SCRIPT).stdout.splitlines():
        parts = line.split()
        if len(parts) != 3 or not re.fullmatch(r"-?\d+", parts[2]):
            continue
        raw = int(parts[2])
        zones[parts[0]] = {"type": parts[1], "temp_c": raw / 1000 if abs(raw) > 500 else float(raw)}  # a few kernels report degrees
    return zones


def hottest_cpu_c(zones: dict[str, dict[str, Any]]) -> float | None:
    """The hottest CPU zone; every zone when none is named like a CPU's."""
    cpu = [z["temp_c"] for z in zones.values() if any(marker in z["type"].lower() for marker in CPU_ZONE_MARKERS)]
    values = cpu or [z["temp_c"] for z in zones.values()]
    return max(values) if values else None


@dataclass
class CoolDown:
    target_c: float = DEFAULT_TARGET_C
    timeout_s: float = DEFAULT_COOLDOWN_TIMEOUT_S
    poll_s: float = POLL_S

    def wait(self, transport: Transport, sleep=time.sleep) -> dict[str, Any]:
        """Wait until the hottest CPU zone is at or under `target_c` (at most `timeout_s`);
        returns what to record: the zones at the start and the end, the wait, and `hot`."""
        start = time.monotonic()
        first = zones = thermal_zones(transport)
        hottest = hottest_cpu_c(zones)
        while hottest is not None and hottest > self.target_c and time.monotonic() - start < self.timeout_s:
            sleep(min(self.poll_s, max(0.0, self.timeout_s - (time.monotonic() - start))))
            zones = thermal_zones(transport)
            hottest = hottest_cpu_c(zones)
        return {
            "target_c": self.target_c,
            "hottest_cpu_c_start": hottest_cpu_c(first),
            "hottest_cpu_c": hottest,
            "waited_s": round(time.monotonic() - start, 3),
            "hot": hottest is not None and hottest > self.target_c,
            "zones": zones,
            "readable": bool(zones),
        }


def free_bytes(transport: Transport, path: str) -> int | None:
    """Free space of the filesystem holding `path` on the phone (`df -k`), None if unknown."""
    out = transport.shell(f"df -k {path} 2>/dev/null | tail -n 1", check=False).stdout
    parts = out.split()
    # Filesystem 1K-blocks Used Available Use% Mounted-on
    if len(parts) >= 4 and parts[3].isdigit():
        return int(parts[3]) * 1024
    return None


__all__ = ["device_facts", "thermal_zones", "hottest_cpu_c", "CoolDown", "free_bytes", "DEFAULT_TARGET_C", "DEFAULT_COOLDOWN_TIMEOUT_S"]
