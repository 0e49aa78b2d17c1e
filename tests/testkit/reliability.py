"""Helpers for the reliability scenarios (issue 11): a TCP proxy on loopback that can cut
the network between a client and an agent, the agent's own jobs read back in queue order,
the exactly-once/FIFO check, RSS sampling, an environment that touches none of the user's
files, and whether a small tmpfs can be mounted here (the `small_disk_agent` fixture in
tests/conftest.py needs one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

from devices.agent import AgentClient


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of an agent. `cut()` closes the listening socket
    and every open connection (the driver sees resets, then refused connections: the
    agent is gone as far as it can tell); `restore()` listens again on the same port."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 30
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:  # the old socket may linger a moment
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.cuts += 1
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            open_sockets, self._sockets = self._sockets, set()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def jobs_in_queue_order(client: AgentClient) -> list[dict]:
    """Every job the agent knows, in submission (queue) order: the listing without a state
    filter is newest first by the agent's sequence number."""
    return list(reversed(client.jobs(limit=1000)))


def check_exactly_once_in_order(jobs: list[dict]) -> None:
    """Jobs (in queue order) ran one at a time, in that order, each started once and done once."""
    for job in jobs:
        events = [event["event"] for event in job["events"]]
        assert job["state"] == "done" and events.count("done") == 1 and events.count("started") == 1 == job["attempts"], job
    for before, after in zip(jobs, jobs[1:]):
        assert before["started_at"] <= after["started_at"], f"FIFO order broken: {before['job_id']} started after {after['job_id']}"
        assert before["finished_at"] <= after["started_at"], f"{before['job_id']} and {after['job_id']} overlapped"


class RssSampler:
    """Samples a process's RSS in a thread (psutil), for "memory stays bounded" checks."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append(self.process.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples)


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a CLI run that touches none of the user's files."""
    return dict(
        os.environ,
        LFM2_NAS_CACHE=str(tmp_path / "cache"),
        LFM2_NAS_CONFIG=str(tmp_path / "devices.toml"),
        LFM2_NAS_LOCKS=str(tmp_path / "locks"),
        XDG_DATA_HOME=str(tmp_path / "xdg-data"),
    )


def can_mount_tmpfs() -> bool:
    """Whether this host lets a test mount a tmpfs in a private user+mount namespace and
    enter it (unshare, nsenter): what `small_disk_agent` needs to make a small disk."""
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0
