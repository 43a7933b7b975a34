"""The one place that decides verdicts: every admitted frame gets exactly one Decision.

Each frame becomes a ``Ticket``. A ticket is resolved exactly once, by whichever comes
first of: the inspection result, its deadline timer, an overload at admission, a bad
frame, or an error in any stage; a later outcome is only logged. Stages overlap:

    intake thread --submit--> [prepare pool: decode + prepare] --> (EDF queue) --> [ONE engine thread: infer]
                                                                                --> [decide pool: decide] --> resolve

Priorities. Frame k+1 is prepared while frame k is inferred and frame k-1 decided, and all
of them want the cores. Inference (the engine thread and the backend's tile workers, which
occupy every core while a frame's tiles run) and decide run at ``COMPUTE_NICE``; preparing
runs ``PREPARE_NICE`` steps nicer still. The kernel then gives a newer frame's preparation
the cores the older frames' work leaves (the tail of an inference, the gaps between tiles
and stages) instead of stretching the inference of the frame ahead of it: an older frame's
latency no longer depends on whether a newer one happened to arrive during its inference.
Nothing starves: a nicer thread still gets its (smaller) share of a busy core, so the work
done per second is the same; only who goes first changes.

Ordering and deadlines. Decisions leave in admission order per camera (a line's reject
gate sees parts in order), so a resolved ticket waits for its unresolved predecessors.
That can never push it past its own deadline because deadlines are kept monotone per
camera: when a frame arrives with an earlier deadline than frames still undecided before
it, those predecessors' deadlines are pulled down to it. Then every predecessor is
resolved (at worst by its own timer) before a ticket's deadline, the ordering is never
broken and no decision is late. The price, only for a camera whose deadlines go
backwards, is that a predecessor can be rejected (reason ``deadline``) earlier than its
own header asked. Overload and bad-frame rejects are decided at once and published as
soon as their predecessors are. A frame whose deadline has already passed on arrival is
rejected (``deadline``) at once, the same way; it pulls no predecessor's deadline down
(they could only be rejected too) and is not a delay of the deadline thread. A decision's
``t_decided_ns`` is when it is published.

Threads: the engine owner and the deadline thread are supervised and fatal
(supervision.py); each marks the work it holds, so a hung inference is a stall. A stage
task (decode + prepare, decide) whose exception escapes its own handling is logged,
counted as a death of ``stages`` and its frame rejected (``error``); its pool carries on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import PriorityQueue
from typing import Any, Protocol

import numpy as np
import structlog

from daemon.decoding import decode_frame
from daemon.protocol import BadFrame, Decision, Evidence, Frame, result_fields
from daemon.supervision import Supervisor
from engines.errors import ImageError, InspectError
from engines.types import Geometry, Result

log = structlog.get_logger("inspectd.scheduler")

# Compute threads (decode/prepare/decide workers, the engine thread, and the backend's own
# threads, which inherit it when the model is loaded from such a thread) run this much
# nicer than the intake, deadline and output threads, so that on a saturated CPU the
# deadline rejects still go out on time and the sockets are still drained.
COMPUTE_NICE = 5
# Preparing (decode, registration) runs this much nicer than inference and decide: the next frame's
# preparation yields the cores to the inference of the frame ahead (see the module docstring). Still
# less nice than the observers (outputs.OBSERVER_NICE), which never compete with frames.
PREPARE_NICE = 4
# Deadline rejects are published this long before the deadline, so thread wake-up and
# socket hand-off never make a "deadline" decision itself late.
DEADLINE_MARGIN_NS = 2_000_000
MAX_TIMER_WAIT_NS = 500_000_000  # the deadline thread looks at its stop flag (and checkpoint) this often
WARM_UP_TIMEOUT_S = 60.0  # a stage of the warm-up frame taking longer is given up on (serving starts regardless)
_STOP = (math.inf, math.inf, None)


def _slot_moved(ticket: Ticket) -> str | None:
    """Why a frame read from a grabber's shared-memory slot may be torn (the slot was written again), or None."""
    item = ticket.item
    return item.slot.changed() if isinstance(item, Frame) and item.slot is not None else None


def lower_priority(nice: int = COMPUTE_NICE) -> None:
    """Make the calling thread (and the threads it creates later) nicer; a no-op where unsupported."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


def nice_at_least(level: int) -> None:
    """Make the calling thread (and the threads it creates later) at least ``level`` nice; never less nice.

    Threads inherit the nice value of the thread that creates them, and a pool's threads are
    created by whichever thread first submits to it, so pools set a level rather than an increment.
    """
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if level > current:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, level))
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


def run_niced(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` on a short-lived lower-priority thread (so threads it spawns inherit that) and return its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        lower_priority()
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="inspectd-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _own_nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0


class Engine(Protocol):
    """What the scheduler needs from an ``engines.inspector.Inspector``."""

    geometry: Geometry
    bundle_id: str
    threshold: float

    def prepare(self, image: np.ndarray) -> Any: ...
    def infer(self, prepared: Any) -> np.ndarray: ...
    def decide(self, prepared: Any, anomaly: np.ndarray) -> Result: ...


@dataclass(eq=False)
class _WarmUp:
    """Work for the engine thread that belongs to no frame (``Scheduler.warm_up``); its outcome goes to ``done``."""

    work: Callable[[], Any]
    done: Future[Any] = field(default_factory=Future)

    def run(self) -> None:
        try:
            self.done.set_result(self.work())
        except Exception as exc:  # the warm-up's caller logs it
            self.done.set_exception(exc)


@dataclass(eq=False)
class Ticket:
    """One admitted frame on its way to its single decision."""

    item: Frame | BadFrame
    seq: int
    deadline_ns: int
    engine: Engine | None = None
    stage: str = "queued"
    prepared: Any = None
    outcome: dict[str, Any] | None = None  # Decision fields, set once by resolve()
    has_work: bool = False
    armed_ns: int = 0  # when its deadline timer was (last) armed: timer lag counts from here at the earliest
    image: Any = None  # the decoded frame, kept (a reference) for the evidence sinks
    evidence: Evidence | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # wall time of each stage

    @property
    def camera(self) -> str | None:
        return self.item.camera_id

    @property
    def resolved(self) -> bool:
        return self.outcome is not None


@dataclass
class Stats:
    """Counters and latencies since the last summary; read under the scheduler lock."""

    reasons: Counter[str] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    decisions: int = 0
    deadline_missed: int = 0
    unidentified: int = 0  # bad messages without a readable frame id: counted, not answered
    capture_dropped: int = 0  # t_capture_ns values dropped as unreadable (informational field)
    late_results: int = 0
    timer_lag_ns: int = 0  # worst delay of the deadline thread behind its schedule (CPU/GIL starvation)
    since_ns: int = field(default_factory=time.monotonic_ns)
    totals: Counter[str] = field(default_factory=Counter)  # since start, never reset (metrics)

    def summary(self) -> dict[str, Any]:
        """Rates and latency percentiles since the last call, then start afresh."""
        elapsed = max((time.monotonic_ns() - self.since_ns) / 1e9, 1e-9)
        lat = np.fromiter(self.latencies_ms, float) if self.latencies_ms else np.zeros(1)
        out = {
            "decisions": self.decisions,
            "rate_hz": round(self.decisions / elapsed, 2),
            "reasons": dict(self.reasons),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
            "latency_max_ms": round(float(lat.max()), 2),
            "deadline_missed": self.deadline_missed,
            "unidentified_bad_messages": self.unidentified,
            "t_capture_dropped": self.capture_dropped,
            "late_results": self.late_results,
            "timer_lag_max_ms": round(self.timer_lag_ns / 1e6, 2),
        }
        self.reasons.clear()
        self.latencies_ms.clear()
        self.decisions = self.deadline_missed = self.unidentified = self.late_results = self.timer_lag_ns = 0
        self.capture_dropped = 0
        self.since_ns = time.monotonic_ns()
        return out


@dataclass
class StageCosts:
    """Recent wall time of each stage (ns, exponentially weighted), for admission decisions."""

    prepare: float = 0.0
    infer: float = 0.0
    decide: float = 0.0
    alpha: float = 0.2

    def update(self, old: float, sample: float) -> float:
        return sample if old == 0.0 else old + self.alpha * (sample - old)

    def finish_ns(self, preparing: int, inferring: int, workers: int) -> float:
        """Expected time to a new frame's result with ``preparing``/``inferring`` frames ahead."""
        prepared = self.prepare * (1 + preparing // workers)
        engine_free = self.infer * (preparing + inferring)  # every frame ahead passes the one engine
        return max(prepared, engine_free) + self.infer + self.decide


class Scheduler:
    """Admits frames, runs the stages, resolves each ticket once and publishes in order."""

    def __init__(
        self,
        engine: Engine,
        publish: Callable[[Decision], None],
        *,
        admitted: Callable[[Frame | BadFrame, int], None] | None = None,
        cycle_ns: int,
        queue_depth: int = 4,
        workers: int = 2,
        max_defects: int = 20,
        margin_ns: int = DEADLINE_MARGIN_NS,
        clock: Callable[[], int] = time.time_ns,
        stage_clock: Callable[[], int] = time.perf_counter_ns,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.engine = engine
        self._publish = publish
        self._admitted = admitted  # told (item, deadline_ns) of each admitted frame: fail-safe actuators
        self._cycle_ns = cycle_ns
        self._queue_depth = queue_depth
        self._max_defects = max_defects
        self._margin_ns = margin_ns
        self._clock = clock  # wall time (ns) of deadlines and decisions
        self._stage_clock = stage_clock  # monotonic ns for stage durations (the cost estimates admission uses)
        self._lock = threading.Lock()
        self._chains: dict[str | None, deque[Ticket]] = {}
        self._working: set[Ticket] = set()  # admitted tickets whose stages have not finished
        self._workers = workers
        self._cost = StageCosts()
        self._users: Counter[int] = Counter()  # id(engine) -> tickets still using it
        self._seq = itertools.count()
        self._stats = Stats()
        base = _own_nice()  # the levels below are relative to the nice of the thread creating the scheduler
        self._prepare_pool = ThreadPoolExecutor(
            workers, "inspectd-prepare", initializer=nice_at_least, initargs=(base + COMPUTE_NICE + PREPARE_NICE,)
        )
        self._decide_pool = ThreadPoolExecutor(
            workers, "inspectd-decide", initializer=nice_at_least, initargs=(base + COMPUTE_NICE,)
        )
        self._engine_q: PriorityQueue[tuple[float, float, Ticket | _WarmUp | None]] = PriorityQueue()
        self._timer_cv = threading.Condition()
        self._timers: list[tuple[int, int, Ticket]] = []
        self._stopping = False
        sup = supervisor or Supervisor()
        self._supervisor = sup
        self._engine_watch = sup.watch("engine", self._engine_loop, fatal=True)
        self._timer_watch = sup.watch("deadlines", self._timer_loop, fatal=True)
        self._stages = sup.watch("stages", None, fatal=False)  # the pools' tasks (never started as a thread)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._engine_watch.start()
        self._timer_watch.start()

    def wake(self) -> None:
        """Make the deadline thread read the clock now (for an injected clock that jumps, as in tests)."""
        with self._timer_cv:
            self._timer_cv.notify_all()

    @property
    def alive(self) -> bool:
        """True while the engine and deadline threads run."""
        return self._engine_watch.alive and self._timer_watch.alive

    @property
    def stalled_s(self) -> float:
        """How long the engine thread has held its frame (0 when idle): a hung backend shows here."""
        return self._engine_watch.busy_s()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(len(c) for c in self._chains.values())

    def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for in-flight frames, reject the rest; returns how many were rejected."""
        end = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < end:
            time.sleep(0.005)
        with self._lock:
            left = [t for chain in self._chains.values() for t in chain if not t.resolved]
        for ticket in left:
            self._resolve(ticket, "reject", "error", detail="daemon stopping before a result was ready")
        return len(left)

    def stop(self) -> None:
        """Stop the threads (call ``drain`` first: tickets left unresolved get no decision)."""
        self._stopping = True
        self._engine_q.put(_STOP)
        with self._timer_cv:
            self._timer_cv.notify_all()
        for watch in (self._engine_watch, self._timer_watch):
            watch.join(timeout=2.0)  # a no-op when never started (a failed startup)
        for pool in (self._prepare_pool, self._decide_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def totals(self) -> dict[str, int]:
        """Counts since start: decisions, per reason, unidentified bad messages, late results."""
        with self._lock:
            return dict(self._stats.totals)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            out = self._stats.summary()
            out["in_flight"] = sum(len(c) for c in self._chains.values())
        return out

    # -- warm-up ----------------------------------------------------------------------------
    def warm_up(self, frame: np.ndarray, timeout_s: float = WARM_UP_TIMEOUT_S) -> bool:
        """Run ``frame`` through every stage thread once, after ``start`` and before the first real frame;
        nothing is published. True when every stage ran; a failure or overrun is logged and serving starts all
        the same (the first real frames then pay, as before).

        A thread's first frame is slow: glibc gives each thread its own heap arena, and the frame-sized
        blocks of a new arena are fresh pages the first time (at 5120 px about 8,700 page faults in prepare
        and 8,100 in infer on a new thread): a fresh daemon's first one or two frames took 70-150 ms longer
        than the rest (``benchmarks/frame_path.py --daemon``, slowest frames), the whole p99 of a short run.
        """
        engine = self.engine
        start = self._stage_clock()
        try:
            prepared = self._on_every_thread(self._prepare_pool, lambda: engine.prepare(frame), timeout_s)
            warm = _WarmUp(lambda: engine.infer(prepared[0]))
            self._engine_q.put((-math.inf, -1, warm))  # ahead of any frame (there should be none yet)
            anomaly = warm.done.result(timeout_s)
            self._on_every_thread(self._decide_pool, lambda: engine.decide(prepared[0], anomaly), timeout_s)
        except Exception as exc:
            log.warning("warm_up_failed", detail=f"{type(exc).__name__}: {exc}"[:200])
            return False
        log.info("warmed_up", threads=2 * self._workers + 1, ms=round((self._stage_clock() - start) / 1e6, 1))
        return True

    def _on_every_thread(self, pool: ThreadPoolExecutor, work: Callable[[], Any], timeout_s: float) -> list[Any]:
        """``work`` once on each of the pool's threads (a barrier keeps one thread from taking two); the results."""
        barrier = threading.Barrier(self._workers, timeout=timeout_s)

        def together() -> Any:
            with contextlib.suppress(threading.BrokenBarrierError):  # a thread missing: warm the others anyway
                barrier.wait()
            return work()

        futures = [pool.submit(together) for _ in range(self._workers)]
        return [f.result(timeout_s) for f in futures]

    # -- reload -----------------------------------------------------------------------------
    def swap_engine(self, new: Engine) -> Engine:
        """Make ``new`` serve every frame admitted from now on; returns the old engine."""
        with self._lock:
            old, self.engine = self.engine, new
        return old

    def wait_unused(self, engine: Engine, timeout_s: float) -> bool:
        """True once no admitted frame still uses ``engine`` (so it can be deactivated)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                if not self._users[id(engine)]:
                    return True
            time.sleep(0.01)
        return False

    # -- admission ---------------------------------------------------------------------------
    def submit(self, item: Frame | BadFrame) -> None:
        """Admit one received message; never blocks (the intake thread calls this)."""
        if item.dropped:
            with self._lock:
                self._stats.capture_dropped += 1
                self._stats.totals["t_capture_dropped"] += 1
        if isinstance(item, BadFrame) and item.frame_id is None:
            self._unidentified(item)
            return
        now = self._clock()
        with self._lock:
            ticket = self._admit(item, now)
            past = isinstance(item, Frame) and ticket.deadline_ns <= now
            overload = self._overload(ticket) if isinstance(item, Frame) and not past else None
            if self._admitted is not None:  # only a put_nowait per interested sink (outputs.py)
                self._admitted(item, ticket.deadline_ns)
            if isinstance(item, Frame) and not (past or overload):
                ticket.engine = self.engine
                ticket.has_work = True
                self._working.add(ticket)
                self._users[id(ticket.engine)] += 1
        if isinstance(item, BadFrame):
            self._resolve(ticket, "reject", "bad_frame", detail=item.detail)
        elif past:
            self._resolve(ticket, "reject", "deadline", detail="the deadline had passed when the frame arrived")
        elif overload:
            self._resolve(ticket, "reject", "overload", detail=overload)
        else:
            self._arm(ticket)
            self._run_task(self._prepare_pool, self._prepare, ticket)

    def _unidentified(self, item: BadFrame) -> None:
        """A message that cannot be answered: counted, logged, and (a part may have passed) told to the actuators."""
        with self._lock:
            self._stats.unidentified += 1
            self._stats.totals["unidentified_bad_messages"] += 1
            if self._admitted is not None:  # reject-by-default fires one reject for it at receipt + cycle
                self._admitted(item, item.t_received_ns + self._cycle_ns)
        log.info("bad_message", detail=item.detail, camera_id=item.camera_id, source=item.source)

    def _admit(self, item: Frame | BadFrame, now: int) -> Ticket:
        """Create the ticket and queue it in its camera's chain (caller holds the lock)."""
        deadline = item.deadline_ns if item.deadline_ns is not None else item.t_received_ns + self._cycle_ns
        ticket = Ticket(item, next(self._seq), deadline)
        chain = self._chains.setdefault(item.camera_id, deque())
        # Keep deadlines monotone per camera (see the module docstring); a deadline already past
        # pulls nothing down: the frame is rejected at once and its predecessors keep their own.
        for earlier in reversed(chain) if deadline > now else ():
            if not earlier.resolved and earlier.deadline_ns > deadline:
                earlier.deadline_ns = deadline
                self._arm(earlier)
        chain.append(ticket)
        return ticket

    def _overload(self, ticket: Ticket) -> str | None:
        """Why ``ticket`` cannot be taken on, or None (caller holds the lock).

        Beyond a full queue, a frame is refused when the frames ahead of it make its
        expected finish later than its deadline: working on it would only make it, and
        the frames after it, late (goodput collapses under overload otherwise).
        With nothing ahead a frame is always tried (see below).
        """
        if len(self._working) >= self._queue_depth:
            return f"{self._queue_depth} frames already in flight"
        preparing = sum(t.stage in ("queued", "prepare") for t in self._working)
        inferring = len(self._working) - preparing
        expected = self._cost.finish_ns(preparing, inferring, self._workers)
        left = ticket.deadline_ns - self._clock()
        # With nothing ahead a frame is always tried: estimates only refresh from frames that
        # run, so refusing on an estimate alone could refuse every frame from then on.
        if self._working and expected > left:
            return f"expected to finish in {expected / 1e6:.0f} ms, {left / 1e6:.0f} ms left to the deadline"
        return None

    def _arm(self, ticket: Ticket) -> None:
        ticket.armed_ns = self._clock()
        with self._timer_cv:
            heapq.heappush(self._timers, (ticket.deadline_ns, ticket.seq, ticket))
            self._timer_cv.notify()

    def _run_task(self, pool: ThreadPoolExecutor, task: Callable[..., None], ticket: Ticket, *args: Any) -> None:
        """Queue a stage task on ``pool``, supervised: an exception escaping it rejects its frame."""
        pool.submit(
            self._supervisor.run_task, self._stages, task, ticket, *args, on_failure=lambda: self._abandon(ticket)
        )

    def _abandon(self, ticket: Ticket) -> None:
        """After an internal failure of a stage task: an ``error`` reject, and its place freed."""
        if not ticket.resolved:
            self._resolve(ticket, "reject", "error", detail=f"internal error at {ticket.stage}")
        self._finish(ticket)

    # -- stages ------------------------------------------------------------------------------
    def _prepare(self, ticket: Ticket) -> None:
        if self._skip(ticket):
            return
        assert isinstance(ticket.item, Frame) and ticket.engine is not None
        ticket.stage = "prepare"
        start = self._stage_clock()
        try:
            image = decode_frame(ticket.item, ticket.engine.geometry)
            ticket.image = image
            ticket.prepared = ticket.engine.prepare(image)
        except Exception as exc:
            self._fail(ticket, exc)
            return
        elapsed = self._stage_clock() - start
        ticket.timings_ms["prepare"] = elapsed / 1e6
        self._cost.prepare = self._cost.update(self._cost.prepare, elapsed)
        ticket.stage = "infer-queue"
        # Earliest deadline first: a frame that prepared slowly does not hold up a later one.
        self._engine_q.put((ticket.deadline_ns, ticket.seq, ticket))

    def _engine_loop(self) -> None:
        lower_priority()
        while True:
            _, _, ticket = self._engine_q.get()
            if ticket is None:
                return
            self._engine_watch.busy()  # holds this frame until it is handed on: a hung backend is a stall
            try:
                if isinstance(ticket, _WarmUp):
                    ticket.run()
                else:
                    self._infer(ticket)
            finally:
                self._engine_watch.idle()

    def _infer(self, ticket: Ticket) -> None:
        if self._skip(ticket):
            return
        assert ticket.engine is not None
        ticket.stage = "infer"
        start = self._stage_clock()
        try:
            anomaly = ticket.engine.infer(ticket.prepared)
        except Exception as exc:
            self._fail(ticket, exc)
            return
        elapsed = self._stage_clock() - start
        ticket.timings_ms["infer"] = elapsed / 1e6
        self._cost.infer = self._cost.update(self._cost.infer, elapsed)
        ticket.stage = "decide"
        try:
            self._run_task(self._decide_pool, self._decide, ticket, anomaly)
        except RuntimeError:  # pool shut down while stopping
            self._finish(ticket)

    def _decide(self, ticket: Ticket, anomaly: np.ndarray) -> None:
        assert ticket.engine is not None
        start = self._stage_clock()
        try:
            result = ticket.engine.decide(ticket.prepared, anomaly)
        except Exception as exc:
            self._fail(ticket, exc)
            return
        elapsed = self._stage_clock() - start
        ticket.timings_ms["decide"] = elapsed / 1e6
        self._cost.decide = self._cost.update(self._cost.decide, elapsed)
        moved = _slot_moved(ticket)
        if moved:  # the grabber wrote into the frame's slot while it was being read: judged on mixed pixels
            self._fail(ticket, InspectError("bad_frame", moved))
            return
        ticket.evidence = self._evidence(ticket, result.anomaly_map, result.pose_matrix)
        fields = result_fields(result, self._max_defects)
        fields["timings_ms"] = {**fields["timings_ms"], **ticket.timings_ms}
        self._resolve(ticket, **fields)
        self._finish(ticket)

    @staticmethod
    def _evidence(ticket: Ticket, anomaly_map: Any = None, pose_matrix: Any = None) -> Evidence:
        slot = ticket.item.slot if isinstance(ticket.item, Frame) else None
        return Evidence(ticket.image, anomaly_map, pose_matrix, slot=slot)

    def _skip(self, ticket: Ticket) -> bool:
        """Drop the work of a ticket already resolved (its deadline passed) or when stopping.

        Work is not dropped on an *expected* miss: estimates refresh only from frames that
        run, so such a rule could starve every frame after one slow spell.
        """
        if ticket.resolved or self._stopping:
            self._finish(ticket)
            return True
        return False

    def _fail(self, ticket: Ticket, exc: Exception) -> None:
        moved = _slot_moved(ticket)
        if moved:  # whatever failed, it read pixels of two frames: that is the reason to give
            exc = InspectError("bad_frame", moved)
        if isinstance(exc, ImageError):  # the frame does not fit the model (conform in prepare)
            self._resolve(ticket, "reject", "bad_frame", detail=str(exc)[:200])
        elif isinstance(exc, InspectError):
            reason = exc.reason if exc.reason in ("bad_frame", "registration") else "error"
            self._resolve(ticket, "reject", reason, detail=exc.detail)
        else:
            log.exception("stage_failed", stage=ticket.stage, frame_id=ticket.item.frame_id)
            detail = f"{ticket.stage}: {type(exc).__name__}: {exc}"[:200]
            self._resolve(ticket, "reject", "error", detail=detail)
        self._finish(ticket)

    def _finish(self, ticket: Ticket) -> None:
        """The ticket's stages are over: free its place in the queue and its engine reference."""
        with self._lock:
            if ticket.has_work:
                ticket.has_work = False
                self._working.discard(ticket)
                self._users[id(ticket.engine)] -= 1
                if not self._users[id(ticket.engine)]:
                    del self._users[id(ticket.engine)]
            ticket.prepared = None

    # -- deadlines ---------------------------------------------------------------------------
    def _timer_loop(self) -> None:
        while True:
            self._timer_watch.checkpoint()
            with self._timer_cv:
                if self._stopping:
                    return
                expired = self._pop_expired()
                if not expired:
                    self._timer_cv.wait(self._next_wait_s())
                    continue
            self._timer_watch.busy()
            try:
                for ticket in expired:
                    detail = f"no result by the deadline (at {ticket.stage})"
                    self._resolve(ticket, "reject", "deadline", detail=detail)
            finally:
                self._timer_watch.idle()

    def _pop_expired(self) -> list[Ticket]:
        """Tickets whose deadline (less the margin) has come (caller holds the timer lock)."""
        expired = []
        now = self._clock()
        while self._timers:
            due, _, ticket = self._timers[0]
            if ticket.resolved or due != ticket.deadline_ns:
                heapq.heappop(self._timers)  # decided already, or re-armed with an earlier deadline
            elif due - self._margin_ns <= now:
                expired.append(heapq.heappop(self._timers)[2])
                # Lag behind schedule: from when the timer was due, or armed if it was due already then.
                lag = now - max(due - self._margin_ns, ticket.armed_ns)
                self._stats.timer_lag_ns = max(self._stats.timer_lag_ns, lag)
            else:
                break
        return expired

    def _next_wait_s(self) -> float:
        if not self._timers:
            return MAX_TIMER_WAIT_NS / 1e9
        wait_ns = self._timers[0][0] - self._margin_ns - self._clock()  # ints: no float overflow
        return min(max(wait_ns, 0), MAX_TIMER_WAIT_NS) / 1e9

    # -- resolution --------------------------------------------------------------------------
    def _resolve(self, ticket: Ticket, verdict: str, reason: str, **fields: Any) -> bool:
        """Settle ``ticket`` once; publish every decision now due in its camera's order."""
        released: list[Decision] = []
        with self._lock:
            if ticket.resolved:
                self._stats.late_results += 1
                self._stats.totals["late_results"] += 1
                late = True
            else:
                late = False
                ticket.outcome = {"verdict": verdict, "reason": reason, **fields}
                released = self._release(ticket.camera)
        if late:
            log.debug("late_result", frame_id=ticket.item.frame_id, reason=reason, camera_id=ticket.camera)
            return False
        for decision in released:
            if decision.verdict != "pass":
                log.info(
                    "reject",
                    camera_id=decision.camera_id,
                    frame_id=decision.frame_id,
                    reason=decision.reason,
                    detail=decision.detail,
                    score=decision.score,
                    latency_ms=round(decision.latency_ms, 2),
                )
        return True

    def _release(self, camera: str | None) -> list[Decision]:
        """Publish the chain's resolved head (caller holds the lock, which keeps the order)."""
        chain = self._chains[camera]
        out: list[Decision] = []
        while chain and chain[0].resolved:
            decision = self._decision(chain.popleft())
            self._publish(decision)
            self._count(decision)
            out.append(decision)
        if not chain:
            del self._chains[camera]  # forget cameras with nothing in flight (bounded memory)
        return out

    def _decision(self, ticket: Ticket) -> Decision:
        item, engine = ticket.item, ticket.engine or self.engine
        outcome = dict(ticket.outcome or {})
        outcome.setdefault("threshold", engine.threshold)
        outcome.setdefault("timings_ms", dict(ticket.timings_ms))
        evidence = ticket.evidence
        if evidence is None and ticket.image is not None:  # rejected before a map existed
            evidence = self._evidence(ticket)
        ticket.image = ticket.evidence = None  # the decision holds them now; the ticket is done
        return Decision(
            frame_id=item.frame_id,
            camera_id=item.camera_id,
            part_id=item.part_id,
            t_received_ns=item.t_received_ns,
            t_decided_ns=self._clock(),
            deadline_ns=ticket.deadline_ns,
            model=engine.bundle_id,
            reply=item.reply,
            evidence=evidence,
            **outcome,
        )

    def _count(self, decision: Decision) -> None:
        stats = self._stats
        stats.decisions += 1
        stats.reasons[decision.reason] += 1
        stats.totals["decisions"] += 1
        stats.totals[decision.reason] += 1
        stats.latencies_ms.append(decision.latency_ms)
        if not decision.deadline_met:
            stats.deadline_missed += 1
