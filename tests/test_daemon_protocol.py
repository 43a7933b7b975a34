"""Wire protocol: native and imagezmq parsing against the model geometry, decision JSON."""

from __future__ import annotations

import json

import numpy as np

from daemon.protocol import BadFrame, Decision, Frame, message_limit, parse_imagezmq, parse_native, result_fields
from engines.types import Defect, Geometry, Result
from tests.test_daemon_support import GEOMETRY, header, image


def native(hdr: dict | bytes, payload: bytes | None = None) -> Frame | BadFrame:
    raw = hdr if isinstance(hdr, bytes) else json.dumps(hdr).encode()
    parts = [raw] if payload is None else [raw, payload]
    return parse_native(parts, 123, GEOMETRY)


def test_good_native_frame_is_a_zero_copy_frame() -> None:
    """A valid header and payload give a Frame whose payload is a view of the message."""
    payload = bytearray(image().tobytes())
    item = native(header(5, part_id="P-1", deadline_ns=999), bytes(payload))
    assert isinstance(item, Frame)
    assert (item.camera_id, item.frame_id, item.part_id, item.deadline_ns) == ("cam1", 5, "P-1", 999)
    assert isinstance(item.payload, memoryview) and len(item.payload) == GEOMETRY.nbytes


def test_bad_native_messages_name_the_frame_when_they_can() -> None:
    """Each malformed message is a BadFrame with a short detail and the ids that could be read."""
    good = image().tobytes()
    cases = {
        "not UTF-8 JSON": native(b"\xff{", good),
        "misses": native({k: v for k, v in header(1).items() if k != "dtype"}, good),
        "dtype": native(header(2, dtype="float64"), good),
        "encoding": native(header(3, encoding="webp"), good),
        "header says": native(header(4), good[:-1]),
        "payload is": native(header(5), good + b"x"),
        "model expects": native(header(6, width=64), good),
        "2 message parts": native(header(7)),
        "version": native(header(8, v=2), good),
        "integer": native(header(9, deadline_ns="soon"), good),
        "exceeds": native(header(10, encoding="png"), bytes(message_limit(GEOMETRY) + 1)),
    }
    for needle, item in cases.items():
        assert isinstance(item, BadFrame), needle
        assert needle in item.detail, (needle, item.detail)
        assert len(item.detail) <= 200
    assert cases["not UTF-8 JSON"].frame_id is None
    assert cases["dtype"].frame_id == 2 and cases["dtype"].camera_id == "cam1"
    assert cases["2 message parts"].frame_id == 7


def test_ids_must_be_short_ints_or_strings() -> None:
    """A list as frame id or an overlong camera id is refused, and not echoed back."""
    item = native(header([1], camera_id="x" * 1000), image().tobytes())
    assert isinstance(item, BadFrame) and item.frame_id is None and item.camera_id is None


def test_imagezmq_array_and_jpeg_messages() -> None:
    """send_image metadata becomes a raw frame, send_jpg a jpeg frame, numbered per sender name."""
    counters: dict[str, int] = {}

    def next_id(cam: str) -> int:
        counters[cam] = counters.get(cam, -1) + 1
        return counters[cam]

    meta = json.dumps({"msg": "pi-1", "dtype": "uint8", "shape": [32, 48]}).encode()
    first = parse_imagezmq([meta, image().tobytes()], 1, GEOMETRY, next_id)
    second = parse_imagezmq([json.dumps({"msg": "pi-1"}).encode(), b"\xff\xd8jpeg"], 2, GEOMETRY, next_id)
    assert isinstance(first, Frame) and (first.camera_id, first.frame_id, first.encoding) == ("pi-1", 0, "raw")
    assert isinstance(second, Frame) and (second.frame_id, second.encoding) == (1, "jpeg")
    wrong = json.dumps({"msg": "pi-1", "dtype": "uint8", "shape": [32, 48, 3]}).encode()
    bad = parse_imagezmq([wrong, image().tobytes()], 3, GEOMETRY, next_id)
    assert isinstance(bad, BadFrame) and bad.frame_id == 2 and "model expects" in bad.detail
    garbage = parse_imagezmq([b"garbage"], 4, GEOMETRY, next_id)
    assert isinstance(garbage, BadFrame) and garbage.camera_id == "imagezmq" and garbage.frame_id == 0


def test_colour_uint16_geometry_is_checked() -> None:
    """Header geometry must equal the model's in size, channels and pixel type."""
    geo = Geometry(4, 5, 3, "uint16")
    hdr = header(1, geometry=geo)
    ok = parse_native([json.dumps(hdr).encode(), bytes(geo.nbytes)], 0, geo)
    mono = parse_native([json.dumps({**hdr, "channels": 1}).encode(), bytes(geo.nbytes)], 0, geo)
    assert isinstance(ok, Frame) and isinstance(mono, BadFrame)


def test_decision_json_caps_defects_and_reports_timing() -> None:
    """Decision JSON has every documented field; defects beyond the cap are counted."""
    defects = [Defect((i, i, i + 1, i + 1), 1, float(i)) for i in range(5)]
    fields = result_fields(Result("reject", "defect", 4.0, 1.0, defects), max_defects=2)
    d = Decision("f", "cam", None, t_received_ns=0, t_decided_ns=5_000_000, deadline_ns=4_000_000, model="m", **fields)
    out = json.loads(d.to_json())
    assert [x["score"] for x in out["defects"]] == [4.0, 3.0] and out["defects_more"] == 3
    assert out["latency_ms"] == 5.0 and out["deadline_met"] is False
    assert set(out) >= {
        "v",
        "frame_id",
        "camera_id",
        "part_id",
        "verdict",
        "reason",
        "score",
        "threshold",
        "defects",
        "t_received_ns",
        "t_decided_ns",
        "latency_ms",
        "deadline_met",
        "model",
    }
    inf = Decision(1, "c", None, "reject", "bad_frame", 0, 0, 0, "m", score=float("inf"))
    assert json.loads(inf.to_json())["score"] is None
    assert np.isfinite(out["score"])


def test_field_rules_at_their_edges() -> None:
    """Ids: 64-bit ints and 1-256 characters of text; bools, floats and lone surrogates are not ids."""
    from daemon import validation as check

    assert [check.frame_id(v) for v in (-(2**63), 2**64 - 1, "a" * 256, "日本")] == [
        -(2**63),
        2**64 - 1,
        "a" * 256,
        "日本",
    ]
    assert [check.frame_id(v) for v in (-(2**63) - 1, 2**64, "a" * 257, "", True, 1.0, "x\ud800", [1])] == [None] * 8
    assert check.camera_id("cam\ud800") is None and check.camera_id("\x00tab\t") == "\x00tab\t"
    assert (
        check.part_id(None) == (None, "") and check.part_id(False)[0] is None and "part_id" in check.part_id(False)[1]
    )


def test_deadline_window_at_its_edges() -> None:
    """0 and 2**64-1 are "none"; [receipt - 10 s, receipt + max] is accepted; one ns outside is refused."""
    from daemon.validation import PAST_WINDOW_NS, deadline

    t, ahead = 10**18, 60 * 10**9
    assert deadline(0, t, ahead) == (None, "") and deadline(2**64 - 1, t, ahead) == (None, "")
    assert deadline(t - PAST_WINDOW_NS, t, ahead) == (t - PAST_WINDOW_NS, "")
    assert deadline(t + ahead, t, ahead) == (t + ahead, "")
    for bad in (t - PAST_WINDOW_NS - 1, t + ahead + 1, 10**400, -(10**400), True, 1.5e18, "soon"):
        value, why = deadline(bad, t, ahead)
        assert value is None and "deadline_ns" in why, bad


def test_native_frames_keep_valid_deadlines_and_drop_bad_capture_times() -> None:
    """A deadline 5 s past is kept (the scheduler rejects it at once); t_capture_ns junk is dropped, not refused."""
    now = 10**18
    parts = [json.dumps(header(1, deadline_ns=now - 5 * 10**9, t_capture_ns=-5)).encode(), image().tobytes()]
    item = parse_native(parts, now, GEOMETRY)
    assert isinstance(item, Frame) and item.deadline_ns == now - 5 * 10**9
    assert item.t_capture_ns is None and item.dropped == ("t_capture_ns",)
    far = parse_native([json.dumps(header(2, deadline_ns=now + 61 * 10**9)).encode(), image().tobytes()], now, GEOMETRY)
    assert isinstance(far, BadFrame) and far.deadline_ns is None and far.frame_id == 2


def test_parsers_answer_even_when_a_check_itself_fails(monkeypatch: object) -> None:
    """A bug inside the checks still gives a named bad_frame (flagged internal), never an exception."""
    from daemon import protocol

    def broken(*_: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(protocol, "_check_image_fields", broken)  # type: ignore[attr-defined]
    item = parse_native([json.dumps(header(9)).encode(), image().tobytes()], 0, GEOMETRY)
    assert isinstance(item, BadFrame) and item.internal and item.frame_id == 9 and "ZeroDivisionError" in item.detail
