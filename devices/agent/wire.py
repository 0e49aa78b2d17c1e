"""What crosses the agent's HTTP API (version 1), as pydantic models: the request bodies a
client sends (`JobRequest` with its `ProtocolBody`, bounded field by field: no NaN, no text
where a number goes), the answers it gets (`Info`, `JobView`, `ArtifactInfo`, ...), the
path and query parameters, and the one rule that refuses a protocol longer than the agent's
job timeout. The routes are `devices.agent.service`; the client is `devices.agent.client`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from fastapi import Path as PathParam
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from devices.protocol import Protocol
from lfm2.errors import UserError

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


# Each bounded field below is `Annotated[int | float, Field(bounds), _JSON_NUMBER]`, written out
# (a type checker reads only static annotations): the bounds first, as after a validator they
# would reach the JSON schema as "ge", not "minimum".
_JSON_NUMBER = BeforeValidator(_number_not_text_or_bool)
_Length = Annotated[int, Field(ge=1, le=1 << 20), _JSON_NUMBER]
_Runs = Annotated[int, Field(ge=1, le=10_000), _JSON_NUMBER]
_WarmupRuns = Annotated[int, Field(ge=0, le=1000), _JSON_NUMBER]
_Percent = Annotated[float, Field(allow_inf_nan=False, ge=0, le=100), _JSON_NUMBER]


class ProtocolBody(BaseModel):
    """`devices.protocol.Protocol` as JSON; every field optional (Protocol's defaults)."""

    model_config = ConfigDict(extra="forbid")

    prompt_lengths: list[_Length] = Field(default=list(_DEFAULT.prompt_lengths), min_length=1, max_length=64)
    decode_depths: list[_Length] = Field(default=list(_DEFAULT.decode_depths), min_length=1, max_length=64)
    decode_tokens: Annotated[int, Field(ge=1, le=1 << 16), _JSON_NUMBER] = _DEFAULT.decode_tokens
    warmup_runs: _WarmupRuns = _DEFAULT.warmup_runs
    max_warmup_runs: _WarmupRuns = _DEFAULT.max_warmup_runs
    min_runs: _Runs = _DEFAULT.min_runs
    max_runs: _Runs = _DEFAULT.max_runs
    max_seconds_per_point: Annotated[float, Field(allow_inf_nan=False, gt=0, le=86_400), _JSON_NUMBER] = _DEFAULT.max_seconds_per_point
    trim_fraction: Annotated[float, Field(allow_inf_nan=False, ge=0, lt=0.5), _JSON_NUMBER] = _DEFAULT.trim_fraction
    ci_target: _Percent = _DEFAULT.ci_target
    disturbance_threshold: _Percent = _DEFAULT.disturbance_threshold
    cv_threshold: _Percent = _DEFAULT.cv_threshold
    max_remeasures: Annotated[int, Field(ge=0, le=100), _JSON_NUMBER] = _DEFAULT.max_remeasures
    measure_memory: StrictBool = _DEFAULT.measure_memory
    threads: Annotated[int, Field(ge=1, le=1024), _JSON_NUMBER] | None = _DEFAULT.threads
    cpus: list[Annotated[int, Field(ge=0, le=4095), _JSON_NUMBER]] | None = Field(default=None, min_length=1, max_length=4096)
    anchor_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN, description="an uploaded artifact timed side by side with this one (same backend and precision)")
    processes: Annotated[int, Field(ge=1, le=16, description="fresh processes a point may use (devices.processes)"), _JSON_NUMBER] = _DEFAULT.processes
    loads: Annotated[int, Field(ge=1, le=16, description="loads of the model inside each process, every point timed after each (devices.processes)"), _JSON_NUMBER] = _DEFAULT.loads
    huge_pages: StrictBool = _DEFAULT.huge_pages

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


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in (400, 401, *codes)}


def protocol_budget_s(protocol: Protocol) -> float:
    """The timed seconds a protocol may ask for: every point (prompt lengths and decode
    depths) timed for up to `max_seconds_per_point`, once and then up to `max_remeasures`
    times again, in each of up to `processes` fresh processes. (Runs stop at `max_runs` or once
    the time is used after `min_runs`.)"""
    points = len(set(protocol.prompt_lengths)) + len(set(protocol.decode_depths))
    return points * (1 + protocol.max_remeasures) * protocol.max_seconds_per_point * protocol.processes


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
            f"max_seconds_per_point {protocol.max_seconds_per_point:g} s x {protocol.processes} process(es)), more than this agent's job timeout of {job_timeout_s:g} s; "
            "measure fewer lengths, lower max_seconds_per_point, max_remeasures or processes, or start the agent with a larger --job-timeout"
        )


__all__ = [
    "ArtifactInfo", "ErrorBody", "Health", "Info", "JobList", "JobRequest", "JobView", "ProtocolBody",
    "JOB_ID_PATTERN", "SHA256_PATTERN", "JobId", "Limit", "Sha256", "StateFilter", "WaitSeconds",
    "check_protocol_fits", "error_responses", "protocol_budget_s",
]
