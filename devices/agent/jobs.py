"""The agent's durable job queue (SQLite) and its single measuring worker.

Every state change is one SQLite transaction (WAL, synchronous=FULL), so a job is
never lost or duplicated by a crash: a job the agent was RUNNING when it died is put
back in the queue at the next start, with an event saying so, and results stay.
A job that has been started `max_attempts` times without finishing (it keeps killing
the agent, or the agent keeps being killed) is finished with status `error` instead
of being tried forever. A job that the agent itself could not run because the host ran
out of a resource (file descriptors, memory, processes) is put back in the queue, with
a growing pause, up to `MAX_RESOURCE_ATTEMPTS` starts: that is the host's trouble, not
the candidate's, and must not become the candidate's result. The same goes for a device that
cannot be reached (`devices.adb.DeviceUnavailable`: a phone unplugged, unauthorised, offline,
or disconnected mid-run): the job is re-queued the same way, and if the device stays away it
ends with status `lost` and the reason, so that it is reported, never dropped.

Results say why a job failed in one short line, `<kind>: <message>`, of the agent's own
making (`public_error`): never an exception's text, a traceback or a server path, which
a hostile artifact could fill with the bytes of files it made the runtime read. The
details go to the agent's log.

Jobs run strictly one at a time in submission order (FIFO by a sequence number); the
worker is one thread that calls `devices.measure.measure`, which runs the measurement
in a child process under the agent's limits. The thread only waits on that child, so
the HTTP server stays responsive.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.adb.transport import DeviceUnavailable
from devices.artifact import ArtifactError
from devices.protocol import Limits, Measurement, Protocol
from lfm2.errors import EnvironmentFailure, UserError

log = logging.getLogger("lfm2_nas.agent")

STATES = ("queued", "running", "done")
MAX_ATTEMPTS = 3
#: Starts of a job that keeps meeting a host resource error before it is given up.
MAX_RESOURCE_ATTEMPTS = 5
#: The pause before a job re-queued for a resource error runs again: doubles each time.
RESOURCE_BACKOFF_S = (1.0, 60.0)
#: Errors that say "the host is out of something", not "this job is bad".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOSPC, errno.ENOBUFS})
MAX_ERROR_CHARS = 300

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    artifact_sha256 TEXT NOT NULL,
    protocol TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    events TEXT NOT NULL DEFAULT '[]',
    measurement TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
"""


class JobConflict(UserError):
    """A job id reused with a different request."""


class StoreUnavailable(EnvironmentFailure):
    """The job database cannot be written (disk full, read-only)."""


class QueueFull(UserError):
    """The queue holds as many jobs as the agent takes; answered with 429 and Retry-After."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def is_resource_error(exc: BaseException) -> bool:
    """The host ran out of something (fds, memory, processes): worth trying again later."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS)


def public_error(kind: str, message: str, hide: tuple[str, ...] = ()) -> str:
    """`<kind>: <message>` for a job result: the message's first line, without the
    strings in `hide` (server paths), cut to `MAX_ERROR_CHARS`."""
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else "no details"
    line = line.removesuffix("; its stderr ends with:").rstrip(":")
    for secret in sorted((h for h in hide if h), key=len, reverse=True):
        line = line.replace(secret + "/", "").replace(secret, "the artifact")
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    return f"{kind}: {line}"


def failure_kind(measurement: Measurement) -> str:
    """The kind of a failed measurement that `devices.measure` returned."""
    if measurement.status == "timeout":
        return "cores_busy" if re.search(r"stayed locked", measurement.error or "") else "timeout"
    if measurement.status == "oom":
        return "oom"
    return "child_failed"


def request_sha256(artifact_sha256: str, protocol: Protocol) -> str:
    """What makes two submissions "the same job": the artifact and the normalised protocol."""
    text = json.dumps({"artifact_sha256": artifact_sha256, "protocol": protocol.to_dict()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Job:
    seq: int
    id: str
    artifact_sha256: str
    protocol: dict[str, Any]
    request_sha256: str
    state: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    events: list[dict[str, Any]] = field(default_factory=list)
    measurement: dict[str, Any] | None = None
    queue_position: int | None = None  # jobs ahead of this one (queued jobs only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "state": self.state,
            "artifact_sha256": self.artifact_sha256,
            "protocol": self.protocol,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "attempts": self.attempts,
            "events": self.events,
            "queue_position": self.queue_position,
            "status": self.measurement["status"] if self.measurement else None,
            "measurement": self.measurement,
        }


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a result acknowledged is a result kept
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreUnavailable(f"the agent cannot write its job database ({exc}); free space in its --workdir") from None

    @staticmethod
    def _job(row: sqlite3.Row, position: int | None = None) -> Job:
        return Job(
            seq=row["seq"],
            id=row["id"],
            artifact_sha256=row["artifact_sha256"],
            protocol=json.loads(row["protocol"]),
            request_sha256=row["request_sha256"],
            state=row["state"],
            submitted_at=row["submitted_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            attempts=row["attempts"],
            events=json.loads(row["events"]),
            measurement=json.loads(row["measurement"]) if row["measurement"] else None,
            queue_position=position,
        )

    def _position(self, db: sqlite3.Connection, row: sqlite3.Row) -> int | None:
        if row["state"] != "queued":
            return None
        return db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row["seq"],)).fetchone()[0]

    def submit(self, job_id: str, artifact_sha256: str, protocol: Protocol, max_queued: int | None = None, retry_after_s: int = 30) -> tuple[Job, bool]:
        """Queue a job; returns (job, created). The same id with the same request returns
        the existing job (created False); with a different request raises `JobConflict`.
        A new job when `max_queued` jobs are already waiting raises `QueueFull`."""
        digest = request_sha256(artifact_sha256, protocol)
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                if row["request_sha256"] != digest:
                    raise JobConflict(
                        f"job id {job_id!r} is already used by a different request (another artifact or protocol); use a new job id"
                    )
                return self._job(row, self._position(db, row)), False
            if max_queued is not None:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    raise QueueFull(f"the agent's queue is full ({queued} jobs waiting, its limit); submit again after {retry_after_s} s", retry_after_s)
            now = time.time()
            events = json.dumps([{"at": now, "event": "submitted"}])
            db.execute(
                "INSERT INTO jobs (id, artifact_sha256, protocol, request_sha256, state, submitted_at, events) VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, artifact_sha256, json.dumps(protocol.to_dict(), sort_keys=True), digest, now, events),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row, self._position(db, row)), True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row, self._position(self._db, row)) if row is not None else None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT ?", (state, limit)).fetchall()
            return [self._job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({state: n for state, n in rows})
        return counts

    def claim_next(self) -> Job | None:
        """The oldest queued job, now marked running (one more attempt)."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            events = json.loads(row["events"]) + [{"at": now, "event": "started", "attempt": row["attempts"] + 1}]
            db.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, events = ? WHERE seq = ?",
                (now, json.dumps(events), row["seq"]),
            )
            return self._job(db.execute("SELECT * FROM jobs WHERE seq = ?", (row["seq"],)).fetchone())

    def requeue(self, job_id: str, reason: str) -> None:
        """Put a job the worker could not run back in the queue, at its place (its attempts stay counted)."""
        with self._transaction() as db:
            row = db.execute("SELECT events FROM jobs WHERE id = ?", (job_id,)).fetchone()
            events = json.loads(row["events"]) + [{"at": time.time(), "event": "requeued", "reason": reason}]
            db.execute("UPDATE jobs SET state = 'queued', events = ? WHERE id = ?", (json.dumps(events), job_id))

    def finish(self, job_id: str, measurement: Measurement) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT events FROM jobs WHERE id = ?", (job_id,)).fetchone()
            now = time.time()
            events = json.loads(row["events"]) + [{"at": now, "event": "done", "status": measurement.status}]
            db.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, measurement = ?, events = ? WHERE id = ?",
                (now, measurement.to_json(), json.dumps(events), job_id),
            )

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> builtins.list[str]:  # `list` here is JobStore.list
        """After a restart: jobs left RUNNING go back to the queue (or, after `max_attempts`
        starts, are finished as `error`). Returns the ids put back in the queue."""
        requeued = []
        with self._transaction() as db:
            now = time.time()
            for row in db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq").fetchall():
                events = json.loads(row["events"])
                if row["attempts"] >= max_attempts:
                    reason = f"the agent stopped during this job {row['attempts']} times (killed, crashed or restarted); not tried again"
                    measurement = Measurement.failure("error", public_error("abandoned", reason), artifact_sha256=row["artifact_sha256"], protocol=json.loads(row["protocol"]))
                    events.append({"at": now, "event": "abandoned", "reason": reason})
                    db.execute(
                        "UPDATE jobs SET state = 'done', finished_at = ?, measurement = ?, events = ? WHERE seq = ?",
                        (now, measurement.to_json(), json.dumps(events), row["seq"]),
                    )
                else:
                    events.append({"at": now, "event": "requeued", "reason": "the agent restarted while this job was running"})
                    db.execute("UPDATE jobs SET state = 'queued', events = ? WHERE seq = ?", (json.dumps(events), row["seq"]))
                    requeued.append(row["id"])
        return requeued


MeasureFn = Callable[..., Measurement]


def _default_measure(*args: Any, **kwargs: Any) -> Measurement:
    from devices.measure import measure  # imported late: it pulls in the runtimes

    return measure(*args, **kwargs)


class Worker:
    """One thread that measures queued jobs, one at a time, oldest first."""

    def __init__(
        self,
        jobs: JobStore,
        artifact_path: Callable[[str], Path | None],
        limits: Limits,
        device: dict[str, Any],
        cooldown_s: float = 0.0,
        measure: MeasureFn = _default_measure,
        scratch_dir: Path | None = None,
        hide: tuple[str, ...] = (),
    ):
        self.jobs = jobs
        self.scratch_dir = scratch_dir
        self.hide = tuple(hide)  # server paths a result must not show
        self._resource_failures = 0
        self.artifact_path = artifact_path
        self.limits = limits
        self.device = device
        self.cooldown_s = cooldown_s
        self._measure = measure
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None
        self.phase = "idle"  # idle | running | cooling
        self.completed = 0
        self._last_finished: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the loop to end; a measurement in flight is not waited for (its job stays
        RUNNING in the store and is re-queued at the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                waiting = self.jobs.counts()["queued"] > 0
                cooled = self._cool_down() if waiting else 0.0
                job = self.jobs.claim_next() if waiting and not self._stop.is_set() else None
            except (StoreUnavailable, sqlite3.Error, OSError, MemoryError) as exc:  # e.g. out of fds: wait, never die
                log.error("cannot claim a job: %s", exc)
                self._stop.wait(5.0)
                continue
            if job is None:
                self._wake.wait(1.0)
                continue
            self._run(job, cooled)

    def _cool_down(self) -> float:
        """Pause (before taking the next job, so a job is never RUNNING while we wait) until
        `cooldown_s` have passed since the last measurement: the next one starts on cool
        cores. Returns the seconds paused."""
        if self.cooldown_s <= 0 or self._last_finished is None:
            return 0.0
        remaining = self.cooldown_s - (time.monotonic() - self._last_finished)
        if remaining <= 0:
            return 0.0
        self.phase = "cooling"
        self._stop.wait(remaining)
        self.phase = "idle"
        return remaining

    def _run(self, job: Job, cooled_s: float) -> None:
        self.current_job, self.phase = job.id, "running"
        log.info("job %s: measuring artifact %s (attempt %d)", job.id, job.artifact_sha256[:12], job.attempts)
        hide = (*self.hide, str(self.artifact_path(job.artifact_sha256) or ""))
        try:
            measurement = self._measure_job(job)
            if measurement.status != "ok":
                log.info("job %s: %s; the full report: %s", job.id, measurement.status, (measurement.error or "")[-4000:])
                kind = failure_kind(measurement)
                measurement.error = public_error(kind, measurement.error or "", hide)
                if kind == "child_failed":
                    measurement.error += "; the agent's log has the details"
        except DeviceUnavailable as exc:  # the phone is away (unplugged, unauthorised, offline): not the candidate's result
            if not self._stop.is_set() and job.attempts < MAX_RESOURCE_ATTEMPTS:
                self._requeue_for_device(job, exc)
                return
            log.warning("job %s: the device stayed unavailable for %d attempts: %s", job.id, job.attempts, exc)
            measurement = Measurement.failure("lost", public_error("device_unavailable", f"tried {job.attempts} times: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'the device is unavailable'}; submit the job again once the device is back", hide))
        except UserError as exc:  # a request measure() refuses (e.g. the protocol needs a longer context)
            kind = "artifact_invalid" if isinstance(exc, ArtifactError) else "refused"
            measurement = Measurement.failure("error", public_error(kind, str(exc), hide))
        except BaseException as exc:  # never let one job take the worker down
            if is_resource_error(exc) and not self._stop.is_set() and job.attempts < MAX_RESOURCE_ATTEMPTS:
                self._requeue_for_resources(job, exc)
                return
            log.exception("job %s: the agent failed to run the measurement", job.id)
            kind = "resource_exhausted" if is_resource_error(exc) else "agent_error"
            measurement = Measurement.failure("error", public_error(kind, f"the agent could not run the measurement ({type(exc).__name__}); its log has the details"))
        self._resource_failures = 0
        if self._stop.is_set():
            # the agent is stopping and has killed the child: that is no result of the
            # candidate's; the job stays RUNNING and is re-queued at the next start
            log.info("job %s: interrupted by the agent stopping; it will run again at the next start", job.id)
            self.current_job, self.phase = None, "idle"
            return
        measurement.device = {**measurement.device, **self.device}
        measurement.thermal = {**measurement.thermal, "cooldown_before_s": round(cooled_s, 3)}
        if not measurement.artifact_sha256:
            measurement.artifact_sha256 = job.artifact_sha256
        if not measurement.protocol:
            measurement.protocol = job.protocol
        try:
            self.jobs.finish(job.id, measurement)
        except StoreUnavailable as exc:
            log.error("job %s: measured, but the result cannot be stored (%s); it will run again after a restart", job.id, exc)
        log.info("job %s: %s", job.id, measurement.status)
        self.completed += 1
        self._last_finished = time.monotonic()
        self.current_job, self.phase = None, "idle"

    def _requeue_for_resources(self, job: Job, exc: BaseException) -> None:
        """The host ran out of something while starting this job: back to the queue, and a
        pause (doubling, bounded) before the worker takes a job again."""
        pause = self._next_pause()
        self._requeue_and_pause(job, f"the host ran out of a resource ({errno.errorcode.get(getattr(exc, 'errno', None) or 0, type(exc).__name__)}); tried again in {pause:g} s", pause)

    def _requeue_for_device(self, job: Job, exc: BaseException) -> None:
        """The device could not be reached: back to the queue with a growing pause, like a
        resource error; after MAX_RESOURCE_ATTEMPTS starts the job ends `lost` with the reason."""
        pause = self._next_pause()
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "the device is unavailable"
        self._requeue_and_pause(job, public_error(getattr(exc, "kind", "device_unavailable"), f"tried again in {pause:g} s: {first_line}"), pause)

    def _next_pause(self) -> float:
        """One more failure in a row: the pause before the next job, doubling up to the bound."""
        self._resource_failures += 1
        return min(RESOURCE_BACKOFF_S[0] * 2 ** (self._resource_failures - 1), RESOURCE_BACKOFF_S[1])

    def _requeue_and_pause(self, job: Job, reason: str, pause: float) -> None:
        log.warning("job %s: %s", job.id, reason)
        try:
            self.jobs.requeue(job.id, reason)
        except StoreUnavailable as store_error:
            log.error("job %s: cannot re-queue it (%s); it will run again after a restart", job.id, store_error)
        self.current_job, self.phase = None, "idle"
        self._stop.wait(pause)

    def _measure_job(self, job: Job) -> Measurement:
        path = self.artifact_path(job.artifact_sha256)
        if path is None:
            return Measurement.failure("error", public_error("artifact_missing", f"artifact {job.artifact_sha256} is no longer on the agent; upload it again and submit a new job"))
        protocol = Protocol.from_dict(job.protocol)
        extra: dict[str, Any] = {}
        if protocol.anchor_sha256 is not None:
            anchor = self.artifact_path(protocol.anchor_sha256)
            if anchor is None:
                return Measurement.failure("error", public_error("artifact_missing", f"the anchor artifact {protocol.anchor_sha256} is no longer on the agent; upload it again and submit a new job"))
            extra["anchor"] = anchor
        if self.scratch_dir is not None:
            extra["scratch_dir"] = self.scratch_dir
        return self._measure(path, protocol, limits=self.limits, device=dict(self.device), **extra)


__all__ = ["JobStore", "Job", "Worker", "JobConflict", "StoreUnavailable", "QueueFull", "request_sha256", "public_error", "is_resource_error", "STATES", "MAX_ATTEMPTS", "MAX_RESOURCE_ATTEMPTS"]
