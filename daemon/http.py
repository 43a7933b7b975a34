"""The daemon's HTTP side door: health and readiness now; operator page, /metrics and SSE later.

A stdlib ThreadingHTTPServer on its own thread. Handlers only read a ``Health`` snapshot
(and, later, metrics); nothing here touches the frame path. Routes are a table of
``path -> handler(request) -> Response`` so new endpoints are one ``route()`` call, and a
handler may stream (``Response.stream``) for server-sent events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from daemon.outputs import OBSERVER_NICE
from daemon.scheduler import lower_priority
from daemon.supervision import Supervisor, Watch

log = structlog.get_logger("inspectd.http")


@dataclass
class Response:
    """Status, headers and either a body or an iterator of chunks (for SSE)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterable[bytes] | None = None


Handler = Callable[[BaseHTTPRequestHandler], Response]


class Health:
    """What the main loop tells the outside world: it ticks (liveness), it is ready, or what is wrong."""

    def __init__(self, stale_s: float = 5.0) -> None:
        self._stale_s = stale_s
        self._last_tick: float | None = None  # None: still starting (loading may take minutes)
        self.ready = False
        self.status = "starting"
        # A dead or stalled frame-path thread (supervision.py), in words; None while healthy.
        self.problem: str | None = None

    def tick(self) -> None:
        self._last_tick = time.monotonic()

    @property
    def live(self) -> bool:
        """True while starting and then while the main loop has ticked within ``stale_s``."""
        return self._last_tick is None or time.monotonic() - self._last_tick < self._stale_s

    @property
    def healthy(self) -> bool:
        """/healthz: the main loop ticks and no frame-path thread is dead or stalled."""
        return self.live and self.problem is None


class HttpServer:
    """Routes GET requests to handlers on a background thread."""

    def __init__(self, host: str, port: int, health: Health) -> None:
        self.health = health
        self.routes: dict[str, Handler] = {}
        self.route("/healthz", self._healthz)
        self.route("/readyz", self._readyz)
        routes = self.routes

        class _Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                # One thread per connection: the page, SSE streams and scrapes never compete with frames.
                lower_priority(OBSERVER_NICE)
                super().setup()

            def do_GET(self) -> None:
                handler = routes.get(self.path.split("?", 1)[0])
                response = handler(self) if handler else Response(404, b"not found\n")
                _write(self, response)

            def log_message(self, format: str, *args: Any) -> None:  # keep access logs out of stderr
                pass

        self._server = _Server((host, port), _Handler)
        self.address = self._server.server_address[:2]
        # An observer: restarted in place if it dies (serving resumes on the same listening socket).
        self.watch = Watch("http", self._serve, fatal=False)
        self._server.watch = self.watch

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def start(self, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:
            supervisor.add(self.watch)
        self.watch.start()

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # Health endpoints: status only, no body, as inference servers do.
    def _healthz(self, _request: BaseHTTPRequestHandler) -> Response:
        return Response(200 if self.health.healthy else 503)

    def _readyz(self, _request: BaseHTTPRequestHandler) -> Response:
        return Response(200 if self.health.ready and self.health.healthy else 503)


class _Server(ThreadingHTTPServer):
    """The stdlib server; its loop meets the supervision checkpoint every poll interval."""

    daemon_threads = True
    watch: Watch | None = None

    def service_actions(self) -> None:
        if self.watch is not None:
            self.watch.checkpoint()


def _write(request: BaseHTTPRequestHandler, response: Response) -> None:
    try:
        request.send_response(response.status)
        request.send_header("Content-Type", response.content_type)
        for key, value in response.headers.items():
            request.send_header(key, value)
        if response.stream is None:
            request.send_header("Content-Length", str(len(response.body)))
            request.end_headers()
            request.wfile.write(response.body)
            return
        request.end_headers()
        for chunk in response.stream:
            request.wfile.write(chunk)
            request.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away; nothing to tell it
