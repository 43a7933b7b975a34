"""HTTP side door: health routes, extension routes and streaming responses; limits on connections and time.

The request deadline runs on an injected clock (the serve loop reaps on it every poll
interval); connections are real sockets on loopback.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon.http import Health, HttpServer, Response
from tests.test_daemon_support import running


def get(server: HttpServer, path: str) -> tuple[int, bytes]:
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(check: Any, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return False


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replies:
    """What the server sent on each socket, once it has sent something (b"" when it only closed)."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.got: dict[int, bytes] = {}

    def poll(self) -> int:
        """Read what has arrived; how many sockets have answered so far."""
        for i, sock in enumerate(self.socks):
            if i not in self.got and select.select([sock], [], [], 0)[0]:
                self.got[i] = _read_all(sock)
        return len(self.got)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_health_and_readiness_follow_the_health_state() -> None:
    """/healthz is 200 while starting or ticking and 503 when stale; /readyz needs ready and live."""
    health = Health(stale_s=0.05)
    server = HttpServer("127.0.0.1", 0, health)
    server.start()
    try:
        assert get(server, "/healthz") == (200, b"") and get(server, "/readyz")[0] == 503
        health.tick()
        health.ready = True
        assert get(server, "/readyz")[0] == 200
        health._last_tick -= 1.0  # the loop stopped ticking
        assert get(server, "/healthz")[0] == 503 and get(server, "/readyz")[0] == 503
    finally:
        server.stop()


def test_routes_can_be_added_and_can_stream() -> None:
    """A later endpoint is one route() call; a streamed response (as SSE will be) arrives in chunks."""
    server = HttpServer("127.0.0.1", 0, Health())
    server.route("/metrics", lambda req: Response(body=b"inspectd_up 1\n"))
    server.route("/events", lambda req: Response(content_type="text/event-stream", stream=iter([b"data: 1\n\n"] * 2)))
    server.start()
    try:
        assert get(server, "/metrics") == (200, b"inspectd_up 1\n")
        assert get(server, "/events") == (200, b"data: 1\n\ndata: 1\n\n")
        assert get(server, "/missing")[0] == 404
    finally:
        server.stop()


def test_row4_idle_connections_are_capped_refused_at_once_and_let_go_at_the_timeout() -> None:
    """Issue 13, row 4: 200 idle TCP connections to a running daemon's HTTP port (the old server gave each a thread
    with no timeout). At most http_max_connections (64) are held, each in a thread; the others get 503 with
    Retry-After at once, without a thread. Once http_timeout_s has passed on the daemon's clock, the held ones, idle
    or sending a byte now and then, are closed and their threads end; the page still answers."""
    clock = FakeClock()
    with running(clock=clock) as (server, _):
        assert server.http is not None
        address = server.http.address
        base = threading.active_count()
        socks = [socket.create_connection(address, timeout=5) for _ in range(200)]
        for sock in socks[::10]:
            sock.sendall(b"GET /healthz HTTP/1.0\r\nX-Slow: ")  # a request that never completes
        replies = Replies(socks)
        try:
            assert wait_for(lambda: replies.poll() >= 200 - 64)
            time.sleep(0.2)  # room for a wrong extra answer or thread
            replies.poll()
            refused = list(replies.got.values())
            held_threads = threading.active_count() - base
            status, _ = get(server.http, "/healthz")  # over the cap too: refused, never queued
            clock.now += 10.5  # past http_timeout_s (10 s)
            assert wait_for(lambda: replies.poll() == 200)
            refusals = sum(answer.startswith(b"HTTP/1.0 503 ") for answer in replies.got.values())
            assert wait_for(lambda: threading.active_count() <= base)
            after = get(server.http, "/healthz")
            assert wait_for(lambda: server.http.stats()["open"] == 0)
            stats = server.http.stats()
        finally:
            for sock in socks:
                sock.close()
    assert len(refused) == 200 - 64 and held_threads <= 64
    assert all(r.startswith(b"HTTP/1.0 503 ") and b"\r\nRetry-After: 5\r\n" in r for r in refused)
    assert refusals == 200 - 64  # the held ones were closed without an answer: they never asked anything
    assert status == 503 and after == (200, b"")
    assert stats["refused"] == 200 - 64 + 1 and stats["timed_out"] == 64 and stats["open"] == 0


def test_the_listen_backlog_queues_a_burst_of_connections() -> None:
    """Before the server accepts anything, a burst of connections completes in the kernel (the old backlog of 5
    left all but six retrying their SYNs)."""
    burst = min(200, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    server = HttpServer("127.0.0.1", 0, Health())  # bound and listening, not serving yet
    socks = []
    try:
        for _ in range(burst):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(server.address)
            socks.append(sock)
        pending = list(socks)
        end = time.monotonic() + 5
        while pending and time.monotonic() < end:
            _, writable, _ = select.select([], pending, [], 0.1)
            pending = [s for s in pending if s not in writable]
        connected = sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in socks if s not in pending)
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    assert connected == burst


def test_event_streams_count_against_the_cap_and_a_stuck_reader_is_let_go() -> None:
    """At most half the connections may be streams (503 + Retry-After beyond); a stream whose client stopped reading
    ends once a send has blocked for timeout_s; health stays reachable throughout."""

    def forever(_request: Any) -> Response:
        def chunks():  # type: ignore[no-untyped-def]
            while True:
                yield b"data: " + b"x" * 65536 + b"\n\n"

        return Response(content_type="text/event-stream", stream=chunks())

    server = HttpServer("127.0.0.1", 0, Health(), max_connections=4, timeout_s=0.2, clock=FakeClock())
    server.route("/events", forever)
    server.start()
    readers = []
    try:
        for _ in range(2):
            sock = socket.create_connection(server.address, timeout=5)
            sock.sendall(b"GET /events HTTP/1.0\r\n\r\n")
            readers.append(sock)
        assert wait_for(lambda: server.stats()["streams"] == 2)
        status, body = get(server, "/events")
        health = get(server, "/healthz")
        assert wait_for(lambda: server.stats()["streams"] == 0)  # neither reader reads: both sends time out
        assert wait_for(lambda: server.stats()["open"] == 0)
    finally:
        for sock in readers:
            sock.close()
        server.stop()
    assert status == 503 and b"too many event streams" in body and health == (200, b"")
