"""Scenario 3 of issue 11: the network between a driver and its agent goes away for a
while and comes back; the job that was in flight is still collected, once.

Three faults on a real agent process: a TCP proxy in front of it is cut (connections
reset, then refused) and restored; the agent is paused with SIGSTOP (connections hang)
and resumed, with a submission sent again and again meanwhile; an upload is cut off
halfway. The jobs are real agent jobs that `devices.measure` refuses at once (the
protocol asks for more context than the artifact holds), so that they run in
milliseconds; the agent's cool-down between jobs keeps one queued while the network is
cut. test_agent_e2e.py and the slow search scenarios do the same with real measurements.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from testkit.agent import handmade_artifact
from testkit.reliability import CuttableProxy

from devices.agent import AgentClient, start_local_agent
from devices.agent.bundle import bundle_bytes
from devices.protocol import Protocol

#: a protocol that `measure` refuses at once for a 64-token artifact: a quick, real job
QUICK = Protocol(prompt_lengths=(16,), decode_depths=(4096,), decode_tokens=1, warmup_runs=0, min_runs=1, max_runs=1)
COOLDOWN_S = 5.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LFM2_NAS_LOCKS", str(tmp_path_factory.mktemp("locks")))
        handle = start_local_agent(name="flaky-net", workdir=tmp_path_factory.mktemp("agent"), threads=1, cooldown_s=COOLDOWN_S, job_timeout_s=60)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return handmade_artifact(tmp_path_factory.mktemp("artifact") / "a")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _collect_in_thread(url: str, token: str, job_id: str, results: dict, failures: list, **client_options) -> threading.Thread:
    def wait() -> None:
        try:
            with AgentClient(url, token, **client_options) as client:
                results[job_id] = client.wait(job_id, timeout=180)
        except Exception as exc:  # surfaced by the caller's assertion
            failures.append(repr(exc))

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_a_network_cut_does_not_lose_the_in_flight_job(agent, artifact, figures):
    """The driver reaches the agent through a proxy. A job is queued (behind the agent's
    cool-down) when the proxy is cut; it runs and finishes on the agent while the driver
    cannot reach it; the proxy comes back and the driver's wait returns that result."""
    proxy = CuttableProxy(_port(agent.url))
    results, failures = {}, []
    try:
        with AgentClient(proxy.url, agent.token, retry_for_s=2, timeout_s=10) as driver, agent.client() as direct:
            sha = driver.upload(artifact)
            driver.wait(driver.submit(sha, QUICK, "before-cut"), timeout=60)  # the cool-down starts now
            driver.submit(sha, QUICK, "in-flight")
            waiter = _collect_in_thread(proxy.url, agent.token, "in-flight", results, failures, retry_for_s=2, timeout_s=10)
            time.sleep(0.5)  # the waiter is in its long poll
            proxy.cut()
            cut_at = time.monotonic()
            assert direct.job("in-flight")["state"] != "done", "precondition: the job must still be in flight when the network is cut"
            finished = direct.wait("in-flight", timeout=120)  # it finishes while the driver is cut off
            time.sleep(2.0)  # and the driver goes on failing to reach the agent for a while
            assert waiter.is_alive() and not results, "the driver cannot have collected anything through a cut network"
            outage_s = time.monotonic() - cut_at
            proxy.restore()
            waiter.join(180)
            job = direct.job("in-flight")
    finally:
        proxy.close()
    assert failures == [] and results["in-flight"].to_dict() == finished.to_dict()
    assert job["attempts"] == 1 and [e["event"] for e in job["events"]].count("done") == 1
    figures("network cut (proxy)", jobs=2, faults_injected=1, outage_s=round(outage_s, 1), collected=1, losses=0, duplicate_runs=0)


def test_a_paused_agent_is_waited_out_and_a_resent_submission_is_one_job(agent, artifact, figures):
    """SIGSTOP the agent: connections hang instead of failing. A driver with a 1 s timeout
    submits meanwhile, times out and sends the same submission again and again; after
    SIGCONT the agent answers every copy with the one job, which runs once and is collected."""
    with agent.client() as direct:
        sha = direct.upload(artifact)
    results, failures, sent = {}, [], []

    def submit_and_wait() -> None:
        try:
            with AgentClient(agent.url, agent.token, timeout_s=1.0, retry_for_s=120) as driver:
                original = driver._http.request

                def counted(method, url, **kwargs):  # count the copies the retry loop sends
                    if method == "POST":
                        sent.append(time.monotonic())
                    return original(method, url, **kwargs)

                driver._http.request = counted
                results["paused"] = driver.wait(driver.submit(sha, QUICK, "paused"), timeout=180)
        except Exception as exc:
            failures.append(repr(exc))

    os.kill(agent.pid, signal.SIGSTOP)
    try:
        thread = threading.Thread(target=submit_and_wait, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while len(sent) < 3:  # the submission has been sent, timed out and sent again (at least twice)
            assert time.monotonic() < deadline and thread.is_alive(), failures
            time.sleep(0.1)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    thread.join(180)
    assert failures == [] and results["paused"].status == "error" and "max_context" in results["paused"].error
    with agent.client() as direct:
        copies = [job for job in direct.jobs(limit=1000) if job["job_id"] == "paused"]
        assert agent.running() and direct.info()["worker_alive"]
    assert len(copies) == 1 and copies[0]["attempts"] == 1 and [e["event"] for e in copies[0]["events"]].count("done") == 1
    figures("agent paused (SIGSTOP/SIGCONT)", jobs=1, faults_injected=1, submissions_sent=len(sent), jobs_created=len(copies), losses=0, duplicate_runs=0)


def test_an_upload_cut_off_halfway_leaves_nothing_and_the_next_one_works(agent, tmp_path, figures):
    """The connection drops after half of a declared body: the agent keeps no artifact and
    no temporary file, and the same upload, sent whole, is stored and verified."""
    artifact = handmade_artifact(tmp_path / "cut", payload=os.urandom(256 << 10))
    sha, data = bundle_bytes(artifact)
    with socket.create_connection(("127.0.0.1", _port(agent.url)), timeout=10) as raw:
        head = f"PUT /v1/artifacts/{sha} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {agent.token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
        raw.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.5)
    leftovers = lambda: list((agent.workdir / "tmp").iterdir())  # noqa: E731
    deadline = time.monotonic() + 30
    while leftovers():
        assert time.monotonic() < deadline, f"the cut upload left {leftovers()}"
        time.sleep(0.1)
    assert not (agent.workdir / "artifacts" / sha).exists()
    with agent.client() as client:
        assert not client.has_artifact(sha)
        assert client.upload(artifact) == sha and client.has_artifact(sha)
    assert (agent.workdir / "artifacts" / sha / "model.bin").read_bytes() == (artifact.path / "model.bin").read_bytes()
    figures("upload cut off halfway", faults_injected=1, half_written_artifacts=0, leftovers=0)
