"""Starting the agent: bind the address first (a port that cannot be had leaves the workdir
untouched), then take the workdir (`Agent`), announce where it serves and how to register
it, and run uvicorn until SIGINT/SIGTERM (or until the process that started it is gone)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from devices.agent.config import API_VERSION, AgentConfig
from devices.agent.guard import rate_limit_logs, server_settings
from devices.agent.lifecycle import Agent
from lfm2.errors import UserError

log = logging.getLogger("lfm2_nas.agent")


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
    from devices.agent.service import create_app

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


__all__ = ["is_loopback", "serve"]
