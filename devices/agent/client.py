"""`AgentClient`: talk to a device agent over HTTP (httpx).

Safe to retry by construction: uploads are content-addressed (asked for with HEAD, then
PUT; a repeated PUT is a no-op on the agent) and every submission carries a job id
(made here if the caller gives none), so resending a POST after a lost answer returns
the same job instead of starting a second measurement. Connection errors and 502/503/504
(and 429, after its Retry-After) are retried with exponential backoff within `retry_for_s`; `wait` keeps polling through
an unreachable agent until its own timeout, so a network cut or an agent restart in the
middle of a job does not lose the result.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from devices.agent.bundle import pack_bundle
from devices.artifact import MANIFEST, Artifact
from devices.protocol import Measurement, Protocol
from lfm2.sizes import format_size
from lfm2.errors import EnvironmentFailure, UserError

API = "/v1"
_RETRY_STATUSES = (502, 503, 504)


class AgentError(EnvironmentFailure):
    """Talking to an agent failed (network, agent, job); the message says what to do."""


class AgentUnreachable(AgentError):
    pass


class AgentAuthError(UserError, AgentError):
    """The agent refused the token: a configuration the user fixes (exit 2, not 4)."""


class AgentRejected(AgentError):
    """The agent refused a request (4xx/5xx); `status` and `detail` say why."""

    def __init__(self, message: str, status: int, detail: Any = None):
        super().__init__(message)
        self.status = status
        self.detail = detail


class JobTimeout(AgentError):
    pass


class JobLost(AgentError):
    """The agent no longer knows the job (its workdir was wiped)."""


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds a 429 asks to wait (Retry-After in seconds), bounded; None if it says none."""
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.5), 300.0)
    except ValueError:
        return None


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text[:500]


#: bundle sha256 memo: (artifact folder, manifest mtime_ns, manifest size) -> (sha256, bytes)
_BUNDLE_SHA: dict[tuple[str, int, int], tuple[str, int]] = {}
_BUNDLE_LOCK = threading.Lock()


def bundle_sha256(artifact: Artifact | str | Path) -> tuple[str, int]:
    """The sha256 and size of an artifact's bundle (packed once per process and remembered)."""
    path = Path(artifact.path if isinstance(artifact, Artifact) else artifact).resolve()
    stat = (path / MANIFEST).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _BUNDLE_LOCK:
        if key in _BUNDLE_SHA:
            return _BUNDLE_SHA[key]
    with open(os.devnull, "wb") as sink:
        result = pack_bundle(path, sink)
    with _BUNDLE_LOCK:
        _BUNDLE_SHA[key] = result
    return result


class AgentClient:
    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 30.0,
        retry_for_s: float = 60.0,
        verify: bool | str = True,
        name: str | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise AgentError(f"agent URL {url!r} must start with http:// or https://, e.g. http://127.0.0.1:7341")
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self._token = token
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "lfm2-nas-agent-client"},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            verify=verify,
        )

    def __repr__(self) -> str:
        return f"AgentClient({self.url!r})"  # never the token

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, retry_for_s: float | None = None, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> httpx.Response:
        """One request, retried on connection errors and 502/503/504 within `retry_for_s`.
        Statuses in `ok` return; 401 raises `AgentAuthError`; others `AgentRejected`."""
        budget = self.retry_for_s if retry_for_s is None else retry_for_s
        deadline = time.monotonic() + budget
        delay = 0.2
        while True:
            try:
                response = self._http.request(method, API + path, **kwargs)
            except httpx.TransportError as exc:
                if time.monotonic() + delay > deadline:
                    raise AgentUnreachable(
                        f"agent {self.name} at {self.url} is unreachable ({type(exc).__name__}: {exc}) after retrying for {budget:.0f} s; "
                        "check that it is running (`lfm2-nas agent serve`) and reachable, or `lfm2-nas devices list`"
                    ) from None
            else:
                if response.status_code in ok:
                    return response
                if response.status_code == 401:
                    raise AgentAuthError(f"agent {self.name} at {self.url} refused the token; use the token file the agent wrote (its --token-file)")
                wait = _retry_after(response) if response.status_code == 429 else None
                retryable = response.status_code in _RETRY_STATUSES or wait is not None
                if not retryable or time.monotonic() + (wait or delay) > deadline:
                    detail = _detail(response)
                    raise AgentRejected(f"agent {self.name}: {method} {path} -> {response.status_code}: {detail}", response.status_code, detail)
                if wait is not None:  # a 429 (the queue is full) that says when: come back then
                    time.sleep(wait)
                    continue
            if "content" in kwargs and hasattr(kwargs["content"], "seek"):
                kwargs["content"].seek(0)  # a streamed file body starts over on a retry
            time.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, 5.0)

    # -- the API ----------------------------------------------------------------------------

    def health(self, retry_for_s: float | None = None) -> dict[str, Any]:
        return self._request("GET", "/health", retry_for_s=retry_for_s).json()

    def info(self, retry_for_s: float | None = None) -> dict[str, Any]:
        return self._request("GET", "/info", retry_for_s=retry_for_s).json()

    def has_artifact(self, sha256: str) -> bool:
        return self._request("HEAD", f"/artifacts/{sha256}", ok=(200, 404)).status_code == 200

    def upload(self, artifact: Artifact | str | Path) -> str:
        """Make sure the agent has the artifact; returns its bundle sha256. Sends nothing
        if the agent has it already."""
        path = Path(artifact.path if isinstance(artifact, Artifact) else artifact)
        sha, size = bundle_sha256(path)
        if self.has_artifact(sha):
            return sha
        limit = self.info().get("max_upload_bytes")
        if limit is not None and size > limit:
            raise AgentRejected(
                f"artifact {path} packs to {format_size(size)}, over agent {self.name}'s upload limit of {format_size(limit)}; restart the agent with a larger --max-upload",
                413,
            )
        with tempfile.TemporaryFile(prefix="lfm2-nas-bundle-") as bundle:
            packed_sha, packed_size = pack_bundle(path, bundle)
            if packed_sha != sha:
                raise AgentError(f"artifact {path} changed while it was being sent; send it again")
            bundle.seek(0)
            self._request(
                "PUT",
                f"/artifacts/{sha}",
                content=bundle,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(packed_size)},
                timeout=httpx.Timeout(max(self.timeout_s, 300.0), connect=5.0),
            )
        return sha

    def submit(self, artifact_sha256: str, protocol: Protocol | dict[str, Any], job_id: str | None = None) -> str:
        """Queue a measurement; returns the job id. Resubmitting the same id and request is
        a no-op (the agent answers with the existing job)."""
        job_id = job_id or uuid.uuid4().hex
        protocol_dict = protocol.to_dict() if isinstance(protocol, Protocol) else dict(protocol)
        self._request("POST", "/jobs", json={"artifact_sha256": artifact_sha256, "protocol": protocol_dict, "job_id": job_id})
        return job_id

    def job(self, job_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        params = {"wait": wait_s} if wait_s > 0 else None
        response = self._request(
            "GET", f"/jobs/{job_id}", params=params, ok=(200, 404), timeout=httpx.Timeout(self.timeout_s + wait_s, connect=5.0)
        )
        if response.status_code == 404:
            raise JobLost(f"agent {self.name} does not know job {job_id!r} (it lost its workdir or never got it); submit it again")
        return response.json()

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._request("GET", "/jobs", params=params).json()["jobs"]

    def wait(self, job_id: str, timeout: float | None = None, on_state: Callable[[dict[str, Any]], None] | None = None) -> Measurement:
        """Poll until the job is done and return its Measurement. The agent being unreachable
        (a network cut, a restart) is waited out, within `timeout` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.2
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise JobTimeout(f"job {job_id!r} on agent {self.name} was not done within {timeout:.0f} s; it is still queued or running there")
            long_poll = 20.0 if remaining is None else max(0.0, min(20.0, remaining))
            try:
                job = self.job(job_id, wait_s=long_poll)
            except AgentUnreachable:
                job = None  # keep waiting: the job is safe on the agent's disk
            if job is not None:
                if on_state is not None:
                    on_state(job)
                if job["state"] == "done":
                    return Measurement.from_dict(job["measurement"])
                delay = 0.2
                continue
            time.sleep(min(delay, remaining) if remaining is not None else delay)
            delay = min(delay * 2, 5.0)

    def measure(self, artifact: Artifact | str | Path, protocol: Protocol, job_id: str | None = None, timeout: float | None = None, anchor: Artifact | str | Path | None = None) -> Measurement:
        """Upload (if needed), submit, wait: the Measurement of `artifact` on this agent.
        If the agent comes back without the job (a wiped workdir), it is sent again under
        the same id; the earlier run's result no longer exists, so nothing is measured twice.
        `anchor`: an artifact to time side by side with this one (uploaded too, and named in
        the protocol by its bundle's sha256)."""
        job_id = job_id or uuid.uuid4().hex
        for attempt in range(3):
            if anchor is not None:
                protocol = dataclasses.replace(protocol, anchor_sha256=self.upload(anchor))
            sha = self.upload(artifact)
            try:
                self.submit(sha, protocol, job_id)
            except AgentRejected as exc:
                if exc.status == 404 and attempt < 2:
                    continue  # the artifact vanished between upload and submit: upload again
                raise
            try:
                return self.wait(job_id, timeout)
            except JobLost:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


__all__ = ["AgentClient", "AgentError", "AgentUnreachable", "AgentAuthError", "AgentRejected", "JobTimeout", "JobLost", "bundle_sha256"]
