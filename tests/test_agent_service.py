"""One real agent process (uvicorn on a loopback port) under test: auth on every route,
upload limits, hashes, hostile bundles, idempotent jobs, the client, concurrent clients
measuring real compiled artifacts (one over the memory cap), a full disk, and finally
`devices list` once the agent is stopped. The slow scenarios are in test_agent_e2e.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from testkit.agent import PROTOCOL, TINY_SPEC, artifact_members, check_one_at_a_time_in_order, handmade_artifact, http, link, list_devices, regular, sha256, tar_bytes

from devices.agent import AgentAuthError, AgentClient, AgentUnreachable, start_local_agent
from devices.agent.bundle import bundle_bytes
from devices.agent.client import AgentRejected, bundle_sha256
from devices.compile import compile
from devices.registry import add_device
from lfm2.spec import ArchSpec

MAX_UPLOAD = 64 << 10
#: A tiny candidate peaks near 270 MiB (most of it torch); the big one needs GBs to load.
MEMORY_CAP = "700MiB"
OTHER_TINY = TINY_SPEC.replace(layers=("attn", "conv", "conv"))
BIG_SPEC = ArchSpec(vocab_size=65536, d_model=2048, layers=("conv",) * 12 + ("attn",) * 4, n_heads=16, n_kv_heads=8, ffn_dim=8192)
FITTING = {"prompt_lengths": [16], "decode_depths": [8], "decode_tokens": 4, "min_runs": 1, "max_runs": 1, "warmup_runs": 0}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("agent")
    handle = start_local_agent(name="svc", workdir=workdir, max_upload=MAX_UPLOAD, threads=1, memory_limit=MEMORY_CAP, job_timeout_s=300)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return handmade_artifact(tmp_path_factory.mktemp("artifact") / "a")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Real compiled artifacts (eager: a few bytes each, the weights come from the seed)."""
    cache = tmp_path_factory.mktemp("compiled")
    return {
        "tiny": compile(TINY_SPEC, "eager", "fp32", 64, (16,), cache_dir=cache, verify=False),  # checking eager against eager: nothing to learn
        "tiny2": compile(OTHER_TINY, "eager", "fp32", 64, (16,), cache_dir=cache, verify=False),
        "big": compile(BIG_SPEC, "eager", "fp32", 64, (16,), cache_dir=cache, verify=False),  # ~1.2B parameters
    }


def _stored(agent) -> set[str]:
    return {p.name for p in (agent.workdir / "artifacts").iterdir()}


def _leftovers(agent) -> list[str]:
    return [p.name for p in (agent.workdir / "tmp").iterdir()]


def test_health_is_open_and_the_schema_is_versioned(agent):
    with http(agent.url, None) as anonymous:
        health = anonymous.get("/v1/health")
    assert health.status_code == 200 and health.json()["name"] == "svc" and health.json()["api_version"] == "v1"
    with http(agent.url, agent.token) as client:
        schema = client.get("/v1/openapi.json").json()
    assert {"/v1/info", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/artifacts/{sha256}"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_every_route_but_health_needs_the_token(agent):
    with http(agent.url, agent.token) as client:
        schema = client.get("/v1/openapi.json").json()
    routes = [(method.upper(), path.replace("{sha256}", "0" * 64).replace("{job_id}", "j")) for path, ops in schema["paths"].items() for method in ops]
    routes += [("GET", "/v1/openapi.json"), ("GET", "/v1/docs"), ("GET", "/v1/no-such-route"), ("POST", "/v1/jobs")]
    checked = 0
    for token in (None, "wrong-token", agent.token + "x", "Basic " + agent.token):
        headers = {} if token is None else {"Authorization": token if token.startswith("Basic") else f"Bearer {token}"}
        with httpx.Client(base_url=agent.url, headers=headers, timeout=10) as client:
            for method, path in routes:
                if path == "/v1/health":
                    continue
                response = client.request(method, path, content=b'{"artifact_sha256": 1' if method in ("POST", "PUT") else None)
                assert response.status_code == 401, (token, method, path, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"
                checked += 1
    assert checked >= 30


def test_upload_is_verified_stored_once_and_reported(agent, tmp_path):
    # an artifact of its own: the module's is uploaded by whichever test runs first
    artifact = handmade_artifact(tmp_path / "a", payload=b"weights only this test uploads" * 10)
    sha, data = bundle_bytes(artifact)
    with http(agent.url, agent.token) as client:
        assert client.head(f"/v1/artifacts/{sha}").status_code == 404
        first = client.put(f"/v1/artifacts/{sha}", content=data)
        assert first.status_code == 201 and first.json()["created"] is True and first.json()["key"] == artifact.key
        again = client.put(f"/v1/artifacts/{sha}", content=data)
        assert again.status_code == 200 and again.json()["created"] is False
        assert client.head(f"/v1/artifacts/{sha}").status_code == 200
        assert client.get(f"/v1/artifacts/{sha}").json()["backend"] == "eager"
        assert client.get("/v1/artifacts/not-a-hash").status_code == 422
    assert (agent.workdir / "artifacts" / sha / "model.bin").read_bytes() == (artifact.path / "model.bin").read_bytes()


def test_uploads_over_the_limit_get_413_and_leave_nothing(agent, artifact):
    _, data = bundle_bytes(artifact)
    big = data + b"\0" * MAX_UPLOAD
    before = _stored(agent)
    with http(agent.url, agent.token) as client:
        declared = client.put(f"/v1/artifacts/{sha256(big)}", content=big)
        assert declared.status_code == 413 and "--max-upload" in declared.json()["detail"]

        def chunks():  # no Content-Length: the agent must count as it goes
            for start in range(0, len(big), 4096):
                yield big[start : start + 4096]

        streamed = client.put(f"/v1/artifacts/{sha256(big)}", content=chunks())
        assert streamed.status_code == 413
        assert client.get("/v1/health").status_code == 200
    assert _stored(agent) == before and _leftovers(agent) == []


def test_wrong_hash_is_rejected(agent, artifact):
    _, data = bundle_bytes(artifact)
    wrong = "f" * 64
    with http(agent.url, agent.token) as client:
        response = client.put(f"/v1/artifacts/{wrong}", content=data)
        assert response.status_code == 422 and "sha256" in response.json()["detail"]
        assert client.head(f"/v1/artifacts/{wrong}").status_code == 404
    assert wrong not in _stored(agent) and _leftovers(agent) == []


@pytest.mark.parametrize(
    "case",
    ["dotdot", "absolute", "symlink", "symlinked-dir", "hardlink", "extra-file", "tampered", "not-a-tar", "empty"],
)
def test_hostile_bundles_are_refused(agent, artifact, case):
    honest = artifact_members(artifact)
    swapped = lambda member: [member if m[0].name == "model.bin" else m for m in honest]  # noqa: E731
    members = {
        "dotdot": honest + [regular("../../escaped-by-agent-test", b"x")],
        "absolute": honest + [regular("/tmp/escaped-by-agent-test", b"x")],
        "symlink": swapped(link("model.bin", "/etc/passwd")),
        "symlinked-dir": honest + [link("d", "/tmp"), regular("d/escaped-by-agent-test", b"x")],
        "hardlink": honest + [link("h", "/etc/passwd", hard=True)],
        "extra-file": honest + [regular("run_me.py", b"import os")],
        "tampered": swapped(regular("model.bin", b"not the weights")),
    }.get(case)
    data = tar_bytes(members) if members is not None else (b"junk" * 1000 if case == "not-a-tar" else b"")
    before = _stored(agent)
    with http(agent.url, agent.token) as client:
        response = client.put(f"/v1/artifacts/{sha256(data)}", content=data)
        assert response.status_code in (400, 422), response.text
        assert client.get("/v1/health").status_code == 200
    assert _stored(agent) == before and _leftovers(agent) == []
    assert not Path("/tmp/escaped-by-agent-test").exists() and not (agent.workdir / "escaped-by-agent-test").exists()


def test_job_submission_is_checked_and_idempotent(agent, artifact):
    sha, data = bundle_bytes(artifact)
    with http(agent.url, agent.token) as client:
        client.put(f"/v1/artifacts/{sha}", content=data)
        missing = client.post("/v1/jobs", json={"artifact_sha256": "e" * 64, "protocol": FITTING})
        assert missing.status_code == 404 and "upload it first" in missing.json()["detail"]
        for bad in ({**FITTING, "surprise": 1}, {**FITTING, "min_runs": True}, {**FITTING, "min_runs": 5, "max_runs": 2}, {**FITTING, "decode_depths": []}):
            assert client.post("/v1/jobs", json={"artifact_sha256": sha, "protocol": bad}).status_code == 422, bad
        assert client.post("/v1/jobs", json={"artifact_sha256": sha, "protocol": FITTING, "job_id": "../x"}).status_code == 422
        assert client.post("/v1/jobs", content=b"[" * (300 << 10), headers={"Content-Type": "application/json"}).status_code == 413

        # the artifact holds 64 tokens of context: measure() refuses this protocol at once,
        # which makes a cheap job (a DONE job with status error) for the idempotency checks
        too_long = {**FITTING, "decode_depths": [4096]}
        first = client.post("/v1/jobs", json={"artifact_sha256": sha, "protocol": too_long, "job_id": "svc-1"})
        assert first.status_code == 201 and first.json()["job_id"] == "svc-1"
        repeat = client.post("/v1/jobs", json={"artifact_sha256": sha, "protocol": too_long, "job_id": "svc-1"})
        assert repeat.status_code == 200 and repeat.json()["submitted_at"] == first.json()["submitted_at"]
        conflict = client.post("/v1/jobs", json={"artifact_sha256": sha, "protocol": {**too_long, "decode_tokens": 2}, "job_id": "svc-1"})
        assert conflict.status_code == 409
        assert client.get("/v1/jobs/no-such-job").status_code == 404
        done = client.get("/v1/jobs/svc-1", params={"wait": 60}).json()
        assert done["state"] == "done" and done["attempts"] == 1 and done["status"] == "error" and "max_context" in done["measurement"]["error"]
        assert done["measurement"]["device"]["name"] == "svc" and done["measurement"]["device"]["emulated"] is False
        listed = client.get("/v1/jobs").json()["jobs"]
        assert [job["job_id"] for job in listed].count("svc-1") == 1


def test_client_uploads_once_and_reports_auth_and_reachability(agent, artifact, tmp_path):
    other = handmade_artifact(tmp_path / "other", payload=b"other weights")
    with AgentClient(agent.url, agent.token) as client:
        sha = client.upload(other)
        assert sha == bundle_sha256(other)[0] and client.has_artifact(sha)
        stored = (agent.workdir / "artifacts" / sha).stat().st_mtime_ns
        assert client.upload(other) == sha and (agent.workdir / "artifacts" / sha).stat().st_mtime_ns == stored
        info = client.info()
        assert info["name"] == "svc" and info["max_upload_bytes"] == MAX_UPLOAD and info["state"] in ("idle", "running", "cooling")
        big = handmade_artifact(tmp_path / "big", payload=os.urandom(MAX_UPLOAD))
        with pytest.raises(AgentRejected, match="--max-upload"):
            client.upload(big)
    with AgentClient(agent.url, "wrong") as client, pytest.raises(AgentAuthError, match="token"):
        client.info()
    with AgentClient("http://127.0.0.1:9", "t", retry_for_s=0.5) as client, pytest.raises(AgentUnreachable, match="unreachable"):
        client.info()


def test_concurrent_clients_run_one_at_a_time_none_lost_and_oom_is_survived(agent, artifacts):
    """A candidate over the memory cap is queued first; two clients then measure at the same
    time (and each repeats its request, as a retry would). The big one is `oom`, the agent
    answers throughout, and every job runs exactly once, one at a time, in order."""
    with agent.client() as first:
        first.submit(first.upload(artifacts["big"]), PROTOCOL, job_id="big")
    results, failures = {}, []

    def measure(job_id: str, artifact) -> None:
        try:
            with AgentClient(agent.url, agent.token, name=job_id) as client:
                results[job_id] = client.measure(artifact, PROTOCOL, job_id=job_id, timeout=400)
                results[job_id + " again"] = client.measure(artifact, PROTOCOL, job_id=job_id, timeout=60)
        except Exception as exc:  # surfaced by the assertion below
            failures.append(repr(exc))

    threads = [threading.Thread(target=measure, args=(name, artifacts[kind])) for name, kind in (("c0", "tiny"), ("c1", "tiny2"))]
    for thread in threads:
        thread.start()
    seen_busy = False
    with agent.client() as watcher:
        while any(thread.is_alive() for thread in threads):
            info = watcher.info(retry_for_s=5)  # the agent answers while it measures
            seen_busy |= info["busy"] and info["current_job"] in ("big", "c0", "c1")
            time.sleep(0.5)
        big = watcher.wait("big", timeout=10)
        jobs = {job["job_id"]: job for job in watcher.jobs()}
    for thread in threads:
        thread.join()
    assert failures == [] and seen_busy

    assert big.status == "oom" and "cap" in big.error, big.error
    for name in ("c0", "c1"):
        measurement = results[name]
        assert measurement.status == "ok", measurement.error
        assert set(measurement.prefill) == {16} and set(measurement.decode) == {8}
        assert measurement.device["name"] == "svc" and measurement.device["emulated"] is False
        assert results[name + " again"].to_dict() == measurement.to_dict()  # the same result, not a second run
    ordered = sorted((jobs[name] for name in ("big", "c0", "c1")), key=lambda job: job["submitted_at"])
    assert ordered[0]["job_id"] == "big" and all(job["attempts"] == 1 for job in ordered)
    check_one_at_a_time_in_order(ordered)
    print("\nagent concurrency: jobs 3, concurrent clients 2, repeated submissions 2, oom 1, losses 0, duplicate runs 0")



# -- a full disk ------------------------------------------------------------------------------


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a mountable tmpfs (user namespaces) to make a small disk")
def test_a_full_disk_during_upload_is_a_clear_507_and_nothing_half_written(tmp_path, artifact):
    """The agent's workdir is a 3 MiB tmpfs (in a private mount namespace): an upload that
    does not fit fails with 507, leaves no temp file and no artifact, and the agent goes on."""
    store = tmp_path / "store"
    store.mkdir()
    token = "disk-full-test-token"
    (tmp_path / "token").write_text(token)
    (tmp_path / "token").chmod(0o600)
    serve = [sys.executable, "-m", "devices.agent", "serve", "--name", "tiny-disk", "--port", "0", "--workdir", str(store)]
    serve += ["--token-file", str(tmp_path / "token"), "--ready-file", str(tmp_path / "ready.json"), "--max-upload", "64MiB"]
    script = f"mount -t tmpfs -o size=3m tmpfs {store} && exec " + " ".join(serve)
    with open(tmp_path / "agent.log", "wb") as log:
        process = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.1)
        url = json.loads((tmp_path / "ready.json").read_text())["url"]
        listing = lambda sub: subprocess.run(  # noqa: E731  (the tmpfs is visible inside the agent's namespace only)
            ["nsenter", "-t", str(process.pid), "-U", "-m", "--preserve-credentials", "ls", "-A", str(store / sub)], capture_output=True, text=True
        ).stdout.split()
        big = os.urandom(6 << 20)
        with http(url, token) as client:
            declared = client.put(f"/v1/artifacts/{sha256(big)}", content=big)
            assert declared.status_code == 507 and "free" in declared.json()["detail"]

            def chunks():  # undeclared length: the space runs out in the middle of the write
                step = 256 << 10
                for start in range(0, len(big), step):
                    yield big[start : start + step]

            # refused by the reservation before a write would fill the disk, naming the room needed
            streamed = client.put(f"/v1/artifacts/{sha256(big)}", content=chunks())
            detail = streamed.json()["detail"]
            assert streamed.status_code == 507 and "free" in detail and "needs" in detail, streamed.text
            if shutil.which("nsenter"):
                assert listing("tmp") == [] and listing("artifacts") == []
            assert client.head(f"/v1/artifacts/{sha256(big)}").status_code == 404
            sha, data = bundle_bytes(artifact)  # the space was given back: a small upload still works
            assert client.put(f"/v1/artifacts/{sha}", content=data).status_code == 201
            assert client.get("/v1/health").status_code == 200
    finally:
        process.terminate()
        process.wait(10)


def test_the_protocol_body_has_exactly_the_protocols_fields():
    """The API's pydantic model mirrors `devices.protocol.Protocol`: a field added there
    must be added to the API too (this fails until it is)."""
    import dataclasses

    from devices.agent.service import ProtocolBody
    from devices.protocol import Protocol

    assert set(ProtocolBody.model_fields) == {f.name for f in dataclasses.fields(Protocol)}
    assert ProtocolBody().to_protocol() == Protocol()


def test_devices_list_shows_a_stopped_agent_as_offline(tmp_path, monkeypatch):
    # its own agent: stopping the module's would break whichever test ran after it (the
    # suite runs in a random order)
    agent = start_local_agent(name="svc", workdir=tmp_path / "agent", threads=1, job_timeout_s=60)
    config = tmp_path / "devices.toml"
    monkeypatch.setenv("LFM2_NAS_CONFIG", str(config))
    add_device("svc", agent.url, agent.workdir / "token")
    row = list_devices(monkeypatch, config)["svc"]
    assert row["status"] == "online" and row["profile"] == "local" and row["emulated"] is False and row["busy"] is False
    agent.stop()
    row = list_devices(monkeypatch, config)["svc"]
    assert row["status"] == "offline" and row["online"] is False and "unreachable" in row["error"]
