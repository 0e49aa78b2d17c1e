"""Issue 20: the agent attacked as an outsider (or a token holder) would, over real sockets
on 127.0.0.1, against real `python -m devices.agent serve` processes.

1. a manifest that names a file outside the artifact (absolute, `..`, unlisted): refused
   at upload, refused again at load, and no job result carries file bytes, server paths
   or a traceback;
2. a flood of half-open connections against an agent with a test-sized fd limit, headers
   sent a byte at a time, a body that stalls, and a worker that meets EMFILE: the agent
   keeps answering, no job ends as `error` for it, and the log stays small;
3. a manifest of several MiB: refused before it is parsed, the agent's memory unmoved;
4. NaN, Infinity and 1e999 in bodies and queries: 4xx, never 500;
5. a burst of submissions and a protocol that would hold the device for hours: 429 with
   Retry-After past the queue limit, 422 for the protocol, nothing lost;
6. a chunked upload larger than the disk, duplicate Authorization headers, a SIGKILLed
   agent's measurement folders, a core lock held by another process.

Every loop here is bounded by count and time and stops by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from testkit.agent import TINY_SPEC, artifact_members, handmade_artifact, regular, sha256, tar_bytes
from testkit.reliability import RssSampler, can_mount_tmpfs, isolated_env

from devices.agent.guard import BODY_IDLE_TIMEOUT_S, HEADER_TIMEOUT_S, connection_cap
from devices.agent.bundle import bundle_bytes
from devices.artifact import MAX_MANIFEST_BYTES, write_manifest
from devices.protocol import Protocol

#: A job that measure() refuses at once (more context than the artifact holds): the queue
#: and the worker are under test, and it takes milliseconds.
QUICK = Protocol(prompt_lengths=(16,), decode_depths=(4096,), decode_tokens=1, warmup_runs=0, min_runs=1, max_runs=1, max_seconds_per_point=1.0, max_remeasures=0)
#: A job that reaches the measurement child (and so the core locks and the scratch folder).
RUNS = Protocol(prompt_lengths=(16,), decode_depths=(8,), decode_tokens=1, warmup_runs=0, min_runs=1, max_runs=1, max_seconds_per_point=1.0, max_remeasures=0)
SECRET = b"TOP-SECRET-7f3a9c-do-not-leak"


class Agent:
    """`python -m devices.agent serve` as a process of its own, with the options given."""

    def __init__(self, root: Path, *flags: str, nofile: int | None = None, name: str = "target"):
        self.root = root
        self.workdir = root / "work"
        self.token = "security-test-token-0123456789"
        root.mkdir(parents=True, exist_ok=True)
        token_file = root / "token"
        if not token_file.exists():
            token_file.write_text(self.token)
            token_file.chmod(0o600)
        ready = root / "ready.json"
        ready.unlink(missing_ok=True)
        self.log_path = root / "agent.log"
        command = [sys.executable, "-m", "devices.agent", "serve", "--name", name, "--port", "0", "--workdir", str(self.workdir), "--exit-with-parent"]
        command += ["--token-file", str(token_file), "--ready-file", str(ready), "--threads", "1", *flags]
        env = isolated_env(root.parent)
        env["LFM2_NAS_LOCKS"] = str(root.parent / "locks")

        def limit_fds() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_fds, start_new_session=True)
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def agents(tmp_path):
    started: list[Agent] = []

    def start(*flags: str, **options) -> Agent:
        agent = Agent(tmp_path / f"agent{len(started)}", *flags, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def _upload(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.put(f"/v1/artifacts/{sha256(data)}", content=data)


def _submit(client: httpx.Client, sha: str, protocol: Protocol, job_id: str | None = None) -> httpx.Response:
    body = {"artifact_sha256": sha, "protocol": protocol.to_dict()}
    if job_id:
        body["job_id"] = job_id
    return client.post("/v1/jobs", json=body)


def _wait_done(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        if job["state"] == "done":
            return job
    raise AssertionError(f"job {job_id} not done within {timeout_s} s")


def _check_clean_error(text: str, *hidden: str) -> None:
    """A job's error: one short line of the agent's own, no bytes read, no paths, no traceback."""
    assert text and "\n" not in text and len(text) <= 300, text
    assert "Traceback" not in text and SECRET.decode() not in text, text
    for secret in hidden:
        assert secret not in text, (secret, text)


# -- 1. manifest paths --------------------------------------------------------------------------


def _onnx_artifact(folder: Path, weights: str) -> tuple[bytes, dict]:
    """A bundle that claims to be an ONNX artifact whose `onnx.weights` is `weights`; its
    other files are junk (the runner must never get as far as parsing them)."""
    folder.mkdir(parents=True)
    for name in ("step.onnx", "weights.bin"):
        (folder / name).write_bytes(b"junk " + name.encode())
    (folder / "weights_index.json").write_text(json.dumps({"step.onnx": {}}))
    facts = {"onnx": {"step": "step.onnx", "weights": weights, "weights_index": "weights_index.json", "state": []}}
    artifact = write_manifest(folder, TINY_SPEC, "onnx", "fp32", 64, (16,), ["step.onnx", "weights.bin", "weights_index.json"], **facts)
    return tar_bytes(artifact_members(artifact)), artifact.manifest


def test_a_manifest_cannot_make_the_agent_read_a_file_outside_the_artifact(agents, tmp_path, figures):
    secret = tmp_path / "secret.key"
    secret.write_bytes(SECRET * 4)
    secret.chmod(0o600)
    agent = agents("--job-timeout", "120")
    hostile = {
        "absolute path": str(secret),
        "climbs out": "../../../" + secret.name,
        "not a listed file": "other.bin",
        "odd characters": "weights bin",
        "not a string": 5,
    }
    with agent.client() as client:
        for case, weights in hostile.items():
            data, _ = _onnx_artifact(tmp_path / case.replace(" ", "-"), weights)  # type: ignore[arg-type]
            response = _upload(client, data)
            assert response.status_code == 422, (case, response.status_code, response.text)
            assert "onnx.weights" in response.text and str(agent.workdir) not in response.text, (case, response.text)
        assert sorted(p.name for p in (agent.workdir / "artifacts").iterdir()) == []

        # Refused again at load: the same bundle placed in the store behind the agent's
        # back (an older agent let it in, or the disk was tampered with).
        data, _ = _onnx_artifact(tmp_path / "planted", str(secret))
        planted = agent.workdir / "artifacts" / sha256(data)
        (tmp_path / "planted").rename(planted)
        job = _submit(client, sha256(data), RUNS, job_id="planted").json()
        done = _wait_done(client, job["job_id"])
        error = done["measurement"]["error"]
        assert done["status"] == "error" and error.startswith("artifact_invalid: "), error
        _check_clean_error(error, str(agent.workdir))  # (the name it quotes is the bundle's own)
        assert "onnx.weights" in error

        # A well-formed manifest whose files are junk: the runtime's own error (which
        # names the file and quotes what it read) stays in the agent's log.
        data, _ = _onnx_artifact(tmp_path / "junk", "weights.bin")
        assert _upload(client, data).status_code == 201
        done = _wait_done(client, _submit(client, sha256(data), RUNS, job_id="junk").json()["job_id"])
        error = done["measurement"]["error"]
        assert done["status"] == "error" and error.startswith("child_failed: the measurement child raised"), error
        _check_clean_error(error, str(agent.workdir), str(tmp_path), "junk ", "step.onnx")
        listed = client.get("/v1/jobs").text
        assert SECRET.decode() not in listed and "Traceback" not in listed and str(agent.workdir) not in listed
    figures("manifest paths", hostile_bundles=len(hostile), refused_at_upload=len(hostile), planted_refused_at_load=1, secret_bytes_leaked=0, server_paths_leaked=0)


# -- 2. connections: flood, slow headers, stalled bodies; resource errors in the worker -----------

FD_LIMIT = 160
FLOOD_SOCKETS = 3000
FLOOD_S = 12.0


def _open_half_open(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Up to `count` connections that never send a byte (bounded by `deadline`)."""
    held = []
    while len(held) < count and time.monotonic() < deadline:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        held.append(sock)
    return held


def test_a_half_open_flood_does_not_take_the_agent_down_or_lose_jobs(agents, tmp_path, figures):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD_SOCKETS + 200:
        pytest.skip(f"this process may open {hard} files; the flood needs {FLOOD_SOCKETS + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD_SOCKETS + 200), hard))
    agent = agents("--job-timeout", "120", nofile=FD_LIMIT)
    owner = psutil.Process(agent.process.pid)
    artifact = handmade_artifact(tmp_path / "a")
    sha, data = bundle_bytes(artifact)
    with agent.client() as client:
        assert _upload(client, data).status_code == 201
    log_before = agent.log_path.stat().st_size
    held: list[socket.socket] = []
    answered = tried = 0
    peak_fds = 0
    submitted: list[str] = []
    try:
        end = time.monotonic() + FLOOD_S
        while time.monotonic() < end:
            # the attacker: thousands of sockets that never send a request
            held += _open_half_open(agent.port, 200, min(end, time.monotonic() + 0.5))
            with contextlib.suppress(psutil.Error):
                peak_fds = max(peak_fds, owner.num_fds())
            # a driver: health and a job submission through the flood (fresh connections)
            tried += 1
            with contextlib.suppress(httpx.TransportError), agent.client(timeout=5) as client:
                if client.get("/v1/health").status_code == 200:
                    response = _submit(client, sha, QUICK, job_id=f"through-the-flood-{tried}")
                    if response.status_code == 201:
                        submitted.append(response.json()["job_id"])
                    answered += 1
            if len(held) >= FLOOD_SOCKETS:
                break
        assert agent.process.poll() is None, agent.log()
    finally:
        for sock in held:
            sock.close()
    with agent.client() as client:
        assert client.get("/v1/info").status_code == 200
        jobs = [_wait_done(client, job_id, 60) for job_id in submitted]
    assert peak_fds < FD_LIMIT, (peak_fds, FD_LIMIT)
    assert answered >= tried * 0.8, (answered, tried)
    assert submitted and all(job["status"] == "error" and job["measurement"]["error"].startswith("refused: ") for job in jobs)  # QUICK's own answer
    assert "Too many open files" not in agent.log()
    log_growth = agent.log_path.stat().st_size - log_before
    assert log_growth < 64 << 10, log_growth
    figures(
        "half-open flood",
        fd_limit=FD_LIMIT,
        connection_cap=connection_cap(FD_LIMIT),
        sockets_opened=len(held),
        agent_peak_fds=peak_fds,
        health_answered=f"{answered}/{tried}",
        jobs=len(jobs),
        losses=0,
        log_growth_kib=round(log_growth / 1024, 1),
    )


def test_headers_sent_a_byte_at_a_time_are_cut_off(agents, figures):
    agent = agents()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        request = f"GET /v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n".encode()
        closed_after = None
        for i in range(int(HEADER_TIMEOUT_S * 4)):  # one header byte every 0.5 s, never the blank line
            try:
                sock.sendall(request[i : i + 1] if i < len(request) else b"X")
                sock.settimeout(0.5)
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                continue
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and HEADER_TIMEOUT_S <= closed_after < HEADER_TIMEOUT_S + 5, closed_after
    with agent.client() as client:
        assert client.get("/v1/health").status_code == 200
    figures("slow headers", header_timeout_s=HEADER_TIMEOUT_S, closed_after_s=round(closed_after, 1))


@pytest.mark.slow
def test_an_upload_that_stalls_is_cut_off_and_leaves_nothing(agents, tmp_path, figures):
    agent = agents()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        head = f"PUT /v1/artifacts/{'0' * 64} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\nContent-Length: 1000000\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 4096)
        sock.settimeout(BODY_IDLE_TIMEOUT_S + 15)
        with contextlib.suppress(OSError):
            while sock.recv(1024):
                pass
    closed_after = time.monotonic() - started
    assert BODY_IDLE_TIMEOUT_S <= closed_after < BODY_IDLE_TIMEOUT_S + 10, closed_after
    time.sleep(0.5)
    assert list((agent.workdir / "tmp").iterdir()) == []
    figures("stalled upload", body_idle_timeout_s=BODY_IDLE_TIMEOUT_S, closed_after_s=round(closed_after, 1), leftovers=0)


def test_a_worker_out_of_file_descriptors_requeues_the_job_instead_of_failing_it(agents, tmp_path, figures):
    agent = agents("--cooldown", "3", "--job-timeout", "60")
    artifact = handmade_artifact(tmp_path / "a")
    sha, data = bundle_bytes(artifact)
    with agent.client() as client:
        assert _upload(client, data).status_code == 201
        first = _wait_done(client, _submit(client, sha, QUICK, job_id="first").json()["job_id"])
        second = _submit(client, sha, QUICK, job_id="second").json()  # waits out the cooldown
        assert second["state"] == "queued"
    pid = agent.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    time.sleep(0.3)  # our connection's fd goes
    in_use = psutil.Process(pid).num_fds()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use - 4, limits[1]))  # not one file more, whatever closes meanwhile
    try:
        time.sleep(6)  # the cooldown ends; the worker meets EMFILE, re-queues, and again
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    with agent.client() as client:
        done = _wait_done(client, "second", 60)
    requeues = [event for event in done["events"] if event["event"] == "requeued"]
    assert requeues and "EMFILE" in requeues[0]["reason"], done["events"]
    assert done["status"] == first["status"] and done["measurement"]["error"] == first["measurement"]["error"]  # its own result
    assert done["attempts"] == 1 + len(requeues)
    figures("worker out of fds", jobs=2, requeued=len(requeues), finished_as_its_own_result=1, losses=0)


# -- 3. manifest size ------------------------------------------------------------------------------


def test_a_huge_manifest_is_refused_before_it_is_parsed(agents, tmp_path, figures):
    agent = agents()
    artifact = handmade_artifact(tmp_path / "a")
    manifest = dict(artifact.manifest, padding=["x" * 1000] * (8 * MAX_MANIFEST_BYTES // 1000))
    honest = [m for m in artifact_members(artifact) if m[0].name != "manifest.json"]
    data = tar_bytes(honest + [regular("manifest.json", json.dumps(manifest).encode())])
    with agent.client() as client:
        idle = psutil.Process(agent.process.pid).memory_info().rss
        with RssSampler(agent.process.pid, every_s=0.05) as rss:
            response = _upload(client, data)
        assert response.status_code == 422 and "limit of a manifest" in response.text, response.text
        # planted in the store behind the agent's back: HEAD, GET and a job refuse it too
        planted = agent.workdir / "artifacts" / sha256(data)
        planted.mkdir()
        for info, payload in honest:
            (planted / info.name).write_bytes(payload)
        (planted / "manifest.json").write_text(json.dumps(manifest))
        with RssSampler(agent.process.pid, every_s=0.05) as rss_reads:
            for _ in range(4):
                response = client.get(f"/v1/artifacts/{sha256(data)}")
                assert response.status_code == 422 and str(agent.workdir) not in response.text, response.text
                assert client.head(f"/v1/artifacts/{sha256(data)}").status_code == 422
            job = _wait_done(client, _submit(client, sha256(data), QUICK).json()["job_id"])
    assert job["measurement"]["error"].startswith("artifact_invalid: "), job
    _check_clean_error(job["measurement"]["error"], str(agent.workdir))
    growth = max(rss.peak, rss_reads.peak) - idle
    assert growth < 24 << 20, growth  # a parsed 8 MiB manifest takes ~5x its size
    figures("huge manifest", manifest_mib=round(len(json.dumps(manifest)) / 2**20, 1), refused=9, agent_rss_growth_mib=round(growth / 2**20, 1))


# -- 4. non-finite numbers --------------------------------------------------------------------------


def test_non_finite_numbers_are_a_4xx_never_a_500(agents, figures):
    agent = agents()
    sha = "0" * 64
    bodies = [
        '{"artifact_sha256": "%s", "protocol": {"cv_threshold": NaN}}' % sha,
        '{"artifact_sha256": "%s", "protocol": {"cv_threshold": 1e999}}' % sha,
        '{"artifact_sha256": "%s", "protocol": {"max_seconds_per_point": -Infinity}}' % sha,
        '{"artifact_sha256": "%s", "protocol": {"prompt_lengths": [NaN, 1e999]}}' % sha,
        '{"artifact_sha256": "%s", "protocol": {"threads": 1e999}}' % sha,
        '{"artifact_sha256": NaN}',
        "NaN",
        "[1e999]",
    ]
    statuses = []
    with agent.client() as client:
        for body in bodies:
            response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            statuses.append(response.status_code)
            assert 400 <= response.status_code < 500 and response.json()["detail"], (body, response.status_code, response.text)
        for wait in ("nan", "inf", "1e999", "-inf"):
            response = client.get("/v1/jobs/some-job", params={"wait": wait})
            statuses.append(response.status_code)
            assert response.status_code == 422, (wait, response.text)
        assert client.get("/v1/info").json()["worker_alive"]
    figures("non-finite numbers", inputs_tried=len(statuses), answers_4xx=sum(400 <= s < 500 for s in statuses), server_errors=0)


# -- 5. queue and protocol bounds ------------------------------------------------------------------


@contextlib.contextmanager
def _hold_core_locks(locks: Path):
    """Lock every core's lock file as another process would (the agent's cores are all of ours)."""
    locks.mkdir(parents=True, exist_ok=True)
    handles = []
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            handle = open(locks / f"cpu{cpu}.lock", "a+")
            fcntl.flock(handle, fcntl.LOCK_EX)
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.close()


def test_the_queue_and_the_protocol_size_are_bounded(agents, tmp_path, figures):
    agent = agents("--max-queue", "5", "--job-timeout", "60")
    artifact = handmade_artifact(tmp_path / "a")
    sha, data = bundle_bytes(artifact)
    accepted, refused, retry_after = [], 0, set()
    with agent.client() as client:
        assert _upload(client, data).status_code == 201
        # hours of device time in one job: refused up front
        greedy = Protocol(prompt_lengths=tuple(range(1, 65)), decode_depths=(1,), decode_tokens=1, max_runs=10_000, min_runs=1, max_seconds_per_point=60.0)
        response = _submit(client, sha, greedy)
        assert response.status_code == 422 and "job timeout" in response.text, response.text
        with _hold_core_locks(agent.root.parent / "locks"):
            blocker = _submit(client, sha, RUNS, job_id="blocker").json()  # holds the worker at the core locks
            deadline = time.monotonic() + 30
            while client.get("/v1/jobs/blocker").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for i in range(40):  # a burst, as fast as one connection goes
                response = _submit(client, sha, QUICK, job_id=f"burst-{i}")
                if response.status_code == 201:
                    accepted.append(response.json()["job_id"])
                else:
                    assert response.status_code == 429, response.text
                    refused += 1
                    retry_after.add(response.headers["Retry-After"])
            again = _submit(client, sha, QUICK, job_id=accepted[0])  # a resent submission is no new job
            assert again.status_code == 200
        jobs = [_wait_done(client, job_id, 60) for job_id in [blocker["job_id"], *accepted]]
    assert len(accepted) == 5 and refused == 35 and all(v.isdigit() and int(v) > 0 for v in retry_after), (len(accepted), refused, retry_after)
    assert all(job["state"] == "done" and job["attempts"] == 1 for job in jobs)
    figures("queue flood", submissions=40, queued=len(accepted), answered_429=refused, greedy_protocol_422=1, losses=0)


# -- 6. space, headers, scratch folders, core locks ----------------------------------------------------


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare/nsenter and a mountable tmpfs (user namespaces) to make a small disk")
def test_a_chunked_upload_larger_than_the_disk_is_refused_before_the_disk_fills(small_disk_agent, tmp_path, figures):
    url, token, store, inside = small_disk_agent
    small = handmade_artifact(tmp_path / "small")
    sha, data = bundle_bytes(small)
    sent = 0

    def chunks():  # no Content-Length: the agent learns the size only by reading
        nonlocal sent
        for _ in range(64):
            sent += 256 << 10
            yield os.urandom(256 << 10)

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        assert _upload(client, data).status_code == 201
        response = client.put(f"/v1/artifacts/{'a' * 64}", content=chunks())
        assert response.status_code == 507 and "free space" in response.text, response.text
        free_after = int(inside("df", "--output=avail", "-B1", str(store)).stdout.split()[-1])
        assert free_after > 1 << 20, free_after  # refused while there was still room
        # the job database can still be written: a job goes through
        assert _submit(client, sha, QUICK).status_code == 201
    assert inside("ls", "-A", str(store / "tmp")).stdout.split() == []
    figures("chunked upload > disk", disk_mib=5, offered_mib=16, refused_with=507, free_mib_left=round(free_after / 2**20, 1), leftovers=0)


def _raw_request(port: int, head: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.decode(errors="replace").partition("\r\n")
    return int(status_line.split()[1]), rest


def test_duplicate_authorization_headers_are_refused(agents, figures):
    agent = agents()
    right, wrong = f"Authorization: Bearer {agent.token}\r\n", "Authorization: Bearer wrong\r\n"
    cases = {"right then wrong": right + wrong, "wrong then right": wrong + right, "right twice": right + right}
    for case, headers in cases.items():
        status, rest = _raw_request(agent.port, f"GET /v1/info HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
        assert status == 400 and "one Authorization header" in rest, (case, status, rest)
    status, _ = _raw_request(agent.port, f"GET /v1/info HTTP/1.1\r\nHost: x\r\n{right}Connection: close\r\n\r\n")
    assert status == 200
    figures("duplicate Authorization", cases=len(cases), refused_400=len(cases))


def test_a_held_core_lock_times_out_the_job_and_a_killed_agent_leaves_no_temp_folders(agents, tmp_path, figures):
    agent = agents("--job-timeout", "4")
    artifact = handmade_artifact(tmp_path / "a")
    sha, data = bundle_bytes(artifact)
    scratch = agent.workdir / "measure"
    with _hold_core_locks(agent.root.parent / "locks"):
        with agent.client() as client:
            assert _upload(client, data).status_code == 201
            started = time.monotonic()
            done = _wait_done(client, _submit(client, sha, RUNS, job_id="locked-out").json()["job_id"], 60)
            waited = time.monotonic() - started
        error = done["measurement"]["error"]
        assert done["status"] == "timeout" and error.startswith("cores_busy: "), error
        assert waited < 30, waited  # the lock wait counted against the job's 4 s, not for ever
        _check_clean_error(error, str(agent.workdir))

        # SIGKILL the agent while a job waits for the cores: its scratch folder is in the workdir
        with agent.client() as client:
            _submit(client, sha, RUNS, job_id="killed-while-waiting")
        deadline = time.monotonic() + 30
        while not (scratch.is_dir() and any(scratch.iterdir())):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        left = [p.name for p in scratch.iterdir()]
        os.killpg(agent.process.pid, signal.SIGKILL)
        agent.process.wait()
        assert [p.name for p in scratch.iterdir()] == left and all(name.startswith("lfm2-measure-") for name in left)
    restarted = Agent(agent.root, "--job-timeout", "60")
    try:
        assert not set(left) & {p.name for p in scratch.iterdir()}  # cleaned at start (the re-queued job may have made its own)
        with restarted.client() as client:
            job = _wait_done(client, "killed-while-waiting", 90)
        assert [e["event"] for e in job["events"]].count("requeued") == 1
    finally:
        restarted.stop()
    figures("core lock held / agent killed", job_timeout_s=4, waited_s=round(waited, 1), status=done["status"], scratch_folders_left=len(left), removed_at_start=len(left), losses=0)
