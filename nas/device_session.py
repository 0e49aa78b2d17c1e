"""The device a search measures on: an agent registered by name, or one started here.

`--device local` needs nothing set up: an agent for this machine is started on a free
loopback port with a fresh token and stopped at the end. When the device is this very
machine, the cores are PARTITIONED: measurements own the upper half of the cores and
compiles/training are pinned to the lower half. Partitioning (rather than pausing
compiles during a measurement) keeps the device busy — the next artifact compiles while
the current one is measured — at the price of fewer cores for each side; a paused
pipeline would leave the device idle for a whole compile (30-80 s) after every
measurement (~10 s), which is the bigger loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from lfm2.errors import EnvironmentFailure, UserError


@dataclass
class DeviceSession:
    name: str
    url: str
    token: str
    local: bool  # an agent on this machine, started by the search
    emulated: bool
    profile: str
    worker_cpus: list[int] | None  # where compiles and quality training may run
    measure_cpus: list[int] | None
    stop: Callable[[], None] = field(default=lambda: None, repr=False)


def partition_cores() -> tuple[list[int], list[int]]:
    """(worker cores, measurement cores) for an agent on this machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise UserError(
            "measuring on this machine needs at least 2 cores (one for measurements, one for compiles); "
            "register a device agent running elsewhere instead (lfm2-nas devices add)"
        )
    half = len(cores) // 2
    return cores[:half], cores[half:]


def _not_registered_message(device: str, known_profiles: list[str]) -> str:
    emulate = (
        f"or run an emulated {device} on this machine (its thread count and memory cap; every result says emulated): add --emulate"
        if device in known_profiles
        else f"known profiles for --emulate: {', '.join(known_profiles)}"
    )
    return (
        f"no device agent named {device!r} is registered. Start an agent on (or beside) the device:\n"
        f"    lfm2-nas agent serve --name {device} --profile {device if device in known_profiles else 'PROFILE'} --host 0.0.0.0 --token-file agent.token\n"
        f"then register it here:\n"
        f"    lfm2-nas devices add {device} --url http://DEVICE-ADDRESS:7341 --token-file agent.token\n"
        f"{emulate}; or use --device local to measure on this machine."
    )


def open_device(device: str, emulate: bool, workdir: str | None = None, memory_limit_bytes: int | None = None) -> Callable[[], DeviceSession]:
    """Check that `device` can be measured on and return a function that starts the session.

    Everything that can be wrong with the flags is found here, before the study's storage
    is touched, so that a bad `--device` writes nothing."""
    from devices.profiles import load_profiles
    from devices.registry import get_device

    profiles = load_profiles()
    if device == "local" or emulate:
        if device != "local" and device not in profiles:
            raise UserError(f"--emulate needs a device profile; {device!r} is not one (known: {', '.join(sorted(profiles))})")
        worker_cpus, measure_cpus = partition_cores()
        profile = profiles["local" if device == "local" else device]

        def start_local() -> DeviceSession:
            from devices.agent.local import start_local_agent

            handle = start_local_agent(
                name=device,
                profile=profile.name,
                cpus=tuple(measure_cpus),
                threads=len(measure_cpus) if device == "local" else None,
                memory_limit=memory_limit_bytes,
                emulate=device != "local",
                workdir=workdir,
            )
            return DeviceSession(
                name=device, url=handle.url, token=handle.token, local=True, emulated=device != "local", profile=profile.name,
                worker_cpus=worker_cpus, measure_cpus=measure_cpus, stop=handle.stop,
            )

        return start_local
    registered = get_device(device)
    if registered is None:
        raise UserError(_not_registered_message(device, sorted(profiles)))
    from devices.registry import probe_device

    probe = probe_device(registered)
    if not probe["online"] or probe["status"] != "online":
        problem = {"offline": "is unreachable", "no token": "has no usable token file", "token refused": "refused our token"}.get(probe["status"], "answered with an error")
        # A missing or refused token is the user's configuration (exit 2); an agent that does
        # not answer is the network's or the device's (exit 4: the same command may work later).
        failure = UserError if probe["status"] in ("no token", "token refused") else EnvironmentFailure
        raise failure(
            f"device {device!r} {problem} at {registered.url}"
            f"{': ' + probe['error'] if probe.get('error') else ''}; start its agent (lfm2-nas agent serve) "
            "or check it with `lfm2-nas devices list`"
        )

    def connect() -> DeviceSession:
        return DeviceSession(
            name=device, url=registered.url, token=registered.token(), local=False, emulated=False,
            profile=getattr(registered, "profile", device), worker_cpus=None, measure_cpus=None,
        )

    return connect


def describe(session: DeviceSession, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": session.name,
        "url": session.url,
        "local": session.local,
        "emulated": bool(info.get("emulated", session.emulated)),
        "profile": info.get("profile", session.profile),
        "measure_cpus": session.measure_cpus,
        "worker_cpus": session.worker_cpus,
        "info": info,
    }


__all__ = ["DeviceSession", "open_device", "partition_cores", "describe"]
