"""Reject actuators: a sink that turns decisions into a reject output (PLC coil, digital line).

The logic is shared by every actuator and kept apart from the hardware, which subclasses
supply as two calls: ``write_result`` (a result record for the line controller, optional)
and ``set_output`` (the reject signal on or off). All of it runs on the sink's own thread,
so a slow or absent device never delays a decision; failures are counted and logged.

No droppable queue. The frame path only records what happened, in O(1) under a lock:
``admit`` puts a frame's deadline into a **schedule**, ``offer`` appends the decision to
the **held** results. Each turn of the thread then

1. turns a finished pulse off,
2. fires every **due default reject** (reject-by-default: a frame whose result record was not
   written by its deadline), one pulse for all that are due together,
3. gives the reject output for the decisions that arrived since the last turn (one pulse if
   any of them is a reject; in ``level`` mode the output is on if any is a reject, else off),
4. writes **one result record for everything held**: the newest decision in full plus how many
   decisions the record covers and how many of them were rejects. When the device keeps up
   that is one record per decision; when it falls behind, it writes the newest state
   instead of a backlog. A record that cannot be written (the link is down) stays held and is
   written, with what came meanwhile, once the link is back: that first record says how many
   results were **missed** and how many reject signals could not be given.

So every admitted frame ends with its result in a record or its default reject, whatever
the load. Memory is bounded: the schedule holds ``capacity`` frames awaiting their
deadline and the held results ``capacity`` decisions not yet acted on (beyond that a
decision is lost: a final health failure, outputs.py); decisions already acted on whose
record could not be written are folded into counts when the hold is full.

Modes. ``pulse``: each reject turns the output on for ``pulse_ms`` (a reject during a
pulse extends it). ``level``: the output follows the verdicts (on = reject).

Reject by default (the fail-safe of commercial systems): unless a record carrying a frame's
result has been written by its deadline, the reject fires at the deadline. A pass that
arrives later is reported to the controller as a reject (the part is already past the
gate). This covers a decision that never came (the pipeline stalled), a late one and a
slow device link; it cannot cover the daemon process dying, which only the controller's
own timeout on the result counter can (README, "On the line"). A message whose frame id
cannot be read gets no decision, but it may have been a part: it is scheduled under a key
of its own and so fires one default reject at its receipt time + cycle.

The sink's thread is fatal to the daemon if it dies (supervision.py); its waits are
bounded (``WAIT_S``), so it reaches a checkpoint at least that often.

Result record (``RECORD_FIELDS``, the PLC's holding registers from ``plc_register``):
counter (decisions covered so far, 16 bit, wraps: the result-ready handshake, comparable
with the controller's own trigger count), verdict (1 OK, 2 NG, 3 error) and reason code and
frame id low word of the newest decision, covered, rejects, reject bits (bit i: the i-th
newest covered decision was a reject), missed, unfired. NG is a part judged bad (defect,
registration); error is a part the system could not judge (deadline, overload, bad frame,
error); both are rejects.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from daemon.outputs import DECISION_QUEUE, Sink
from daemon.protocol import BadFrame, Decision, Frame

log = structlog.get_logger("inspectd.actuator")

VERDICT_CODES = {"ok": 1, "ng": 2, "error": 3}
REASON_CODES = {"ok": 0, "defect": 1, "registration": 2, "deadline": 3, "overload": 4, "bad_frame": 5, "error": 6}
NG_REASONS = ("defect", "registration")
WAIT_S = 1.0  # longest wait for work: the thread's loop turns (and meets its checkpoint) at least this often
MAX_AHEAD_NS = 10**15  # a default reject is never armed further ahead than this (about 11 days)
RETRY_MIN_S = 0.5  # a record that could not be written is tried again after at least this long (or a link's back-off)
WORD = 0xFFFF

Key = tuple[Any, Any]


class Record(NamedTuple):
    """One result record (holding registers ``plc_register`` + 0 ... 8)."""

    counter: int  # decisions covered by records so far, mod 2**16
    verdict: int  # of the newest covered decision
    reason: int
    frame: int  # the newest decision's frame id, low word
    covered: int  # decisions this record covers (1 while the actuator keeps up)
    rejects: int  # how many of them were rejects
    reject_bits: int  # bit i set: the i-th newest covered decision was a reject (bit 0 = the newest)
    missed: int  # covered decisions an earlier write could not deliver (the link was down)
    unfired: int  # reject signals that could not be given since the previous record (the output failed)


RECORD_FIELDS = Record._fields


def verdict_code(verdict: str, reason: str) -> int:
    if verdict == "pass":
        return VERDICT_CODES["ok"]
    return VERDICT_CODES["ng"] if reason in NG_REASONS else VERDICT_CODES["error"]


def frame_word(frame_id: Any) -> int:
    """The low 16 bits of an integer frame id; a CRC of a string id."""
    if isinstance(frame_id, int) and not isinstance(frame_id, bool):
        return frame_id & WORD
    return zlib.crc32(str(frame_id).encode("utf-8", "surrogatepass")) & WORD


@dataclass(slots=True)
class _Result:
    """One decision as the actuator keeps it (small: the hold may grow to ``capacity`` of these)."""

    key: Key
    verdict: int
    reason: int
    frame: int
    passed: bool
    late: bool = False  # its default reject had fired before it came: reported as an error reject

    @property
    def reject(self) -> bool:
        return self.late or not self.passed


class ActuatorSink(Sink):
    """Decisions -> result records + reject output, with pulse timing and reject-by-default."""

    name = "actuator"
    fatal = True

    def __init__(
        self,
        mode: str = "pulse",
        pulse_ms: float = 100.0,
        reject_by_default: bool = False,
        capacity: int = DECISION_QUEUE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] = time.time_ns,
    ) -> None:
        super().__init__(capacity)
        self.mode = mode
        self.pulse_s = pulse_ms / 1000
        self.reject_by_default = reject_by_default
        self._clock = clock
        self._wall = wall  # Unix ns, to turn a frame's deadline into a time on ``clock``
        self._cv = threading.Condition()
        self._stop = False
        # -- shared with the frame path (under ``_cv``) --
        self._new: deque[_Result] = deque()  # decisions not yet acted on
        self._timers: list[tuple[float, int]] = []  # (due, admission): a heap; cancelled ones are skipped
        self._armed: dict[int, Key] = {}  # admission -> frame, while its default reject may still fire
        self._by_key: dict[Key, deque[int]] = {}  # frame -> its armed admissions, oldest first
        self._admissions = itertools.count()
        self._unidentified = itertools.count()
        # -- the sink's thread only --
        self._held: deque[_Result] = deque()  # acted on, record not written yet
        self._folded = self._folded_rejects = 0  # held decisions folded into counts (the hold was full)
        self._fired: OrderedDict[Key, None] = OrderedDict()  # frames whose default reject fired
        self._record_at = 0.0  # when to try writing the held record again after a failure
        self._missed = 0  # held decisions that came while records could not be written (reported in the next one)
        self._unfired = 0  # reject signals that failed since the last record
        self._off_at = 0.0
        self.counter = 0
        self.records = 0  # records written
        self.coalesced = 0  # decisions covered by a record that was not their own (the actuator fell behind)
        self.missed_results = 0  # decisions first reported in a record after the link came back
        self.rejects = 0  # reject signals given (pulses started or level set on)
        self.default_rejects = 0  # fired at a deadline because no result had been written
        self.unfired_rejects = 0  # reject signals (decided or default) the output could not give
        self.late_passes = 0  # passes that came after their default reject had fired

    # -- what subclasses implement (on the sink's thread) -----------------------------------
    def write_result(self, record: Record) -> None:
        """Write the result record (optional)."""

    def set_output(self, on: bool) -> None:
        raise NotImplementedError

    def retry_at(self) -> float:
        """Earliest time (on ``clock``) a write can succeed again after a failure (a link's back-off)."""
        return 0.0

    # -- called from the frame path: must not block -----------------------------------------
    @property
    def wants_admissions(self) -> bool:  # type: ignore[override]
        return self.reject_by_default

    def admit(self, item: Frame | BadFrame, deadline_ns: int) -> None:
        # A message without a frame id never gets a decision: a key no decision can match makes it
        # fire its default reject (frame ids are ints or strings, never tuples).
        frame = item.frame_id if item.frame_id is not None else ("unidentified", next(self._unidentified))
        ahead_ns = min(max(deadline_ns - self._wall(), 0), MAX_AHEAD_NS)  # in ints: no float overflow
        due = self._clock() + ahead_ns / 1e9
        with self._cv:
            if len(self._armed) >= self.capacity:
                self.overflowed()  # a default reject that cannot be kept: lost, the daemon restarts
                return
            admission = next(self._admissions)
            key = (item.camera_id, frame)
            self._armed[admission] = key
            self._by_key.setdefault(key, deque()).append(admission)
            heapq.heappush(self._timers, (due, admission))
            if self._timers[0][1] == admission:  # the earliest now: the thread's wait must shorten
                self._cv.notify()

    def offer(self, decision: Decision) -> None:
        result = _Result(
            (decision.camera_id, decision.frame_id),
            verdict_code(decision.verdict, decision.reason),
            REASON_CODES.get(decision.reason, REASON_CODES["error"]),
            frame_word(decision.frame_id),
            decision.verdict == "pass",
        )
        with self._cv:
            if len(self._new) >= self.capacity:
                self.overflowed()
                return
            self._new.append(result)
            self._cv.notify()

    def wake(self) -> None:
        """Make the thread look at its schedule now (after an injected clock moved)."""
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict[str, int]:
        return {
            **super().stats(),
            "queued": len(self._new) + len(self._held) + self._folded,
            "scheduled": len(self._armed),
            "records": self.records,
            "coalesced": self.coalesced,
            "missed_results": self.missed_results,
            "rejects": self.rejects,
            "default_rejects": self.default_rejects,
            "unfired_rejects": self.unfired_rejects,
            "late_passes": self.late_passes,
        }

    def close(self, flush_s: float = 1.0) -> None:
        """Act on and record what is held (up to ``flush_s``), then stop the thread and free resources."""
        end = time.monotonic() + flush_s
        while (self._new or self._held) and time.monotonic() < end and self.watch.alive:
            time.sleep(0.002)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._closing.set()
        self.watch.join(timeout=1.0)
        if not self.watch.alive:
            self.release()

    # -- the sink's thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self.watch.checkpoint()
                with self._cv:
                    if self._stop:
                        return
                    now = self._clock()
                    wait = self._wait_s(now)
                    if wait > 0:
                        self._cv.wait(wait)
                        continue
                    fresh = list(self._new)
                    self._new.clear()
                    due = self._pop_due(now)
                self.watch.busy()
                try:
                    self._turn(now, due, fresh)
                finally:
                    self.watch.idle()
        finally:
            # Also when the thread dies: a pulse is not left on (the daemon is then unhealthy and restarted).
            self._guard(self._shutdown)
            self.release()

    def _wait_s(self, now: float) -> float:
        """0 when there is work now, else how long to sleep (caller holds the lock)."""
        if self._new or (self._held and now >= self._record_at):
            return 0.0
        times = [now + WAIT_S]
        if self._timers:
            times.append(self._timers[0][0])
        if self._off_at:
            times.append(self._off_at)
        if self._held:
            times.append(self._record_at)
        return max(0.0, min(times) - now)

    def _pop_due(self, now: float) -> list[Key]:
        """Frames whose default reject is due (caller holds the lock)."""
        keys = []
        while self._timers and self._timers[0][0] <= now:
            _, admission = heapq.heappop(self._timers)
            key = self._armed.pop(admission, None)
            if key is None:
                continue  # its result was written in time
            self._by_key[key].remove(admission)
            if not self._by_key[key]:
                del self._by_key[key]
            keys.append(key)
        return keys

    def _turn(self, now: float, due: list[Key], fresh: list[_Result]) -> None:
        if self._off_at and self._off_at <= now:
            self._off_at = 0.0
            self._guard(self.set_output, False)
        if due:
            self._fire_defaults(due)
        if fresh:
            self._act(fresh, now)
        if self._held and now >= self._record_at:
            self._write_record(now)

    def _fire_defaults(self, keys: list[Key]) -> None:
        for key in keys:
            self._fired[key] = None
            if len(self._fired) > self.capacity:
                self._fired.popitem(last=False)
        frames = [key[1] for key in keys[:10]]
        log.warning("default_reject", sink=self.name, count=len(keys), camera_id=keys[0][0], frame_ids=frames)
        if self._signal(len(keys)):
            self.default_rejects += len(keys)

    def _act(self, fresh: list[_Result], now: float) -> None:
        """The reject output for decisions that just arrived; they are held until a record covers them."""
        if now < self._record_at:  # they come while the last record could not be written: missed too
            self._missed += len(fresh)
        rejects = passes = 0
        for result in fresh:
            if result.key in self._fired:  # rejected at its deadline already: report it, do not act again
                result.late = True
                self.late_passes += result.passed
            elif result.passed:
                passes += 1
            else:
                rejects += 1
        if rejects:
            self._signal(rejects)
        elif passes and self.mode == "level":
            self._guard(self.set_output, False)
        self._held.extend(fresh)
        while len(self._held) > self.capacity:  # the link has been down for long: keep counts, not entries
            old = self._held.popleft()
            self._folded += 1
            self._folded_rejects += old.reject

    def _signal(self, count: int) -> bool:
        """Give one reject signal on behalf of ``count`` frames; False (counted as unfired) if the output failed."""
        try:
            self._reject()
        except Exception as exc:
            self.failed += 1
            self.unfired_rejects += count
            self._unfired += count
            self.on_failure(exc)
            return False
        return True

    def _write_record(self, now: float) -> None:
        held = list(self._held)
        newest = held[-1]
        covered = len(held) + self._folded
        bits = 0
        for i, result in enumerate(reversed(held[-16:])):
            bits |= result.reject << i
        verdict, reason = newest.verdict, newest.reason
        if newest.late:  # the part was rejected at its deadline: report what happened to it
            verdict, reason = VERDICT_CODES["error"], REASON_CODES["deadline"]
        record = Record(
            (self.counter + covered) & WORD,
            verdict,
            reason,
            newest.frame,
            min(covered, WORD),
            min(sum(r.reject for r in held) + self._folded_rejects, WORD),
            bits,
            min(self._missed, WORD),
            min(self._unfired, WORD),
        )
        try:
            self.write_result(record)
        except Exception as exc:
            self.failed += 1
            self.on_failure(exc)
            self._missed = covered  # everything held missed its moment; the next record says so
            self._record_at = max(self.retry_at(), now + RETRY_MIN_S)
            return
        self.counter = record.counter
        self.records += 1
        self.sent += covered
        self.coalesced += covered - 1
        self.missed_results += self._missed
        if self._missed or self._unfired:
            log.warning("results_missed", sink=self.name, missed=self._missed, unfired=self._unfired)
        self._missed = self._unfired = self._folded = self._folded_rejects = 0
        self._held.clear()
        with self._cv:  # written in time: their default rejects no longer fire
            for result in held:
                self._cancel(result.key)

    def _cancel(self, key: Key) -> None:
        admissions = self._by_key.get(key)
        if admissions:
            self._armed.pop(admissions.popleft(), None)
            if not admissions:
                del self._by_key[key]

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a device failure must never reach the frame path
            self.failed += 1
            self.on_failure(exc)

    def on_failure(self, exc: Exception) -> None:
        log.warning("actuator_failed", sink=self.name, error=f"{type(exc).__name__}: {exc}")

    def _reject(self) -> None:
        self.set_output(True)
        self.rejects += 1
        if self.mode == "pulse":
            self._off_at = self._clock() + self.pulse_s

    def _shutdown(self) -> None:
        """Leave a pulse output off (a level output keeps the last verdict)."""
        if self.mode == "pulse" and self._off_at:
            self.set_output(False)
