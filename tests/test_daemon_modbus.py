"""Modbus TCP reject output against a real pymodbus server: records, coil pulses, a PLC that stops answering or
goes away, and a flood with reject-by-default where every frame must end in a record or a default reject."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from daemon.actuator import REASON_CODES, VERDICT_CODES, Record, frame_word
from daemon.modbus import ModbusSink
from daemon.protocol import Decision
from tests.test_daemon_support import Client, FakeInspector, ModbusPeer, image, running


def decision(frame_id: int, verdict: str = "pass", reason: str = "ok") -> Decision:
    now = time.time_ns()
    return Decision(frame_id, "cam1", None, verdict, reason, now, now, now + 10**9, "m")


def wait_for(check, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def coverage(records: list[list[int]], decisions: list[dict[str, Any]]) -> dict[Any, int]:
    """Which record covers each decision (decisions in the order they were published).

    A record covers the ``covered`` decisions after the previous one's: its counter must move by
    exactly that much, and its frame word must be the newest covered decision's.
    """
    covers: dict[Any, int] = {}
    seen = 0
    for n, values in enumerate(records):
        record = Record(*values)
        assert record.counter == (seen + record.covered) & 0xFFFF, f"record {n} skips or repeats decisions"
        newest = decisions[seen + record.covered - 1]
        assert record.frame == frame_word(newest["frame_id"])
        assert record.rejects >= sum(d["verdict"] != "pass" for d in decisions[seen : seen + record.covered])
        for d in decisions[seen : seen + record.covered]:
            covers[d["frame_id"]] = n
        seen += record.covered
    return covers


def test_records_and_coil_pulse_are_written_to_the_plc() -> None:
    """The result block lands at the configured registers and the reject coil pulses on the configured device."""
    peer = ModbusPeer(device_id=3)
    sink = ModbusSink("127.0.0.1", peer.port, device_id=3, register=40, coil=7, mode="pulse", pulse_ms=60)
    sink.start()
    try:
        sink.offer(decision(5))
        sink.offer(decision(70000, "reject", "defect"))
        assert wait_for(lambda: len(peer.coil_writes(7)) >= 2)
        values = peer.registers(40, 9)
        assert values[:4] == [2, VERDICT_CODES["ng"], REASON_CODES["defect"], 70000 & 0xFFFF]
        published = [{"frame_id": 5, "verdict": "pass"}, {"frame_id": 70000, "verdict": "reject"}]
        assert sorted(coverage(peer.records(40), published)) == [5, 70000]
        (t_on, on), (t_off, off) = peer.coil_writes(7)[:2]
        assert on is True and off is False and 0.05 <= t_off - t_on < 0.3
        assert peer.coil(7) is False and sink.stats()["connected"] == 1
    finally:
        sink.close()
        peer.stop()


def test_after_a_reconnect_the_first_record_says_what_the_plc_missed() -> None:
    """With no PLC listening, records and coil pulses fail fast and are counted; once it is there, the first record
    covers every decision made meanwhile and says how many results were missed and how many rejects went unsignalled."""
    port = free_port()
    clock = FakeClock()
    sink = ModbusSink("127.0.0.1", port, timeout_s=0.2, backoff_s=(0.1, 0.2), clock=clock)
    sink.start()
    for i in range(50):  # the back-off runs on the injected clock, which stands still: one connect, then none
        sink.offer(decision(i, "reject", "defect"))
    assert wait_for(lambda: sink.stats()["unfired_rejects"] == 50, 30)
    assert sink.stats()["connected"] == 0 and sink.counter == 0
    peer = ModbusPeer(port=port)
    try:
        clock.now += 1.0  # past the back-off and the record's retry time
        sink.offer(decision(99, "reject", "defect"))
        assert wait_for(lambda: peer.records())
        assert wait_for(lambda: sink.stats()["records"] == 1, 30)  # the sink counts it once the PLC has answered
        assert sink.stats()["connected"] == 1 and sink.stats()["missed_results"] == 50
    finally:
        sink.close()
        peer.stop()
    first = Record(*peer.records()[0])
    assert (first.counter, first.covered, first.rejects, first.missed, first.unfired) == (51, 51, 51, 50, 50)
    assert (first.frame, first.reject_bits) == (99, 0xFFFF)


def test_daemon_writes_each_decision_to_the_plc() -> None:
    """A running daemon with plc_host set covers every frame with a record and pulses the coil for the reject."""
    peer = ModbusPeer()
    try:
        with running(FakeInspector(), plc_host="127.0.0.1", plc_port=peer.port, plc_pulse_ms=30) as (server, _):
            with Client(server) as client:
                client.send(1)
                client.send(2, image(defect=True))
                client.send(3)
                got = client.decisions(3)
            assert wait_for(lambda: peer.registers(0, 1)[0] == 3)
        covers = coverage(peer.records(), got)
        assert sorted(covers) == [1, 2, 3]
        assert [v for _, v in peer.coil_writes(0)][:2] == [True, False]
    finally:
        peer.stop()


def test_reject_by_default_fires_when_the_pipeline_is_too_slow() -> None:
    """With plc_reject_by_default, a frame still undecided at its deadline gets the reject coil at the deadline."""
    peer = ModbusPeer()
    try:
        options = {"plc_host": "127.0.0.1", "plc_port": peer.port, "plc_reject_by_default": True, "plc_mode": "level"}
        fake = FakeInspector()
        release = fake.hold("infer", 100)  # the inference does not end before the reject has fired
        with running(fake, cycle_ms=150, **options) as (server, _), Client(server) as client:
            client.send(1)
            got = client.decisions(1, timeout_s=30)
            assert got[0]["reason"] == "deadline"
            assert wait_for(lambda: any(v for _, v in peer.coil_writes(0)), 30)
            assert fake.inferred == []  # fired at the deadline, while the inference was still running
            release.set()
    finally:
        peer.stop()


def test_row2_a_plc_that_stops_answering_loses_no_frame() -> None:
    """Issue 13, row 2: the PLC stops answering while 300 frames are decided (the actuator thread waits in its
    request; the old queue of 256 dropped admissions and decisions). Once it answers again every frame is covered by
    a record, in order, and nothing was dropped."""
    peer = ModbusPeer()
    plc = {"plc_host": "127.0.0.1", "plc_port": peer.port, "plc_reject_by_default": True, "plc_timeout_s": 30.0}
    try:
        with running(FakeInspector(), queue_depth=16, **plc) as (server, _), Client(server) as client:
            client.send(0)
            got = client.decisions(1)
            assert wait_for(lambda: len(peer.records()) == 1)
            peer.pause()
            for i in range(1, 301):
                client.send(i, image(defect=i % 5 == 0))
            got += client.decisions(300, timeout_s=20)
            plc_sink = next(s for s in server.outputs.sinks if s.name == "plc")
            peer.resume()
            assert wait_for(lambda: plc_sink.stats()["queued"] == 0, 10)
            assert wait_for(lambda: sum(Record(*r).covered for r in peer.records()) >= len(got), 10)
            stats = plc_sink.stats()
    finally:
        peer.stop()
    assert [d["frame_id"] for d in got] == list(range(301))
    covers = coverage(peer.records(), got)
    assert sorted(covers) == list(range(301))  # every frame has its result in a record
    assert stats["dropped"] == 0 and stats["coalesced"] > 0  # it fell behind and caught up with the newest state


def test_flood_every_frame_ends_in_a_record_or_a_default_reject() -> None:
    """A 300-frame flood at the default 200 ms cycle with 20 unreadable messages among it, reject-by-default on:
    each frame id is covered by a result record (continuous counter, right frame words), each message without an id
    fired a default reject, nothing was dropped or missed."""
    peer = ModbusPeer()
    plc = {"plc_host": "127.0.0.1", "plc_port": peer.port, "plc_reject_by_default": True, "plc_pulse_ms": 20}
    # the test's PLC answers in this process: on a loaded machine its thread can wait longer than the default 0.3 s,
    # and a write whose answer came late counts as failed although it landed (test_daemon_modbus's other tests
    # cover lost links); this test is about the flood, so the PLC gets time to answer
    plc["plc_timeout_s"] = 5.0
    try:
        with (
            running(FakeInspector(infer_s=0.003), cycle_ms=200, **plc) as (server, _),
            Client(server) as client,
        ):
            for i in range(300):
                client.send(i, image(defect=i % 9 == 0))
                if i % 15 == 7:
                    client.send_parts(b"not json", image().tobytes())  # a part passed, its id is unreadable
            got = client.decisions(300, timeout_s=30)
            plc_sink = next(s for s in server.outputs.sinks if s.name == "plc")
            assert wait_for(lambda: plc_sink.stats()["queued"] == 0 and plc_sink.stats()["scheduled"] == 0, 10)
            stats = plc_sink.stats()
    finally:
        peer.stop()
    assert len(got) == 300
    covers = coverage(peer.records(), got)
    missing = set(range(300)) - set(covers)
    assert not missing, f"frames with no result record: {sorted(missing)}"
    assert stats["default_rejects"] >= 20 and stats["dropped"] == 0 and stats["missed_results"] == 0
    assert any(on for _, on in peer.coil_writes(0))
    print(json.dumps({k: stats[k] for k in ("records", "coalesced", "default_rejects", "late_passes")}))
