"""`lfm2-nas agent serve` and `lfm2-nas devices add|list|remove`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from devices.agent.config import DEFAULT_JOB_TIMEOUT_S, DEFAULT_MAX_QUEUE, DEFAULT_PORT

agent_app = typer.Typer(help="Run a device agent: measures artifacts where the model will run.", no_args_is_help=True)
devices_app = typer.Typer(help="The device agents this machine knows (a user config file).", no_args_is_help=True)


@agent_app.callback()
def _agent_group() -> None:
    """Run a device agent: measures artifacts where the model will run."""


@agent_app.command("serve")
def serve_command(
    name: str = typer.Option(..., "--name", help="What the agent calls itself (and how you will register it), e.g. pixel8-lab."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Loopback unless you say otherwise (0.0.0.0: every interface)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port; 0 picks a free one."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Bearer token file; made (mode 0600) if absent. Default: WORKDIR/token."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Artifacts, jobs and results. Default: ~/.local/share/lfm2-nas/agents/NAME."),
    profile: str = typer.Option("local", "--profile", help="Device profile: local, pixel8, galaxy-s24, raspberry-pi-5, or one of yours."),
    profiles_file: Optional[Path] = typer.Option(None, "--profiles-file", help="A TOML file with more device profiles (see devices/profiles.toml)."),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="Cores the measurements run on, e.g. 0,1 or 4-7. Default: the profile's."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads. Default: the profile's recommendation."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Memory cap per measurement, e.g. 2GB, 1.5GiB, 800M; over it gives status oom."),
    emulate: bool = typer.Option(False, "--emulate", help="Emulate the profile here: its threads and memory budget as a cap; every result says emulated."),
    max_upload: str = typer.Option("8GiB", "--max-upload", help="Largest artifact bundle accepted."),
    cooldown: float = typer.Option(0.0, "--cooldown", help="Seconds to pause between jobs, so the next starts on cool cores."),
    job_timeout: float = typer.Option(DEFAULT_JOB_TIMEOUT_S, "--job-timeout", help="Wall-clock limit of one measurement, in seconds; over it gives status timeout."),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, "--max-queue", help="Jobs waiting at most; past it a submission gets 429 with Retry-After."),
    ready_file: Optional[Path] = typer.Option(None, "--ready-file", help="Write {url, port, pid} as JSON here once serving (for scripts)."),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate (PEM)."),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="The certificate's private key (PEM)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    exit_with_parent: bool = typer.Option(False, "--exit-with-parent", help="Stop when the process that started the agent exits (agents started by a search)."),
    adb: Optional[str] = typer.Option(None, "--adb", help="Measure on the Android phone with this serial (`adb devices`), over adb, instead of on this host."),
    adb_runner: Optional[Path] = typer.Option(None, "--adb-runner", help="With --adb: the lfm2-runner build for the phone's ABI (a folder; lfm2-nas agent build-runner)."),
    thermal_target: Optional[float] = typer.Option(None, "--thermal-target", help="With --adb: the hottest CPU zone must be at or under this (C) before a measurement; default 40."),
    thermal_timeout: Optional[float] = typer.Option(None, "--thermal-timeout", help="With --adb: wait at most this long (s) for the cool-down; then measure and record it hot. Default 300."),
) -> None:
    """Serve the device agent API (/v1/...) until stopped (Ctrl-C or SIGTERM)."""
    from devices.agent.auth import ensure_token
    from devices.agent.config import build_config
    from devices.agent.service import serve

    config = build_config(
        name,
        workdir=workdir,
        profile=profile,
        cpus=cpus,
        threads=threads,
        memory_limit=memory_limit,
        emulate=emulate,
        max_upload=max_upload,
        cooldown_s=cooldown,
        job_timeout_s=job_timeout,
        profiles_files=(profiles_file,) if profiles_file else (),
        max_queue=max_queue,
        adb_serial=adb,
        adb_runner=adb_runner,
        thermal_target_c=thermal_target,
        thermal_timeout_s=thermal_timeout,
    )
    if config.adb is not None:
        config.adb.phone().check_cores(config.limits.cpus)  # the phone must be there, authorised, of the runner's ABI and have the cores
    token_path = (token_file or config.workdir / "token").expanduser().resolve()
    token = ensure_token(token_path)
    serve(config, token, host=host, port=port, ready_file=ready_file, log_level=log_level, tls_cert=tls_cert, tls_key=tls_key, announce=typer.echo, token_file=token_path, exit_with_parent=exit_with_parent)


@agent_app.command("doctor")
def doctor_command(
    adb: str = typer.Option(..., "--adb", help="The phone's serial (`adb devices`)."),
    adb_runner: Path = typer.Option(..., "--adb-runner", help="The lfm2-runner build for the phone (lfm2-nas agent build-runner)."),
    profile: str = typer.Option("local", "--profile", help="The device profile whose cores and threads to check (e.g. pixel8)."),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="Cores to run on, e.g. 4-7. Default: the profile's affinity, else every core."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads. Default: the profile's."),
    skip_measure: bool = typer.Option(False, "--skip-measure", help="Check the connection, facts, space and runner only; do not measure a tiny model."),
) -> None:
    """Check a phone end to end: adb, authorisation, ABI, space, temperatures, the runner, and a
    short measurement of a tiny model (compiled here) on the profile's cores."""
    from devices.adb.doctor import run_doctor
    from devices.profiles import get_profile

    ok = run_doctor(adb, adb_runner, get_profile(profile), cpus=cpus, threads=threads, measure=not skip_measure, echo=typer.echo)
    raise typer.Exit(0 if ok else 1)


@agent_app.command("build-runner")
def build_runner_command(
    out: Optional[Path] = typer.Option(None, "--out", help="Build folder. Default: a cache folder named by the sources' hash."),
    android_ndk: Optional[Path] = typer.Option(None, "--android-ndk", help="The Android NDK's root (r26+): build for a phone instead of this machine."),
    llama_cpp_source: Optional[Path] = typer.Option(None, "--llama-cpp-source", help="llama.cpp's sources, built statically (needed for a phone build)."),
    abi: str = typer.Option("arm64-v8a", "--abi", help="With --android-ndk: the phone's ABI."),
    api_level: int = typer.Option(28, "--api-level", help="With --android-ndk: the lowest Android API level to run on."),
) -> None:
    """Build lfm2-runner (devices/adb/runner) and print its folder, for `agent serve --adb-runner`."""
    from devices.adb.runner_build import build_runner

    build = build_runner(out, android_ndk=android_ndk, llama_cpp_source=llama_cpp_source, abi=abi, api_level=api_level)
    typer.echo(f"built lfm2-runner {build.version} for {build.abi}: {build.path}")


@devices_app.command("add")
def add_command(
    name: str = typer.Argument(..., help="A name for the device, e.g. pixel8."),
    url: str = typer.Option(..., "--url", help="The agent's address, e.g. http://192.168.1.20:7341."),
    token_file: Path = typer.Option(..., "--token-file", help="A copy of the agent's token file."),
    replace: bool = typer.Option(False, "--replace", help="Replace a device of the same name."),
) -> None:
    """Register a running agent under NAME (kept in the user config file)."""
    from devices.registry import add_device, config_path, probe_device

    device = add_device(name, url, token_file, replace=replace)
    row = probe_device(device)
    typer.echo(f"registered {name} -> {device.url} in {config_path()}")
    if row["online"] and row.get("profile"):
        typer.echo(f"  online: profile {row['profile']}{' (emulated)' if row['emulated'] else ''}, agent {row.get('agent_name')!r}")
    else:
        typer.echo(f"  not reachable now ({row['status']}): {row['error']}")


@devices_app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per device."),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to wait for each agent."),
) -> None:
    """The registered devices, each probed: online or offline, busy, queue, profile, emulated."""
    from devices.registry import config_path, probe_all

    rows = probe_all(timeout_s=timeout)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo(f"no devices registered in {config_path()}; add one with `lfm2-nas devices add NAME --url URL --token-file F`")
        return
    table = Table(title=f"device agents ({config_path()})")
    for column in ("name", "url", "status", "busy", "queue", "profile", "emulated"):
        table.add_column(column)

    def show(value: object) -> str:
        return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

    for row in rows:
        table.add_row(row["name"], row["url"], row["status"], show(row["busy"]), show(row["queue_length"]), show(row["profile"]), show(row["emulated"]))
    console = Console()
    Console(width=max(console.width, 120)).print(table)


@devices_app.command("remove")
def remove_command(name: str = typer.Argument(..., help="The registered name.")) -> None:
    """Forget a registered device (the agent itself keeps running)."""
    from devices.registry import config_path, remove_device

    device = remove_device(name)
    typer.echo(f"removed {name} ({device.url}) from {config_path()}")


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
    app.add_typer(devices_app, name="devices")


__all__ = ["register", "agent_app", "devices_app"]
