"""The agent's HTTP service (FastAPI, served by uvicorn): API version 1 under `/v1/`.

    GET  /v1/health                  open: is it up (for probes; says nothing secret)
    GET  /v1/info                    what the device is, its limits, busy or idle, queue
    HEAD /v1/artifacts/{sha256}      200 if the agent has that bundle, 404 if not
    GET  /v1/artifacts/{sha256}      what that artifact is
    PUT  /v1/artifacts/{sha256}      streamed upload of a bundle (uncompressed tar)
    POST /v1/jobs                    queue a measurement {artifact_sha256, protocol, job_id?}
    GET  /v1/jobs/{job_id}?wait=S    a job's state, and its Measurement when done
    GET  /v1/jobs?state=queued       jobs, oldest first for a state, newest first otherwise
    GET  /v1/openapi.json, /v1/docs  the schema

Everything but `/v1/health` needs `Authorization: Bearer <token>`; the check runs in an
ASGI middleware before any routing or body parsing, so a request without the token
learns nothing and costs nothing. Bodies are bounded (uploads by `--max-upload`, JSON
by `MAX_JSON_BODY`) and only ever parsed as JSON into pydantic models or unpacked as a
tar by `devices.agent.bundle` (never unpickled, never evaluated).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import psutil
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from devices.agent.auth import bearer_token, token_matches
from devices.agent.config import API_VERSION, AgentConfig, agent_version
from devices.agent.guard import rate_limit_logs, server_settings
from devices.agent.jobs import JobConflict, JobStore, QueueFull, StoreUnavailable, Worker, request_sha256
from devices.agent.store import ArtifactStore, UploadError
from devices.protocol import Protocol
from lfm2.errors import EnvironmentFailure, UserError

log = logging.getLogger("lfm2_nas.agent")

OPEN_PATHS = frozenset({f"/{API_VERSION}/health"})
MAX_JSON_BODY = 256 << 10
UPLOAD_CHUNK = 1 << 20
#: What a client is told to wait when the queue is full (429): about one short job.
QUEUE_FULL_RETRY_AFTER_S = 30
#: After refusing an upload, read (and drop) up to this much more of it, so the client
#: sees the refusal instead of a connection reset halfway through its send.
DRAIN_AFTER_REFUSAL = 32 << 20
SHA256_PATTERN = r"^[0-9a-f]{64}$"
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

Sha256 = Annotated[str, PathParam(pattern=SHA256_PATTERN, description="sha256 of the bundle bytes")]
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="the job id (given by the client, or made by the agent)")]
WaitSeconds = Annotated[float, Query(ge=0, le=60.0, description="seconds to wait for the job to be done")]
StateFilter = Annotated[Literal["queued", "running", "done"] | None, Query()]
Limit = Annotated[int, Query(ge=1, le=1000)]

_DEFAULT = Protocol()


def _number_not_text_or_bool(value: Any) -> Any:
    # JSON's 3.0 is an integer to JSON Schema (and is accepted), but true or "3" is not
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("must be a JSON number")
    return value


def _int(ge: int, le: int) -> Any:
    # the bounds first: after a validator they would reach the JSON schema as "ge", not "minimum"
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_number_not_text_or_bool)]


def _number(**bounds: float) -> Any:
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(_number_not_text_or_bool)]


_Length = _int(1, 1 << 20)


class ProtocolBody(BaseModel):
    """`devices.protocol.Protocol` as JSON; every field optional (Protocol's defaults)."""

    model_config = ConfigDict(extra="forbid")

    prompt_lengths: list[_Length] = Field(default=list(_DEFAULT.prompt_lengths), min_length=1, max_length=64)
    decode_depths: list[_Length] = Field(default=list(_DEFAULT.decode_depths), min_length=1, max_length=64)
    decode_tokens: _int(1, 1 << 16) = _DEFAULT.decode_tokens
    warmup_runs: _int(0, 1000) = _DEFAULT.warmup_runs
    max_warmup_runs: _int(0, 1000) = _DEFAULT.max_warmup_runs
    min_runs: _int(1, 10_000) = _DEFAULT.min_runs
    max_runs: _int(1, 10_000) = _DEFAULT.max_runs
    max_seconds_per_point: _number(gt=0, le=86_400) = _DEFAULT.max_seconds_per_point
    trim_fraction: _number(ge=0, lt=0.5) = _DEFAULT.trim_fraction
    ci_target: _number(ge=0, le=100) = _DEFAULT.ci_target
    disturbance_threshold: _number(ge=0, le=100) = _DEFAULT.disturbance_threshold
    cv_threshold: _number(ge=0, le=100) = _DEFAULT.cv_threshold
    max_remeasures: _int(0, 100) = _DEFAULT.max_remeasures
    measure_memory: StrictBool = _DEFAULT.measure_memory
    threads: _int(1, 1024) | None = _DEFAULT.threads
    cpus: list[_int(0, 4095)] | None = Field(default=None, min_length=1, max_length=4096)

    def to_protocol(self) -> Protocol:
        return Protocol.from_dict(self.model_dump())


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact_sha256: str = Field(pattern=SHA256_PATTERN, description="the bundle's sha256, as uploaded")
    protocol: ProtocolBody = Field(default_factory=ProtocolBody)
    job_id: str | None = Field(
        default=None, pattern=JOB_ID_PATTERN, description="makes submission idempotent: the same id and body give the same job; a different body, 409"
    )


class Health(BaseModel):
    status: Literal["ok"]
    name: str
    api_version: str
    agent_version: str


class ErrorBody(BaseModel):
    detail: str | list[Any] | dict[str, Any]


class ArtifactInfo(BaseModel):
    sha256: str
    key: str
    backend: str
    quant: str
    spec_key: str
    max_context: int
    prompt_lengths: list[int]
    bytes: int
    created: bool | None = None


class JobView(BaseModel):
    job_id: str
    state: Literal["queued", "running", "done"]
    artifact_sha256: str
    protocol: dict[str, Any]
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    events: list[dict[str, Any]]
    queue_position: int | None
    status: str | None = Field(description="the Measurement's status when done: ok, oom, error, timeout")
    measurement: dict[str, Any] | None = Field(description="devices.protocol.Measurement.to_dict(), when done")


class JobList(BaseModel):
    jobs: list[JobView]


class Info(BaseModel):
    name: str
    api_version: str
    agent_version: str
    profile: dict[str, Any]
    emulated: bool
    fingerprint: str
    machine: dict[str, Any]
    runtimes: dict[str, str]
    limits: dict[str, Any]
    notes: list[str]
    transport: dict[str, Any] = Field(default_factory=dict, description="which device and transport measure: local, or adb with the phone's serial and facts")
    max_upload_bytes: int
    free_disk_bytes: int
    artifacts: int
    state: Literal["idle", "running", "cooling"]
    busy: bool
    current_job: str | None
    queue_length: int
    max_queue: int
    jobs: dict[str, int]
    cooldown_s: float
    worker_alive: bool
    started_at: float
    uptime_s: float


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in (400, 401, *codes)}


class WorkdirLocked(EnvironmentFailure):
    pass


#: Set in the agent's environment, so its measurement children (which inherit it) can be
#: told apart from other agents' after a crash (see `Agent.kill_measurement_children`).
WORKDIR_ENV = "LFM2_NAS_AGENT_WORKDIR"


def measurement_children(workdir: Path) -> list[psutil.Process]:
    """Measurement processes started by an agent serving `workdir` (alive or orphaned)."""
    workdir = Path(workdir).resolve()
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "devices.measure_child" not in (process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get(WORKDIR_ENV) == str(workdir):
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


class Agent:
    """The agent's state: its stores and its worker. One per workdir (a file lock)."""

    def __init__(self, config: AgentConfig, token: str):
        self.config = config
        self.token = token
        config.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_handle = open(config.workdir / "agent.lock", "a+")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.seek(0)
            holder = self._lock_handle.read().strip() or "unknown"
            self._lock_handle.close()
            raise WorkdirLocked(f"another agent (pid {holder}) is serving {config.workdir}; stop it, or give this one another --workdir") from None
        self._lock_handle.seek(0)
        self._lock_handle.truncate()
        self._lock_handle.write(str(os.getpid()))
        self._lock_handle.flush()
        os.environ[WORKDIR_ENV] = str(config.workdir)
        self.artifacts = ArtifactStore(config.workdir, config.max_upload)
        self.jobs = JobStore(config.workdir / "jobs.sqlite")
        # measurement children write their files here, not in the system temp folder: an
        # agent that is killed leaves them in its own workdir, removed at its next start
        self.scratch = config.workdir / "measure"
        on_phone = {"measure": config.adb.phone().measure} if config.adb is not None else {}  # devices.adb: measured on the phone
        self.worker = Worker(
            self.jobs, self.artifacts.path, config.limits, config.device_facts(), config.cooldown_s, scratch_dir=self.scratch, hide=(str(config.workdir),), **on_phone
        )
        self.started_at = time.time()
        self._machine = config.machine()

    def kill_measurement_children(self) -> int:
        """End measurements started from this workdir: at start, the orphans of an agent
        that was killed (they would compete for the cores with the re-run of their job);
        at stop, our own (a measurement must not outlive its agent)."""
        killed = 0
        for process in measurement_children(self.config.workdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the child leads its own session
                killed += 1
            with contextlib.suppress(psutil.Error):
                process.kill()
        return killed

    def start(self) -> None:
        orphans = self.kill_measurement_children()
        if orphans:
            log.warning("killed %d measurement process(es) left running by a previous agent on this workdir", orphans)
        cleaned = self.artifacts.clean_tmp() + self.clean_scratch()
        requeued = self.jobs.recover()
        if cleaned:
            log.info("removed %d leftover(s) of interrupted uploads and measurements", cleaned)
        if requeued:
            log.warning("re-queued %d job(s) that were running when the agent stopped: %s", len(requeued), ", ".join(requeued))
        self.worker.start()

    def clean_scratch(self) -> int:
        """Remove what measurements of a killed agent left (run after their processes are killed)."""
        self.scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        removed = 0
        for entry in self.scratch.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def stop(self) -> None:
        self.worker.stop(timeout=0.5)
        self.kill_measurement_children()  # its job stays RUNNING and is re-queued at the next start
        self.worker.stop(timeout=2.0)
        self.jobs.close()
        self._lock_handle.close()

    def info(self) -> dict[str, Any]:
        counts = self.jobs.counts()
        return {
            "name": self.config.name,
            "api_version": API_VERSION,
            "agent_version": agent_version(),
            "profile": self.config.profile.to_dict(),
            "emulated": self.config.emulate,
            "fingerprint": self.config.fingerprint,
            "machine": self._machine,
            "runtimes": self._machine.get("runtimes", {}),
            "limits": self.config.limits.to_dict(),
            "notes": self.config.notes,
            "transport": self.config.transport_facts(),
            "max_upload_bytes": self.config.max_upload,
            "free_disk_bytes": self.artifacts.free_bytes(),
            "artifacts": self.artifacts.count(),
            "state": self.worker.phase,
            "busy": self.worker.phase != "idle" or counts["running"] > 0,
            "current_job": self.worker.current_job,
            "queue_length": counts["queued"],
            "max_queue": self.config.max_queue,
            "jobs": counts,
            "cooldown_s": self.config.cooldown_s,
            "worker_alive": self.worker.alive,
            "started_at": self.started_at,
            "uptime_s": time.time() - self.started_at,
        }


class BearerAuth:
    """ASGI middleware: the token check and the JSON body bound, before anything else runs."""

    def __init__(self, app: Any, token: str, upload_prefix: str):
        self.app = app
        self.token = token
        self.upload_prefix = upload_prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] not in OPEN_PATHS:
            given = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(given) > 1:  # which one counts would be up to each proxy and server on the way: refuse
                response = JSONResponse({"detail": "send one Authorization header, not several"}, status_code=400)
                return await response(scope, receive, send)
            presented = bearer_token((given[0] if given else b"").decode("latin-1"))
            if not token_matches(presented, self.token):
                reason = "missing" if presented is None else "wrong"
                response = JSONResponse(
                    {"detail": f"{reason} bearer token: send `Authorization: Bearer <token>` with the token from the agent's --token-file"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        if scope["path"].startswith(self.upload_prefix) and scope["method"] == "PUT":
            return await self.app(scope, receive, send)  # the upload route bounds its own body
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_JSON_BODY):
            response = JSONResponse({"detail": f"request body over {MAX_JSON_BODY} bytes; JSON requests are small"}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def bounded_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_JSON_BODY:
                raise HTTPException(413, f"request body over {MAX_JSON_BODY} bytes; JSON requests are small")
            return message

        return await self.app(scope, bounded_receive, send)


def create_app(agent: Agent, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app for `agent`; its lifespan starts and stops the agent's worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        agent.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            agent.stop()

    prefix = f"/{API_VERSION}"
    app = FastAPI(
        title="lfm2-nas device agent",
        version=agent_version(),
        description="Measures compiled LFM2 artifacts on the device it runs on (see devices/agent/service.py).",
        openapi_url=f"{prefix}/openapi.json",
        docs_url=f"{prefix}/docs",
        redoc_url=None,
        lifespan=lifespan,
        dependencies=[Depends(_known_query_parameters_only)],
    )
    app.add_middleware(BearerAuth, token=agent.token, upload_prefix=f"{prefix}/artifacts/")
    bearer = HTTPBearer(auto_error=False, description="the token in the agent's --token-file")
    authed = [Depends(bearer)]  # documents the scheme; BearerAuth has already enforced it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette's Allow lists one route's methods; a path served by several routes has more
        allowed = sorted({m for r in app.router.routes if isinstance(r, APIRoute) and r.path_regex.match(request.url.path) for m in r.methods})
        return JSONResponse({"detail": f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input back, and a NaN or 1e999 in the body
        # (which Python's JSON parser accepts) cannot be encoded into the answer: a 500.
        # Where, what and why are enough, and always encodable.
        errors = [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))} for error in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(UserError)
    @app.exception_handler(EnvironmentFailure)  # StoreUnavailable: the disk, not the request
    async def user_error(request: Request, exc: UserError | EnvironmentFailure) -> JSONResponse:
        if isinstance(exc, UploadError):
            status = exc.status
        elif isinstance(exc, JobConflict):
            status = 409
        elif isinstance(exc, StoreUnavailable):
            status = 507
        else:
            status = 422
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.get(f"{prefix}/health", response_model=Health, tags=["agent"])
    def health() -> dict[str, Any]:
        """Open to all: for probes. Everything else needs the bearer token."""
        return {"status": "ok", "name": agent.config.name, "api_version": API_VERSION, "agent_version": agent_version()}

    @app.get(f"{prefix}/info", response_model=Info, dependencies=authed, responses=_errors(), tags=["agent"])
    def info() -> dict[str, Any]:
        return agent.info()

    @app.api_route(f"{prefix}/artifacts/{{sha256}}", methods=["GET", "HEAD"], response_model=ArtifactInfo, dependencies=authed, responses=_errors(404, 422), tags=["artifacts"])
    def get_artifact(sha256: Sha256) -> dict[str, Any]:
        """200 with what the artifact is if the agent has the bundle, else 404."""
        described = agent.artifacts.describe(sha256)
        if described is None:
            raise HTTPException(404, f"artifact {sha256} is not on this agent; upload it with PUT {prefix}/artifacts/{sha256}")
        return described

    @app.put(
        f"{prefix}/artifacts/{{sha256}}",
        status_code=201,
        response_model=ArtifactInfo,
        dependencies=authed,
        responses={200: {"model": ArtifactInfo, "description": "already present: nothing was stored"}, **_errors(413, 422, 507)},
        tags=["artifacts"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def put_artifact(sha256: Sha256, request: Request, response: Response) -> Any:
        """Upload a bundle (an uncompressed tar of the artifact folder) named by its sha256.
        The hash is checked, the tar unpacked safely and the manifest's sha256s verified
        before the artifact becomes visible. An artifact already present costs nothing."""
        store = agent.artifacts
        if store.has(sha256):
            response.status_code = 200
            return {**store.describe(sha256), "created": False}
        declared_text = request.headers.get("content-length")
        if declared_text is not None and not declared_text.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        declared = int(declared_text) if declared_text is not None else None
        try:
            store.check_room(declared)
        except UploadError:
            await _drain(request)
            raise
        try:
            upload = store.begin(declared)
        except UploadError:
            await _drain(request)
            raise
        try:
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                if len(buffer) >= UPLOAD_CHUNK:
                    data, buffer = bytes(buffer), bytearray()
                    await anyio.to_thread.run_sync(upload.write, data)
            if buffer:
                await anyio.to_thread.run_sync(upload.write, bytes(buffer))
        except UploadError:
            upload.discard()
            await _drain(request)
            raise
        except ClientDisconnect:
            upload.discard()
            log.info("upload of %s: the client went away; nothing kept", sha256[:12])
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        except BaseException:
            upload.discard()
            raise
        if upload.size == 0:
            upload.discard()
            raise HTTPException(400, "empty upload: send the bundle bytes as the request body")
        path, created = await anyio.to_thread.run_sync(store.commit, upload, sha256)
        response.status_code = 201 if created else 200
        if created:
            log.info("stored artifact %s (%d bytes)", sha256[:12], upload.size)
        return {**store.describe(sha256), "created": created}

    @app.post(
        f"{prefix}/jobs",
        status_code=201,
        response_model=JobView,
        dependencies=authed,
        responses={200: {"model": JobView, "description": "this job id was submitted before with the same body"}, **_errors(404, 409, 413, 422, 429, 507)},
        tags=["jobs"],
    )
    def submit_job(body: JobRequest, response: Response) -> dict[str, Any]:
        """Queue a measurement of an uploaded artifact. With a `job_id`, submitting again is
        safe: the same id and body return the same job (200), never a second measurement."""
        protocol = body.protocol.to_protocol()
        check_protocol_fits(protocol, agent.config.limits.timeout_s)
        if body.job_id is not None:
            existing = agent.jobs.get(body.job_id)
            if existing is not None:
                if existing.request_sha256 != request_sha256(body.artifact_sha256, protocol):
                    raise JobConflict(f"job id {body.job_id!r} is already used by a different request (another artifact or protocol); use a new job id")
                response.status_code = 200
                return existing.to_dict()
        if not agent.artifacts.has(body.artifact_sha256):
            raise HTTPException(404, f"artifact {body.artifact_sha256} is not on this agent; upload it first with PUT {prefix}/artifacts/{body.artifact_sha256}")
        job, created = agent.jobs.submit(body.job_id or uuid.uuid4().hex, body.artifact_sha256, protocol, max_queued=agent.config.max_queue, retry_after_s=QUEUE_FULL_RETRY_AFTER_S)
        agent.worker.wake()
        response.status_code = 201 if created else 200
        return job.to_dict()

    @app.get(f"{prefix}/jobs/{{job_id}}", response_model=JobView, dependencies=authed, responses=_errors(404, 422), tags=["jobs"])
    async def get_job(job_id: JobId, wait: WaitSeconds = 0.0) -> dict[str, Any]:
        """A job's state; with `wait`, answers as soon as it is done or after that many seconds."""
        deadline = time.monotonic() + wait
        while True:
            job = await anyio.to_thread.run_sync(agent.jobs.get, job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id!r} on this agent (it may have lost its workdir); submit it again")
            if job.state == "done" or time.monotonic() >= deadline:
                return job.to_dict()
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    @app.get(f"{prefix}/jobs", response_model=JobList, dependencies=authed, responses=_errors(422), tags=["jobs"])
    def list_jobs(state: StateFilter = None, limit: Limit = 100) -> dict[str, Any]:
        """Jobs in a state, oldest first (the queue order), or the latest jobs of any state."""
        return {"jobs": [job.to_dict() for job in agent.jobs.list(state, limit)]}

    return app


def protocol_budget_s(protocol: Protocol) -> float:
    """The timed seconds a protocol may ask for: every point (prompt lengths and decode
    depths) timed for up to `max_seconds_per_point`, once and then up to `max_remeasures`
    times again. (Runs stop at `max_runs` or once the time is used after `min_runs`.)"""
    points = len(set(protocol.prompt_lengths)) + len(set(protocol.decode_depths))
    return points * (1 + protocol.max_remeasures) * protocol.max_seconds_per_point


def check_protocol_fits(protocol: Protocol, job_timeout_s: float | None) -> None:
    """Refuse (422) a protocol that asks for more timed seconds than a job may take: it
    would hold the device until the timeout and then fail anyway."""
    if job_timeout_s is None:
        return
    budget = protocol_budget_s(protocol)
    if budget > job_timeout_s:
        points = len(set(protocol.prompt_lengths)) + len(set(protocol.decode_depths))
        raise UserError(
            f"the protocol asks for up to {budget:g} s of timed runs ({points} points x {1 + protocol.max_remeasures} attempts x "
            f"max_seconds_per_point {protocol.max_seconds_per_point:g} s), more than this agent's job timeout of {job_timeout_s:g} s; "
            "measure fewer lengths, lower max_seconds_per_point or max_remeasures, or start the agent with a larger --job-timeout"
        )


def _known_query_parameters_only(request: Request) -> None:
    """Refuse query parameters a route does not take: a typo such as `?wiat=5` would
    otherwise be ignored in silence (and the request mean something else than meant)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    known, dependants = set(), [route.dependant]
    while dependants:
        dependant = dependants.pop()
        known |= {param.alias for param in dependant.query_params}
        dependants += dependant.dependencies
    unknown = sorted(set(request.query_params.keys()) - known)
    if unknown:
        takes = f"it takes: {', '.join(sorted(known))}" if known else "it takes none"
        raise HTTPException(422, f"unknown query parameter(s) {unknown} for {request.method} {route.path}; {takes}")


async def _drain(request: Request) -> None:
    """Read and drop what is left of a refused body, up to a bound."""
    drained = 0
    try:
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > DRAIN_AFTER_REFUSAL:
                break
    except (ClientDisconnect, RuntimeError):
        pass


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; choose one in 1-65535, or 0 to pick a free one")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (0 picks a free one) or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _watch_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """Stop (gracefully: SIGTERM to ourselves) once the process that started us is gone, so
    that an agent started for one search does not outlive a search that was killed."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        log.warning("the process that started this agent (pid %d) has exited; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="agent-parent-watch", daemon=True).start()


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve(
    config: AgentConfig,
    token: str,
    host: str = "127.0.0.1",
    port: int = 7341,
    ready_file: str | Path | None = None,
    log_level: str = "info",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    announce: Callable[[str], None] = print,
    token_file: Path | None = None,
    exit_with_parent: bool = False,
) -> None:
    """Run the agent until SIGINT/SIGTERM. `port` 0 picks a free port; `ready_file`, if
    given, receives {"url", "port", "pid", "name"} as JSON once the agent is serving."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise UserError("give both --tls-cert and --tls-key, or neither")
    # the address first: a port that cannot be had leaves the workdir untouched
    sock = _bind(host, port)
    try:
        agent = Agent(config, token)
    except BaseException:
        sock.close()
        raise
    actual_port = sock.getsockname()[1]
    scheme = "https" if tls_cert else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{actual_port}"

    def on_ready() -> None:
        announce(f"agent {config.name!r} ({'emulated ' if config.emulate else ''}{config.profile.name}) serving {url}/{API_VERSION}/ from {config.workdir}")
        for note in config.notes:
            announce(f"  note: {note}")
        if token_file is not None:
            where = f"{scheme}://THIS-HOST:{actual_port}" if host in ("0.0.0.0", "::") else url  # a wildcard is no address to dial
            announce(f"  token file: {token_file}; register this agent on the search machine with a copy of it:")
            announce(f"    lfm2-nas devices add {config.name} --url {where} --token-file {config.name}.token")
        if not is_loopback(host) and tls_cert is None:
            announce("  warning: listening beyond loopback over plain HTTP: the token crosses the network in clear; prefer an SSH tunnel or --tls-cert/--tls-key")
        if ready_file is not None:
            target = Path(ready_file)
            temporary = target.with_name(target.name + ".tmp")
            temporary.write_text(json.dumps({"url": url, "port": actual_port, "pid": os.getpid(), "name": config.name}))
            os.replace(temporary, target)

    if exit_with_parent:
        _watch_parent(os.getppid())
    app = create_app(agent, on_ready=on_ready)
    server_config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,  # uvicorn's loggers propagate to ours, and so through the rate limit
        access_log=log_level == "debug",
        server_header=False,
        timeout_graceful_shutdown=3,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        **server_settings(),
    )
    rate_limit_logs()
    server = uvicorn.Server(server_config)
    server.run(sockets=[sock])


__all__ = ["Agent", "create_app", "serve", "ProtocolBody", "JobRequest", "is_loopback", "WorkdirLocked"]
