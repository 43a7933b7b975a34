"""Frame intake: the sockets frames arrive on, read by one thread that never blocks for long.

Native frames arrive on a bound PULL socket (cameras PUSH) or a SUB socket connected to a
camera that publishes. imagezmq senders are served by a bound ROUTER (their REQ sockets
block for a reply, which is the decision JSON) or a SUB connected to their PUB. Every
socket has LINGER 0, a receive high-water mark of a few frames and a MAXMSGSIZE derived
from the model geometry (libzmq disconnects a peer that sends more), and every message is
received zero-copy. The thread drains its sockets as fast as messages come, so excess
frames become immediate ``overload`` rejects instead of piling up in socket buffers.

Nothing a camera sends can raise out of the intake: the parsers are total (protocol.py),
and the thread is supervised and fatal (supervision.py). ``failed`` counts the messages
whose handling failed all the same (a bug, each logged with its traceback).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from daemon import endpoints
from daemon.config import Config
from daemon.protocol import BadFrame, Frame, message_limit, parse_imagezmq, parse_native
from daemon.shm import FrameSlots, SlotSocket
from daemon.supervision import Supervisor, Watch
from engines.errors import UserError
from engines.types import Geometry

log = structlog.get_logger("inspectd.intake")

POLL_MS = 100  # how often the loop looks at its stop flag when nothing arrives
BATCH = 16  # messages read from one socket before the others get a turn
MAX_IMAGEZMQ_CAMERAS = 4096  # per-name frame counters kept (bounded against floods of names)
REPLY_HWM = 1000  # imagezmq replies queued per sender (a REQ sender has one outstanding; a DEALER may have more)
_instances = itertools.count()


class Intake:
    """Owns the input sockets and their thread; turns each message into a Frame or BadFrame."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        config: Config,
        geometry: Callable[[], Geometry],
        submit: Callable[[Frame | BadFrame], None],
        clock: Callable[[], int] = time.time_ns,
        secure: Callable[[zmq.Socket[Any]], None] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._ctx = ctx
        self._secure = secure  # CurveZMQ on bound sockets (security.py)
        self._geometry = geometry
        self._submit = submit
        self._clock = clock
        self._hwm = config.hwm
        self._max_ahead_ns = int(config.deadline_max_s * 1e9)
        self._max_msg = message_limit(geometry())
        self._reading = True
        self._running = True
        self._counters: OrderedDict[str, itertools.count[int]] = OrderedDict()
        self.received = 0
        self.failed = 0  # messages whose parsing or admission raised (each logged with its traceback)
        self._sockets: list[zmq.Socket[Any]] = []
        self._monitors: list[zmq.Socket[Any]] = []
        self._files: list[endpoints.SocketFile] = []  # ipc:// socket files bound here, removed at close
        self.peers_dropped = 0  # disconnects: oversize messages (unreadable, so unanswered) or senders leaving
        self.replies_undelivered = 0  # imagezmq replies the ROUTER could not route (the sender left or stopped reading)
        self.slots: FrameSlots | None = None  # shared-memory frame slots for a grabber on this host (frames_shm)
        self.slot_socket: SlotSocket | None = None
        try:
            if config.frames_shm:
                self.slots = FrameSlots(config.frames_shm_slots, geometry().nbytes)
                self.slot_socket = SlotSocket(Path(config.frames_shm), self.slots)
            self.native = self._open(config.frames_mode, config.frames_endpoint, "frames_endpoint")
            self.imagezmq = None
            if config.imagezmq_endpoint:
                mode = "router" if config.imagezmq_mode == "reqrep" else "sub"
                self.imagezmq = self._open(mode, config.imagezmq_endpoint, "imagezmq_endpoint")
                if mode == "router":
                    # Replies are small: room for many per sender. MANDATORY: a reply that cannot be
                    # routed raises (counted) instead of vanishing.
                    self.imagezmq.setsockopt(zmq.SNDHWM, REPLY_HWM)
                    self.imagezmq.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.reply_endpoint = f"inproc://inspectd-replies-{next(_instances)}"
            self._replies = self._socket(zmq.PULL)
            self._replies.bind(self.reply_endpoint)
        except (zmq.ZMQError, UserError):
            self.close()
            raise
        self.watch = Watch("intake", self._loop, fatal=True)
        if supervisor is not None:
            supervisor.add(self.watch)

    # -- sockets ----------------------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        self._sockets.append(sock)
        return sock

    def _open(self, mode: str, endpoint: str, setting: str) -> zmq.Socket[Any]:
        kind = {"pull": zmq.PULL, "sub": zmq.SUB, "router": zmq.ROUTER}[mode]
        sock = self._socket(kind)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_msg)
        try:
            if mode == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.connect(endpoint)
            else:
                if self._secure is not None:
                    self._secure(sock)
                if (made := endpoints.bind(sock, endpoint)) is not None:
                    self._files.append(made)
                # libzmq drops a peer that sends an oversize message before we see a byte of it:
                # the disconnect event is the only trace, so it is what gets counted.
                self._monitors.append(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        except zmq.ZMQError as exc:
            verb = "connect to" if mode == "sub" else "bind"
            raise UserError(f"{setting}: cannot {verb} {endpoint}: {exc.strerror}") from None
        return sock

    def endpoint(self, sock: zmq.Socket[Any] | None) -> str:
        """The address a socket actually bound (resolves ``tcp://127.0.0.1:*``)."""
        return sock.getsockopt_string(zmq.LAST_ENDPOINT) if sock is not None else ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.watch.start()

    def pause(self) -> None:
        """Stop reading frames; replies to imagezmq senders still go out (used while draining)."""
        self._reading = False

    def stop(self) -> None:
        self._running = False
        self.watch.join(timeout=2.0)
        self.close()

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors.clear()
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        for made in self._files:
            made.remove()
        self._files.clear()
        if self.slot_socket is not None:
            self.slot_socket.close()
            self.slot_socket = None
        if self.slots is not None:
            self.slots.close()

    @property
    def alive(self) -> bool:
        return self.watch.alive

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        inputs = [s for s in (self.native, self.imagezmq) if s is not None]
        for sock in [*inputs, self._replies, *self._monitors]:
            poller.register(sock, zmq.POLLIN)
        if self.slot_socket is not None:
            poller.register(self.slot_socket.fileno(), zmq.POLLIN)  # reported by its descriptor
        while self._running:
            self.watch.checkpoint()
            ready = dict(poller.poll(POLL_MS))
            self.watch.busy()
            try:
                self._serve(ready, inputs)
            finally:
                self.watch.idle()

    def _serve(self, ready: dict[Any, int], inputs: list[zmq.Socket[Any]]) -> None:
        for monitor in self._monitors:
            if monitor in ready:
                self._count_drops(monitor)
        if self._replies in ready:
            self._forward_replies()
        if self.slot_socket is not None and self.slot_socket.fileno() in ready:
            self.slot_socket.serve()
        if not self._reading:
            return
        for sock in inputs:
            if sock in ready:
                self._drain(sock)

    def _count_drops(self, monitor: zmq.Socket[Any]) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.peers_dropped += 1
                log.info("peer_dropped", endpoint=event["endpoint"].decode(errors="replace"))

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        for _ in range(BATCH):
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = self._clock()
            self.received += 1
            try:
                item = self._parse(sock, parts, now)
                if isinstance(item, BadFrame) and item.internal:
                    self.failed += 1  # answered all the same; protocol.py logged the traceback
                self._submit(item)
            except Exception:  # a bug must not stop the intake
                self.failed += 1
                log.exception("intake_failed")

    def _parse(self, sock: zmq.Socket[Any], parts: list[Any], now: int) -> Frame | BadFrame:
        geometry = self._geometry()
        if sock is not self.imagezmq:
            return parse_native(parts, now, geometry, self._max_ahead_ns, self.slots)
        reply = None
        if sock.type == zmq.ROUTER:
            # [identity, b"", metadata, payload] from REQ; tolerate a DEALER without the delimiter.
            reply = bytes(parts[0].buffer)
            parts = parts[2:] if len(parts) > 1 and len(parts[1].buffer) == 0 else parts[1:]
        item = parse_imagezmq(parts, now, geometry, self._next_id)
        item.reply = reply
        return item

    def _next_id(self, camera: str) -> int:
        counter = self._counters.get(camera)
        if counter is None:
            counter = self._counters[camera] = itertools.count()
            if len(self._counters) > MAX_IMAGEZMQ_CAMERAS:
                self._counters.popitem(last=False)
        else:
            self._counters.move_to_end(camera)
        return next(counter)

    def _forward_replies(self) -> None:
        assert self.imagezmq is not None
        for _ in range(BATCH):
            try:
                identity, body = self._replies.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.imagezmq.send_multipart([identity, b"", body], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the sender left; EAGAIN: it stopped reading
                self.replies_undelivered += 1
                level = log.warning if self.replies_undelivered == 1 else log.debug
                level("reply_undelivered", error=str(exc), undelivered=self.replies_undelivered)
