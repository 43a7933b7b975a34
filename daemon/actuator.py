"""Reject actuators: a sink that turns decisions into a reject output (PLC coil, digital line).

The logic is shared by every actuator and kept apart from the hardware, which subclasses
supply as two calls: ``write_result`` (a result record for the line controller, optional)
and ``set_output`` (the reject signal on or off). All of it runs on the sink's own thread,
so a slow or absent device never delays a decision; failures are counted and logged.

Modes. ``pulse``: each reject turns the output on for ``pulse_ms`` (a reject during a
pulse extends it). ``level``: the output follows the latest verdict (on = reject).

Reject by default (the fail-safe of commercial systems): the sink is told of every
admitted frame and its deadline; unless a pass for that frame has been written by the
deadline, the reject fires at the deadline. A pass that arrives later is reported to the
controller as a reject (the part is already past the gate). This covers a decision that
never reached the sink (its queue was full, the pipeline stalled) and a slow device link;
it cannot cover the daemon process dying, which only the controller's own timeout on the
result counter can (docs: "On the line" in the README). A message whose frame id cannot be
read gets no decision, but it may have been a part: it is admitted under a key of its own
and so fires one default reject at its receipt time + cycle.

The sink's thread is fatal to the daemon if it dies (supervision.py); its waits are
bounded (``WAIT_S``), so it reaches a checkpoint at least that often.

Result record (the PLC's holding registers): [inspection counter (16 bit, wraps), verdict
(1 OK, 2 NG, 3 error), reason code, frame id low word]. NG is a part judged bad (defect,
registration); error is a part the system could not judge (deadline, overload, bad frame,
error); both are rejects.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog

from daemon.outputs import Sink
from daemon.protocol import BadFrame, Decision, Frame

log = structlog.get_logger("inspectd.actuator")

VERDICT_CODES = {"ok": 1, "ng": 2, "error": 3}
REASON_CODES = {"ok": 0, "defect": 1, "registration": 2, "deadline": 3, "overload": 4, "bad_frame": 5, "error": 6}
NG_REASONS = ("defect", "registration")
FIRED_MEMORY = 4096  # frames whose default reject fired, remembered to report their late pass as a reject
WAIT_S = 1.0  # longest wait for work: the thread's loop turns (and meets its checkpoint) at least this often
MAX_AHEAD_NS = 10**15  # a default reject is never armed further ahead than this (about 11 days)

Key = tuple[Any, Any]


def verdict_code(verdict: str, reason: str) -> int:
    if verdict == "pass":
        return VERDICT_CODES["ok"]
    return VERDICT_CODES["ng"] if reason in NG_REASONS else VERDICT_CODES["error"]


def frame_word(frame_id: Any) -> int:
    """The low 16 bits of an integer frame id; a CRC of a string id."""
    if isinstance(frame_id, int) and not isinstance(frame_id, bool):
        return frame_id & 0xFFFF
    return zlib.crc32(str(frame_id).encode("utf-8", "surrogatepass")) & 0xFFFF


class ActuatorSink(Sink):
    """Decisions -> result record + reject output, with pulse timing and reject-by-default."""

    name = "actuator"
    fatal = True

    def __init__(
        self,
        mode: str = "pulse",
        pulse_ms: float = 100.0,
        reject_by_default: bool = False,
        maxsize: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(maxsize)
        self.mode = mode
        self.pulse_s = pulse_ms / 1000
        self.reject_by_default = reject_by_default
        self._clock = clock
        self._events: list[tuple[float, int, str, Key | None]] = []  # (due, seq, "off" | "default", key)
        self._seq = itertools.count()
        self._unidentified = itertools.count()
        self._pending: dict[Key, float] = {}  # reject-by-default: frame -> monotonic deadline
        self._fired: OrderedDict[Key, None] = OrderedDict()
        self._off_at = 0.0
        self.counter = 0
        self.rejects = 0  # reject signals given (pulses started or level set on)
        self.default_rejects = 0  # fired at a deadline because no pass had been written
        self.late_passes = 0  # passes that came after their default reject had fired

    # -- what subclasses implement (on the sink's thread) -----------------------------------
    def write_result(self, counter: int, verdict: int, reason: int, frame: int) -> None:
        """Write the result record (optional)."""

    def set_output(self, on: bool) -> None:
        raise NotImplementedError

    # -- called from the frame path: must not block -----------------------------------------
    @property
    def wants_admissions(self) -> bool:  # type: ignore[override]
        return self.reject_by_default

    def admit(self, item: Frame | BadFrame, deadline_ns: int) -> None:
        # A message without a frame id never gets a decision: a key no decision can match makes it
        # fire its default reject (frame ids are ints or strings, never tuples).
        frame = item.frame_id if item.frame_id is not None else ("unidentified", next(self._unidentified))
        self.offer(("admit", (item.camera_id, frame), deadline_ns))  # type: ignore[arg-type]

    def stats(self) -> dict[str, int]:
        return {
            **super().stats(),
            "rejects": self.rejects,
            "default_rejects": self.default_rejects,
            "late_passes": self.late_passes,
        }

    # -- the sink's thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                timeout = min(WAIT_S, max(0.0, self._events[0][0] - self._clock())) if self._events else WAIT_S
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = ()
                self.watch.busy()
                try:
                    if not self._step(item):
                        return
                finally:
                    self.watch.idle()
        finally:
            # Also when the thread dies: a pulse is not left on (the daemon is then unhealthy and restarted).
            self._guard(self._shutdown)
            self.release()

    def _step(self, item: Any) -> bool:
        """Fire what is due, then handle one queue item; False at the end (None)."""
        self._guard(self._due)
        if item is None:
            return False
        if isinstance(item, tuple) and item and item[0] == "admit":
            self._arm_default(item[1], item[2])
        elif isinstance(item, Decision):
            self._guard(self._decision, item)
        return True

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a device failure must never reach the frame path
            self.failed += 1
            self.on_failure(exc)

    def on_failure(self, exc: Exception) -> None:
        log.warning("actuator_failed", sink=self.name, error=f"{type(exc).__name__}: {exc}")

    def _arm_default(self, key: Key, deadline_ns: int) -> None:
        ahead_ns = min(max(deadline_ns - time.time_ns(), 0), MAX_AHEAD_NS)  # in ints: no float overflow
        due = self._clock() + ahead_ns / 1e9
        self._pending[key] = due
        heapq.heappush(self._events, (due, next(self._seq), "default", key))

    def _due(self) -> None:
        now = self._clock()
        while self._events and self._events[0][0] <= now:
            _, _, kind, key = heapq.heappop(self._events)
            if kind == "off" and self._off_at and self._off_at <= now:
                self._off_at = 0.0
                self.set_output(False)
            elif kind == "default" and key in self._pending and self._pending[key] <= now:
                del self._pending[key]
                self._remember_fired(key)
                self.default_rejects += 1
                log.warning("default_reject", sink=self.name, camera_id=key[0], frame_id=key[1])
                self._reject()

    def _decision(self, decision: Decision) -> None:
        key = (decision.camera_id, decision.frame_id)
        passed = decision.verdict == "pass"
        already = False
        if self.reject_by_default:
            self._pending.pop(key, None)
            already = key in self._fired
            if already and passed:
                self.late_passes += 1
        verdict = verdict_code(decision.verdict, decision.reason)
        reason = REASON_CODES.get(decision.reason, REASON_CODES["error"])
        if already:  # the part was rejected at its deadline: report what happened to it
            verdict, reason = VERDICT_CODES["error"], REASON_CODES["deadline"]
        self.counter = (self.counter + 1) & 0xFFFF
        self.write_result(self.counter, verdict, reason, frame_word(decision.frame_id))
        self.sent += 1
        if already:
            return
        if not passed:
            self._reject()
        elif self.mode == "level":
            self.set_output(False)

    def _reject(self) -> None:
        self.rejects += 1
        self.set_output(True)
        if self.mode == "pulse":
            self._off_at = self._clock() + self.pulse_s
            heapq.heappush(self._events, (self._off_at, next(self._seq), "off", None))

    def _remember_fired(self, key: Key) -> None:
        self._fired[key] = None
        if len(self._fired) > FIRED_MEMORY:
            self._fired.popitem(last=False)

    def _shutdown(self) -> None:
        """Leave a pulse output off (a level output keeps the last verdict)."""
        if self.mode == "pulse" and self._off_at:
            self.set_output(False)
