"""Intake over real sockets: bad input of every kind, oversize messages, vanishing senders, imagezmq."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import cv2
import imagezmq
import numpy as np
import zmq

from daemon.protocol import message_limit
from tests.test_daemon_support import GEOMETRY, LOOPBACK, Client, FakeInspector, header, image, running


def test_malformed_frames_get_bad_frame_rejects_and_serving_continues() -> None:
    """Every malformed frame that names itself gets a bad_frame reject with a detail; good frames still pass."""
    good = image().tobytes()
    ok_png = cv2.imencode(".png", image())[1].tobytes()
    other_png = cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()
    ok_jpeg = cv2.imencode(".jpg", image())[1].tobytes()
    cases: list[tuple[list[bytes], str]] = [
        ([json.dumps({k: v for k, v in header(1).items() if k != "width"}).encode(), good], "misses width"),
        ([json.dumps(header(2, dtype="int8")).encode(), good], "unknown dtype"),
        ([json.dumps(header(3, encoding="bmp")).encode(), good], "unknown encoding"),
        ([json.dumps(header(4)).encode(), good[:-7]], "header says"),
        ([json.dumps(header(5)).encode(), good + b"extra"], "payload is"),
        ([json.dumps(header(6, height=31)).encode(), good], "model expects"),
        ([json.dumps(header(7, encoding="png")).encode(), ok_png[:40] + b"\0" * 50], "corrupt png"),
        ([json.dumps(header(8, encoding="jpeg")).encode(), b"\xff\xd8\xff\xe0garbage"], "corrupt jpeg"),
        ([json.dumps(header(9, encoding="png")).encode(), other_png], "png is 64x64"),
        ([json.dumps(header(10)).encode()], "2 message parts"),
        ([json.dumps(header(11)).encode(), good, b"third"], "2 message parts"),
    ]
    with running(queue_depth=16) as (server, _), Client(server) as client:
        for parts, _ in cases:
            client.send_parts(*parts)
        client.send_parts(json.dumps(header(20, encoding="png")).encode(), ok_png)
        client.send_parts(json.dumps(header(21, encoding="jpeg")).encode(), ok_jpeg)
        client.send(22)
        got = client.decisions(len(cases) + 3)
    by_id = {d["frame_id"]: d for d in got}
    for (_, needle), frame_id in zip(cases, range(1, 12), strict=True):
        assert by_id[frame_id]["reason"] == "bad_frame", by_id[frame_id]
        assert needle in by_id[frame_id]["detail"], (needle, by_id[frame_id]["detail"])
    assert [by_id[i]["reason"] for i in (20, 21, 22)] == ["ok", "ok", "ok"]


def test_garbage_flood_is_answered_or_counted_and_the_next_frame_served() -> None:
    """A flood of random messages never stops the daemon; each is answered or counted."""
    rng = np.random.default_rng(0)
    with running(queue_depth=8) as (server, _), Client(server) as client:
        for i in range(300):
            parts = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
            if i % 3 == 0:
                parts[0] = json.dumps({"frame_id": i, "camera_id": "junk"}).encode()
            client.send_parts(*parts)
        client.send(1000)
        got = client.decisions(101, timeout_s=10)
        time.sleep(0.1)
        totals = server.scheduler.totals()
    assert got[-1]["frame_id"] == 1000 and got[-1]["reason"] == "ok"
    assert all(d["reason"] == "bad_frame" for d in got[:-1])
    assert totals["decisions"] + totals["unidentified_bad_messages"] == 301


def test_oversize_message_disconnects_the_peer_and_others_are_served() -> None:
    """An oversize message never reaches the daemon (libzmq drops the peer): it is counted, serving goes on."""
    with running() as (server, _), Client(server) as client:
        big = bytes(message_limit(GEOMETRY) + 1024)
        client.send_parts(json.dumps(header(1, encoding="png")).encode(), big)
        deadline = time.monotonic() + 5
        while server.intake.peers_dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        dropped = server.intake.peers_dropped
        with Client(server) as other:
            other.send(2)
            got = other.decisions(1)
            with urllib.request.urlopen(f"http://{server.endpoints['http']}/metrics", timeout=5) as response:
                metrics = response.read().decode()
    assert [d["frame_id"] for d in got] == [2]
    assert dropped == 1
    assert "inspectd_peers_dropped_total 1.0" in metrics


def test_sender_that_vanishes_mid_stream_still_gets_its_frames_decided() -> None:
    """A camera that closes its socket right after sending leaves the daemon serving; its frames are decided."""
    with running(FakeInspector(infer_s=0.02), queue_depth=8) as (server, _), Client(server) as listener:
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(server.endpoints["frames"])
        for i in range(3):
            push.send_multipart([json.dumps(header(i)).encode(), image().tobytes()])
        push.close(linger=30_000)  # term() returns once the frames are out (bounded)
        ctx.term()
        got = listener.decisions(3)  # the vanished camera's frames (another connection's may overtake them)
        listener.send(3)  # and the daemon serves on
        got += listener.decisions(1)
    assert [d["frame_id"] for d in got] == [0, 1, 2, 3]


def test_imagezmq_req_rep_sender_gets_the_decision_as_reply() -> None:
    """An unmodified imagezmq REQ sender gets each frame's decision JSON as its reply (arrays and JPEG)."""
    with running(imagezmq_endpoint=LOOPBACK, imagezmq_mode="reqrep") as (server, _):
        sender = imagezmq.ImageSender(connect_to=server.endpoints["imagezmq"])
        sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            replies = [json.loads(sender.send_image("pi-1", image(defect=i == 1))) for i in range(3)]
            jpg = cv2.imencode(".jpg", image())[1].tobytes()
            replies.append(json.loads(sender.send_jpg("pi-1", jpg)))
            wrong = np.zeros((10, 10, 3), np.uint8)
            replies.append(json.loads(sender.send_image("pi-1", wrong)))
        finally:
            sender.close()
    assert [r["frame_id"] for r in replies] == [0, 1, 2, 3, 4]
    assert [r["reason"] for r in replies] == ["ok", "defect", "ok", "ok", "bad_frame"]
    assert all(r["camera_id"] == "pi-1" for r in replies)


def test_imagezmq_pub_sub_sender_is_subscribed_to() -> None:
    """In PUB/SUB mode the daemon connects to an imagezmq PUB sender and decides its frames."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    sender = imagezmq.ImageSender(connect_to=endpoint, REQ_REP=False)
    try:
        with running(imagezmq_endpoint=endpoint, imagezmq_mode="pubsub") as (server, _), Client(server) as client:
            got: list[dict] = []
            end = time.monotonic() + 30  # PUB drops until the subscription has arrived: resend, bounded
            while time.monotonic() < end:
                sender.send_image("pub-cam", image())
                got += client.decisions(1, timeout_s=0.1)
                if len(got) >= 3:
                    break
    finally:
        sender.close()
    assert len(got) >= 3 and all(d["camera_id"] == "pub-cam" and d["reason"] == "ok" for d in got)
    ids = [d["frame_id"] for d in got]
    assert ids == sorted(ids)


def test_sub_mode_receives_native_frames_from_a_publishing_camera() -> None:
    """With frames_mode sub, the daemon connects to a camera's PUB socket."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(LOOPBACK)
    try:
        endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        with running(frames_endpoint=endpoint, frames_mode="sub") as (server, _), Client(server) as client:
            got: list[dict] = []
            end, frame_id = time.monotonic() + 30, 0  # PUB drops until the subscription has arrived: resend, bounded
            while time.monotonic() < end:
                pub.send_multipart([json.dumps(header(frame_id)).encode(), image().tobytes()])
                frame_id += 1
                got += client.decisions(1, timeout_s=0.1)
                if got:
                    break
    finally:
        ctx.destroy(linger=0)
    assert got and got[0]["reason"] == "ok"
