"""Shared helpers for the daemon tests (no tests here): a stand-in Inspector and socket helpers.

``FakeInspector`` has the Inspector's interface: its anomaly map is the image divided
by 128, so a pixel of 255 scores about 2 (a defect at threshold 1) and mid grey passes;
``infer`` takes ``infer_s`` to model a slow backend and records which threads call it.
Given a ``ManualClock`` its stages spend their time on that clock instead of sleeping, and
``hold`` stops a stage until the test releases it: tests then assert what happens in which
order, never how fast the machine is (the brief: inject clocks, assert ordering).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from daemon.config import Config
from daemon.server import Server
from engines.errors import ImageError, InspectError
from engines.types import Defect, Geometry, Result

GEOMETRY = Geometry(32, 48, 1, "uint8")
LOOPBACK = "tcp://127.0.0.1:*"


class ManualClock:
    """An injected clock (integer ns) that moves only when told; ``listeners`` are called after each move."""

    def __init__(self, start_ns: int = 1_700_000_000 * 10**9) -> None:
        self._now = start_ns
        self._lock = threading.Lock()
        self.listeners: list[Callable[[], None]] = []

    def __call__(self) -> int:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += round(seconds * 1e9)
        for wake in list(self.listeners):
            wake()


class FakeInspector:
    """Inspector stand-in: configurable stage times (slept, or spent on a ``ManualClock``), deterministic verdicts."""

    def __init__(
        self,
        geometry: Geometry = GEOMETRY,
        infer_s: float = 0.0,
        prepare_s: float = 0.0,
        bundle_id: str = "fake-1",
        threshold: float = 1.0,
        clock: ManualClock | None = None,
    ) -> None:
        self.geometry = geometry
        self.infer_s = infer_s
        self.prepare_s = prepare_s
        self.clock = clock
        self.inferring = False
        self.overlapped = 0  # prepare calls that ran while infer was running
        self.bundle_id = bundle_id
        self.threshold = threshold
        self.infer_threads: set[int] = set()
        self.inferred: list[int] = []
        self.started: list[tuple[str, int]] = []  # (stage, first pixel) as each prepare/infer call began
        self.nice: dict[str, set[int]] = {"prepare": set(), "infer": set(), "decide": set()}  # of the calling threads
        self.active = False
        self._held: dict[tuple[str, int], threading.Event] = {}
        self._cv = threading.Condition()

    def hold(self, stage: str, value: int) -> threading.Event:
        """Make ``stage`` ("prepare" | "infer") of frames whose first pixel is ``value`` wait until the event is set."""
        gate = self._held[(stage, value)] = threading.Event()
        return gate

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Block until ``predicate()`` (checked whenever a stage call begins or ends) holds."""
        with self._cv:
            assert self._cv.wait_for(predicate, timeout_s), "the fake inspector never reached the awaited state"

    def _enter(self, stage: str, image: np.ndarray) -> None:
        self._note_nice(stage)
        value = int(image.flat[0]) if image.size else -1
        self._changed(lambda: self.started.append((stage, value)))
        gate = self._held.get((stage, value))
        if gate is not None:
            assert gate.wait(10), f"{stage} of a frame {value} was never released"

    def _note_nice(self, stage: str) -> None:
        if hasattr(os, "getpriority"):
            self.nice[stage].add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    def _changed(self, change: Callable[[], object]) -> None:
        with self._cv:
            change()
            self._cv.notify_all()

    def _spend(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def activate(self) -> None:
        self.active = True

    def deactivate(self) -> None:
        self.active = False

    def prepare(self, image: np.ndarray) -> np.ndarray:
        why = self.geometry.check(image)
        if why:
            raise ImageError(f"frame: {why}")
        if image.size and image.flat[0] == 7:  # a magic first pixel simulates a registration failure
            raise InspectError("registration", "part not found")
        self._enter("prepare", image)
        self._spend(self.prepare_s * (5 if image.flat[0] == 21 else 1))  # 21: a slow frame
        if self.inferring:
            self._changed(lambda: setattr(self, "overlapped", self.overlapped + 1))
        return image

    def infer(self, prepared: np.ndarray) -> np.ndarray:
        self.infer_threads.add(threading.get_ident())
        if prepared.size and prepared.flat[0] == 13:  # a magic first pixel simulates a backend crash
            raise RuntimeError("backend exploded")
        self.inferring = True
        self._enter("infer", prepared)
        self._spend(self.infer_s)
        self.inferring = False
        self._changed(lambda: self.inferred.append(int(prepared.flat[0])))
        return prepared.astype(np.float32) / 128.0

    def decide(self, prepared: np.ndarray, amap: np.ndarray) -> Result:
        self._note_nice("decide")
        score = float(amap.max())
        pose = np.eye(2, 3)
        if score <= self.threshold:
            return Result("pass", "ok", score, self.threshold, anomaly_map=amap, pose_matrix=pose)
        ys, xs = np.nonzero(amap > self.threshold)
        defect = Defect((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), len(xs), score)
        return Result("reject", "defect", score, self.threshold, [defect], anomaly_map=amap, pose_matrix=pose)


def image(value: int = 100, geometry: Geometry = GEOMETRY, defect: bool = False) -> np.ndarray:
    """A flat test image; ``defect`` adds a bright 3x3 spot; ``value`` also sets the magic first pixel."""
    img = np.full(geometry.shape, 100, np.uint8 if geometry.dtype == "uint8" else np.uint16)
    img.flat[0] = value
    if defect:
        img[10:13, 20:23] = 255
    return img


def header(frame_id: Any, geometry: Geometry = GEOMETRY, **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "frame_id": frame_id,
        "camera_id": "cam1",
        "width": geometry.width,
        "height": geometry.height,
        "channels": geometry.channels,
        "dtype": geometry.dtype,
        "encoding": "raw",
        **extra,
    }


def make_config(**overrides: Any) -> Config:
    """A config on loopback with ephemeral ports and short timings."""
    base = Config(
        model="fake",
        frames_endpoint=LOOPBACK,
        decisions_endpoint=LOOPBACK,
        http_listen="127.0.0.1:0",
        cycle_ms=2000,
        summary_s=60,
        drain_s=1.0,
        log_format="json",
        cpu_wakeup_latency_us=-1,  # the machine's idle policy is left alone (test_cpu_latency.py holds it)
    )
    return replace(base, **overrides).validate()


@contextmanager
def running(
    inspector: FakeInspector | None = None, clock: Callable[[], float] = time.monotonic, **overrides: Any
) -> Iterator[tuple[Server, FakeInspector]]:
    """A Server with a FakeInspector (and ``clock`` for supervision and HTTP deadlines), run on a thread;
    stopped (and checked to exit 0) afterwards."""
    fake = inspector or FakeInspector()
    server = Server(make_config(**overrides), loader=lambda model, backend: fake, clock=clock)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(server.run(install_signals=False)), daemon=True)
    thread.start()
    assert server.ready.wait(10), "server did not become ready"
    try:
        yield server, fake
    finally:
        server.request_stop()
        thread.join(15)
        assert not thread.is_alive(), "server did not stop"
        assert codes == [0]


def connect_after_handshake(sock: zmq.Socket[Any], endpoint: str, pub: Any = None) -> None:
    """Connect ``sock`` (a SUB) and return once the publisher has its subscription.

    With ``pub`` (the daemon's ``ZmqPubSink``, in this process) that is exact: the sink counts the
    subscriptions its XPUB has taken. Otherwise (a daemon in another process) this waits for the
    ZeroMQ handshake, after which the subscription is the first message the SUB sends. Either way
    it waits for an event, not for a fixed time, which a loaded machine can outlast.
    """
    before = None if pub is None else pub.subscriptions
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        assert monitor.poll(30_000), f"no ZeroMQ handshake with {endpoint}"
        recv_monitor_message(monitor)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    end = time.monotonic() + 30
    while before is not None and pub.subscriptions <= before:
        assert time.monotonic() < end, f"the publisher at {endpoint} never took the subscription"
        time.sleep(0.002)


def decision_sink(server: Server) -> Any:
    """The server's decision PUB sink."""
    return next(s for s in server.outputs.sinks if s.name == "zmq-pub")


class Client:
    """A camera (PUSH, native protocol) plus a decision subscriber, on one context."""

    def __init__(self, server: Server | dict[str, str], subscribe: bool = True) -> None:
        endpoints = server if isinstance(server, dict) else server.endpoints
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDTIMEO, 2000)
        self.push.connect(endpoints["frames"])
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        if subscribe:
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        pub = decision_sink(server) if isinstance(server, Server) and subscribe else None
        connect_after_handshake(self.sub, endpoints["decisions"], pub)

    def send(self, frame_id: Any, img: np.ndarray | None = None, **extra: Any) -> None:
        img = image() if img is None else img
        self.push.send_multipart([json.dumps(header(frame_id, **extra)).encode(), img.tobytes()])

    def send_parts(self, *parts: bytes) -> None:
        self.push.send_multipart(list(parts))

    def decisions(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Receive ``count`` decisions (fewer if the timeout passes first: a bound for a loaded machine, not a
        speed expectation; a test that expects fewer than it asks for gives its own short timeout)."""
        out: list[dict[str, Any]] = []
        end = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < end:
            if self.sub.poll(50):
                topic, body = self.sub.recv_multipart()
                decision = json.loads(body)
                assert topic == (decision["camera_id"] or "").encode()
                out.append(decision)
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_fake(options_json: str) -> int:
    """Run a fake-model daemon in this (main) thread with real signal handlers; prints its endpoints.

    Options: infer_s, and reload ("ok" | "fail"): what the loader does after the first load.
    Used by the signal tests as ``python -c "...; serve_fake('{...}')"``.
    """
    import sys

    from daemon import logging as daemon_logging

    options = json.loads(options_json)
    loads = itertools.count(1)

    def loader(model: str, backend: str) -> FakeInspector:
        n = next(loads)
        if n > 1 and options.get("reload") == "fail":
            raise ValueError("bundle checksum mismatch")
        return FakeInspector(infer_s=options.get("infer_s", 0.0), bundle_id=f"fake-{n}")

    daemon_logging.configure("json", "info", stream=sys.stderr)
    server = Server(make_config(drain_s=options.get("drain_s", 2.0)), loader=loader)

    def announce() -> None:
        server.ready.wait(30)
        print(json.dumps(server.endpoints), flush=True)

    threading.Thread(target=announce, daemon=True).start()
    return server.run()


class ModbusPeer:
    """A real pymodbus TCP server on loopback (a PLC stand-in) that records every write it receives.

    ``writes`` holds (monotonic time, "registers" | "coil", address, values) per request;
    ``registers(address, count)`` and ``coil(address)`` read the data store back over a real client.
    """

    def __init__(self, device_id: int = 1, port: int = 0) -> None:
        import asyncio
        import socket

        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        if not port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        self.port = port
        self.device_id = device_id
        self.writes: list[tuple[float, str, int, list[Any]]] = []
        device = SimDevice(
            id=device_id,
            simdata=(
                [SimData(0, count=256, values=False, datatype=DataType.BITS)],
                [SimData(0, count=1, values=False, datatype=DataType.BITS)],
                [SimData(0, count=256, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
            ),
        )
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._gate = threading.Event()
        started = threading.Event()

        def trace(sending: bool, pdu: Any) -> Any:
            name = type(pdu).__name__
            if not sending and name == "WriteMultipleRegistersRequest":
                self.writes.append((time.monotonic(), "registers", pdu.address, list(pdu.registers)))
            elif not sending and name == "WriteSingleCoilRequest":
                self.writes.append((time.monotonic(), "coil", pdu.address, [bool(pdu.bits[0])]))
            return pdu

        async def serve() -> None:
            self._server = ModbusTcpServer(device, address=("127.0.0.1", port), trace_pdu=trace)
            started.set()
            await self._server.serve_forever()

        self._thread = threading.Thread(target=lambda: self._loop.run_until_complete(serve()), daemon=True)
        self._thread.start()
        assert started.wait(5)
        time.sleep(0.2)  # let the listener bind

    def client(self) -> Any:
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=1, retries=0)
        assert client.connect()
        return client

    def registers(self, address: int, count: int) -> list[int]:
        client = self.client()
        try:
            return list(client.read_holding_registers(address, count=count, device_id=self.device_id).registers)
        finally:
            client.close()

    def coil(self, address: int) -> bool:
        client = self.client()
        try:
            return bool(client.read_coils(address, count=1, device_id=self.device_id).bits[0])
        finally:
            client.close()

    def coil_writes(self, address: int) -> list[tuple[float, bool]]:
        return [(t, v[0]) for t, kind, a, v in self.writes if kind == "coil" and a == address]

    def records(self, address: int = 0) -> list[list[int]]:
        """Every result record written at ``address``, oldest first (actuator.Record's fields)."""
        return [v for _, kind, a, v in self.writes if kind == "registers" and a == address]

    def pause(self) -> None:
        """Stop answering (a PLC halted mid-cycle): the server's loop blocks until ``resume``; TCP still connects."""
        self._gate = threading.Event()
        self._loop.call_soon_threadsafe(self._gate.wait, 30)

    def resume(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        import asyncio

        self._gate.set()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(5)
        self._thread.join(5)
