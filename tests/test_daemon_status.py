"""Operator status page: counters, shifts, the reject thumbnail, and its read-only HTTP routes."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request

import cv2
import numpy as np

from daemon.protocol import Decision, Evidence
from daemon.status import StatusBoard, render_reject, shift_start
from tests.test_daemon_support import Client, FakeInspector, image, running


def decision(frame_id: int, verdict: str = "pass", reason: str = "ok", **extra: object) -> Decision:
    now = time.time_ns()
    return Decision(frame_id, "cam1", None, verdict, reason, now - 5_000_000, now, now + 10**9, "m", **extra)  # type: ignore[arg-type]


def get(address: str, path: str, method: str = "GET") -> tuple[int, bytes, str]:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


def test_board_counts_rates_and_recent_decisions() -> None:
    """The snapshot has pass/reject/error counts, reasons, reject rate, latency and the last N decisions."""
    board = StatusBoard(cycle_ms=200, recent=3)
    board.set_model("model-7")
    for i, (verdict, reason) in enumerate([("pass", "ok")] * 6 + [("reject", "defect"), ("reject", "deadline")]):
        board.send(decision(i, verdict, reason))
    snap = board.snapshot()
    assert snap["state"] == "REJECT" and snap["latest"]["frame_id"] == 7
    assert snap["total"]["pass"] == 6 and snap["total"]["reject"] == 2 and snap["total"]["errors"] == 1
    assert snap["total"]["reasons"] == {"defect": 1, "deadline": 1} and snap["total"]["reject_rate"] == 0.25
    assert [r["frame_id"] for r in snap["recent"]] == [7, 6, 5]
    assert snap["latency_ms"]["p50"] == 5.0 and snap["latency_ms"]["cycle"] == 200
    assert snap["model"]["id"] == "model-7" and snap["throughput_hz"] > 0


def test_shift_counters_restart_at_the_configured_times() -> None:
    """The shift that contains a time is found, including the one that started yesterday evening."""
    day = dt.datetime(2026, 3, 2, 5, 30).timestamp()
    start = shift_start(day, [(6, 0), (14, 0), (22, 0)])
    assert dt.datetime.fromtimestamp(start) == dt.datetime(2026, 3, 1, 22, 0)
    assert dt.datetime.fromtimestamp(shift_start(day + 3600, [(6, 0), (22, 0)])) == dt.datetime(2026, 3, 2, 6, 0)
    assert shift_start(day, []) is None


def test_reject_thumbnail_has_heatmap_and_boxes_in_frame_pixels() -> None:
    """The heatmap is warped by the pose into frame pixels and the defect box is drawn in red."""
    frame = np.full((200, 400), 90, np.uint8)
    amap = np.zeros((200, 400), np.float32)
    amap[50:60, 100:110] = 3.0  # a hot spot in reference pixels
    pose = np.array([[1.0, 0.0, 40.0], [0.0, 1.0, 20.0]])  # reference -> frame: shifted by (40, 20)
    d = decision(1, "reject", "defect", threshold=1.0, defects=[{"bbox": [140, 70, 150, 80], "area": 100, "score": 3}])
    jpeg = render_reject(Evidence(frame, amap, pose), d, width=200)
    thumb = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (100, 200, 3)
    redness = thumb[..., 2].astype(int) - thumb[..., 0].astype(int)
    assert redness[36:40, 71:75].mean() > 30  # the hot spot at (145, 75) in frame pixels, halved
    assert abs(redness[26:29, 51:54].mean()) < 10  # not where it was in reference pixels
    assert np.abs(thumb[5:15, 5:15].astype(int) - 90).max() < 10  # no heat elsewhere
    assert thumb[34, 71:76, 2].mean() > 150  # the red box edge just above the defect


def test_a_large_frames_thumbnail_keeps_its_heat_and_boxes_in_place() -> None:
    """A frame far wider than the thumbnail is stepped over before the area resize (numpy on the status thread,
    not OpenCV's pool on every core): the hot spot and its box still land where they belong."""
    frame = np.full((2000, 4000), 90, np.uint8)
    amap = np.zeros((2000, 4000), np.float32)
    amap[500:600, 1000:1100] = 3.0
    pose = np.array([[1.0, 0.0, 400.0], [0.0, 1.0, 200.0]])
    d = decision(1, "reject", "defect", threshold=1.0, defects=[{"bbox": [1400, 700, 1500, 800], "area": 1e4}])
    jpeg = render_reject(Evidence(frame, amap, pose), d, width=200)
    thumb = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (100, 200, 3)
    redness = thumb[..., 2].astype(int) - thumb[..., 0].astype(int)
    assert redness[36:39, 71:74].mean() > 30  # the hot spot at (1450, 750) in frame pixels, a twentieth
    assert abs(redness[26:29, 51:54].mean()) < 10  # not where it was in reference pixels
    assert np.abs(thumb[5:15, 5:15].astype(int) - 90).max() < 10


def test_routes_serve_page_snapshot_events_and_thumbnail_read_only() -> None:
    """The page, JSON, SSE and the reject thumbnail are served; POST is refused (the page is read-only)."""
    with running(FakeInspector(), status_refresh_s=0.05) as (server, _), Client(server) as client:
        address = server.endpoints["http"]
        status, body, kind = get(address, "/")
        assert status == 200 and b"EventSource" in body and kind.startswith("text/html")
        assert b"http://" not in body and b"https://" not in body  # nothing from outside the box
        assert get(address, "/reject.jpg")[0] == 404
        client.send(1)
        client.send(2, image(defect=True))
        assert len(client.decisions(2)) == 2
        end = time.monotonic() + 30  # the board renders on its own thread: wait (bounded) for both and the thumbnail

        def rendered(snap: dict) -> bool:
            return snap["total"]["total"] == 2 and snap["reject_image"] is not None

        while not rendered(snap := json.loads(get(address, "/status.json")[1])) and time.monotonic() < end:
            time.sleep(0.02)
        assert snap["total"]["pass"] == 1 and snap["total"]["reject"] == 1 and snap["reject_image"]["frame_id"] == 2
        status, jpeg, kind = get(address, "/reject.jpg")
        assert status == 200 and kind == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
        with urllib.request.urlopen(f"http://{address}/events", timeout=5) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            lines = [stream.readline() for _ in range(4)]
        event = json.loads(next(line for line in lines if line.startswith(b"data: "))[6:])
        assert event["total"]["total"] == 2 and event["health"]["ok"] is True
        assert get(address, "/status.json", method="POST")[0] == 501
