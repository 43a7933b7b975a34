"""Reject actuator logic: pulse and level outputs, result records, reject-by-default, falling behind, a link down.

A ``Recorder`` stands in for the hardware (a PLC over Modbus is tested against a real
pymodbus server in test_daemon_modbus.py). Deadlines run on an injected clock where the
test is about them; a thread is held inside a write with an event to make it fall behind.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from daemon.actuator import REASON_CODES, VERDICT_CODES, ActuatorSink, Record, frame_word, verdict_code
from daemon.protocol import BadFrame, Decision, Frame
from daemon.supervision import Supervisor

MS = 1_000_000


def wait_for(check: Any, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.005)
    return False


class FakeClock:
    """Monotonic seconds and Unix ns that move together, only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall_ns = 1_900_000_000 * 10**9

    def __call__(self) -> float:
        return self.now

    def wall(self) -> int:
        return self.wall_ns

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall_ns += int(seconds * 1e9)


class Recorder(ActuatorSink):
    """An actuator whose hardware is a list of events; ``hold`` blocks the next record write until set."""

    name = "recorder"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events: list[tuple[str, Any]] = []
        self.hold: threading.Event | None = None
        self.holding = threading.Event()
        self.link_up = True

    def write_result(self, record: Record) -> None:
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.holding.set()
            hold.wait(10)
        if not self.link_up:
            raise ConnectionError("link down")
        self.events.append(("record", record))

    def set_output(self, on: bool) -> None:
        if not self.link_up:
            raise ConnectionError("link down")
        self.events.append(("output", on))

    def outputs(self) -> list[bool]:
        return [v for kind, v in self.events if kind == "output"]

    def written(self) -> list[Record]:
        return [v for kind, v in self.events if kind == "record"]


def decision(frame_id: Any, verdict: str = "pass", reason: str = "ok") -> Decision:
    now = time.time_ns()
    return Decision(frame_id, "cam1", None, verdict, reason, now, now, now + 1000 * MS, "m")


def frame(frame_id: Any) -> Frame:
    return Frame("cam1", frame_id, "raw", memoryview(b""), 0)


def covered_frames(records: list[Record]) -> int:
    """Decisions the records cover, checking that the counter moves by exactly that much each time."""
    total = 0
    for record in records:
        total += record.covered
        assert record.counter == total & 0xFFFF
    return total


def test_codes_for_the_result_record() -> None:
    """Pass is OK, a bad part NG, a part the system could not judge error; frame ids fold to 16 bits."""
    assert verdict_code("pass", "ok") == VERDICT_CODES["ok"]
    assert verdict_code("reject", "defect") == verdict_code("reject", "registration") == VERDICT_CODES["ng"]
    assert verdict_code("reject", "deadline") == verdict_code("reject", "overload") == VERDICT_CODES["error"]
    assert frame_word(0x12345) == 0x2345 and 0 <= frame_word("A-17") <= 0xFFFF
    assert len(Record._fields) == 9


def test_pulse_mode_pulses_on_reject_and_writes_every_result() -> None:
    """Each decision is covered by a record; a reject turns the output on for pulse_ms, then off."""
    clock = FakeClock()
    sink = Recorder(mode="pulse", pulse_ms=50, clock=clock)
    sink.start()
    sink.offer(decision(1))
    assert wait_for(lambda: len(sink.written()) == 1)
    sink.offer(decision(2, "reject", "defect"))
    assert wait_for(lambda: sink.outputs() == [True] and len(sink.written()) == 2)
    clock.advance(0.049)
    sink.wake()
    time.sleep(0.05)
    assert sink.outputs() == [True]  # not yet: the pulse lasts pulse_ms on the clock
    clock.advance(0.002)
    sink.wake()
    assert wait_for(lambda: sink.outputs() == [True, False])
    sink.close()
    assert sink.written() == [
        Record(1, VERDICT_CODES["ok"], 0, 1, 1, 0, 0, 0, 0),
        Record(2, VERDICT_CODES["ng"], REASON_CODES["defect"], 2, 1, 1, 1, 0, 0),
    ]


def test_level_mode_follows_the_verdict() -> None:
    """In level mode the output is on after a reject and off after a pass."""
    sink = Recorder(mode="level")
    sink.start()
    for i, d in enumerate((decision(1, "reject", "defect"), decision(2), decision(3, "reject", "deadline"))):
        sink.offer(d)
        assert wait_for(lambda i=i: len(sink.written()) == i + 1)
    sink.close()
    assert sink.outputs() == [True, False, True]


def test_reject_by_default_fires_at_the_deadline_without_a_pass() -> None:
    """A frame whose pass never arrives is rejected at its deadline; one that passes in time is not;
    a pass after its default reject is reported as an error reject."""
    clock = FakeClock()
    sink = Recorder(mode="pulse", pulse_ms=20, reject_by_default=True, clock=clock, wall=clock.wall)
    sink.start()
    deadline = clock.wall_ns + 100 * MS
    sink.admit(frame(1), deadline)
    sink.admit(frame(2), deadline)
    sink.offer(decision(2))  # frame 2 passes in time, frame 1's decision is late
    assert wait_for(lambda: len(sink.written()) == 1)
    clock.advance(0.099)
    sink.wake()
    time.sleep(0.05)
    assert sink.default_rejects == 0 and sink.outputs() == []
    clock.advance(0.002)
    sink.wake()
    assert wait_for(lambda: sink.default_rejects == 1)
    sink.offer(decision(1))  # frame 1's pass comes too late
    assert wait_for(lambda: len(sink.written()) == 2)
    sink.close()
    assert sink.late_passes == 1 and sink.outputs().count(True) == 1
    last = sink.written()[-1]
    assert (last.verdict, last.reason, last.frame, last.rejects) == (
        VERDICT_CODES["error"],
        REASON_CODES["deadline"],
        1,
        1,
    )


def test_falling_behind_writes_the_newest_state_covering_every_decision() -> None:
    """With the thread held inside a write, 2000 decisions (more than any old queue held) arrive: the next record
    covers all of them, with the newest in full, the count of rejects and the newest 16 as bits; none is lost."""
    sink = Recorder(mode="pulse", pulse_ms=10)
    gate = sink.hold = threading.Event()
    sink.start()
    sink.offer(decision(0))
    assert sink.holding.wait(5)
    verdicts = ["reject" if i % 7 == 0 else "pass" for i in range(1, 2001)]
    for i, verdict in enumerate(verdicts, start=1):
        sink.offer(decision(i, verdict, "defect" if verdict == "reject" else "ok"))
    gate.set()
    assert wait_for(lambda: sink.stats()["queued"] == 0)
    sink.close()
    first, second = sink.written()
    assert covered_frames([first, second]) == 2001 and sink.sent == 2001 and sink.dropped == 0
    assert (second.covered, second.frame, second.rejects) == (2000, 2000, verdicts.count("reject"))
    assert second.reject_bits == sum(1 << i for i in range(16) if verdicts[-1 - i] == "reject")
    assert sink.coalesced == 1999 and sink.outputs()[0] is True  # one pulse for the rejects among them


def test_every_due_default_reject_fires_when_behind() -> None:
    """Frames admitted while the thread is held: once released, every one whose deadline passed without a record
    fires (one pulse for all), and their decisions, arriving later, are reported as error rejects."""
    clock = FakeClock()
    sink = Recorder(mode="pulse", pulse_ms=10, reject_by_default=True, clock=clock, wall=clock.wall)
    gate = sink.hold = threading.Event()
    sink.start()
    sink.offer(decision(0))
    assert sink.holding.wait(5)
    for i in range(1, 601):  # half decided in the meantime, half not yet
        sink.admit(frame(i), clock.wall_ns + 50 * MS)
        if i % 2:
            sink.offer(decision(i))
    clock.advance(1.0)
    gate.set()
    assert wait_for(lambda: sink.default_rejects == 600)  # no record had carried any of them by the deadline
    for i in range(2, 601, 2):
        sink.offer(decision(i))
    assert wait_for(lambda: sink.stats()["queued"] == 0)
    sink.close()
    records = sink.written()
    assert covered_frames(records) == 601 and sink.stats()["scheduled"] == 0
    assert sum(r.rejects for r in records) == 600 and records[-1].verdict == VERDICT_CODES["error"]
    assert sink.late_passes == 600 and sink.outputs().count(True) == 1


def test_a_link_down_holds_the_results_and_the_first_record_after_says_what_was_missed() -> None:
    """While the link is down, records and reject signals fail; after it is back, the first record covers what was
    held and says how many results were missed and how many reject signals could not be given."""
    clock = FakeClock()
    sink = Recorder(mode="pulse", pulse_ms=10, reject_by_default=True, clock=clock, wall=clock.wall)
    sink.start()
    sink.offer(decision(0))
    assert wait_for(lambda: len(sink.written()) == 1)
    sink.link_up = False
    for i in range(1, 6):
        sink.admit(frame(i), clock.wall_ns + 10_000 * MS)
        sink.offer(decision(i, "reject" if i == 3 else "pass", "defect" if i == 3 else "ok"))
    sink.admit(BadFrame("header is not UTF-8 JSON", 0), clock.wall_ns + 50 * MS)  # a part without a decision
    assert wait_for(lambda: sink.unfired_rejects == 1)  # frame 3's reject signal failed
    clock.advance(0.1)
    sink.wake()
    assert wait_for(lambda: sink.unfired_rejects == 2)  # the unidentified message's default reject failed too
    sink.link_up = True
    clock.advance(1.0)  # past the retry time
    sink.offer(decision(6))
    assert wait_for(lambda: len(sink.written()) == 2)
    sink.close()
    after = sink.written()[1]
    assert (after.counter, after.covered, after.missed, after.unfired, after.rejects) == (7, 6, 5, 2, 1)
    assert sink.missed_results == 5 and sink.stats()["scheduled"] == 0  # frames 1-5 were covered in time


def test_an_overflow_loses_a_decision_and_is_final() -> None:
    """Beyond capacity a decision cannot be kept: counted, and the supervisor reports it as fatal from then on."""
    sup = Supervisor()
    sink = Recorder(capacity=16)
    gate = sink.hold = threading.Event()
    sink.start(sup)
    sink.offer(decision(0))
    assert sink.holding.wait(5)
    for i in range(1, 18):
        sink.offer(decision(i))
    assert sup.check().healthy is False
    gate.set()
    assert wait_for(lambda: sink.stats()["queued"] == 0)
    state = sup.check()  # the queue drained, but a decision was lost: it stays reported
    sink.close()
    assert sink.dropped == 1
    assert state.fatal == ["recorder queue: 1 decisions lost (the queue of 16 was full)"]
