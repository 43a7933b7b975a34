"""Decision sinks: each has its own bounded queue and thread, so none can block the frame path.

``Outputs.publish`` is called by the scheduler (under its ordering lock) and only does
``put_nowait`` on each interested sink's queue; encoding and socket I/O happen on the
sink's own thread. New sinks subclass ``Sink`` and implement ``accepts`` and ``send``.

Two kinds of sink, by what a lost decision costs:

line sinks   carry the decision itself to the line: the decisions socket, imagezmq replies,
             reject actuators (``fatal = True``). They never drop silently: their queues hold
             ``DECISION_QUEUE`` decisions (minutes of a fast line; a decision is under 1 KB
             here), and an overflow, i.e. a decision lost, is a final health failure
             (``Supervisor.condition(..., final=True)``: /healthz 503, no watchdog pings, exit 1
             after ``fatal_exit_s``), as is the death of their thread.
observers    the status page, metrics and the audit trail: a full queue drops and counts; if
             their thread dies it is restarted in place on the same queue.

Where the decisions socket's guarantee ends: ``ZmqPubSink`` hands each decision to libzmq,
which keeps a queue per subscriber (``PUB_HWM`` decisions, then the TCP buffers, then the
subscriber's own ``RCVHWM``). A subscriber that stops reading fills them, and PUB semantics
then drop what it cannot take. The socket is set to ``ZMQ_XPUB_NODROP``, so libzmq says so
(EAGAIN) instead of dropping unseen: the stall is counted and logged, the decision goes to
every other subscriber, and the stalled one misses decisions until it reads again; each
decision carries ``seq`` so a subscriber can count what it missed. A stalled subscriber
never slows or stops the others or the daemon.

Evidence (the decoded frame and its anomaly map, see ``protocol.Evidence``) is large: only
sinks whose ``wants_evidence(decision)`` is true get a decision that still references it
(they keep short queues); every other sink gets the same decision without it, so a slow
subscriber's queue never pins frames in memory. Sinks with ``wants_admissions`` are also
told of each admitted frame and its deadline (``admit``), which fail-safe actuators need
to reject a part whose pass never came.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
import zmq

from daemon import endpoints
from daemon.protocol import BadFrame, Decision, Frame
from daemon.scheduler import lower_priority
from daemon.supervision import Supervisor, Watch

log = structlog.get_logger("inspectd.outputs")
OBSERVER_NICE = 10  # nicer than the compute threads (COMPUTE_NICE): observers never compete with frames
# Decisions a line sink holds before a decision is lost (a final health failure): ten minutes at
# 100 decisions/s. Only filled while the sink's thread cannot keep up (each costs about 1 KB then).
DECISION_QUEUE = 65_536
PUB_HWM = 10_000  # decisions libzmq queues per subscriber before it counts as stalled
RETRY_S = 0.05  # a line sink whose hand-off is refused (queue full) tries again this often
_IDLE = object()


class Sink:
    """A decision consumer with a bounded queue drained by its own thread."""

    name = "sink"
    fatal = False  # True: the line waits for this sink (its death makes the daemon unhealthy)
    wants_admissions = False
    idle_s: float | None = None  # when set, ``idle()`` runs after this long without a decision
    # Niceness added to the sink's thread. Sinks the line waits for (decision PUB, replies,
    # actuators) keep 0; observers (status page, metrics, audit) yield the CPU to the frame path.
    nice = 0

    def __init__(self, maxsize: int = 256) -> None:
        self.capacity = maxsize
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.watch = Watch(self.name, self._run, fatal=self.fatal)
        self._resources_closed = False
        self._resources_lock = threading.Lock()
        self._closing = threading.Event()
        self.sent = 0
        self.dropped = 0  # decisions the queue could not take (for a line sink: lost, a health failure)
        self.failed = 0

    def accepts(self, decision: Decision) -> bool:
        return True

    def wants_evidence(self, decision: Decision) -> bool:
        """True to receive this decision with its image and anomaly map (keep the queue short)."""
        return False

    def admit(self, item: Frame | BadFrame, deadline_ns: int) -> None:
        """A frame was admitted (only called when ``wants_admissions``); must not block."""

    def idle(self) -> None:
        """Deferred work (runs on the sink's thread when its queue has been empty for ``idle_s``)."""

    def send(self, decision: Decision) -> None:
        raise NotImplementedError

    def close_resources(self) -> None:
        """Release sockets or files (runs on the sink's thread after the last send)."""

    def start(self, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:
            supervisor.add(self.watch)
            if self.fatal:  # a line sink that lost a decision: the daemon is restarted (module docstring)
                supervisor.condition(f"{self.name} queue", self.lost_problem, fatal=True, final=True)
        self.watch.start()

    def lost_problem(self) -> str | None:
        """For a line sink: what it lost to an overflow, in words; None while nothing was lost."""
        if not self.dropped:
            return None
        return f"{self.dropped} decisions lost (the queue of {self.capacity} was full)"

    def release(self) -> None:
        """``close_resources`` once, whichever of the sink's thread and ``close`` gets there first."""
        with self._resources_lock:
            if self._resources_closed:
                return
            self._resources_closed = True
        self.close_resources()

    def offer(self, decision: Decision) -> None:
        try:
            self._queue.put_nowait(decision)
        except queue.Full:
            self.overflowed()

    def overflowed(self) -> None:
        """A decision did not fit: counted; for a line sink also a final health failure (``lost_problem``)."""
        self.dropped += 1
        if self.fatal and self.dropped == 1:
            log.error("decision_lost", sink=self.name, detail=f"queue of {self.capacity} full; the daemon will restart")

    def close(self, flush_s: float = 1.0) -> None:
        """Send what is queued (up to ``flush_s``), then stop the thread and free resources."""
        end = time.monotonic() + flush_s
        while not self._queue.empty() and time.monotonic() < end and self.watch.alive:
            time.sleep(0.002)
        self._closing.set()  # a hand-off still being retried gives up now
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(0.0, end - time.monotonic()) + 0.1)
        self.watch.join(timeout=1.0)
        if not self.watch.alive:
            self.release()

    def stats(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": self._queue.qsize(),
        }

    def _run(self) -> None:
        if self.nice:
            lower_priority(self.nice)
        while True:
            try:
                decision = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                decision = _IDLE
            if decision is None:
                break
            self.watch.busy()
            try:
                if decision is _IDLE:
                    self.idle()
                else:
                    self.send(decision)
            except Exception as exc:  # a sink failure must never reach the frame path
                self.failed += 1
                log.warning("sink_failed", sink=self.name, error=f"{type(exc).__name__}: {exc}")
            finally:
                self.watch.idle()
        # Only a normal end releases here: a thread that died may be restarted on the same resources
        # (``close`` releases them at shutdown).
        self.release()


class ZmqPubSink(Sink):
    """Publishes every decision on a bound PUB socket: [camera_id, decision JSON with ``seq``].

    ``seq`` numbers the decisions on this socket (1, 2, 3 ... since the daemon started), so a
    subscriber sees from a gap exactly how many it missed. The socket has ``ZMQ_XPUB_NODROP``
    (libzmq: "return EAGAIN if SNDHWM is reached" instead of dropping; it applies to PUB too):
    EAGAIN means a subscriber's queue is full and the whole decision was refused. The sink
    then sends it once more without NODROP, so every other subscriber gets it, and counts a
    **subscriber stall**. From then on libzmq skips that subscriber without a word until it has
    read again (its queue is no longer eligible), so the count is of stalls, not of decisions
    missed: those the subscriber counts itself, from ``seq``.

    The socket is an XPUB (to subscribers the same as a PUB) told to pass every subscribe and
    unsubscribe (``ZMQ_XPUB_VERBOSER``): the sink reads them after each send and every ``idle_s``
    and keeps ``subscriptions``, the number of subscriptions (topic filters) live now, for
    ``inspectd_decision_subscriptions``: 0 means nobody on the line hears the decisions.
    """

    name = "zmq-pub"
    fatal = True
    idle_s = 0.02  # how often an idle sink reads (un)subscriptions

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        hwm: int = PUB_HWM,
        secure: Callable[[zmq.Socket[Any]], None] | None = None,
        maxsize: int = DECISION_QUEUE,
    ) -> None:
        super().__init__(maxsize)
        self._socket = ctx.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, hwm)  # per subscriber; decisions are small
        self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self._socket.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe, duplicates included
        if secure is not None:  # CurveZMQ: only authenticated subscribers get decisions
            secure(self._socket)
        self._file = endpoints.bind(self._socket, endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = 0  # decisions published
        self.subscriber_stalls = 0  # times a subscriber's queue was found full
        self.subscriptions = 0  # live subscriptions (a subscriber has one per topic it filters on)

    def send(self, decision: Decision) -> None:
        self.seq += 1
        # Camera ids are validated text (protocol.py); surrogatepass keeps even a bug from stopping the socket.
        parts = [(decision.camera_id or "").encode("utf-8", "surrogatepass"), decision.to_json(seq=self.seq)]
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:  # a subscriber's queue is full: the others still get it, the stall is counted
            self._send_past_a_stalled_subscriber(parts, decision)
        self.sent += 1
        self.idle()

    def idle(self) -> None:
        """Read the (un)subscriptions that arrived: first byte 1 subscribe, 0 unsubscribe, then the topic."""
        while True:
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] in (b"\x00", b"\x01"):
                self.subscriptions = max(0, self.subscriptions + (1 if message[:1] == b"\x01" else -1))

    def _send_past_a_stalled_subscriber(self, parts: list[bytes], decision: Decision) -> None:
        self.subscriber_stalls += 1
        log.warning(
            "subscriber_stalled",
            sink=self.name,
            detail="a decision subscriber's queue is full: it misses decisions until it reads again (gaps in seq)",
            seq=self.seq,
            stalls=self.subscriber_stalls,
        )
        self._socket.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK)  # PUB semantics: never refused
        finally:
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "subscriber_stalls": self.subscriber_stalls, "subscriptions": self.subscriptions}

    def close_resources(self) -> None:
        self._socket.close(linger=0)
        if self._file is not None:
            self._file.remove()


class ReplySink(Sink):
    """Answers imagezmq REQ senders: hands [identity, decision JSON] to the intake thread.

    The ROUTER socket belongs to the intake thread (ZeroMQ sockets are not thread-safe),
    so replies travel over an inproc PUSH that the intake polls next to its inputs. When
    that pipe is full (the intake is busy) the reply waits and is tried again, so a reply is
    never dropped here; the sink's own queue holds the backlog (``DECISION_QUEUE``). Replies
    the ROUTER cannot deliver (the sender left) are counted by the intake (``undelivered``).
    """

    name = "imagezmq-reply"
    fatal = True

    def __init__(
        self,
        ctx: zmq.Context[Any],
        inproc_endpoint: str,
        maxsize: int = DECISION_QUEUE,
        undelivered: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(maxsize)
        self._socket = ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(inproc_endpoint)
        self._undelivered = undelivered

    def accepts(self, decision: Decision) -> bool:
        return decision.reply is not None

    def send(self, decision: Decision) -> None:
        assert decision.reply is not None
        parts = [decision.reply, decision.to_json()]
        while True:
            try:
                self._socket.send_multipart(parts, flags=zmq.NOBLOCK)
                break
            except zmq.Again:  # the intake has not caught up: wait (bounded) and try again
                if self._closing.is_set():
                    raise
                self._socket.poll(int(RETRY_S * 1000), zmq.POLLOUT)
                self.watch.checkpoint()
        self.sent += 1

    def stats(self) -> dict[str, int]:
        out = super().stats()
        if self._undelivered is not None:
            out["undelivered"] = self._undelivered()
        return out

    def close_resources(self) -> None:
        self._socket.close(linger=0)


class Outputs:
    """Fans each decision out to every sink that wants it; never blocks."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks = list(sinks)

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def start(self, supervisor: Supervisor | None = None) -> None:
        for sink in self.sinks:
            sink.start(supervisor)

    def publish(self, decision: Decision) -> None:
        if decision.evidence is not None and decision.evidence.slot is not None:
            self._publish_from_slot(decision)
            return
        bare = decision
        if decision.evidence is not None:
            bare = dataclasses.replace(decision, evidence=None)
        for sink in self.sinks:
            _offer(sink, decision, bare)

    def _publish_from_slot(self, decision: Decision) -> None:
        """A frame in a grabber's shared-memory slot (shm.py): the sinks that need no evidence (the line's
        among them) first, then the frame is copied out of the slot for those that keep it. The grabber may
        reuse the slot once the decision is out; a copy that lost that race is dropped, not kept torn."""
        assert decision.evidence is not None
        bare = dataclasses.replace(decision, evidence=None)
        keepers = []
        for sink in self.sinks:
            try:
                if sink.accepts(decision) and sink.wants_evidence(decision):
                    keepers.append(sink)
                    continue
            except Exception as exc:
                _hand_off_failed(sink, exc)
                continue
            _offer(sink, bare, bare)
        if not keepers:
            return
        kept = dataclasses.replace(decision, evidence=decision.evidence.kept())
        if kept.evidence is not None and kept.evidence.image is None and decision.evidence.image is not None:
            log.info("evidence_image_lost", frame_id=decision.frame_id, why="the grabber reused its slot first")
        for sink in keepers:
            _offer(sink, kept, bare)

    def admit(self, item: Frame | BadFrame, deadline_ns: int) -> None:
        for sink in self.sinks:
            if sink.wants_admissions:
                try:
                    sink.admit(item, deadline_ns)
                except Exception as exc:
                    _hand_off_failed(sink, exc)

    @property
    def wants_admissions(self) -> bool:
        return any(sink.wants_admissions for sink in self.sinks)

    def close(self, flush_s: float = 1.0) -> None:
        for sink in self.sinks:
            sink.close(flush_s)

    def stats(self) -> dict[str, dict[str, int]]:
        return {sink.name: sink.stats() for sink in self.sinks}


def _offer(sink: Sink, decision: Decision, bare: Decision) -> None:
    """``decision`` to ``sink`` if it takes it, with its evidence where the sink wants that (else ``bare``)."""
    try:
        if sink.accepts(decision):
            sink.offer(decision if bare is not decision and sink.wants_evidence(decision) else bare)
    except Exception as exc:  # runs on a frame-path thread: one sink's bug must not stop it or the others
        _hand_off_failed(sink, exc)


def _hand_off_failed(sink: Sink, exc: Exception) -> None:
    sink.failed += 1
    log.exception("sink_hand_off_failed", sink=sink.name, error=f"{type(exc).__name__}: {exc}")
