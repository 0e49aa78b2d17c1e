"""Scenario 5 of issue 11: the agent's disk fills up. A clear error, and no half-written
artifact is ever used later.

The agent's workdir is a 5 MiB tmpfs in a private user+mount namespace (no root needed;
the `small_disk_agent` fixture, tests/conftest.py).
test_agent_service.py covers an upload refused up front (declared too large) and one that
fills the disk while it is written. Here: an upload that fits but whose unpacking does
not; the job store on a full disk; what a driver's `AgentClient` reports; and that the
agent takes uploads and jobs again once there is room. Quick (no measurement runs), so
it is in the default suite wherever user namespaces allow the mount.
"""

from __future__ import annotations

import os

import pytest
from testkit.agent import handmade_artifact, http
from testkit.reliability import can_mount_tmpfs

from devices.agent import AgentClient, AgentRejected
from devices.agent.bundle import bundle_bytes
from devices.protocol import Protocol

QUICK = Protocol(prompt_lengths=(16,), decode_depths=(4096,), decode_tokens=1, warmup_runs=0, min_runs=1, max_runs=1)
MiB = 1 << 20


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare/nsenter and a mountable tmpfs (user namespaces) to make a small disk")
def test_a_full_disk_never_leaves_a_half_written_artifact_and_the_agent_recovers(small_disk_agent, tmp_path, figures):
    url, token, store, inside = small_disk_agent
    listing = lambda sub: inside("ls", "-A", str(store / sub)).stdout.split()  # noqa: E731
    faults = 0

    # 1. The upload fits (1.2 MiB with ~2 MiB free) but its unpacked copy does not: sent
    #    without a length, so that the agent cannot refuse it up front. It is refused as
    #    soon as what it sent cannot fit twice (issue 20: room is reserved before every
    #    write), or else when the unpacking fills the disk.
    fits_once = handmade_artifact(tmp_path / "fits-once", payload=os.urandom(1200 << 10))
    sha, data = bundle_bytes(fits_once)
    inside("fallocate", "-l", str(3 * MiB), str(store / "filler"))  # room for one copy, not two

    def chunks():
        for start in range(0, len(data), 256 << 10):
            yield data[start : start + (256 << 10)]

    with http(url, token) as client:
        response = client.put(f"/v1/artifacts/{sha}", content=chunks())
        faults += 1
        detail = response.json()["detail"]
        assert response.status_code == 507 and ("needs about" in detail or "while unpacking" in detail) and "free space in its --workdir" in detail, response.text
        assert listing("tmp") == [] and listing("artifacts") == [], "a half-written artifact was left behind"
        assert client.head(f"/v1/artifacts/{sha}").status_code == 404
        # 2. No job can use what was never stored.
        refused = client.post("/v1/jobs", json={"artifact_sha256": sha, "protocol": QUICK.to_dict(), "job_id": "uses-half-written"})
        assert refused.status_code == 404 and "upload it first" in refused.json()["detail"]

    # 3. A driver's client says what happened and what to do (no retry loop, no traceback).
    with AgentClient(url, token, retry_for_s=5) as driver:
        with pytest.raises(AgentRejected, match="507.*(disk|free)") as rejected:
            driver.measure(fits_once, QUICK, job_id="through-the-client", timeout=60)
        faults += 1
        assert rejected.value.status == 507
        assert not driver.has_artifact(sha)

        # 4. The job store on a full disk: a clear 507, and no job half-recorded.
        small = handmade_artifact(tmp_path / "small", payload=b"w" * 1000)
        small_sha = driver.upload(small)
        inside("sh", "-c", f"cat /dev/zero > {store / 'filler2'} 2>/dev/null; true")  # every byte of the disk
        with http(url, token) as client:
            full = client.post("/v1/jobs", json={"artifact_sha256": small_sha, "protocol": QUICK.to_dict(), "job_id": "disk-full-job"})
            faults += 1
            # SQLite may still find room in pages it holds already; if not, a clear 507 and no job
            assert full.status_code in (201, 507), full.text
            job_store_full = full.status_code == 507
            if job_store_full:
                assert "free space in its --workdir" in full.json()["detail"]
                assert client.get("/v1/jobs/disk-full-job").status_code == 404, "a refused job was half-recorded"

        # 5. Room again: the same uploads and jobs go through, and the refused job id is free.
        inside("rm", "-f", str(store / "filler"), str(store / "filler2"))
        assert driver.upload(fits_once) == sha and driver.has_artifact(sha)
        done = driver.measure(small, QUICK, job_id="disk-full-job", timeout=120)
        assert done.status == "error" and "max_context" in done.error  # a real job, done once
        jobs = [job for job in driver.jobs(limit=1000) if job["job_id"] == "disk-full-job"]
        assert len(jobs) == 1 and jobs[0]["attempts"] == 1
        assert driver.health()["status"] == "ok" and driver.info()["worker_alive"]
    assert sorted(listing("artifacts")) == sorted([sha, small_sha]) and listing("tmp") == []
    figures("disk full", faults_injected=faults, job_store_full_507=int(job_store_full), half_written_artifacts=0, jobs_on_missing_artifacts=0, recovered=1)
