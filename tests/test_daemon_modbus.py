"""Modbus TCP reject output against a real pymodbus server: records, coil pulses, an unreachable PLC."""

from __future__ import annotations

import time

from daemon.actuator import REASON_CODES, VERDICT_CODES
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


def test_records_and_coil_pulse_are_written_to_the_plc() -> None:
    """The result block lands at the configured registers and the reject coil pulses on the configured device."""
    peer = ModbusPeer(device_id=3)
    sink = ModbusSink("127.0.0.1", peer.port, device_id=3, register=40, coil=7, mode="pulse", pulse_ms=60)
    sink.start()
    try:
        sink.offer(decision(5))
        sink.offer(decision(70000, "reject", "defect"))
        assert wait_for(lambda: len(peer.coil_writes(7)) >= 2)
        assert peer.registers(40, 4) == [2, VERDICT_CODES["ng"], REASON_CODES["defect"], 70000 & 0xFFFF]
        (t_on, on), (t_off, off) = peer.coil_writes(7)[:2]
        assert on is True and off is False and 0.05 <= t_off - t_on < 0.3
        assert peer.coil(7) is False and sink.stats()["connected"] == 1
    finally:
        sink.close()
        peer.stop()


def test_unreachable_plc_is_counted_and_reconnected_with_backoff() -> None:
    """With no PLC listening, sends fail fast and are counted; once it appears, the sink reconnects."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = ModbusSink("127.0.0.1", port, timeout_s=0.2, backoff_s=(0.1, 0.2))
    sink.start()
    start = time.monotonic()
    for i in range(50):
        sink.offer(decision(i, "reject", "defect"))
    assert wait_for(lambda: sink.stats()["queued"] == 0, 3.0)
    assert time.monotonic() - start < 3.0 and sink.failed >= 50 and sink.stats()["connected"] == 0
    peer = ModbusPeer(port=port)
    try:
        time.sleep(0.3)  # past the back-off
        sink.offer(decision(99, "reject", "defect"))
        assert wait_for(lambda: peer.registers(0, 4)[3] == 99)
        assert sink.stats()["connected"] == 1
    finally:
        sink.close()
        peer.stop()


def test_daemon_writes_each_decision_to_the_plc() -> None:
    """A running daemon with plc_host set writes one record per frame and pulses the coil for the reject."""
    peer = ModbusPeer()
    try:
        with running(FakeInspector(), plc_host="127.0.0.1", plc_port=peer.port, plc_pulse_ms=30) as (server, _):
            with Client(server) as client:
                client.send(1)
                client.send(2, image(defect=True))
                client.send(3)
                assert len(client.decisions(3)) == 3
            assert wait_for(lambda: peer.registers(0, 4)[0] == 3)
        records = [v for _, kind, _, v in peer.writes if kind == "registers"]
        assert [r[1] for r in records] == [1, 2, 1] and [r[3] for r in records] == [1, 2, 3]
        assert [v for _, v in peer.coil_writes(0)][:2] == [True, False]
    finally:
        peer.stop()


def test_reject_by_default_fires_when_the_pipeline_is_too_slow() -> None:
    """With plc_reject_by_default, a frame still undecided at its deadline gets the reject coil at the deadline."""
    peer = ModbusPeer()
    try:
        options = {"plc_host": "127.0.0.1", "plc_port": peer.port, "plc_reject_by_default": True, "plc_mode": "level"}
        with running(FakeInspector(infer_s=0.5), cycle_ms=150, **options) as (server, _), Client(server) as client:
            sent = time.monotonic()
            client.send(1)
            got = client.decisions(1)
            assert got[0]["reason"] == "deadline"
            assert wait_for(lambda: peer.coil_writes(0))
            t_on = next(t for t, v in peer.coil_writes(0) if v)
            assert t_on - sent < 0.4  # at the deadline (150 ms), not after the 500 ms inference
    finally:
        peer.stop()
