"""The daemon's HTTP side door: health, readiness, and the routes other modules add (page, /metrics, SSE).

A stdlib ThreadingHTTPServer on its own thread. Handlers only read a ``Health`` snapshot
(and metrics, the status board); nothing here touches the frame path. Routes are a table
of ``path -> handler(request) -> Response`` so new endpoints are one ``route()`` call, and a
handler may stream (``Response.stream``) for server-sent events.

Limits, so that no client can hold the daemon's threads (one per connection):

- at most ``max_connections`` open connections, event streams included, and at most half of
  them streams; one more is answered at once, without a thread, with ``503`` and
  ``Retry-After`` and closed;
- a request must arrive whole within ``timeout_s`` of the connection (an idle connection,
  or one that sends a byte now and then, is closed then: the serve loop reaps them on its
  clock), and every read or send on a connection gives up after ``timeout_s``;
- a listen backlog of ``BACKLOG`` (the kernel caps it at ``net.core.somaxconn``), so a burst
  of connections is queued instead of being made to retry.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
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

MAX_CONNECTIONS = 64  # open connections, streams included (config: http_max_connections)
TIMEOUT_S = 10.0  # for a request to arrive whole, and for each read or send (config: http_timeout_s)
BACKLOG = 1024  # listen backlog (the kernel caps it at net.core.somaxconn)
POLL_S = 0.5  # the serve loop's turn: supervision checkpoint, reaping
RETRY_AFTER_S = 5
LINGER_S = 2.0  # a refused connection is closed after this long at most (earlier once the client closed)
LINGER_MAX = 1024
REFUSAL = (
    b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: %d\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 34\r\nConnection: close\r\n\r\ntoo many connections; retry later\n" % RETRY_AFTER_S
)


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
    """Routes GET requests to handlers on a background thread, within the limits of the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        health: Health,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.routes: dict[str, Handler] = {}
        self.route("/healthz", self._healthz)
        self.route("/readyz", self._readyz)
        routes = self.routes

        class _Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # every read and send on the connection (StreamRequestHandler.setup)

            def setup(self) -> None:
                # One thread per connection: the page, SSE streams and scrapes never compete with frames.
                lower_priority(OBSERVER_NICE)
                super().setup()

            def do_GET(self) -> None:
                server: _Server = self.server  # type: ignore[assignment]
                server.arrived(self.request)
                handler = routes.get(self.path.split("?", 1)[0])
                response = handler(self) if handler else Response(404, b"not found\n")
                if response.stream is None:
                    _write(self, response)
                    return
                if not server.open_stream():
                    close = getattr(response.stream, "close", None)
                    if close is not None:
                        close()
                    _write(self, _busy("too many event streams"))
                    return
                try:
                    _write(self, response)
                finally:
                    server.close_stream()

            def log_message(self, format: str, *args: Any) -> None:  # keep access logs out of stderr
                pass

        self._server = _Server((host, port), _Handler, max_connections, timeout_s, clock)
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
        self._server.serve_forever(poll_interval=POLL_S)

    def stop(self) -> None:
        if self.watch.started:  # shutdown() waits for a serve loop, so only when one ran
            self._server.shutdown()
        self._server.server_close()
        self._server.close_all()

    def stats(self) -> dict[str, int]:
        """Open connections and streams; refused (over the cap) and timed-out connections since start."""
        return self._server.stats()

    # Health endpoints: status only, no body, as inference servers do.
    def _healthz(self, _request: BaseHTTPRequestHandler) -> Response:
        return Response(200 if self.health.healthy else 503)

    def _readyz(self, _request: BaseHTTPRequestHandler) -> Response:
        return Response(200 if self.health.ready and self.health.healthy else 503)


class _Server(ThreadingHTTPServer):
    """The stdlib server with a cap on connections and a deadline for each request to arrive.

    Its serve loop meets the supervision checkpoint and reaps late requests every poll interval.
    """

    daemon_threads = True
    block_on_close = False  # stop() shuts every connection down; their threads end on their own
    request_queue_size = BACKLOG
    watch: Watch | None = None

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.max_connections = max_connections
        self.max_streams = max(1, max_connections // 2)
        self.timeout_s = timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> accepted at, until its request arrived
        self._open: set[socket.socket] = set()
        self._streams = 0
        self._lingering: list[tuple[float, socket.socket]] = []  # refused: closed once the client has read
        self._names = itertools.count(1)
        self.refused = 0
        self.timed_out = 0
        super().__init__(address, handler)

    # -- connections --------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = len(self._open) >= self.max_connections
            if full:
                self.refused += 1
            else:
                self._open.add(request)
                self._waiting[request] = self.clock()
        if full:
            self._refuse(request)
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"inspectd-http-{next(self._names)}",
            daemon=True,
        )
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
            self._waiting.pop(request, None)
        super().shutdown_request(request)

    def arrived(self, request: Any) -> None:
        """The request is in: the connection is no longer held to the arrival deadline."""
        with self._lock:
            self._waiting.pop(request, None)

    def open_stream(self) -> bool:
        with self._lock:
            if self._streams >= self.max_streams:
                self.refused += 1
                return False
            self._streams += 1
            return True

    def close_stream(self) -> None:
        with self._lock:
            self._streams -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (reaped, reset, timed out): logged quietly, never printed to stderr."""
        log.debug("http_connection_failed", client=str(client_address), exc_info=True)

    def _refuse(self, request: socket.socket) -> None:
        """Over the cap: 503 with Retry-After, written without a thread; closed once the client read it."""
        try:
            request.setblocking(False)
            request.send(REFUSAL)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        if len(self._lingering) >= LINGER_MAX:
            request.close()
            return
        self._lingering.append((time.monotonic() + LINGER_S, request))

    # -- the serve loop's chores ----------------------------------------------------------------
    def service_actions(self) -> None:
        if self.watch is not None:
            self.watch.checkpoint()
        self._reap()
        self._close_refused()

    def _reap(self) -> None:
        """Close connections whose request has not arrived whole within ``timeout_s`` (idle or slow)."""
        now = self.clock()
        with self._lock:
            late = [sock for sock, since in self._waiting.items() if now - since > self.timeout_s]
            for sock in late:
                del self._waiting[sock]
        for sock in late:
            _shut(sock)  # its thread's read returns at once and the thread ends
        if late:
            self.timed_out += len(late)
            log.info("http_timed_out", connections=len(late), detail=f"no request within {self.timeout_s:g} s")

    def _close_refused(self) -> None:
        now, keep = time.monotonic(), []
        for until, sock in self._lingering:
            if now < until and not _drained(sock):
                keep.append((until, sock))
            else:
                sock.close()
        self._lingering = keep

    def close_all(self) -> None:
        """At stop: shut every connection down (event streams end, idle clients are let go)."""
        with self._lock:
            socks = list(self._open)
        for sock in socks:
            _shut(sock)
        for _, sock in self._lingering:
            sock.close()
        self._lingering = []

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "open": len(self._open),
                "streams": self._streams,
                "refused": self.refused,
                "timed_out": self.timed_out,
            }


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its thread
        sock.shutdown(socket.SHUT_RDWR)


def _drained(sock: socket.socket) -> bool:
    """Read what a refused client sent (so closing does not reset it); True once it has closed its side."""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _busy(what: str) -> Response:
    return Response(503, f"{what}; retry later\n".encode(), headers={"Retry-After": str(RETRY_AFTER_S)})


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
    except OSError:
        pass  # the client went away, or did not read within timeout_s; nothing to tell it
