"""What keeps the agent's server up under a flood it cannot authenticate: connection
limits and timeouts chosen for a small board, and log lines rate-limited.

uvicorn's own settings do part of the job and are used (see `server_settings`):
`limit_concurrency` (503 past a number of requests in flight), `timeout_keep_alive`
(an idle keep-alive connection is closed), `backlog` and h11's cap on buffered header
bytes. What uvicorn 0.54 lacks, `GuardedH11Protocol` adds, as small as it can be:

* a deadline for a request's headers. uvicorn arms no timer on a new connection, and
  every byte received cancels its keep-alive timer, so a connection that never sends a
  request (or sends its headers a byte at a time) is held for ever: 20,000 of them took
  every file descriptor of an agent. Here a connection must complete each request's
  headers within `HEADER_TIMEOUT_S` of opening or of its last response.
* an idle deadline while a request body is read (an upload that stops sending), while
  the server reads from the socket (not while flow control has paused it).
* a cap on open connections, derived from the process's file-descriptor limit. At the
  cap, the connection that has waited longest without a request in flight is closed to
  make room (an attacker's idle sockets go first; a client that sends its request at
  once is never the oldest idle one); if every connection is mid-request, the new one is
  closed. `limit_concurrency` cannot do this: it acts only once a request has arrived.

Numbers for a board with `ulimit -n 1024`: 64 connections, 16 pending in the kernel's
accept queue, 10 s for headers, 30 s of silence within a body, 5 s of keep-alive (and
fewer connections where the fd limit is lower: `connection_cap`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("lfm2_nas.agent")

HEADER_TIMEOUT_S = 10.0
BODY_IDLE_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5
#: Bytes of a request's head that h11 buffers (request line and headers; ours are < 1 KiB).
MAX_HEADER_BYTES = 16 << 10
MAX_CONNECTIONS = 64
#: File descriptors left for everything but client connections: the job store (WAL), the
#: worker's measurement (its child's pipes and files), logs, the listening socket.
FD_RESERVE = 64
#: How often each connection checks its deadlines.
TICK_S = 0.5


def connection_cap(fd_limit: int | None = None) -> int:
    """Open connections allowed: `MAX_CONNECTIONS`, fewer where the fd limit is low. Each
    connection is one fd; sockets accepted but not yet seen by the protocol (a few accept
    rounds of `accept_batch` each) and connections being closed take more for a moment,
    so the cap is half of what is left after `FD_RESERVE`."""
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_limit == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, (fd_limit - FD_RESERVE) // 2))


def accept_batch(cap: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one round
    (before the protocol sees any of them): small, so a flood cannot take a burst of fds."""
    return max(4, cap // 4)


def server_settings(fd_limit: int | None = None) -> dict[str, Any]:
    """uvicorn.Config arguments for the agent (and the cap `GuardedH11Protocol` keeps)."""
    cap = connection_cap(fd_limit)
    return {
        "http": GuardedH11Protocol,
        # uvicorn answers 503 to a request that arrives while this many connections are
        # open (closed ones included until their close callback runs) or this many handler
        # tasks are alive. The connection cap bounds live connections; this bounds tasks
        # that outlive their connection (a `?wait=` poll runs on until it answers), with
        # room for connections evicted but not yet gone, so a flood causes no 503s.
        "limit_concurrency": 2 * cap,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "backlog": accept_batch(cap),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines and a connection cap."""

    max_connections: int | None = None  # set from the fd limit on first use

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        cls = type(self)
        if cls.max_connections is None:
            cls.max_connections = connection_cap()
        now = time.monotonic()
        self._waiting_since = now  # when this connection started waiting for a request's headers
        self._last_data = now
        self._guard_timer: asyncio.TimerHandle | None = None
        # closed connections stay in the set until their close callback has run: not counted
        live = [c for c in self.connections if c.transport is not None and not c.transport.is_closing()]
        if len(live) >= cls.max_connections:
            idle = [c for c in live if isinstance(c, GuardedH11Protocol) and not c._in_request()]
            if idle:
                oldest = min(idle, key=lambda c: c._waiting_since)
                oldest._close("evicted: the connection cap was reached and it had sent no request")
            else:
                super().connection_made(transport)
                self._close("refused: the connection cap was reached and every connection is mid-request")
                return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = time.monotonic()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._waiting_since = self._last_data = time.monotonic()
        super().on_response_complete()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._guard_timer = self.loop.call_later(TICK_S, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._guard_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        now = time.monotonic()
        if not self._in_request():
            if now - self._waiting_since > HEADER_TIMEOUT_S:
                return self._close(f"no complete request within {HEADER_TIMEOUT_S:g} s")
        elif self.cycle.more_body and not self.flow.read_paused and now - self._last_data > BODY_IDLE_TIMEOUT_S:
            return self._close(f"the request body stalled for {BODY_IDLE_TIMEOUT_S:g} s")
        self._arm()

    def _close(self, why: str) -> None:
        client = "%s:%d" % self.client if self.client else "?"
        log.warning("closed a connection from %s: %s", client, why)
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None
        if not self._in_request():
            try:
                self.timeout_keep_alive_handler()  # uvicorn's own way of closing an idle connection
                return
            except Exception:  # an h11 state that cannot say "closed" cleanly: just close
                pass
        self.transport.close()  # mid-request: the handler sees a disconnect (an upload is discarded)


class RateLimitedLog(logging.Filter):
    """At most `burst` records per `window_s` for each message template (logger + format
    string, so "closed a connection from %s" counts as one whatever the address); past
    that they are dropped, and the first one let through in a later window says how many
    were. A flood of connections then costs the log a few lines a minute instead of
    hundreds of MB. Only what a stranger can cause is limited: warnings and errors, and
    anything from the server's and the event loop's loggers; a job's own lines (one
    token holder's submission each) always pass."""

    def __init__(self, burst: int = 20, window_s: float = 60.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list[float]] = {}  # template -> [start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not record.name.startswith(("uvicorn", "asyncio")):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                dropped = int(window[2]) if window is not None else 0
                if len(self._windows) > 10_000:  # templates are few; never grow without bound
                    self._windows.clear()
                window = self._windows[key] = [now, 0, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this suppressed earlier]"
            window[1] += 1
            if window[1] > self.burst:
                window[2] += 1
                return False
        return True


def rate_limit_logs(burst: int = 20, window_s: float = 60.0) -> RateLimitedLog:
    """Put one `RateLimitedLog` on every handler of the root logger (uvicorn's loggers
    propagate there: the agent serves with `log_config=None`)."""
    limiter = RateLimitedLog(burst, window_s)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limiter)
    return limiter


__all__ = ["GuardedH11Protocol", "RateLimitedLog", "connection_cap", "server_settings", "rate_limit_logs", "HEADER_TIMEOUT_S", "BODY_IDLE_TIMEOUT_S"]
