"""Measuring on a phone over adb, with no phone: the product's `AdbTransport` runs the adb stand-in
of tests/testkit/adb.py (first on PATH), and the phone's runner is the x86 build of the
same lfm2-runner the phone gets (built here with cmake against the llama-cpp-python wheel's
llama.cpp, cached by source hash). Transport, parsing, thermal logic, error handling, the
agent over a real socket and a search with `--device pixel8` run for real.

Tests that run the runner skip without the llama.cpp extra (`pip install -e ".[llamacpp]"`);
the transport's errors, the phone's facts and the thermal wait do not need it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from testkit.adb import SERIAL, StandinPhone

from devices.adb.measure import Phone
from devices.adb.phone import CoolDown, device_facts, hottest_cpu_c, thermal_zones
from devices.adb.runner_build import RunnerBuildError, load_runner
from devices.adb.transport import AdbError, AdbTransport, DeviceUnavailable, classify
from devices.protocol import Limits, Protocol
from lfm2.errors import UserError
from lfm2.spec import ArchSpec

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason='llama-cpp-python is not installed (pip install -e ".[llamacpp]")')
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="building lfm2-runner needs cmake and a C++ compiler")

TINY = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=128, conv_kernel=4)
PROTOCOL = Protocol(prompt_lengths=(16, 32), decode_depths=(32,), decode_tokens=4, min_runs=3, max_runs=12, max_seconds_per_point=1.0, max_remeasures=0)
PIXEL8_CORES_MASK = "1e0"  # cores 8, 7, 6, 5: the pixel8 profile's affinity


@pytest.fixture
def phone(tmp_path, monkeypatch):
    standin = StandinPhone(tmp_path / "phone")
    for key, value in standin.env().items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("ADB", raising=False)
    return standin


@pytest.fixture(scope="module")
def runner_build(tmp_path_factory):
    if not HAS_LLAMA_CPP or shutil.which("cmake") is None:
        pytest.skip("needs llama-cpp-python and cmake")
    from devices.adb.runner_build import build_runner

    # The cache for this module's tests only: a variable left set would move later tests' caches.
    with pytest.MonkeyPatch.context() as patch:
        if "LFM2_NAS_CACHE" not in os.environ:
            patch.setenv("LFM2_NAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield build_runner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    if not HAS_LLAMA_CPP:
        pytest.skip("needs llama-cpp-python")
    from devices.compile import compile

    return compile(TINY, "llamacpp", "q4_0", 64, (32,), cache_dir=tmp_path_factory.mktemp("artifacts"))


# -- the transport's errors (adb's own messages) ----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kind", "advice"),
    [("no-device", "no_device", "adb devices"), ("unauthorized", "unauthorized", "Allow USB debugging"), ("offline", "offline", "replug")],
)
def test_an_unreachable_phone_is_a_clear_device_unavailable_error(phone, mode, kind, advice):
    phone.set_mode(mode)
    transport = AdbTransport(SERIAL)
    with pytest.raises(DeviceUnavailable) as raised:
        transport.state()
    assert raised.value.kind == kind and advice in str(raised.value) and SERIAL in str(raised.value)
    with pytest.raises(DeviceUnavailable):
        transport.shell("echo hi")


def test_a_wrong_serial_and_a_missing_adb_program_name_the_fix(phone, monkeypatch):
    with pytest.raises(DeviceUnavailable, match="no phone with serial NOPE"):
        AdbTransport("NOPE").state()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AdbError, match="apt-get install adb") as raised:
        AdbTransport(SERIAL)
    assert raised.value.kind == "adb_missing"


def test_a_full_phone_refuses_a_push_with_no_space(phone, tmp_path):
    phone.set_mode("full-disk")
    (tmp_path / "model.gguf").write_bytes(b"x" * 1000)
    with pytest.raises(AdbError) as raised:
        AdbTransport(SERIAL).push(tmp_path / "model.gguf", "/data/local/tmp/model.gguf")
    assert raised.value.kind == "no_space" and not isinstance(raised.value, DeviceUnavailable) and "free space" in str(raised.value)


def test_messages_of_the_real_adb_are_classified():
    """What adb 1.0.41 (Debian's 29.0.6) printed on this machine, and what it prints for the rest."""
    cases = {
        "error: device 'NOPE' not found": "no_device",
        "adb: error: failed to get feature set: device 'NOPE' not found": "no_device",
        "error: no devices/emulators found": "no_device",
        "error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set": "unauthorized",
        "error: device offline": "offline",
        "adb: error: failed to copy 'a' to 'b': remote couldn't create file: No space left on device": "no_space",
        "error: protocol fault (couldn't read status): Connection reset by peer": "disconnected",
        "error: closed": "disconnected",
    }
    for message, kind in cases.items():
        assert classify("S", message, "test").kind == kind, message
    assert classify("S", "cat: /sys/x: No such file or directory", "test") is None


# -- the phone's facts and its temperature -----------------------------------------------------


def test_facts_come_from_getprop_sysfs_and_meminfo(phone):
    facts = device_facts(AdbTransport(SERIAL))
    assert facts["model"] == "Pixel 8" and facts["soc"] == "Tensor G3" and facts["abis"] == ["x86_64"] and facts["sdk"] == "34"
    assert facts["cores"] == 9 and facts["core_max_freq_hz"]["8"] == 2_914_000_000 and facts["core_max_freq_hz"]["0"] == 1_704_000_000
    assert facts["memory_bytes"] == 7849664 * 1024


def test_cool_down_waits_for_the_hottest_cpu_zone_and_records_it(phone):
    transport = AdbTransport(SERIAL)
    phone.set_temps({"BIG": 47.5, "LITTLE": 36.0, "battery": 60.0})  # a hot battery is not a CPU zone
    assert hottest_cpu_c(thermal_zones(transport)) == 47.5
    cooler = threading.Timer(0.6, phone.set_temps, args=({"BIG": 38.0, "LITTLE": 36.0, "battery": 60.0},))
    cooler.start()
    record = CoolDown(target_c=40.0, timeout_s=30, poll_s=0.2).wait(transport)
    cooler.join()
    assert not record["hot"] and record["hottest_cpu_c_start"] == 47.5 and record["hottest_cpu_c"] == 38.0 and record["waited_s"] >= 0.5
    assert record["zones"]["thermal_zone0"] == {"type": "BIG", "temp_c": 38.0}

    phone.set_temps({"BIG": 55.0})  # never cools: measured anyway after the timeout, recorded hot
    record = CoolDown(target_c=40.0, timeout_s=0.5, poll_s=0.1).wait(transport)
    assert record["hot"] and record["hottest_cpu_c"] == 55.0 and record["waited_s"] >= 0.5


def test_a_runner_of_another_abi_is_refused_with_the_build_command(phone, tmp_path):
    folder = tmp_path / "arm-runner"
    folder.mkdir()
    (folder / "lfm2-runner").write_bytes(b"\x7fELF")
    (folder / "runner.json").write_text(json.dumps({"abi": "arm64-v8a", "version": "x"}))
    with pytest.raises(AdbError, match="built for arm64-v8a, phone STANDIN8 runs x86_64") as raised:
        Phone.open(AdbTransport(SERIAL), load_runner(folder))
    assert raised.value.kind == "wrong_abi" and "build-runner --android-ndk" in str(raised.value)
    with pytest.raises(RunnerBuildError, match="build-runner"):
        load_runner(tmp_path)


# -- measuring on the phone --------------------------------------------------------------------


@needs_llama_cpp
@needs_cmake
def test_a_measurement_on_the_phone_is_pinned_pushed_once_and_says_where_it_ran(phone, runner_build, artifact):
    target = Phone.open(AdbTransport(SERIAL), runner_build)
    limits = Limits(cpus=(8, 7, 6, 5), threads=4, timeout_s=300)
    first = target.measure(artifact, PROTOCOL, limits)
    assert first.ok, first.error
    assert set(first.prefill) == {16, 32} and set(first.decode) == {32}
    for stats in (*first.prefill.values(), *first.decode.values()):
        assert stats.median_ms > 0 and len(stats.samples_ms) >= 3 and stats.ci_low_ms <= stats.median_ms <= stats.ci_high_ms
        assert stats.calibration_slowdown is not None  # the phone's own calibration kernel ran around the point
    assert first.memory["footprint_bytes"] > 0 and first.memory["peak_rss_bytes"] > first.memory["baseline_rss_bytes"]
    assert first.device["transport"] == "adb" and first.device["serial"] == SERIAL and first.device["phone"]["model"] == "Pixel 8"
    assert first.stack["affinity"] == [8, 7, 6, 5] and first.stack["threads"] == 4 and first.stack["runner"]["abi"] == "x86_64"
    assert first.thermal["before"]["hottest_cpu_c"] == 35.0 and not first.thermal["before"]["hot"] and first.thermal["after"]["zones"]
    assert phone.taskset_masks() == [PIXEL8_CORES_MASK]
    pushed = {p: p.stat().st_mtime_ns for p in phone.files()}
    assert any(p.name.endswith(".gguf") for p in pushed) and any(p.name == "lfm2-runner" for p in pushed)
    assert not any(p.name.endswith(".partial") for p in pushed)

    second = target.measure(artifact, PROTOCOL, limits)  # content-addressed: nothing pushed again
    assert second.ok and {p: p.stat().st_mtime_ns for p in phone.files()} == pushed


@needs_llama_cpp
@needs_cmake
def test_a_full_phone_ends_as_an_error_that_says_so_and_leaves_nothing_half_pushed(phone, runner_build, artifact):
    target = Phone.open(AdbTransport(SERIAL), runner_build)
    phone.set_free_bytes(10 << 20)
    result = target.measure(artifact, PROTOCOL, Limits(cpus=(8,), threads=1, timeout_s=120))
    assert result.status == "error" and "no_space" in result.error and "MiB free" in result.error and result.device["transport"] == "adb"
    assert not phone.files()


@needs_llama_cpp
@needs_cmake
def test_over_the_memory_cap_is_oom_and_past_the_time_limit_is_timeout(phone, runner_build, artifact):
    target = Phone.open(AdbTransport(SERIAL), runner_build)
    over = target.measure(artifact, PROTOCOL, Limits(cpus=(8,), threads=1, memory_bytes=1 << 20, timeout_s=120))
    assert over.status == "oom" and "over the 1 MiB cap" in over.error and over.memory["footprint_bytes"] > 1 << 20
    # a limit shorter than the job on any machine: the stand-in's adb calls and the runner's
    # start alone take longer than 0.5 s, and 60 runs a point follow (a 4 s limit was met by a
    # quiet machine, which finished the job in time)
    slow = Protocol(prompt_lengths=(32,), decode_depths=(32,), decode_tokens=4, min_runs=60, max_runs=60, max_seconds_per_point=60, ci_target=0.0)
    late = target.measure(artifact, slow, Limits(cpus=(8,), threads=1, timeout_s=0.5))
    # the limit ends the job at a check between commands or inside a read that was given what was left of it
    assert late.status == "timeout" and late.device["transport"] == "adb"
    assert "0.5 s wall-clock limit" in late.error or ("gave no answer within" in late.error and "the runner was stopped" in late.error), late.error
    assert late.wall_time_s < 30  # the runner was stopped, not waited for


@needs_llama_cpp
@needs_cmake
def test_a_cable_pulled_mid_run_raises_device_unavailable(phone, runner_build, artifact):
    target = Phone.open(AdbTransport(SERIAL), runner_build)
    phone.unplug_after_lines(3)  # the runner answers three commands, then the phone is gone
    with pytest.raises(DeviceUnavailable, match="went away while the runner was") as raised:
        target.measure(artifact, PROTOCOL, Limits(cpus=(8,), threads=1, timeout_s=120))
    assert raised.value.kind == "disconnected"


@needs_llama_cpp
@needs_cmake
def test_requests_the_phone_cannot_serve_are_refused_with_the_reason(phone, runner_build, artifact):
    target = Phone.open(AdbTransport(SERIAL), runner_build)
    with pytest.raises(UserError, match=r"cores \[9\] do not exist on phone STANDIN8"):
        target.measure(artifact, PROTOCOL, Limits(cpus=(9,), threads=1))
    with pytest.raises(UserError, match="compile with max_context >= 160"):
        target.measure(artifact, Protocol(prompt_lengths=(160,), decode_depths=(8,)), Limits(cpus=(8,), threads=1))


# -- the agent, over a real socket -------------------------------------------------------------


def _serve(tmp_path: Path, env: dict[str, str], runner: Path, name: str = "pixel8", extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, str, Path]:
    workdir = tmp_path / f"agent-{name}"
    ready = workdir / "ready.json"
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "devices.agent", "serve", "--name", name, "--port", "0", "--workdir", str(workdir), "--ready-file", str(ready),
               "--profile", "pixel8", "--adb", SERIAL, "--adb-runner", str(runner), "--exit-with-parent", *extra]  # fmt: skip
    log = open(workdir / "agent.log", "ab")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError((workdir / "agent.log").read_text()[-3000:])
        time.sleep(0.05)
    url = json.loads(ready.read_text())["url"]
    return process, url, (workdir / "token").read_text().strip(), workdir


def _agent_env(phone: StandinPhone) -> dict[str, str]:
    project = str(Path(__file__).resolve().parents[1])
    return phone.env({**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p)})


def test_agent_serve_refuses_to_start_without_a_usable_phone(phone, tmp_path):
    folder = tmp_path / "runner"
    folder.mkdir()
    (folder / "lfm2-runner").write_bytes(b"\x7fELF")
    (folder / "runner.json").write_text(json.dumps({"abi": "x86_64", "version": "x"}))
    env = _agent_env(phone)
    for mode, expected in (("unauthorized", "has not authorised this computer"), ("no-device", "no phone with serial"), ("offline", "offline to adb")):
        phone.set_mode(mode)
        done = subprocess.run([sys.executable, "-m", "devices.agent", "serve", "--name", "p", "--port", "0", "--workdir", str(tmp_path / "w"), "--adb", SERIAL, "--adb-runner", str(folder)],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode != 0 and expected in done.stderr + done.stdout and "Traceback" not in done.stderr, done.stderr[-2000:]
    phone.set_mode("ok")
    done = subprocess.run([sys.executable, "-m", "devices.agent", "serve", "--name", "p", "--port", "0", "--workdir", str(tmp_path / "w"), "--adb", SERIAL, "--adb-runner", str(folder),
                           "--cpus", "4-11"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "cores [9, 10, 11] do not exist on phone STANDIN8" in done.stderr, done.stderr[-2000:]


@needs_llama_cpp
@needs_cmake
def test_the_agent_measures_on_the_phone_and_a_disconnect_mid_run_is_re_run_not_lost(phone, tmp_path, runner_build, artifact):
    from devices.agent import AgentClient

    process, url, token, _ = _serve(tmp_path, _agent_env(phone), runner_build.path)
    try:
        with AgentClient(url, token, name="pixel8") as client:
            info = client.info()
            assert info["transport"]["transport"] == "adb" and info["transport"]["serial"] == SERIAL and info["transport"]["phone"]["model"] == "Pixel 8"
            measurement = client.measure(artifact, PROTOCOL, job_id="first", timeout=300)
            assert measurement.ok, measurement.error
            assert measurement.device["name"] == "pixel8" and measurement.device["transport"] == "adb" and measurement.device["serial"] == SERIAL
            assert measurement.device["profile"] == "pixel8" and measurement.device["emulated"] is False

            phone.unplug_after_lines(2)  # the cable is pulled during the next job ...
            client.submit(client.upload(artifact), PROTOCOL, job_id="unplugged")
            deadline = time.monotonic() + 120
            while not any(e["event"] == "requeued" for e in client.job("unplugged")["events"]):
                assert time.monotonic() < deadline, client.job("unplugged")
                time.sleep(0.2)
            phone.set_mode("ok")  # ... and plugged back in: the job runs again
            rerun = client.wait("unplugged", timeout=300)
            assert rerun.ok, rerun.error
            events = client.job("unplugged")["events"]
            requeued = [e for e in events if e["event"] == "requeued"]
            assert requeued and "went away" in requeued[0]["reason"] and [e["event"] for e in events].count("started") >= 2
    finally:
        process.terminate()
        process.wait(30)


@needs_llama_cpp
@needs_cmake
def test_a_phone_that_stays_away_ends_the_job_lost_with_the_reason(phone, tmp_path, runner_build, artifact):
    from devices.agent import AgentClient

    process, url, token, _ = _serve(tmp_path, _agent_env(phone), runner_build.path)
    try:
        with AgentClient(url, token, name="pixel8") as client:
            sha = client.upload(artifact)
            phone.set_mode("unauthorized")  # e.g. the phone was reset and forgot this computer
            client.submit(sha, PROTOCOL, job_id="away")
            result = client.wait("away", timeout=120)
            assert result.status == "lost" and "has not authorised this computer" in result.error and "tried 5 times" in result.error
            assert result.device["transport"] == "adb" and result.device["serial"] == SERIAL
            assert [e["event"] for e in client.job("away")["events"]].count("requeued") == 4
    finally:
        process.terminate()
        process.wait(30)


@needs_llama_cpp
@needs_cmake
@pytest.mark.slow
def test_agent_doctor_checks_the_phone_end_to_end(phone, runner_build):
    env = _agent_env(phone)
    done = subprocess.run([sys.executable, "-c", "from nas.cli import main; main()", "agent", "doctor", "--adb", SERIAL, "--adb-runner", str(runner_build.path), "--profile", "pixel8"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "Pixel 8" in done.stdout and "taskset 1e0" in done.stdout and "a tiny model measured on the phone: prefill 32" in done.stdout
    phone.set_mode("unauthorized")
    done = subprocess.run([sys.executable, "-c", "from nas.cli import main; main()", "agent", "doctor", "--adb", SERIAL, "--adb-runner", str(runner_build.path), "--skip-measure"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "FAIL  phone STANDIN8" in done.stdout and "Allow USB debugging" in done.stdout


# -- a search on the phone ---------------------------------------------------------------------


@needs_llama_cpp
@needs_cmake
@pytest.mark.slow
def test_search_with_device_pixel8_measures_every_trial_on_the_phone_over_adb(phone, tmp_path, runner_build):
    """`lfm2-nas search --device pixel8` against a registered adb agent (the stand-in phone):
    Ray, GGUF compiles checked against eager, the agent over a real socket, a SQLite study."""
    import optuna

    from nas.storage import open_storage

    env = {**_agent_env(phone), "LFM2_NAS_CACHE": str(tmp_path / "cache"), "LFM2_NAS_CONFIG": str(tmp_path / "devices.toml")}
    process, url, _, workdir = _serve(tmp_path, env, runner_build.path)
    try:
        cli = [sys.executable, "-c", "from nas.cli import main; main()"]
        added = subprocess.run([*cli, "devices", "add", "pixel8", "--url", url, "--token-file", str(workdir / "token")], env=env, capture_output=True, text=True, timeout=120)
        assert added.returncode == 0 and "online: profile pixel8" in added.stdout, added.stdout + added.stderr
        args = ["search", "--device", "pixel8", "--budget", "1GB", "--space", "small", "--context", "64", "--backend", "llamacpp", "--quant", "q4_0",
                "--quality", "none", "--sampler", "random", "--seed", "5", "--in-flight", "2", "--trials", "6", "--study", "phone"]  # fmt: skip
        result = subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # the phone's runner has no anchored measurement: the search says so and measures medians
        assert "no anchor: pixel8 measure(s) over adb" in result.stdout, result.stdout[-3000:]
    finally:
        process.terminate()
        process.wait(30)
    study = optuna.load_study(study_name="phone", storage=open_storage(f"sqlite:///{tmp_path}/lfm2-nas.db"))
    assert "anchor" not in study.user_attrs["lfm2_nas"] and "anchor_reference" not in study.user_attrs
    measured = [t for t in study.trials if "measurement" in t.user_attrs and t.user_attrs["measurement"].get("status") == "ok"]
    assert measured, [(t.number, t.state, (t.user_attrs.get("reason") or "")[:200]) for t in study.trials]
    for trial in measured:
        device = trial.user_attrs["measurement"]["device"]
        assert device["name"] == "pixel8" and device["transport"] == "adb" and device["serial"] == SERIAL and device["phone"]["model"] == "Pixel 8"
        assert trial.user_attrs["measurement"]["stack"]["affinity"] == [8, 7, 6, 5]
    assert set(phone.taskset_masks()) == {PIXEL8_CORES_MASK}
