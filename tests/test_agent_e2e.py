"""Slow agent scenarios with real measurements: an agent SIGKILLed in the middle of a
measurement and started again (nothing lost, nothing measured twice into the results, the
client's wait rides out the outage), and an emulated pixel8 that says so in its results."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from testkit.agent import PROTOCOL, TINY_SPEC, check_one_at_a_time_in_order, list_devices

from devices.agent import AgentClient, start_local_agent
from devices.agent.service import measurement_children
from devices.compile import compile
from devices.profiles import get_profile
from devices.registry import add_device


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return {"tiny": compile(TINY_SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path_factory.mktemp("compiled"))}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_an_agent_killed_mid_measurement_loses_nothing(artifacts, tmp_path, monkeypatch):
    """SIGKILL the agent while it measures: the client's wait rides out the outage, the
    restarted agent kills the orphaned measurement, re-queues the job (recorded), keeps the
    earlier result, and every job is done exactly once."""
    workdir, port, config = tmp_path / "agent", _free_port(), tmp_path / "devices.toml"
    monkeypatch.setenv("LFM2_NAS_CONFIG", str(config))
    handle = start_local_agent(name="phoenix", workdir=workdir, port=port, threads=1, job_timeout_s=300)
    token, restarted = handle.token, None
    try:
        add_device("phoenix", handle.url, workdir / "token")
        assert list_devices(monkeypatch, config)["phoenix"]["status"] == "online"
        client = AgentClient(handle.url, token, retry_for_s=5)
        sha = client.upload(artifacts["tiny"])
        before = client.wait(client.submit(sha, PROTOCOL, "done-before"), timeout=300)
        assert before.status == "ok"
        client.submit(sha, PROTOCOL, "interrupted")
        client.submit(sha, PROTOCOL, "queued-behind")
        deadline = time.monotonic() + 120
        while not (client.job("interrupted")["state"] == "running" and measurement_children(workdir)):
            assert time.monotonic() < deadline, "the job never started measuring"
            time.sleep(0.1)

        collected, failures = {}, []

        def wait_for(job_id: str) -> None:
            try:
                with AgentClient(handle.url, token, retry_for_s=5) as waiter:
                    collected[job_id] = waiter.wait(job_id, timeout=400)
            except Exception as exc:
                failures.append(repr(exc))

        waiters = [threading.Thread(target=wait_for, args=(job_id,)) for job_id in ("interrupted", "queued-behind")]
        for thread in waiters:
            thread.start()
        os.kill(handle.pid, signal.SIGKILL)
        handle.process.wait()
        assert list_devices(monkeypatch, config)["phoenix"]["status"] == "offline"
        orphans = measurement_children(workdir)
        time.sleep(2)  # the agent is away for a while: the waiters keep trying

        restarted = start_local_agent(name="phoenix", workdir=workdir, port=port, token=token, threads=1, job_timeout_s=300)
        assert not any(process.is_running() and process.status() != "zombie" for process in orphans)
        for thread in waiters:
            thread.join(450)
        assert failures == [] and collected["interrupted"].status == "ok" and collected["queued-behind"].status == "ok"

        jobs = {job["job_id"]: job for job in client.jobs()}
        interrupted = jobs["interrupted"]
        assert interrupted["attempts"] == 2 and "requeued" in [e["event"] for e in interrupted["events"]]
        assert jobs["done-before"]["attempts"] == 1 and client.wait("done-before", timeout=5).to_dict() == before.to_dict()
        check_one_at_a_time_in_order([jobs["interrupted"], jobs["queued-behind"]])
        assert list_devices(monkeypatch, config)["phoenix"]["status"] == "online"
        print(f"\nagent restart: jobs 3, SIGKILLs 1 (mid-measurement), orphans killed {len(orphans)}, re-queued 1, losses 0, duplicate results 0")
    finally:
        handle.stop()
        if restarted is not None:
            restarted.stop()


@pytest.mark.slow
def test_an_emulated_pixel8_says_so_in_every_result(artifacts, tmp_path):
    pixel8 = get_profile("pixel8")
    with start_local_agent(name="pixel8-emu", profile="pixel8", emulate=True, workdir=tmp_path / "emu", job_timeout_s=300) as handle:
        with handle.client() as client:
            info = client.info()
            assert info["emulated"] is True and info["profile"]["name"] == "pixel8"
            assert info["limits"]["threads"] == pixel8.threads and info["limits"]["memory_bytes"] == pixel8.memory_budget_bytes
            measurement = client.measure(artifacts["tiny"], PROTOCOL, timeout=300)
    assert measurement.status == "ok", measurement.error
    assert measurement.device["emulated"] is True and measurement.device["profile"] == "pixel8" and measurement.device["name"] == "pixel8-emu"
    assert measurement.memory["cap_bytes"] == pixel8.memory_budget_bytes


@pytest.mark.slow
def test_a_local_agent_stops_when_the_process_that_started_it_is_killed(tmp_path):
    """A search SIGKILLed without calling stop() must not leave its agent holding the cores."""
    import subprocess
    import sys

    import psutil

    script = "import sys, time\nfrom devices.agent import start_local_agent\nprint(start_local_agent(name='orphan', workdir=sys.argv[1]).pid, flush=True)\ntime.sleep(600)"
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "w")], stdout=subprocess.PIPE, text=True)
    agent_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(agent_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while True:
        try:
            if psutil.Process(agent_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        assert time.monotonic() < deadline, "the agent outlived the process that started it"
        time.sleep(0.2)
    assert "has exited; stopping" in (tmp_path / "w" / "agent.log").read_text()
