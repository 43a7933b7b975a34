"""What a hostile or broken camera sends, over real sockets: each row of issue 12's table, and its neighbours.

Rows 1-5 run against a daemon on loopback (a FakeInspector stands in for the model: these
tests are about the headers, not the detector), with a real pymodbus server as the PLC
where the actuator matters. Row 6 drives the scheduler with a frozen clock.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import zmq

from daemon.actuator import VERDICT_CODES, Record
from daemon.protocol import BadFrame, Frame
from daemon.scheduler import Scheduler
from tests.test_daemon_modbus import coverage
from tests.test_daemon_support import LOOPBACK, Client, FakeInspector, ManualClock, ModbusPeer, image, running

MS = 1_000_000


def wait_for(check: Any, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return False


def http_get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def imagezmq_request(endpoint: str, metadata: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """What an imagezmq REQ sender gets back for one message (zmq.Again if no reply within 5 s)."""
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.connect(endpoint)
    try:
        req.send_multipart([json.dumps(metadata).encode(), payload])
        return json.loads(req.recv())
    finally:
        ctx.destroy(linger=0)


def sink(server: Any, name: str) -> Any:
    return next(s for s in server.outputs.sinks if s.name == name)


# -- row 1 ---------------------------------------------------------------------------------------
def test_row1_no_deadline_values_leave_the_reject_actuator_working() -> None:
    """deadline_ns 2**64-1 ("none") and 10**20 with reject-by-default: every later reject still reaches the PLC."""
    peer = ModbusPeer()
    plc = {"plc_host": "127.0.0.1", "plc_port": peer.port, "plc_reject_by_default": True, "plc_pulse_ms": 20}
    try:
        with running(FakeInspector(), cycle_ms=400, **plc) as (server, _), Client(server) as client:
            client.send(1, deadline_ns=2**64 - 1)
            client.send(2, deadline_ns=10**20)
            got = client.decisions(2)
            # frame 2's reject pulse has ended before frame 3 comes (a reject during a pulse only extends it)
            assert wait_for(lambda: [on for _, on in peer.coil_writes(0)][-2:] == [True, False], 30)
            client.send(3, image(defect=True))
            got += client.decisions(1)
            # all three records reached the PLC: the actuator thread did not die on the deadlines
            assert wait_for(lambda: peer.registers(0, 4)[0] == 3, 30)
            assert wait_for(lambda: sum(on for _, on in peer.coil_writes(0)) >= 2, 30)  # frames 2 and 3 rejected
            status, _ = http_get(server.endpoints["http"], "/healthz")
        assert [(d["frame_id"], d["reason"]) for d in got] == [(1, "ok"), (2, "bad_frame"), (3, "defect")]
        for d in got[:2]:  # "none" and out of range both mean receipt + cycle
            assert d["deadline_ns"] == d["t_received_ns"] + 400 * MS
        assert "deadline_ns" in got[1]["detail"]
        # every frame's result reached the PLC (records cover them in order; one may cover several)
        assert sorted(coverage(peer.records(), got)) == [1, 2, 3]
        assert Record(*peer.records()[-1]).verdict == VERDICT_CODES["ng"]
        assert status == 200
    finally:
        peer.stop()


# -- row 2 ---------------------------------------------------------------------------------------
def test_row2_deadlines_beyond_64_bits_are_bad_frames_and_the_daemon_lives_on() -> None:
    """deadline_ns 10**400 / -10**400: bad_frame rejects, the deadline thread lives, summary and shutdown work."""
    with running(cycle_ms=500) as (server, _), Client(server) as client:
        client.send(1, deadline_ns=10**400)
        client.send(2, deadline_ns=-(10**400))
        client.send(3)
        got = client.decisions(3)
        summary = server.scheduler.summary()  # the periodic summary crashed on the negative value
        server.log_summary()
    # running() checked the exit code: 0, a clean shutdown
    assert [(d["frame_id"], d["reason"]) for d in got] == [(1, "bad_frame"), (2, "bad_frame"), (3, "ok")]
    assert all("deadline_ns" in d["detail"] and "beyond any clock" in d["detail"] for d in got[:2])
    assert all(d["deadline_ns"] == d["t_received_ns"] + 500 * MS for d in got)
    assert summary["decisions"] == 3 and summary["reasons"] == {"bad_frame": 2, "ok": 1}


# -- row 3 ---------------------------------------------------------------------------------------
def test_row3_a_dtype_of_the_wrong_type_is_a_bad_frame_on_both_endpoints() -> None:
    """dtype as a list or an object: a bad_frame decision naming dtype; the imagezmq REQ sender gets its reply."""
    with running(imagezmq_endpoint=LOOPBACK) as (server, _), Client(server) as client:
        client.send(1, dtype=["uint8"])
        client.send(2, dtype={"name": "uint8"})
        got = client.decisions(2)
        meta = {"msg": "pi-1", "dtype": ["uint8"], "shape": [32, 48]}
        reply = imagezmq_request(server.endpoints["imagezmq"], meta, image().tobytes())
        totals = server.scheduler.totals()
    assert [(d["frame_id"], d["reason"]) for d in got] == [(1, "bad_frame"), (2, "bad_frame")]
    assert all("unknown dtype" in d["detail"] for d in got)
    assert (reply["camera_id"], reply["frame_id"], reply["reason"]) == ("pi-1", 0, "bad_frame")
    assert "unknown dtype" in reply["detail"]
    assert server.intake.failed == 0 and totals["decisions"] == 3


# -- row 4 ---------------------------------------------------------------------------------------
def test_row4_lone_surrogates_in_ids_are_refused_and_a_nameless_frame_fires_the_default_reject() -> None:
    """A surrogate in camera_id / the imagezmq name: bad_frame, published; in frame_id: unanswered, default reject."""
    peer = ModbusPeer()
    plc = {"plc_host": "127.0.0.1", "plc_port": peer.port, "plc_reject_by_default": True, "plc_pulse_ms": 20}
    try:
        with (
            running(FakeInspector(), cycle_ms=300, imagezmq_endpoint=LOOPBACK, **plc) as (server, _),
            Client(server) as client,
        ):
            client.send(1, camera_id="cam\ud800")
            first = client.decisions(1)
            meta = {"msg": "pi\ud800", "dtype": "uint8", "shape": [32, 48]}
            reply = imagezmq_request(server.endpoints["imagezmq"], meta, image().tobytes())
            second = client.decisions(1)
            client.send("f\ud800")  # the frame id is not text: the message cannot be answered
            client.send(3)
            third = client.decisions(2, timeout_s=2)
            plc_sink = sink(server, "plc")
            assert wait_for(lambda: plc_sink.stats()["default_rejects"] == 1)
            totals = server.scheduler.totals()
    finally:
        peer.stop()
    assert [(d["frame_id"], d["camera_id"], d["reason"]) for d in first] == [(1, None, "bad_frame")]
    assert "camera_id" in first[0]["detail"]
    assert (reply["camera_id"], reply["reason"]) == ("imagezmq", "bad_frame") and "msg" in reply["detail"]
    assert [(d["camera_id"], d["reason"]) for d in second] == [("imagezmq", "bad_frame")]
    assert [d["frame_id"] for d in third] == [3]
    assert totals["unidentified_bad_messages"] == 1


# -- row 5 ---------------------------------------------------------------------------------------
def test_row5_booleans_and_floats_are_not_numbers() -> None:
    """v: true, v: 1.0, channels: true, width: true: each a bad_frame naming what is wrong."""
    with running() as (server, _), Client(server) as client:
        client.send(1, v=True)
        client.send(2, v=1.0)
        client.send(3, channels=True)
        client.send(4, width=True)
        client.send(5, part_id=True)
        client.send(6)
        got = client.decisions(6)
    assert [(d["frame_id"], d["reason"]) for d in got] == [(i, "bad_frame") for i in range(1, 6)] + [(6, "ok")]
    assert ["version" in d["detail"] for d in got[:2]] == [True, True]
    assert "image size" in got[2]["detail"] and "image size" in got[3]["detail"] and "part_id" in got[4]["detail"]


# -- row 6 ---------------------------------------------------------------------------------------
def test_row6_a_deadline_already_past_is_rejected_at_once_and_is_no_timer_lag() -> None:
    """With a frozen clock: a frame due 5 s ago gets a deadline reject on arrival; timer lag stays 0."""
    now = 1_900_000_000 * 10**9
    published: list[Any] = []
    fake = FakeInspector()
    sched = Scheduler(fake, published.append, cycle_ns=200 * MS, margin_ns=20 * MS, clock=lambda: now)
    sched.start()
    try:
        frame = Frame("cam1", 1, "raw", memoryview(image().tobytes()), now, deadline_ns=now - 5 * 10**9)
        sched.submit(frame)
        assert wait_for(lambda: len(published) == 1)
        time.sleep(0.05)
        summary = sched.summary()
    finally:
        sched.stop()
    assert (published[0].reason, published[0].deadline_ns) == ("deadline", now - 5 * 10**9)
    assert summary["timer_lag_max_ms"] == 0.0
    assert fake.inferred == []  # nothing was computed for it


def test_a_past_deadline_does_not_pull_its_predecessors_down() -> None:
    """A frame due in the past behind one due later: the earlier frame keeps its deadline and is inspected."""
    clock = ManualClock()  # time moves only by the fake's 50 ms of inference: no deadline but the past one
    now = clock()
    published: list[Any] = []
    fake = FakeInspector(infer_s=0.05, clock=clock)
    sched = Scheduler(fake, published.append, cycle_ns=2000 * MS, margin_ns=20 * MS, clock=clock, stage_clock=clock)
    sched.start()
    try:
        sched.submit(Frame("cam1", 1, "raw", memoryview(image().tobytes()), now))
        sched.submit(Frame("cam1", 2, "raw", memoryview(image().tobytes()), now, deadline_ns=now - 10**9))
        assert wait_for(lambda: len(published) == 2)
    finally:
        sched.stop()
    assert [(d.frame_id, d.reason) for d in published] == [(1, "ok"), (2, "deadline")]


# -- neighbours of the rows -------------------------------------------------------------------------
def test_capture_times_are_informational_dropped_and_counted() -> None:
    """Unreadable t_capture_ns values never reject a frame; they are dropped, counted and shown in /metrics."""
    values = [-1, 2**64, "yesterday", True, 1.5, None, 12345]
    with running(queue_depth=16) as (server, _), Client(server) as client:
        for i, value in enumerate(values):
            client.send(i, t_capture_ns=value)
        got = client.decisions(len(values))
        time.sleep(0.05)
        totals = server.scheduler.totals()
        _, metrics = http_get(server.endpoints["http"], "/metrics")
    assert [d["reason"] for d in got] == ["ok"] * len(values)
    assert totals["t_capture_dropped"] == 5
    assert "inspectd_capture_times_dropped_total 5.0" in metrics.decode()


def test_unreadable_headers_of_every_shape_are_counted_not_crashing() -> None:
    """Deeply nested JSON, NaN, a huge integer id, a non-object: counted as unidentified; nothing failed."""
    bodies = [b"[" * 20000, b'{"v": 1, "frame_id": NaN}', json.dumps({"frame_id": 2**64}).encode(), b"[1, 2]"]
    with running() as (server, _), Client(server) as client:
        for body in bodies:
            client.send_parts(body, image().tobytes())
        client.send(1)
        got = client.decisions(1)
        time.sleep(0.05)
        totals = server.scheduler.totals()
    assert [d["frame_id"] for d in got] == [1]
    assert totals["unidentified_bad_messages"] == len(bodies) and server.intake.failed == 0


def test_unidentified_messages_fire_one_default_reject_each_at_receipt_plus_cycle() -> None:
    """With reject-by-default, each message without a readable id is one reject on the line (a part passed)."""
    from daemon.actuator import ActuatorSink

    class Line(ActuatorSink):
        name = "line"

        def __init__(self) -> None:
            super().__init__(reject_by_default=True, pulse_ms=5)
            self.on: list[bool] = []

        def set_output(self, on: bool) -> None:
            self.on.append(on)

    line = Line()
    line.start()
    now = time.time_ns()
    for _ in range(3):
        line.admit(BadFrame("header is not UTF-8 JSON", now), now + 50 * MS)
    try:
        assert wait_for(lambda: line.default_rejects == 3)
    finally:
        line.close()
    assert line.on.count(True) >= 1 and line.failed == 0
