"""Device profiles: the built-in `profiles.toml` plus the files users add.

A profile says what a kind of device is (cores, memory, the memory one app may use)
and how to measure on it (threads, core affinity). `get_profile("pixel8")` gives one;
`load_profiles()` all of them. User files come from `$LFM2_NAS_PROFILES` (paths joined
with ':') and from the `extra_files` argument, later files overriding earlier ones.
"""

from __future__ import annotations

import os
import platform
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lfm2.sizes import parse_size
from lfm2.errors import UserError

BUILTIN_FILE = Path(__file__).with_name("profiles.toml")
ENV_VAR = "LFM2_NAS_PROFILES"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = ("description", "soc", "os", "arch", "big_cores", "little_cores", "ram", "memory_budget", "threads", "affinity")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    soc: str
    os: str
    arch: str
    big_cores: int
    little_cores: int
    ram_bytes: int
    memory_budget_bytes: int
    threads: int
    affinity: tuple[int, ...] | None  # the device's own core ids; None: no pinning
    source: str = ""  # the file it came from

    @property
    def cores(self) -> int:
        return self.big_cores + self.little_cores

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["affinity"] = list(self.affinity) if self.affinity is not None else None
        data["cores"] = self.cores
        return data


def cpu_model() -> str:
    """The CPU's marketing name where the OS says it (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _local_facts() -> dict[str, Any]:
    """What "auto" means in the `local` profile: this machine, as this process sees it,
    read from the one description of a host (`devices.stack.machine_facts`)."""
    from devices.stack import machine_facts  # imports this module: here, not at the top

    facts = machine_facts()
    usable = len(facts["usable_cpus"])
    physical = facts["physical_cores"] or usable
    return {
        "soc": facts["cpu_model"],
        "os": facts["os"].lower(),
        "arch": facts["arch"],
        "big_cores": usable,
        "ram": facts["memory_bytes"],
        "memory_budget": facts["memory_bytes"] // 2,
        "threads": max(1, min(usable, physical)),
        "affinity": None,
    }


def _profile_from_table(name: str, table: dict[str, Any], source: str) -> DeviceProfile:
    unknown = sorted(set(table) - set(_FIELDS) - {"extends"})
    if unknown:
        raise UserError(f"profile {name!r} in {source} has unknown field(s) {unknown}; known: {list(_FIELDS)} and 'extends'")
    missing = [f for f in _FIELDS if f not in table]
    if missing:
        raise UserError(f"profile {name!r} in {source} lacks {missing}; give them, or `extends = \"<profile>\"` to start from another profile")
    if any(value == "auto" for value in table.values()):
        local = _local_facts()
        table = {key: (local[key] if value == "auto" and key in local else value) for key, value in table.items()}

    def count(field: str, minimum: int) -> int:
        value = table[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"profile {name!r} in {source}: {field} must be an integer >= {minimum}, got {value!r}")
        return value

    affinity = table["affinity"]
    if affinity is not None:
        if not isinstance(affinity, list) or not affinity or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in affinity):
            raise UserError(f"profile {name!r} in {source}: affinity must be a list of core ids (integers >= 0) or \"auto\", got {affinity!r}")
        affinity = tuple(affinity)
    profile = DeviceProfile(
        name=name,
        description=str(table["description"]),
        soc=str(table["soc"]),
        os=str(table["os"]),
        arch=str(table["arch"]),
        big_cores=count("big_cores", 1),
        little_cores=count("little_cores", 0),
        ram_bytes=parse_size(table["ram"], f"profile {name!r} ram"),
        memory_budget_bytes=parse_size(table["memory_budget"], f"profile {name!r} memory_budget"),
        threads=count("threads", 1),
        affinity=affinity,
        source=source,
    )
    if profile.memory_budget_bytes > profile.ram_bytes:
        raise UserError(f"profile {name!r} in {source}: memory_budget ({table['memory_budget']}) is larger than ram ({table['ram']})")
    return profile


def _read_tables(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"profiles file {path} does not exist; check ${ENV_VAR} or --profiles-file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"profiles file {path} is not valid TOML: {exc}") from None
    tables = data.get("profiles")
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise UserError(f"profiles file {path} must hold [profiles.NAME] tables (see {BUILTIN_FILE})")
    for name in tables:
        if not _NAME.match(name):
            raise UserError(f"profile name {name!r} in {path} must be letters, digits, '.', '_' or '-' (at most 64)")
    return tables


def profile_files(extra_files: tuple[str | Path, ...] | list[str | Path] = ()) -> list[Path]:
    files = [BUILTIN_FILE]
    files += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    files += [Path(p).expanduser() for p in extra_files]
    return files


def load_profiles(extra_files: tuple[str | Path, ...] | list[str | Path] = ()) -> dict[str, DeviceProfile]:
    """Every profile, built-in first, then `$LFM2_NAS_PROFILES`, then `extra_files`."""
    raw: dict[str, tuple[dict[str, Any], str]] = {}
    for path in profile_files(extra_files):
        for name, table in _read_tables(path).items():
            if "extends" in table:
                base = table["extends"]
                if base not in raw:
                    raise UserError(f"profile {name!r} in {path} extends {base!r}, which is not defined before it; known: {sorted(raw)}")
                table = {**raw[base][0], **{k: v for k, v in table.items() if k != "extends"}}
            raw[name] = (table, str(path))
    return {name: _profile_from_table(name, table, source) for name, (table, source) in raw.items()}


def get_profile(name: str, extra_files: tuple[str | Path, ...] | list[str | Path] = ()) -> DeviceProfile:
    profiles = load_profiles(extra_files)
    if name not in profiles:
        raise UserError(
            f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}. "
            f"Add your own in a TOML file (see {BUILTIN_FILE}) and name it in ${ENV_VAR} or --profiles-file"
        )
    return profiles[name]


__all__ = ["DeviceProfile", "load_profiles", "get_profile", "profile_files", "BUILTIN_FILE"]
