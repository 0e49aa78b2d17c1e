"""`lfm2-nas dashboard`: the report as a live page that follows a running search.

A small stdlib HTTP server (one process, threads per request) reads the study from its
storage on demand, so it works alongside the search driver that writes it:

- `GET /` the report page (the same content as `lfm2-nas report`), which polls
- `GET /api/report.json?revision=R` the payload, or `{"unchanged": true, ...}` while the
  study's revision is still R (no new or changed trial),
- `GET /api/health` the study name and its trial count,
- `GET /static/plotly.min.js` plotly.js from the installed plotly package (no CDN).

The payload is rebuilt only when the study's revision changes, and one rebuild runs at
a time, so a page polling every few seconds costs one cheap trial listing per poll.
"""

from __future__ import annotations

import json
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import optuna

from lfm2.errors import UserError
from reports.html import plotly_js, render_page, report_payload
from reports.defaults import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REFRESH_S  # re-exported: callers import them from here
from reports.study_data import load_study, open_storage, read_study, study_revision, to_jsonable


class ReportSource:
    """The current report payload of one study, rebuilt when its trials change."""

    def __init__(self, study_name: str, storage_url: str | None) -> None:
        self.study_name = study_name
        self.storage_url = storage_url
        self._storage = open_storage(storage_url)
        load_study(study_name, storage_url, storage=self._storage)  # fail now, with the fix, if it is not there
        self._lock = threading.Lock()
        self._payload: dict[str, Any] | None = None

    def _study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self._storage)

    def revision(self) -> tuple[str, int]:
        trials = self._study().get_trials(deepcopy=False)
        return study_revision(trials), len(trials)

    def payload(self) -> dict[str, Any]:
        with self._lock:
            revision, _count = self.revision()
            if self._payload is None or self._payload["revision"] != revision:
                self._payload = report_payload(read_study(self._study()))
            return self._payload


def _handler(source: ReportSource, refresh_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lfm2-nas-dashboard"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # a poll every few seconds would flood the terminal

        def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: Any) -> None:
            self._send(status, json.dumps(to_jsonable(value), allow_nan=False).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            url = urlsplit(self.path)
            try:
                if url.path in ("/", "/index.html"):
                    page = render_page(source.payload(), live={"url": "api/report.json", "interval_s": refresh_s}, plotly_src="static/plotly.min.js")
                    self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
                elif url.path == "/api/report.json":
                    known = parse_qs(url.query).get("revision", [None])[0]
                    revision, count = source.revision()
                    if known == revision:
                        self._json(HTTPStatus.OK, {"unchanged": True, "revision": revision, "n_trials": count})
                    else:
                        self._json(HTTPStatus.OK, source.payload())
                elif url.path == "/api/health":
                    revision, count = source.revision()
                    self._json(HTTPStatus.OK, {"ok": True, "study": source.study_name, "n_trials": count, "revision": revision})
                elif url.path == "/static/plotly.min.js":
                    self._send(HTTPStatus.OK, plotly_js().encode(), "application/javascript; charset=utf-8", cache="max-age=86400")
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}; try / or /api/report.json"})
            except Exception as exc:  # the storage may be busy or gone: say so, keep serving
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"cannot read study {source.study_name!r}: {type(exc).__name__}: {exc}"})

    return Handler


def make_server(study_name: str, storage_url: str | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, refresh_s: float = DEFAULT_REFRESH_S) -> ThreadingHTTPServer:
    """A bound (not yet serving) dashboard server; port 0 picks a free port
    (`server.server_address[1]` says which)."""
    if not refresh_s > 0:
        raise UserError(f"--refresh must be a positive number of seconds, got {refresh_s}")
    source = ReportSource(study_name, storage_url)
    try:
        server = ThreadingHTTPServer((host, port), _handler(source, refresh_s))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port (0 picks a free one) or --host") from exc
    server.daemon_threads = True
    return server


def _stop_on_sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def serve(study_name: str, storage_url: str | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, refresh_s: float = DEFAULT_REFRESH_S, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the live dashboard until interrupted (Ctrl-C)."""
    server = make_server(study_name, storage_url, host, port, refresh_s)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `kill`, systemd, docker stop: stop cleanly
    bound_host, bound_port = server.socket.getsockname()[:2]  # (str, int): an AF_INET socket's name
    if on_ready is not None:
        on_ready(f"http://{bound_host}:{bound_port}/")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["ReportSource", "make_server", "serve", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_REFRESH_S"]
