"""Several devices in one search, as a user runs it: the installed CLI, two real agents
over loopback HTTP (this machine, and an emulated Pixel 8 with its thread count and
memory cap), real compiles and measurements, a SQLite study, the HTML report in Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from nas.storage import open_storage
from reports.devices import device_view
from reports.study_data import read_study

pytestmark = pytest.mark.slow

DEVICES = ["local", "pixel8"]
BUDGETS = {"local": 400 * 1000**2, "pixel8": 300 * 1000**2}
BASE = ["--device", "local,pixel8", "--emulate", "--budget", "local=400MB,pixel8=300MB", "--space", "small", "--context", "64",
        "--backend", "onnx", "--quant", "fp32", "--quality", "none", "--sampler", "random"]


def _exe(name: str) -> str:
    return shutil.which(name) or f"{sys.prefix}/bin/{name}"


def lfm2_nas(*args, cwd, env, timeout=1800):
    return subprocess.run([_exe("lfm2-nas"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, LFM2_NAS_CACHE=str(tmp_path / "cache"), LFM2_NAS_CONFIG=str(tmp_path / "devices.toml"))


def load(tmp_path, name):
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{tmp_path}/lfm2-nas.db"))


def own_front(study, device):
    """The device's Pareto set worked out here from the stored records: trials measured on
    it within its budget that no other such trial beats on both of its latencies."""
    points = {}
    for trial in study.trials:
        record = (trial.user_attrs.get("devices") or {}).get(device) or {}
        if record.get("status") == "ok":
            points[trial.number] = (record["prefill_ms"], record["decode_ms"])

    def beaten(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points.values())

    return sorted(n for n, p in points.items() if not beaten(p))


def test_a_search_on_two_devices_writes_a_front_per_device_and_the_report_shows_both(tmp_path, env):
    result = lfm2_nas("search", *BASE, "--in-flight", "2", "--trials", "3", "--study", "two", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "local 381.47 MiB, pixel8 286.10 MiB" in result.stdout.replace("\n", " ")  # the final table names each device's budget
    study = load(tmp_path, "two")
    assert study.metric_names == ["prefill_ms@local", "decode_ms@local", "prefill_ms@pixel8", "decode_ms@pixel8"]
    meta = study.user_attrs["lfm2_nas"]
    assert list(meta["devices"]) == DEVICES and meta["budgets_bytes"] == BUDGETS and "device" not in meta
    assert meta["devices"]["local"]["emulated"] is False and meta["devices"]["pixel8"]["emulated"] is True
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete, [(t.number, t.state, t.user_attrs.get("reason")) for t in study.trials]
    for trial in complete:
        records = trial.user_attrs["devices"]
        assert list(records) == DEVICES
        for position, device in enumerate(DEVICES):
            record = records[device]
            assert record["measurement"]["status"] == "ok" and record["footprint_bytes"] > 0
            # the objectives are this device's own medians, its constraint against its own budget
            assert trial.values[2 * position : 2 * position + 2] == [record["prefill_ms"], record["decode_ms"]]
            assert trial.constraints[f"memory_over_budget_bytes@{device}"] == record["footprint_bytes"] - BUDGETS[device]
            assert record["status"] == ("ok" if record["footprint_bytes"] <= BUDGETS[device] else "infeasible")
        # one compile, measured on both: the emulated device ran the same artifact
        assert records["pixel8"]["measurement"]["artifact_sha256"] == records["local"]["measurement"]["artifact_sha256"]
        assert records["pixel8"]["measurement"]["spec_key"] == trial.user_attrs["spec_key"]
        # ... each measured by its own agent, which says what it is
        assert [records[d]["measurement"]["device"].get("name") for d in DEVICES] == DEVICES
        assert [bool(records[d]["measurement"]["device"].get("emulated")) for d in DEVICES] == [False, True]

    # The report: a front per device, and the candidates on every device's front.
    data = read_study(study)
    fronts = {device: own_front(study, device) for device in DEVICES}
    for device in DEVICES:
        assert device_view(data, device).pareto_numbers == fronts[device]
    everywhere = sorted(set(fronts["local"]) & set(fronts["pixel8"]))
    out = tmp_path / "two.html"
    report = lfm2_nas("report", "--study", "two", "--out", str(out), cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    from playwright.sync_api import sync_playwright

    from testkit.reports import launch_chromium

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(out.as_uri())
            page.wait_for_function("document.querySelectorAll('.plot .main-svg').length >= document.querySelectorAll('.plot').length && document.querySelectorAll('.plot').length > 0")
            ids = page.eval_on_selector_all(".plot", "els => els.map(e => e.id)")
            assert ids == ["fig-local-decode-prefill", "fig-local-memory", "fig-pixel8-decode-prefill", "fig-pixel8-memory", "fig-hypervolume", "fig-outcomes"]
            for device in DEVICES:
                # each device's front figure draws its own trials, and its own Pareto table lists exactly its front
                assert device in page.eval_on_selector(f"#fig-{device}-decode-prefill .gtitle", "el => el.textContent")
                assert len(page.eval_on_selector_all(f"#fig-{device}-decode-prefill .scatterlayer .point", "els => els")) >= len(complete)
                rows = page.eval_on_selector_all(f"#pareto-table-{device} tbody tr", "rows => rows.map(r => Number(r.dataset.trial))")
                assert sorted(rows) == fronts[device], (device, rows)
            rows = page.eval_on_selector_all("#everywhere-table tbody tr", "rows => rows.map(r => Number(r.dataset.trial))")
            assert sorted(rows) == everywhere
            assert problems == []
        finally:
            browser.close()

    # study show and pick read the multi-device study
    show = lfm2_nas("study", "show", "--study", "two", cwd=tmp_path, env=env)
    assert show.returncode == 0 and "decode_ms@pixel8" in show.stdout, show.stderr
    pick = lfm2_nas("pick", "--study", "two", "--json", cwd=tmp_path, env=env)
    assert pick.returncode in (0, 1) and "Traceback" not in pick.stderr, pick.stderr


def _agent_of(driver: subprocess.Popen, name: str) -> psutil.Process | None:
    for proc in psutil.Process(driver.pid).children(recursive=True):
        try:
            command = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "devices.agent" in command and "--name" in command and command[command.index("--name") + 1] == name:
            return proc
    return None


def test_a_device_lost_mid_search_fails_only_its_own_measurements(tmp_path, env):
    # --measure-timeout: the client polls an agent that went away (it may be restarting)
    # until the measurement's timeout; 900 s by default, shorter here
    driver = subprocess.Popen([_exe("lfm2-nas"), "search", *BASE, "--in-flight", "1", "--trials", "3", "--study", "lost", "--measure-timeout", "240"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        before: list[int] = []
        while not before:
            assert driver.poll() is None and time.time() < deadline, "no trial completed on both devices in time"
            time.sleep(2)
            try:
                before = [t.number for t in load(tmp_path, "lost").trials if t.state == TrialState.COMPLETE]
            except Exception:  # the study is not created yet
                continue
        agent = _agent_of(driver, "pixel8")
        assert agent is not None, "the emulated pixel8 agent is not running"
        for proc in [agent, *agent.children(recursive=True)]:  # the phone is gone: its agent and its measurement
            proc.kill()
        out, err = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGTERM)
            driver.wait(60)
    assert driver.returncode == 0, out[-3000:] + err[-3000:]
    study = load(tmp_path, "lost")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 3, [(t.number, t.state) for t in study.trials]
    after = [t for t in finished if t.number not in before]
    assert after
    lost = [t for t in after if t.user_attrs["status"] == "lost"]
    assert lost, [(t.number, t.state, t.user_attrs.get("status"), t.user_attrs.get("reason")) for t in after]
    for trial in lost:
        records = trial.user_attrs["devices"]
        # the lost device is marked failed, with why; the other device's figures are kept
        assert trial.state == TrialState.FAIL and records["pixel8"]["status"] == "lost" and "pixel8" in trial.user_attrs["reason"]
        assert records["local"]["status"] in ("ok", "infeasible") and records["local"]["prefill_ms"] > 0 and records["local"]["measurement"]["status"] == "ok"
    # this machine's own front still counts the trials measured after the Pixel was lost
    data = read_study(study)
    local, pixel8 = device_view(data, "local"), device_view(data, "pixel8")
    assert {t.number for t in lost} <= {t.number for t in local.trials if t.measured}
    assert not {t.number for t in lost} & {t.number for t in pixel8.trials if t.measured}
    assert all(t.outcome == "failed" for t in pixel8.trials if t.number in {x.number for x in lost})
