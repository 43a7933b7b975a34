"""Decision sinks: bounded queues that never block, slow and absent subscribers, failing sinks."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import zmq
from structlog.testing import capture_logs

from daemon.outputs import Outputs, ReplySink, Sink, ZmqPubSink
from daemon.protocol import Decision
from daemon.server import Server
from tests.test_daemon_support import (
    LOOPBACK,
    Client,
    FakeInspector,
    connect_after_handshake,
    make_config,
    running,
)


def decision(frame_id: int, camera: str = "cam1") -> Decision:
    return Decision(frame_id, camera, None, "pass", "ok", 0, 1, 2, "m", score=0.5, threshold=1.0)


class Stuck(Sink):
    """A sink whose send blocks until released (a hung PLC, a full disk)."""

    name = "stuck"

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__(maxsize)
        self.unblock = threading.Event()

    def send(self, decision: Decision) -> None:
        self.unblock.wait(30)


class Broken(Sink):
    """A sink whose every send fails."""

    name = "broken"

    def send(self, decision: Decision) -> None:
        raise OSError("device unplugged")


def test_the_pub_sink_counts_live_subscriptions() -> None:
    """Each subscription on the decisions socket is counted when it arrives and uncounted when its subscriber leaves."""
    ctx = zmq.Context()
    pub = ZmqPubSink(ctx, LOOPBACK)
    pub.start()
    try:
        subs = [ctx.socket(zmq.SUB) for _ in range(2)]
        subs[0].setsockopt(zmq.SUBSCRIBE, b"")
        subs[1].setsockopt(zmq.SUBSCRIBE, b"cam1")
        subs[1].setsockopt(zmq.SUBSCRIBE, b"cam2")
        for sub in subs:
            connect_after_handshake(sub, pub.endpoint)
        end = time.monotonic() + 30
        while pub.subscriptions < 3 and time.monotonic() < end:
            time.sleep(0.005)
        counted = pub.stats()["subscriptions"]
        subs[1].close(linger=0)  # its two subscriptions end with it
        while pub.subscriptions > 1 and time.monotonic() < end:
            time.sleep(0.005)
        assert (counted, pub.stats()["subscriptions"]) == (3, 1)
    finally:
        pub.close()
        ctx.destroy(linger=0)


def test_a_stuck_sink_drops_instead_of_blocking_the_publisher() -> None:
    """publish() returns while a sink is stuck; what its queue cannot take is counted as dropped."""
    stuck = Stuck(maxsize=4)
    outputs = Outputs([stuck])
    outputs.start()
    publisher = threading.Thread(target=lambda: [outputs.publish(decision(i)) for i in range(50)])
    publisher.start()
    publisher.join(30)  # bounded: the sink stays stuck until after the check
    finished = not publisher.is_alive()
    stuck.unblock.set()
    outputs.close(flush_s=0.1)
    assert finished
    assert stuck.dropped >= 45  # the queue's 4 and the one in the stuck send at most


def test_a_failing_sink_counts_failures_and_keeps_running() -> None:
    """Exceptions in a sink are counted and logged; later decisions still reach it."""
    broken = Broken()
    outputs = Outputs([broken])
    outputs.start()
    for i in range(3):
        outputs.publish(decision(i))
    time.sleep(0.1)
    outputs.close()
    assert broken.failed == 3


def test_pub_sink_sends_topic_and_json() -> None:
    """The PUB sink sends [camera_id, decision JSON]; subscribers can filter by camera."""
    ctx = zmq.Context()
    pub = ZmqPubSink(ctx, LOOPBACK)
    pub.start()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"cam2")
    connect_after_handshake(sub, pub.endpoint, pub)
    pub.offer(decision(1, "cam1"))
    pub.offer(decision(2, "cam2"))
    assert sub.poll(2000)
    topic, body = sub.recv_multipart()
    assert topic == b"cam2" and json.loads(body)["frame_id"] == 2
    pub.close()
    sub.close(linger=0)
    ctx.term()


def test_slow_and_absent_subscribers_do_not_stall_the_daemon() -> None:
    """With no subscriber, then one that never reads, every frame is still decided on time."""
    # Room for every frame, and a minute per frame: the check is that nothing waits for a subscriber, so
    # neither the queue nor the deadline may turn a slow (loaded) machine into rejects.
    with running(FakeInspector(), queue_depth=256, cycle_ms=60_000) as (server, _):
        with Client(server, subscribe=False) as camera:  # nobody reads decisions
            for i in range(20):
                camera.send(i)
            end = time.monotonic() + 30  # closing the camera drops what it has not sent yet
            while server.scheduler.totals().get("decisions", 0) < 20 and time.monotonic() < end:
                time.sleep(0.01)
        ctx = zmq.Context()
        lazy = ctx.socket(zmq.SUB)
        lazy.setsockopt(zmq.RCVHWM, 1)
        lazy.setsockopt(zmq.SUBSCRIBE, b"")
        lazy.connect(server.endpoints["decisions"])
        with Client(server) as camera:
            for i in range(20, 220):
                camera.send(i)
                time.sleep(0.001)
            got = camera.decisions(200, timeout_s=10)
        ctx.destroy(linger=0)
        totals = server.scheduler.totals()
    assert [d["frame_id"] for d in got] == list(range(20, 220))
    assert totals["decisions"] == 220 and totals.get("deadline", 0) == 0


# -- issue 13, row 1: the decision path never drops silently -----------------------------------------------
def hold_sends(sink: Sink) -> threading.Event:
    """Block the sink's thread in its next send until the returned event is set (a starved or stuck thread)."""
    gate, entered, original = threading.Event(), threading.Event(), sink.send

    def held(decision: Decision) -> None:
        if not gate.is_set():
            entered.set()
            gate.wait(10)
        original(decision)

    sink.send = held  # type: ignore[method-assign]
    sink.entered = entered  # type: ignore[attr-defined]
    return gate


def test_row1_a_blocked_decision_socket_thread_loses_nothing() -> None:
    """Issue 13, row 1: while the decision PUB's thread cannot run, 3000 decisions arrive (the old queue held 256
    and dropped the rest). Once it runs again, a subscriber with the default high-water mark gets each, in order."""
    ctx = zmq.Context()
    pub = ZmqPubSink(ctx, LOOPBACK)
    gate = hold_sends(pub)
    pub.start()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    connect_after_handshake(sub, pub.endpoint, pub)
    try:
        pub.offer(decision(0))
        assert pub.entered.wait(5)  # type: ignore[attr-defined]
        for i in range(1, 3000):
            pub.offer(decision(i))
        gate.set()
        got = []
        while len(got) < 3000 and sub.poll(5000):
            got.append(json.loads(sub.recv_multipart()[1])["frame_id"])
    finally:
        gate.set()
        pub.close()
        ctx.destroy(linger=0)
    assert got == list(range(3000)) and pub.dropped == 0 and pub.subscriber_stalls == 0


def test_an_overflowing_decision_queue_is_a_fatal_health_failure(tmp_path: Path) -> None:
    """With decision_queue 16 and the PUB's thread held, the 17th waiting decision is lost: /healthz 503, the page
    says FATAL, the drop is in /metrics, and the daemon exits 1 after fatal_exit_s on its clock."""
    from tests.test_daemon_hostile import http_get, wait_for
    from tests.test_daemon_supervision import FakeClock

    clock = FakeClock()
    config = make_config(decision_queue=16, fatal_exit_s=5.0, queue_depth=64)
    server = Server(config, loader=lambda m, b: FakeInspector(), clock=clock)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(server.run(install_signals=False)), daemon=True)
    thread.start()
    assert server.ready.wait(10)
    pub = next(s for s in server.outputs.sinks if s.name == "zmq-pub")
    gate = hold_sends(pub)
    try:
        with Client(server, subscribe=False) as camera:
            for i in range(40):
                camera.send(i)
            assert wait_for(lambda: server.health.problem is not None)
        address = server.endpoints["http"]
        health = (http_get(address, "/healthz")[0], http_get(address, "/readyz")[0])
        page = json.loads(http_get(address, "/status.json")[1])["health"]
        metrics = http_get(address, "/metrics")[1].decode()
        gate.set()  # the thread runs again: the lost decisions stay lost, the daemon stays unhealthy
        time.sleep(0.3)
        still = server.health.problem
        clock.advance(5.1)
        assert wait_for(lambda: codes == [1])
    finally:
        gate.set()
        server.request_stop()
        thread.join(15)
    assert health == (503, 503) and page["fatal"] is True
    assert "FATAL: zmq-pub queue: " in page["summary"] and "(the queue of 16 was full)" in page["summary"]
    assert 'inspectd_sink_dropped_total{sink="zmq-pub"}' in metrics and still is not None


def test_a_stalled_subscriber_is_detected_counted_and_sees_its_gap_while_the_others_get_every_one() -> None:
    """A subscriber that never reads fills its queues: libzmq refuses the next decision (XPUB_NODROP) instead of
    dropping it unseen, the stall is counted and logged, and a reading subscriber still gets every decision. When the
    stalled one reads again it gets decisions again, and one gap in ``seq`` tells it exactly how many it missed."""
    ctx = zmq.Context()
    # A smaller high-water mark than the daemon's, and small kernel buffers, so the stall shows after a few thousand
    # decisions. (Not much smaller: libzmq learns that a peer has read only every hwm/2 messages.)
    pub = ZmqPubSink(ctx, LOOPBACK, hwm=2000)
    pub._socket.setsockopt(zmq.SNDBUF, 4096)
    pub.start()
    stalled, reader = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    for sub in (stalled, reader):
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        connect_after_handshake(sub, pub.endpoint, pub)
    got: list[int] = []

    def offer_and_read(frame_id: int) -> None:  # paced: the reader is never behind
        pub.offer(decision(frame_id))
        assert reader.poll(5000)
        got.append(json.loads(reader.recv_multipart()[1])["seq"])

    try:
        with capture_logs() as logs:
            sent = 0
            while pub.subscriber_stalls == 0 and sent < 50_000:
                offer_and_read(sent)
                sent += 1
            for _ in range(100):  # the stalled one misses these
                offer_and_read(sent)
                sent += 1
            seen = []
            while stalled.poll(300):  # it reads again: everything it had queued
                seen.append(json.loads(stalled.recv_multipart()[1])["seq"])
            offer_and_read(sent)
            assert stalled.poll(5000)
            seen.append(json.loads(stalled.recv_multipart()[1])["seq"])
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert got == list(range(1, sent + 2)) and pub.subscriber_stalls == 1 and pub.dropped == 0
    gaps = [(a, b) for a, b in itertools.pairwise(seen) if b != a + 1]
    assert seen[0] == 1 and seen[-1] == sent + 1 and len(gaps) == 1 and gaps[0][1] - gaps[0][0] - 1 >= 100
    assert [e["event"] for e in logs if e["event"].startswith("subscriber_")] == ["subscriber_stalled"]


def test_replies_wait_for_a_busy_intake_instead_of_being_lost() -> None:
    """imagezmq replies: with the intake not reading its reply pipe, 3000 replies queue (the pipe holds about 1000,
    the old queue 256); once it reads, every reply arrives, in order."""
    ctx = zmq.Context()
    intake = ctx.socket(zmq.PULL)
    intake.setsockopt(zmq.RCVHWM, 4)
    intake.bind("inproc://replies-test")
    sink = ReplySink(ctx, "inproc://replies-test")
    sink.start()
    try:
        for i in range(3000):
            d = decision(i)
            d.reply = b"sender-%d" % i
            sink.offer(d)
        time.sleep(0.3)  # the sink fills the pipe and waits
        got = []
        while len(got) < 3000 and intake.poll(5000):
            got.append(intake.recv_multipart()[0])
    finally:
        sink.close()
        ctx.destroy(linger=0)
    assert got == [b"sender-%d" % i for i in range(3000)] and sink.dropped == 0 and sink.failed == 0
