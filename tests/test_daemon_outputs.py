"""Decision sinks: bounded queues that never block, slow and absent subscribers, failing sinks."""

from __future__ import annotations

import json
import time

import zmq

from daemon.outputs import Outputs, Sink, ZmqPubSink
from daemon.protocol import Decision
from tests.test_daemon_support import LOOPBACK, Client, FakeInspector, running


def decision(frame_id: int, camera: str = "cam1") -> Decision:
    return Decision(frame_id, camera, None, "pass", "ok", 0, 1, 2, "m", score=0.5, threshold=1.0)


class Stuck(Sink):
    """A sink whose send blocks for a long time (a hung PLC, a full disk)."""

    name = "stuck"

    def send(self, decision: Decision) -> None:
        time.sleep(0.5)


class Broken(Sink):
    """A sink whose every send fails."""

    name = "broken"

    def send(self, decision: Decision) -> None:
        raise OSError("device unplugged")


def test_a_stuck_sink_drops_instead_of_blocking_the_publisher() -> None:
    """publish() returns at once even when a sink is stuck; the overflow is counted as dropped."""
    stuck = Stuck(maxsize=4)
    outputs = Outputs([stuck])
    outputs.start()
    start = time.monotonic()
    for i in range(50):
        outputs.publish(decision(i))
    assert time.monotonic() - start < 0.1
    assert stuck.dropped >= 40
    outputs.close(flush_s=0.1)


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
    sub.connect(pub.endpoint)
    time.sleep(0.3)
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
    with running(FakeInspector(), queue_depth=16) as (server, _):
        with Client(server, subscribe=False) as camera:  # nobody reads decisions
            for i in range(20):
                camera.send(i)
            time.sleep(0.3)
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
