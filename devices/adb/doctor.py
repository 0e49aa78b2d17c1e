"""`lfm2-nas agent doctor --adb SERIAL`: check a phone end to end, one line per check, and
say what to do about the first thing that fails."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

from devices.adb.measure import Phone
from devices.adb.phone import hottest_cpu_c, thermal_zones
from devices.adb.runner_build import PROGRAM, load_runner
from devices.adb.transport import AdbTransport
from devices.agent.config import parse_cpus
from devices.profiles import DeviceProfile
from devices.protocol import Limits, Protocol
from lfm2.errors import UserError

#: The doctor's model: conv and attention layers, small enough to compile and run in seconds.
TINY_LAYERS = ("conv", "attn", "conv", "attn")


def _tiny_artifact(cache_dir: Path):
    from devices.compile import compile
    from lfm2.spec import ArchSpec

    spec = ArchSpec(vocab_size=512, d_model=64, layers=TINY_LAYERS, n_heads=4, n_kv_heads=2, ffn_dim=128, conv_kernel=3)
    # checked against eager only where llama-cpp-python can run it here
    return compile(spec, "llamacpp", "q4_0", 64, (32,), cache_dir=cache_dir, verify=importlib.util.find_spec("llama_cpp") is not None)


def run_doctor(serial: str, runner_dir: str | Path, profile: DeviceProfile, *, cpus: str | None = None, threads: int | None = None, measure: bool = True, echo: Callable[[str], None] = print) -> bool:
    """Run the checks in order; stop at the first failure. Returns True when all passed."""
    state: dict = {}

    def check(title: str, step: Callable[[], str]) -> bool:
        try:
            detail = step()
        except (UserError, OSError) as exc:
            echo(f"FAIL  {title}: {exc}")
            return False
        echo(f"ok    {title}: {detail}")
        return True

    def transport() -> str:
        state["transport"] = AdbTransport(serial)
        return state["transport"].adb

    def connection() -> str:
        return f"state {state['transport'].state()}"

    def runner() -> str:
        state["runner"] = load_runner(runner_dir)
        return f"{state['runner'].path} ({state['runner'].abi}, version {state['runner'].version})"

    def phone() -> str:
        state["phone"] = Phone.open(state["transport"], state["runner"])
        facts = state["phone"].facts
        freqs = sorted({f for f in facts["core_max_freq_hz"].values() if f}, reverse=True)
        return (
            f"{facts['manufacturer']} {facts['model']}, SoC {facts['soc']}, Android {facts['android_release']} (SDK {facts['sdk']}), ABIs {','.join(facts['abis'])}, "
            f"{facts['cores']} cores (max {', '.join(f'{f / 1e9:.2f}' for f in freqs)} GHz), {facts['memory_bytes'] / 2**30:.1f} GiB"
        )

    def cores() -> str:
        chosen = parse_cpus(cpus) or profile.affinity
        present = sorted(int(c) for c in state["phone"].facts["core_max_freq_hz"])
        chosen = tuple(chosen) if chosen else tuple(present)
        missing = sorted(set(chosen) - set(present))
        if missing:
            raise UserError(f"cores {missing} do not exist on the phone (it has {present}); pass --cpus with cores from that list")
        state["limits"] = Limits(cpus=chosen, threads=threads or (profile.threads if profile.name != "local" else len(chosen)), timeout_s=600)
        return f"{list(chosen)}, {state['limits'].threads} threads"

    def space() -> str:
        from devices.adb.phone import free_bytes

        free = free_bytes(state["transport"], "/data/local/tmp")
        if free is None:
            return "unknown (df gave nothing readable); pushes will tell"
        if free < 256 << 20:
            raise UserError(f"only {free / 2**20:.0f} MiB free in /data/local/tmp: free space on the phone")
        return f"{free / 2**30:.1f} GiB free in /data/local/tmp"

    def thermal() -> str:
        zones = thermal_zones(state["transport"])
        if not zones:
            return "no readable thermal zone: measurements will not wait for cool-down (recorded as unreadable)"
        return f"{len(zones)} zones, hottest CPU zone {hottest_cpu_c(zones):.1f} C"

    def run_runner() -> str:
        folder = state["phone"].install_runner()
        mask = format(sum(1 << c for c in state["limits"].cpus), "x")
        out = state["transport"].shell(f"cd {folder} && LD_LIBRARY_PATH={folder} taskset {mask} ./{PROGRAM} --version", timeout_s=60).stdout
        return f"pushed to {folder}; runs pinned (taskset {mask}): {out.strip()[:200]}"

    def tiny_measurement() -> str:
        with tempfile.TemporaryDirectory(prefix="lfm2-doctor-") as tmp:
            artifact = _tiny_artifact(Path(tmp))
            protocol = Protocol(prompt_lengths=(32,), decode_depths=(32,), decode_tokens=4, min_runs=3, max_runs=10, max_seconds_per_point=2.0, max_remeasures=0)
            result = state["phone"].measure(artifact, protocol, state["limits"])
        if not result.ok:
            raise UserError(f"the measurement ended {result.status}: {result.error}")
        thermal_before = result.thermal.get("before", {})
        return (
            f"prefill 32: {result.prefill[32].median_ms:.2f} ms, decode @32: {result.decode[32].median_ms:.3f} ms/token, "
            f"footprint {result.memory['footprint_bytes'] / 2**20:.1f} MiB, load {result.load_time_s:.2f} s, hottest CPU zone {thermal_before.get('hottest_cpu_c')} C"
        )

    steps = [
        ("adb program", transport),
        (f"phone {serial}", connection),
        ("runner build", runner),
        ("phone facts and ABI", phone),
        (f"cores ({profile.name})", cores),
        ("storage", space),
        ("thermal zones", thermal),
        ("runner on the phone", run_runner),
    ]
    if measure:
        steps.append(("a tiny model measured on the phone", tiny_measurement))
    for title, step in steps:
        if not check(title, step):
            return False
    echo("the phone is ready: lfm2-nas agent serve --adb " + serial + f" --adb-runner {Path(runner_dir)} --profile {profile.name} ...")
    return True


__all__ = ["run_doctor"]
