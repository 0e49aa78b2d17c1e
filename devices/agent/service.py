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

This module is the routes and their error answers (`create_app`). The rest, one job each:
`wire` (the request and answer models), `lifecycle` (`Agent`: the workdir, stores, worker),
`middleware` (the token, the body bound), `server` (binding, announcing, uvicorn: `serve`).
Their names stay importable from here.
"""


from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from devices.agent.config import API_VERSION, agent_version
from devices.agent.jobs import JobConflict, QueueFull, StoreUnavailable, request_sha256
from devices.agent.lifecycle import WORKDIR_ENV, Agent, WorkdirLocked, measurement_children
from devices.agent.middleware import MAX_JSON_BODY, BearerAuth, JsonBodyLimit
from devices.agent.server import is_loopback, serve
from devices.agent.store import UploadError
from devices.agent.wire import (
    ArtifactInfo,
    Health,
    Info,
    JobId,
    JobList,
    JobRequest,
    JobView,
    Limit,
    ProtocolBody,
    Sha256,
    StateFilter,
    WaitSeconds,
    check_protocol_fits,
    error_responses,
    protocol_budget_s,
)
from lfm2.errors import EnvironmentFailure, UserError

log = logging.getLogger("lfm2_nas.agent")

OPEN_PATHS = frozenset({f"/{API_VERSION}/health"})
UPLOAD_CHUNK = 1 << 20
#: What a client is told to wait when the queue is full (429): about one short job.
QUEUE_FULL_RETRY_AFTER_S = 30
#: After refusing an upload, read (and drop) up to this much more of it, so the client
#: sees the refusal instead of a connection reset halfway through its send.
DRAIN_AFTER_REFUSAL = 32 << 20


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
    # added last, runs first: the token check before the body bound, before any routing
    app.add_middleware(JsonBodyLimit, upload_prefix=f"{prefix}/artifacts/")
    app.add_middleware(BearerAuth, token=agent.token, open_paths=OPEN_PATHS)
    bearer = HTTPBearer(auto_error=False, description="the token in the agent's --token-file")
    authed = [Depends(bearer)]  # documents the scheme; BearerAuth has already enforced it

    _install_error_answers(app)
    _agent_routes(app, agent, prefix, authed)
    _artifact_routes(app, agent, prefix, authed)
    _job_routes(app, agent, prefix, authed)
    return app


def _install_error_answers(app: FastAPI) -> None:
    """Each refusal as JSON with the status that says whose fault it is (the request: 4xx;
    the agent's disk: 507), and never an echo of a bad input that could not be encoded."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette's Allow lists one route's methods; a path served by several routes has more
        allowed = sorted({m for r in app.router.routes if isinstance(r, APIRoute) and r.path_regex.match(request.url.path) for m in r.methods or ()})
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


def _agent_routes(app: FastAPI, agent: Agent, prefix: str, authed: list) -> None:
    @app.get(f"{prefix}/health", response_model=Health, tags=["agent"])
    def health() -> dict[str, Any]:
        """Open to all: for probes. Everything else needs the bearer token."""
        return {"status": "ok", "name": agent.config.name, "api_version": API_VERSION, "agent_version": agent_version()}

    @app.get(f"{prefix}/info", response_model=Info, dependencies=authed, responses=error_responses(), tags=["agent"])
    def info() -> dict[str, Any]:
        return agent.info()


def _artifact_routes(app: FastAPI, agent: Agent, prefix: str, authed: list) -> None:
    @app.api_route(f"{prefix}/artifacts/{{sha256}}", methods=["GET", "HEAD"], response_model=ArtifactInfo, dependencies=authed, responses=error_responses(404, 422), tags=["artifacts"])
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
        responses={200: {"model": ArtifactInfo, "description": "already present: nothing was stored"}, **error_responses(413, 422, 507)},
        tags=["artifacts"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def put_artifact(sha256: Sha256, request: Request, response: Response) -> Any:
        """Upload a bundle (an uncompressed tar of the artifact folder) named by its sha256.
        The hash is checked, the tar unpacked safely and the manifest's sha256s verified
        before the artifact becomes visible. An artifact already present costs nothing."""
        store = agent.artifacts
        present = store.describe(sha256)
        if present is not None:
            response.status_code = 200
            return {**present, "created": False}
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
        stored = store.describe(sha256)
        if stored is None:  # removed between the commit and now (the cache's eviction)
            raise HTTPException(503, f"artifact {sha256[:12]} was stored but is gone again (evicted); upload it again")
        return {**stored, "created": created}


def _job_routes(app: FastAPI, agent: Agent, prefix: str, authed: list) -> None:
    @app.post(
        f"{prefix}/jobs",
        status_code=201,
        response_model=JobView,
        dependencies=authed,
        responses={200: {"model": JobView, "description": "this job id was submitted before with the same body"}, **error_responses(404, 409, 413, 422, 429, 507)},
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

    @app.get(f"{prefix}/jobs/{{job_id}}", response_model=JobView, dependencies=authed, responses=error_responses(404, 422), tags=["jobs"])
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

    @app.get(f"{prefix}/jobs", response_model=JobList, dependencies=authed, responses=error_responses(422), tags=["jobs"])
    def list_jobs(state: StateFilter = None, limit: Limit = 100) -> dict[str, Any]:
        """Jobs in a state, oldest first (the queue order), or the latest jobs of any state."""
        return {"jobs": [job.to_dict() for job in agent.jobs.list(state, limit)]}


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


__all__ = [
    "Agent", "create_app", "serve", "ProtocolBody", "JobRequest", "is_loopback", "WorkdirLocked",
    "MAX_JSON_BODY", "WORKDIR_ENV", "check_protocol_fits", "measurement_children", "protocol_budget_s",
]
