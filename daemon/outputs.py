"""Decision sinks: each has its own bounded queue and thread, so none can block the frame path.

``Outputs.publish`` is called by the scheduler (under its ordering lock) and only does
``put_nowait`` on each interested sink's queue; encoding and socket I/O happen on the
sink's own thread. A full queue drops the decision for that sink and counts it; a sink
that fails counts and logs the failure and keeps running. New sinks subclass ``Sink`` and
implement ``accepts`` and ``send``.

Each sink's thread is supervised (``supervision.Watch``): sinks that carry the decision to
the line (decisions socket, imagezmq replies, reject actuators) are ``fatal``: if their
thread dies the daemon reports itself unhealthy and is restarted; observers (status page,
metrics, audit) are restarted in place on the same queue.

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

from daemon.protocol import BadFrame, Decision, Frame
from daemon.scheduler import lower_priority
from daemon.supervision import Supervisor, Watch

log = structlog.get_logger("inspectd.outputs")
OBSERVER_NICE = 10  # nicer than the compute threads (COMPUTE_NICE): observers never compete with frames
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
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.watch = Watch(self.name, self._run, fatal=self.fatal)
        self._resources_closed = False
        self._resources_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
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
        self.watch.start()

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
            self.dropped += 1

    def close(self, flush_s: float = 1.0) -> None:
        """Send what is queued (up to ``flush_s``), then stop the thread and free resources."""
        end = time.monotonic() + flush_s
        while not self._queue.empty() and time.monotonic() < end and self.watch.alive:
            time.sleep(0.002)
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
    """Publishes every decision on a bound PUB socket: [camera_id, decision JSON]."""

    name = "zmq-pub"
    fatal = True

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        hwm: int = 1000,
        secure: Callable[[zmq.Socket[Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self._socket = ctx.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, hwm)  # decisions are small; PUB drops at the mark
        if secure is not None:  # CurveZMQ: only authenticated subscribers get decisions
            secure(self._socket)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, decision: Decision) -> None:
        # Camera ids are validated text (protocol.py); surrogatepass keeps even a bug from stopping the socket.
        topic = (decision.camera_id or "").encode("utf-8", "surrogatepass")
        try:
            self._socket.send_multipart([topic, decision.to_json()], flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:  # PUB normally drops silently; count it if it ever says so
            self.dropped += 1

    def close_resources(self) -> None:
        self._socket.close(linger=0)


class ReplySink(Sink):
    """Answers imagezmq REQ senders: hands [identity, decision JSON] to the intake thread.

    The ROUTER socket belongs to the intake thread (ZeroMQ sockets are not thread-safe),
    so replies travel over an inproc PUSH that the intake polls next to its inputs.
    """

    name = "imagezmq-reply"
    fatal = True

    def __init__(self, ctx: zmq.Context[Any], inproc_endpoint: str) -> None:
        super().__init__()
        self._socket = ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(inproc_endpoint)

    def accepts(self, decision: Decision) -> bool:
        return decision.reply is not None

    def send(self, decision: Decision) -> None:
        assert decision.reply is not None
        self._socket.send_multipart([decision.reply, decision.to_json()], flags=zmq.NOBLOCK)
        self.sent += 1

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
        bare = decision
        if decision.evidence is not None:
            bare = dataclasses.replace(decision, evidence=None)
        for sink in self.sinks:
            try:
                if sink.accepts(decision):
                    sink.offer(decision if bare is not decision and sink.wants_evidence(decision) else bare)
            except Exception as exc:  # runs on a frame-path thread: one sink's bug must not stop it or the others
                _hand_off_failed(sink, exc)

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


def _hand_off_failed(sink: Sink, exc: Exception) -> None:
    sink.failed += 1
    log.exception("sink_hand_off_failed", sink=sink.name, error=f"{type(exc).__name__}: {exc}")
