"""`start_local_agent`: an agent for this machine, as a child process, for one search.

The search uses it for `--device local` and `--emulate`: a free loopback port, a fresh
token, a workdir (a temporary one unless given), and `stop()` at the end. The agent
watches its parent and stops by itself if the search is killed without calling `stop()`. The agent is
a separate process (`python -m devices.agent serve ...`), exactly what a user would run
on a board, so the search talks to a local device the same way as to a remote one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.agent.client import AgentClient
from lfm2.errors import EnvironmentFailure

START_TIMEOUT_S = 60.0


class AgentStartError(EnvironmentFailure):
    pass


@dataclass
class LocalAgent:
    """A running local agent: `url`, `token`, `client()`, and `stop()` (also a context manager)."""

    name: str
    url: str
    token: str
    workdir: Path
    process: subprocess.Popen
    log_path: Path
    _temporary: bool = False
    _clients: list[AgentClient] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> AgentClient:
        client = AgentClient(self.url, self.token, name=self.name, **kwargs)
        self._clients.append(client)
        return client

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; removes a temporary workdir."""
        for client in self._clients:
            client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalAgent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def agent_command(name: str, workdir: Path, token_file: Path, ready_file: Path, port: int = 0, **options: Any) -> list[str]:
    """The command line of `python -m devices.agent serve` for these options (None: left out)."""
    command = [sys.executable, "-m", "devices.agent", "serve", "--name", name, "--host", "127.0.0.1", "--port", str(port), "--exit-with-parent"]
    command += ["--workdir", str(workdir), "--token-file", str(token_file), "--ready-file", str(ready_file)]
    for flag, value in options.items():
        if value is None or value is False:
            continue
        option = "--" + flag.replace("_", "-")
        if value is True:
            command.append(option)
        elif isinstance(value, (list, tuple)):
            command += [option, ",".join(str(v) for v in value)]
        elif flag in ("memory_limit", "max_upload") and isinstance(value, int):
            command += [option, f"{value}B"]  # the flags require a unit; an int here is bytes
        else:
            command += [option, str(value)]
    return command


def start_local_agent(
    name: str = "local",
    profile: str = "local",
    cpus: str | tuple[int, ...] | None = None,
    threads: int | None = None,
    memory_limit: str | int | None = None,
    emulate: bool = False,
    workdir: str | Path | None = None,
    cooldown_s: float | None = None,
    job_timeout_s: float | None = None,
    max_upload: str | int | None = None,
    profiles_file: str | Path | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
    port: int = 0,
    token: str | None = None,
    max_queue: int | None = None,
) -> LocalAgent:
    """Start an agent for this machine on a free loopback port with a fresh token.

    `port` and `token` (default: a free port, a new token) let a caller bring an agent
    back at the same address with the same credentials, e.g. after it was killed."""
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix=f"lfm2-nas-agent-{name}-")) if workdir is None else Path(workdir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    token_file = root / "token"
    token_file.unlink(missing_ok=True)  # written anew: a fresh token unless one is given
    token = token or secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    ready_file = root / "ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = root / "agent.log"
    command = agent_command(
        name, root, token_file, ready_file, port,
        profile=profile, cpus=cpus, threads=threads, memory_limit=memory_limit, emulate=emulate,
        cooldown=cooldown_s, job_timeout=job_timeout_s, max_upload=max_upload, profiles_file=profiles_file,
        max_queue=max_queue,
    )  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log_path, "ab") as log:
        log.write(f"--- starting agent {name!r} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    agent = LocalAgent(name=name, url="", token=token, workdir=root, process=process, log_path=log_path, _temporary=temporary)
    deadline = time.monotonic() + start_timeout_s
    while True:
        if process.poll() is not None:
            tail = agent.log_tail()
            agent.stop()
            raise AgentStartError(f"the local agent {name!r} exited with status {process.returncode} at start:\n{tail}")
        if ready_file.exists():
            try:
                agent.url = json.loads(ready_file.read_text())["url"]
                break
            except (ValueError, KeyError):
                pass  # written atomically, so only a foreign file lands here: keep waiting
        if time.monotonic() > deadline:
            tail = agent.log_tail()
            agent.stop()
            raise AgentStartError(f"the local agent {name!r} did not start within {start_timeout_s:.0f} s:\n{tail}")
        time.sleep(0.05)
    with AgentClient(agent.url, token, name=name) as client:
        client.health(retry_for_s=max(1.0, deadline - time.monotonic()))
    return agent


__all__ = ["LocalAgent", "start_local_agent", "agent_command", "AgentStartError"]
