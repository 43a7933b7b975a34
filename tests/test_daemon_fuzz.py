"""Property-based fuzzing of both frame endpoints against a running daemon, over real sockets (hypothesis).

Native messages (a PUSH socket) and imagezmq messages (a DEALER speaking the REQ envelope
to the daemon's ROUTER) with headers whose every field is either valid, junk of any JSON
type, or missing; header parts that are not JSON at all; payloads of every kind (raw of
the right and wrong size, PNG/JPEG/TIFF of the right and wrong geometry, garbage); one to
three message parts. The daemon runs with every output (decision PUB, imagezmq replies, a
real pymodbus server as PLC with reject-by-default, audit trail, status page, metrics); a
FakeInspector stands in for the model (the subject is the daemon, not the detector).

Properties: every identified native frame (a JSON object header with a usable frame_id)
gets exactly one decision, with the camera id it sent if that was valid; every other
native message none (it is counted); every imagezmq message exactly one reply and one
published decision, numbered without gaps or repeats per camera; afterwards no thread has
died, nothing failed in the intake, /healthz is 200 and a good frame passes.

Frame ids that should be usable are made unique per case (the test numbers them), so a
decision can be traced to its message. The default run has a few hundred cases; the
``slow`` one 10,000 (``python -m pytest -m slow tests/test_daemon_fuzz.py -s`` prints its figures).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.server import Server
from tests.test_daemon_hostile import http_get
from tests.test_daemon_support import (
    GEOMETRY,
    LOOPBACK,
    FakeInspector,
    ModbusPeer,
    connect_after_handshake,
    decision_sink,
    header,
    image,
    make_config,
)

MS = 1_000_000
GOOD = image().tobytes()
DEFECT = image(defect=True).tobytes()
PAYLOADS = {
    "raw": GOOD,
    "raw_defect": DEFECT,
    "png": cv2.imencode(".png", image())[1].tobytes(),
    "jpeg": cv2.imencode(".jpg", image())[1].tobytes(),
    "tiff": cv2.imencode(".tiff", image())[1].tobytes(),
    "png_other": cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes(),
    "png_truncated": cv2.imencode(".png", image())[1].tobytes()[:60],
    "jpeg_header_only": b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x20\x00\x30\x01",
    "empty": b"",
}
CAMERA_POOL = ["z-cam", "z-ü", "z-日本", "z-" + "x" * 250, "z-\x00nul", "z-tab\t", "z-😀", "z-a/b\\c", "z-<b>"]

# -- values ----------------------------------------------------------------------------------------
EDGE_INTS = [
    0,
    -1,
    1,
    3,
    2**31,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**20,
    10**400,
    -(10**400),
]
surrogates = st.builds(lambda a, b: a + "\ud800" + b, st.text(max_size=3), st.text(max_size=3))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    surrogates,
    st.just("x" * 300),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
raw_headers = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"[" * 20000,
            b'{"v": 1, "frame_id": NaN}',
            b'{"frame_id": Infinity}',
            b"\xef\xbb\xbf{}",
            b"null",
            b"{",
            b"1e999",
        ]
    ),
    st.builds(lambda t: t.encode("utf-8", "surrogatepass"), st.text(max_size=20) | surrogates),
)
VALID = {
    "v": st.just(1),
    "width": st.just(GEOMETRY.width),
    "height": st.just(GEOMETRY.height),
    "channels": st.just(GEOMETRY.channels),
    "dtype": st.just(GEOMETRY.dtype),
    "encoding": st.sampled_from(["raw", "raw", "png", "jpeg", "tiff"]),
    "part_id": st.one_of(st.text(min_size=1, max_size=30), st.integers(-(2**63), 2**64 - 1)),
    "t_capture_ns": st.integers(0, 2**64 - 1),
}
field_choice = st.sampled_from(["valid"] * 6 + ["junk", "absent"])


@dataclass
class NativeCase:
    raw_header: bytes | None  # not a JSON object at all (None: a dict header built from the fields below)
    fields: dict[str, Any]
    id_kind: str  # int | bigint | negint | text | invalid | absent
    id_suffix: str
    camera: str | None  # a valid camera id, or None when the header's is junk or missing
    deadline: tuple[str, Any]  # ("offset_ms", ms from now) | ("value", anything)
    payload: bytes
    parts: int
    pad: int


@st.composite
def native_cases(draw: st.DrawFn) -> NativeCase:
    clean = draw(st.integers(0, 2)) == 0  # a third are well-formed frames, so the engine sees odd ids and deadlines too
    fields: dict[str, Any] = {}
    for name, valid in VALID.items():
        choice = "valid" if clean else draw(field_choice)
        if choice != "absent":
            fields[name] = draw(valid if choice == "valid" else junk)
    payload = draw(st.sampled_from(list(PAYLOADS.values())) | st.binary(max_size=3000))
    if clean:
        payload = PAYLOADS[fields["encoding"]] if fields["encoding"] != "raw" else draw(st.sampled_from([GOOD, DEFECT]))
    camera_kind = draw(st.sampled_from(["valid"] * 4 + ["junk", "absent"]))
    camera = "n-" + draw(st.text(max_size=40)) if camera_kind == "valid" else None
    if camera_kind == "junk":
        fields["camera_id"] = draw(junk.filter(lambda v: not (isinstance(v, str) and 0 < len(v) <= 256)) | surrogates)
    id_kind = draw(st.sampled_from(["int", "int", "bigint", "negint", "text", "text", "invalid", "absent"]))
    if id_kind == "invalid":
        fields["frame_id"] = draw(
            st.one_of(st.booleans(), st.none(), st.floats(), st.just(""), st.just("y" * 257), surrogates)
            | st.sampled_from([2**64, -(2**63) - 1, 10**400, [1], {"id": 1}])
        )
    deadline = draw(
        st.one_of(
            st.tuples(st.just("absent"), st.none()),
            st.tuples(st.just("offset_ms"), st.integers(-15_000, 90_000)),
            st.tuples(st.just("value"), st.sampled_from([0, 2**64 - 1, None, *EDGE_INTS]) | junk),
        )
    )
    return NativeCase(
        raw_header=draw(raw_headers) if draw(st.integers(0, 9)) == 0 else None,
        fields=fields,
        id_kind=id_kind,
        id_suffix=draw(st.text(max_size=20)),
        camera=camera,
        deadline=deadline,
        payload=payload,
        parts=draw(st.sampled_from([2] * 8 + [1, 3])),
        pad=draw(st.sampled_from([0] * 30 + [17_000])),
    )


@dataclass
class ZmqCase:
    raw_meta: bytes | None
    meta: dict[str, Any]
    name: str | None  # a valid name from the pool, or None when it is junk or missing
    payload: bytes
    parts: int


@st.composite
def imagezmq_cases(draw: st.DrawFn) -> ZmqCase:
    meta: dict[str, Any] = {}
    name_kind = draw(st.sampled_from(["valid"] * 5 + ["junk", "absent"]))
    name = draw(st.sampled_from(CAMERA_POOL)) if name_kind == "valid" else None
    if name is not None:
        meta["msg"] = name
    elif name_kind == "junk":
        meta["msg"] = draw(junk.filter(lambda v: not (isinstance(v, str) and 0 < len(v) <= 256)) | surrogates)
    kind = draw(st.sampled_from(["array", "array", "jpg", "mixed"]))
    if kind in ("array", "mixed"):
        for key, valid in (("shape", [GEOMETRY.height, GEOMETRY.width]), ("dtype", GEOMETRY.dtype)):
            choice = draw(field_choice)
            if choice != "absent":
                meta[key] = valid if choice == "valid" else draw(junk)
    return ZmqCase(
        raw_meta=draw(raw_headers) if draw(st.integers(0, 9)) == 0 else None,
        meta=meta,
        name=name,
        payload=draw(st.sampled_from(list(PAYLOADS.values())) | st.binary(max_size=3000)),
        parts=draw(st.sampled_from([2] * 8 + [1, 3])),
    )


# -- the run ---------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What was sent and what came back."""

    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    identified: dict[Any, str | None] = field(default_factory=dict)  # frame id -> expected camera id
    unidentified: int = 0
    imagezmq: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)  # everything the PUB published
    replies: list[dict[str, Any]] = field(default_factory=list)


class Line:
    """The daemon with every output, a PLC, a camera of each kind and a decision subscriber."""

    def __init__(self, tmp_path: Path) -> None:
        self.peer = ModbusPeer()
        cfg = make_config(
            imagezmq_endpoint=LOOPBACK,
            plc_host="127.0.0.1",
            plc_port=self.peer.port,
            plc_reject_by_default=True,
            plc_pulse_ms=1,
            audit_dir=str(tmp_path / "audit"),
            audit_max_count=200,
            queue_depth=16,
            cycle_ms=500,
            drain_s=0.2,
        )
        self.server = Server(cfg, loader=lambda m, b: FakeInspector())
        self.codes: list[int] = []
        self.thread = threading.Thread(target=lambda: self.codes.append(self.server.run(install_signals=False)))
        self.thread.start()
        assert self.server.ready.wait(10)
        self.ctx = zmq.Context()
        self.push = self._socket(zmq.PUSH, "frames")
        self.dealer = self._socket(zmq.DEALER, "imagezmq")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        connect_after_handshake(self.sub, self.server.endpoints["decisions"], decision_sink(self.server))
        self.ledger = Ledger()

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 5000)
        sock.connect(self.server.endpoints[endpoint])
        return sock

    def close(self) -> None:
        self.server.request_stop()
        self.thread.join(15)
        self.ctx.destroy(linger=0)
        self.peer.stop()

    # -- receiving ------------------------------------------------------------------------------------
    def collect(self, timeout_ms: int = 0) -> None:
        while self.sub.poll(timeout_ms):
            topic, body = self.sub.recv_multipart()
            decision = json.loads(body)
            assert topic == (decision["camera_id"] or "").encode("utf-8", "surrogatepass")
            self.ledger.decisions.append(decision)
            timeout_ms = 0

    def wait_decision(self, frame_id: Any, timeout_s: float = 5.0) -> dict[str, Any] | None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for d in reversed(self.ledger.decisions[-8:]):
                if d["frame_id"] == frame_id and _native(d):
                    return d
            self.collect(20)
        return None

    # -- sending --------------------------------------------------------------------------------------
    def send_native(self, case: NativeCase) -> None:
        n = next(self.ledger.numbers)
        fields = dict(case.fields)
        frame_id = {
            "int": n,
            "bigint": 2**64 - 1 - n,
            "negint": -(2**63) + n,
            "text": f"t{n}-{case.id_suffix}",
        }.get(case.id_kind)
        if frame_id is not None:
            fields["frame_id"] = frame_id
        if case.camera is not None:
            fields["camera_id"] = case.camera
        kind, value = case.deadline
        if kind == "offset_ms":
            fields["deadline_ns"] = time.time_ns() + value * MS
        elif kind == "value":
            fields["deadline_ns"] = value
        if case.pad:
            fields["pad"] = "p" * case.pad
        head = case.raw_header if case.raw_header is not None else json.dumps(fields).encode()
        parts = [head, case.payload, b"extra"][: case.parts]
        self.push.send_multipart(parts)
        if case.raw_header is None and frame_id is not None and len(head) <= 16 * 1024:
            self.ledger.identified[frame_id] = case.camera
            got = self.wait_decision(frame_id)
            assert got is not None, f"no decision for frame {frame_id!r}: {head[:300]!r}"
            assert got["camera_id"] == case.camera
        else:
            self.ledger.unidentified += 1

    def send_imagezmq(self, case: ZmqCase) -> None:
        meta = case.raw_meta if case.raw_meta is not None else json.dumps(case.meta).encode()
        self.dealer.send_multipart([b"", *[meta, case.payload, b"extra"][: case.parts]])
        self.ledger.imagezmq += 1
        assert self.dealer.poll(5000), f"no reply to {meta[:200]!r}"
        delimiter, body = self.dealer.recv_multipart()
        reply = json.loads(body)
        expected = case.name if case.raw_meta is None else None
        assert delimiter == b"" and reply["camera_id"] == (expected or "imagezmq"), (reply, meta[:200])
        self.ledger.replies.append(reply)
        self.collect()  # keep the subscriber's queue short (its high-water mark would drop decisions)

    # -- the end --------------------------------------------------------------------------------------
    def verdict(self) -> dict[str, Any]:
        """Send a good frame, then compare everything sent with everything received."""
        self.push.send_multipart([json.dumps(header("final", camera_id="n-final")).encode(), GOOD])
        final = self.wait_decision("final")
        time.sleep(0.2)
        self.collect(50)
        ledger = self.ledger
        native = Counter(_key(d["frame_id"]) for d in ledger.decisions if _native(d) and d["frame_id"] != "final")
        published_zmq = [d for d in ledger.decisions if not _native(d)]
        per_camera: dict[str, list[int]] = {}
        for reply in ledger.replies:
            per_camera.setdefault(reply["camera_id"], []).append(reply["frame_id"])
        threads = self.server.supervisor.stats()
        return {
            "final": final["reason"] if final else None,
            "identified": len(ledger.identified),
            "unidentified": ledger.unidentified,
            "native_decisions": sum(native.values()),
            "reasons": dict(Counter(d["reason"] for d in ledger.decisions if _native(d))),
            "duplicates": sum(c - 1 for c in native.values() if c > 1),
            "missing": sum(1 for f in ledger.identified if native[_key(f)] == 0),
            "unexpected": sum(1 for f in native if f not in {_key(k) for k in ledger.identified}),
            "imagezmq": ledger.imagezmq,
            "replies": len(ledger.replies),
            "imagezmq_published": len(published_zmq),
            "numbering_ok": all(ids == list(range(len(ids))) for ids in per_camera.values()),
            "deaths": sum(t["deaths"] for t in threads.values()),
            "intake_failed": self.server.intake.failed,
            "unidentified_counted": self.server.scheduler.totals().get("unidentified_bad_messages", 0),
            "healthz": http_get(self.server.endpoints["http"], "/healthz")[0],
        }


def _native(decision: dict[str, Any]) -> bool:
    camera = decision["camera_id"]
    return camera is None or camera.startswith("n-")


def _key(frame_id: Any) -> tuple[str, Any]:
    return (type(frame_id).__name__, frame_id)


@contextmanager
def line(tmp_path: Path) -> Iterator[Line]:
    fuzz_line = Line(tmp_path)
    try:
        yield fuzz_line
    finally:
        fuzz_line.close()


def fuzz(tmp_path: Path, native: int, imagezmq: int, derandomize: bool) -> tuple[dict[str, Any], float]:
    common = {
        "deadline": None,
        "database": None,
        "derandomize": derandomize,
        "suppress_health_check": list(HealthCheck),
    }
    started = time.monotonic()
    with line(tmp_path) as fuzz_line:

        @settings(max_examples=native, **common)
        @given(native_cases())
        def native_property(case: NativeCase) -> None:
            fuzz_line.send_native(case)

        @settings(max_examples=imagezmq, **common)
        @given(imagezmq_cases())
        def imagezmq_property(case: ZmqCase) -> None:
            fuzz_line.send_imagezmq(case)

        native_property()
        imagezmq_property()
        figures = fuzz_line.verdict()
    figures["exit_code"] = fuzz_line.codes
    return figures, time.monotonic() - started


def check(figures: dict[str, Any]) -> None:
    assert figures["final"] == "ok"
    assert figures["duplicates"] == figures["missing"] == figures["unexpected"] == 0
    assert figures["native_decisions"] == figures["identified"]
    assert figures["unidentified_counted"] == figures["unidentified"]
    assert figures["replies"] == figures["imagezmq_published"] == figures["imagezmq"] and figures["numbering_ok"]
    assert figures["deaths"] == 0 and figures["intake_failed"] == 0 and figures["healthz"] == 200
    assert figures["exit_code"] == [0]


def report(capsys: pytest.CaptureFixture[str], figures: dict[str, Any], wall_s: float) -> None:
    with capsys.disabled():
        sent = figures["identified"] + figures["unidentified"] + figures["imagezmq"]
        print(f"\nfuzz: {sent} messages in {wall_s:.1f} s: {json.dumps(figures)}")


def test_fuzzed_headers_and_payloads_on_both_endpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few hundred fuzzed messages (fixed examples): every identified frame decided once, no thread died."""
    figures, wall_s = fuzz(tmp_path, native=200, imagezmq=100, derandomize=True)
    report(capsys, figures, wall_s)
    check(figures)
    assert figures["identified"] + figures["unidentified"] + figures["imagezmq"] >= 300


@pytest.mark.slow
def test_ten_thousand_fuzzed_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """10,000 fuzzed messages (random examples each run): the same properties, figures printed."""
    figures, wall_s = fuzz(tmp_path, native=7000, imagezmq=3000, derandomize=False)
    report(capsys, figures, wall_s)
    check(figures)
    assert figures["identified"] + figures["unidentified"] + figures["imagezmq"] >= 10_000
