"""CurveZMQ: an allowed camera and subscriber are served, a client with an unknown key is refused."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from daemon.config import ConfigError, load
from tests.test_daemon_support import FakeInspector, header, image, running


def keys(tmp_path: Path) -> dict[str, tuple[bytes, bytes]]:
    for name in ("server", "camera", "stranger"):
        (tmp_path / name).mkdir()
        zmq.auth.create_certificates(tmp_path / name, name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "camera.key").write_bytes((tmp_path / "camera" / "camera.key").read_bytes())
    return {
        name: zmq.auth.load_certificate(tmp_path / name / f"{name}.key_secret")
        for name in ("server", "camera", "stranger")
    }


def connect(
    ctx: zmq.Context, kind: int, endpoint: str, client: tuple[bytes, bytes], server_public: bytes, expect: str
) -> zmq.Socket:
    """A CurveZMQ client socket, returned once the server has accepted (``expect="ok"``) or refused its key.

    Waiting for the handshake's outcome, not for a fixed time, keeps a loaded machine from turning into
    a missed subscription, and shows the refusal itself rather than only what did not arrive.
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = client
    sock.curve_serverkey = server_public
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        sock.connect(endpoint)
        assert monitor.poll(30_000), f"no handshake outcome with {endpoint}"
        event = recv_monitor_message(monitor)["event"]
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    assert event == (zmq.EVENT_HANDSHAKE_SUCCEEDED if expect == "ok" else zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    return sock


def test_allowed_client_is_served_and_a_stranger_refused(tmp_path: Path) -> None:
    """Frames and decisions flow for the listed key; an unlisted key gets neither in nor out."""
    k = keys(tmp_path)
    options = {
        "curve_secret_key": str(tmp_path / "server" / "server.key_secret"),
        "curve_clients": str(tmp_path / "allowed"),
    }
    with running(FakeInspector(), **options) as (server, _):
        ctx = zmq.Context()
        try:
            eps = server.endpoints
            sub = connect(ctx, zmq.SUB, eps["decisions"], k["camera"], k["server"][0], "ok")
            spy = connect(ctx, zmq.SUB, eps["decisions"], k["stranger"], k["server"][0], "refused")
            cam = connect(ctx, zmq.PUSH, eps["frames"], k["camera"], k["server"][0], "ok")
            intruder = connect(ctx, zmq.PUSH, eps["frames"], k["stranger"], k["server"][0], "refused")
            for i in range(100, 105):
                # queued on the intruder's side, since its handshake never completes; once the refused
                # connection is dropped there is no pipe left to queue on (zmq.Again): nothing leaves either way
                with contextlib.suppress(zmq.Again):
                    intruder.send_multipart([json.dumps(header(i)).encode(), image().tobytes()], flags=zmq.NOBLOCK)
            cam.send_multipart([json.dumps(header(1)).encode(), image().tobytes()])
            assert sub.poll(30_000)
            assert json.loads(sub.recv_multipart()[1])["frame_id"] == 1
            assert not spy.poll(300)
            time.sleep(0.2)
            assert server.intake.received == 1
        finally:
            ctx.destroy(linger=0)


def test_curve_settings_are_validated(tmp_path: Path) -> None:
    """Half a CurveZMQ setup, or CurveZMQ on a connecting socket, stops the start with one line."""
    with pytest.raises(ConfigError, match="give both"):
        load(overrides={"model": "m", "curve_secret_key": "k"}, environ={})
    with pytest.raises(ConfigError, match="bound sockets"):
        load(overrides={"model": "m", "curve_secret_key": "k", "curve_clients": "d", "frames_mode": "sub"}, environ={})
