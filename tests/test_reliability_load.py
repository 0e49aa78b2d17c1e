"""Scenario 7 of issue 11: load on one agent over loopback, for a bounded time.

Several drivers (threads, each with its own `AgentClient`) upload artifacts (the same one
at the same time, and multi-MiB ones of their own) and submit and wait for jobs, sending
some submissions twice as a retry after a lost answer would; one more driver keeps many
jobs in flight at once. Afterwards every job the drivers asked for exists exactly once on
the agent, ran exactly once, in queue order, one at a time, and each driver got the
result the agent stored; the agent's RSS (sampled with psutil) stays bounded.

The jobs are real agent jobs that `devices.measure` refuses at once (the protocol asks for
more context than the artifact holds): the queue, the job store, uploads and HTTP are
under load, not the cores. Real measurements under concurrency are in test_agent_service.py.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from testkit.agent import handmade_artifact
from testkit.reliability import RssSampler, check_exactly_once_in_order, jobs_in_queue_order

from devices.agent import AgentClient, start_local_agent
from devices.protocol import Protocol

QUICK = Protocol(prompt_lengths=(16,), decode_depths=(4096,), decode_tokens=1, warmup_runs=0, min_runs=1, max_runs=1)
MiB = 1 << 20
#: How much the agent's RSS may grow over its idle size under this load. Its uploads are
#: streamed to disk in 1 MiB chunks and its jobs live in SQLite, so the growth should not
#: scale with the number of jobs or the size of the artifacts (4 x 4 MiB here).
RSS_GROWTH_BOUND = 96 * MiB


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LFM2_NAS_LOCKS", str(tmp_path_factory.mktemp("locks")))
        handle = start_local_agent(name="loaded", workdir=tmp_path_factory.mktemp("agent"), threads=1, max_upload="64MiB", job_timeout_s=60)
    yield handle
    handle.stop()


def _run_load(agent, tmp_path, run: str, drivers: int, duration_s: float, jobs_per_driver: int, pipelined: int) -> dict:
    """Job ids start with `run`; the agent may hold other runs' jobs (at most 1000 in all are read back)."""
    shared = handmade_artifact(tmp_path / "shared", payload=b"shared weights" * 1000)
    own = [handmade_artifact(tmp_path / f"own{i}", payload=os.urandom(4 * MiB)) for i in range(drivers)]
    asked: dict[str, list[str]] = {}  # driver -> job ids, in the order it submitted them
    collected: dict[str, dict] = {}
    failures: list[str] = []
    resent = 0
    lock = threading.Lock()
    start = threading.Barrier(drivers + 1)
    end = time.monotonic() + duration_s

    def driver(index: int) -> None:
        nonlocal resent
        name = f"{run}-d{index}"
        asked[name] = []
        try:
            with AgentClient(agent.url, agent.token, name=name) as client:
                start.wait()
                shas = [client.upload(shared), client.upload(own[index])]  # the shared one by all drivers at once
                for n in range(jobs_per_driver):
                    if time.monotonic() > end:
                        break
                    job_id = f"{name}-{n}"
                    client.submit(shas[n % 2], QUICK, job_id)
                    asked[name].append(job_id)
                    if n % 3 == 0:  # the answer was "lost": the same submission again
                        client.submit(shas[n % 2], QUICK, job_id)
                        with lock:
                            resent += 1
                    collected[job_id] = client.wait(job_id, timeout=120).to_dict()
        except Exception as exc:
            failures.append(f"{name}: {exc!r}")

    def pipelining_driver() -> None:
        asked[f"{run}-many"] = []
        try:
            with AgentClient(agent.url, agent.token, name="many") as client:
                start.wait()
                sha = client.upload(shared)
                for n in range(pipelined):
                    asked[f"{run}-many"].append(client.submit(sha, QUICK, f"{run}-many-{n}"))
                for job_id in asked[f"{run}-many"]:
                    collected[job_id] = client.wait(job_id, timeout=120).to_dict()
        except Exception as exc:
            failures.append(f"many: {exc!r}")

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(drivers - 1)] + [threading.Thread(target=pipelining_driver)]
    with RssSampler(agent.pid) as rss:
        idle_rss = rss.process.memory_info().rss
        for thread in threads:
            thread.start()
        start.wait()
        began = time.monotonic()
        for thread in threads:
            thread.join(duration_s + 300)
        elapsed_s = time.monotonic() - began
    assert not any(thread.is_alive() for thread in threads), "a driver hung"
    assert failures == [], failures
    with agent.client() as client:
        jobs = [job for job in jobs_in_queue_order(client) if job["job_id"].startswith(f"{run}-")]
        info = client.info()
    return {"asked": asked, "collected": collected, "jobs": jobs, "resent": resent, "idle_rss": idle_rss, "peak_rss": rss.peak, "info": info, "elapsed_s": elapsed_s}


def _check(result: dict) -> None:
    asked, jobs = result["asked"], result["jobs"]
    every_id = [job_id for ids in asked.values() for job_id in ids]
    assert len(every_id) == len(set(every_id))
    on_agent = [job["job_id"] for job in jobs]
    assert sorted(on_agent) == sorted(every_id), "a job was lost or created twice"
    check_exactly_once_in_order(jobs)
    position = {job_id: i for i, job_id in enumerate(on_agent)}
    for ids in asked.values():  # each driver's jobs are queued in the order it sent them
        assert [position[job_id] for job_id in ids] == sorted(position[job_id] for job_id in ids)
    stored = {job["job_id"]: job["measurement"] for job in jobs}
    for job_id, measurement in result["collected"].items():
        assert measurement == stored[job_id], f"{job_id}: the driver got another result than the agent stored"
        assert measurement["status"] == "error" and "max_context" in measurement["error"]
    assert set(result["collected"]) == set(every_id)
    assert result["info"]["worker_alive"] and result["info"]["queue_length"] == 0
    growth = result["peak_rss"] - result["idle_rss"]
    assert growth < RSS_GROWTH_BOUND, f"the agent's RSS grew by {growth / MiB:.0f} MiB under load"


def _figures(figures, scenario: str, result: dict, drivers: int) -> None:
    figures(
        scenario,
        drivers=drivers,
        seconds=round(result["elapsed_s"], 1),
        jobs=len(result["jobs"]),
        resent_submissions=result["resent"],
        uploads=2 * (drivers - 1) + 1,
        agent_rss_mib=f"{result['idle_rss'] / MiB:.0f} idle, {result['peak_rss'] / MiB:.0f} peak",
        losses=0,
        duplicate_runs=0,
    )


def test_many_drivers_one_agent_every_job_once_in_order_memory_bounded(agent, tmp_path, figures):
    drivers, duration_s = 5, 12.0
    result = _run_load(agent, tmp_path, "short", drivers=drivers, duration_s=duration_s, jobs_per_driver=60, pipelined=40)
    _check(result)
    _figures(figures, "load (5 drivers, up to 12 s)", result, drivers)


@pytest.mark.slow
def test_a_longer_load_keeps_memory_bounded(agent, tmp_path, figures):
    drivers, duration_s = 8, 60.0
    result = _run_load(agent, tmp_path, "long", drivers=drivers, duration_s=duration_s, jobs_per_driver=100, pipelined=150)
    _check(result)
    _figures(figures, "load (8 drivers, up to 60 s)", result, drivers)
