"""Reject actuator logic: pulse and level outputs, result codes, reject-by-default at the deadline."""

from __future__ import annotations

import time

from daemon.actuator import REASON_CODES, VERDICT_CODES, ActuatorSink, frame_word, verdict_code
from daemon.protocol import Decision, Frame

MS = 1_000_000


class Recorder(ActuatorSink):
    """An actuator whose hardware is a list of (time, event) entries."""

    name = "recorder"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.events: list[tuple[float, str, object]] = []

    def write_result(self, counter: int, verdict: int, reason: int, frame: int) -> None:
        self.events.append((time.monotonic(), "result", (counter, verdict, reason, frame)))

    def set_output(self, on: bool) -> None:
        self.events.append((time.monotonic(), "output", on))

    def outputs(self) -> list[bool]:
        return [v for _, kind, v in self.events if kind == "output"]  # type: ignore[misc]

    def results(self) -> list[tuple[int, int, int, int]]:
        return [v for _, kind, v in self.events if kind == "result"]  # type: ignore[misc]


def decision(frame_id: int, verdict: str = "pass", reason: str = "ok", deadline_ns: int | None = None) -> Decision:
    now = time.time_ns()
    return Decision(frame_id, "cam1", None, verdict, reason, now, now, deadline_ns or now + 1000 * MS, "m")


def admitted(frame_id: int, deadline_ns: int) -> Frame:
    return Frame("cam1", frame_id, "raw", memoryview(b""), time.time_ns(), deadline_ns=deadline_ns)


def test_codes_for_the_result_record() -> None:
    """Pass is OK, a bad part NG, a part the system could not judge error; frame ids fold to 16 bits."""
    assert verdict_code("pass", "ok") == VERDICT_CODES["ok"]
    assert verdict_code("reject", "defect") == verdict_code("reject", "registration") == VERDICT_CODES["ng"]
    assert verdict_code("reject", "deadline") == verdict_code("reject", "overload") == VERDICT_CODES["error"]
    assert frame_word(0x12345) == 0x2345 and 0 <= frame_word("A-17") <= 0xFFFF


def test_pulse_mode_pulses_on_reject_and_writes_every_result() -> None:
    """Each decision writes a result record; a reject turns the output on for pulse_ms, then off."""
    sink = Recorder(mode="pulse", pulse_ms=50)
    sink.start()
    sink.offer(decision(1))
    sink.offer(decision(2, "reject", "defect"))
    time.sleep(0.2)
    sink.close()
    assert sink.results() == [(1, 1, 0, 1), (2, 2, REASON_CODES["defect"], 2)]
    ons = [(t, v) for t, kind, v in sink.events if kind == "output"]
    assert [v for _, v in ons] == [True, False]
    assert 0.04 <= ons[1][0] - ons[0][0] < 0.15


def test_level_mode_follows_the_verdict() -> None:
    """In level mode the output is on after a reject and off after a pass."""
    sink = Recorder(mode="level")
    sink.start()
    for d in (decision(1, "reject", "defect"), decision(2), decision(3, "reject", "deadline")):
        sink.offer(d)
    time.sleep(0.1)
    sink.close()
    assert sink.outputs() == [True, False, True]


def test_reject_by_default_fires_at_the_deadline_without_a_pass() -> None:
    """A frame whose pass never arrives is rejected at its deadline; one that passes in time is not."""
    sink = Recorder(mode="pulse", pulse_ms=20, reject_by_default=True)
    sink.start()
    soon = time.time_ns() + 100 * MS
    sink.admit(admitted(1, soon), soon)
    sink.admit(admitted(2, soon), soon)
    sink.offer(decision(2, deadline_ns=soon))  # frame 2 passes in time, frame 1's decision is lost
    time.sleep(0.3)
    sink.offer(decision(1, deadline_ns=soon))  # frame 1's pass comes too late
    time.sleep(0.1)
    sink.close()
    assert sink.default_rejects == 1 and sink.late_passes == 1
    fired = [t for t, kind, v in sink.events if kind == "output" and v]
    assert len(fired) == 1
    # the late pass is reported to the controller as an error reject (the part is already past the gate)
    assert sink.results()[-1][1:3] == (VERDICT_CODES["error"], REASON_CODES["deadline"])
