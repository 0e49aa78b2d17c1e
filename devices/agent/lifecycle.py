"""The agent's life: one per workdir (a file lock), its stores and its measuring worker,
started and stopped with the HTTP server (the app's lifespan), and the measurement
processes a killed agent left behind, found by the workdir in their environment."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from devices.agent.config import API_VERSION, AgentConfig, agent_version
from devices.agent.jobs import JobStore, Worker
from devices.agent.store import ArtifactStore
from lfm2.errors import EnvironmentFailure

log = logging.getLogger("lfm2_nas.agent")


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


#: How long the agent waits for killed measurements to be gone. SIGKILL is delivered at
#: once, but a child with a model loaded takes a while to give its memory back (its exit
#: unmaps every page); until then it still holds a core and memory the re-run needs.
KILL_WAIT_S = 10.0


def _wait_until_gone(processes: list[psutil.Process], timeout_s: float) -> None:
    """Wait until every process has exited (a zombie has: it holds nothing but its pid;
    an orphan's zombie is reaped by whoever adopted it, not by us)."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        while time.monotonic() < deadline:
            try:
                if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.05)
        else:
            log.warning("measurement process %d was killed but is still exiting after %.0f s", process.pid, timeout_s)
            return


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
        found = measurement_children(self.config.workdir)
        for process in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the child leads its own session
            with contextlib.suppress(psutil.Error):
                process.kill()
        _wait_until_gone(found, KILL_WAIT_S)
        return len(found)

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


__all__ = ["Agent", "WORKDIR_ENV", "WorkdirLocked", "measurement_children"]
