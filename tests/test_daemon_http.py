"""HTTP side door: health routes, extension routes and streaming responses."""

from __future__ import annotations

import urllib.error
import urllib.request

from daemon.http import Health, HttpServer, Response


def get(server: HttpServer, path: str) -> tuple[int, bytes]:
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


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
