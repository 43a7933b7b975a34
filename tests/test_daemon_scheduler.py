"""Scheduler: exactly one decision per frame, deadlines, overload, ordering, errors, drain, swap."""

from __future__ import annotations

import threading
import time

from daemon.protocol import BadFrame, Decision, Frame
from daemon.scheduler import Scheduler
from tests.test_daemon_support import FakeInspector, image

MS = 1_000_000
MARGIN = 20 * MS


class Sink:
    """Collects published decisions with the wall time they were published."""

    def __init__(self) -> None:
        self.items: list[Decision] = []
        self.cv = threading.Condition()

    def __call__(self, decision: Decision) -> None:
        with self.cv:
            self.items.append(decision)
            self.cv.notify_all()

    def wait(self, count: int, timeout_s: float = 5.0) -> list[Decision]:
        with self.cv:
            self.cv.wait_for(lambda: len(self.items) >= count, timeout_s)
            return list(self.items)


def frame(frame_id: int, value: int = 100, deadline_ns: int | None = None, camera: str = "cam1") -> Frame:
    img = image(value)
    return Frame(camera, frame_id, "raw", memoryview(img.tobytes()), time.time_ns(), deadline_ns=deadline_ns)


def scheduler(fake: FakeInspector, sink: Sink, **kwargs: object) -> Scheduler:
    # A generous margin: these tests assert deadline semantics, not the wake-up jitter of a busy CI box.
    options: dict = {"cycle_ns": 2000 * MS, "queue_depth": 8, "workers": 2, "margin_ns": MARGIN} | kwargs
    sched = Scheduler(fake, sink, **options)
    sched.start()
    return sched


def test_each_frame_gets_one_decision_in_order() -> None:
    """Twenty frames give twenty decisions, in frame order, with the model's verdicts."""
    sink, fake = Sink(), FakeInspector(infer_s=0.002)
    sched = scheduler(fake, sink, queue_depth=32)
    for i in range(20):
        sched.submit(frame(i, value=255 if i == 5 else 100))
    got = sink.wait(20)
    time.sleep(0.05)
    sched.stop()
    assert [d.frame_id for d in sink.items] == list(range(20))
    assert [d.reason for d in got].count("defect") == 1 and got[5].verdict == "reject"
    assert all(d.deadline_met and d.model == "fake-1" for d in got)


def test_deadline_reject_goes_out_at_the_deadline_not_after() -> None:
    """A frame that cannot be inferred in time is rejected at its deadline; the late result is dropped."""
    sink, fake = Sink(), FakeInspector(infer_s=0.4)
    sched = scheduler(fake, sink, cycle_ns=60 * MS)
    start = time.monotonic()
    sched.submit(frame(1))
    (decision,) = sink.wait(1)
    waited = time.monotonic() - start
    assert decision.reason == "deadline" and decision.verdict == "reject"
    assert decision.deadline_met
    assert decision.deadline_ns - decision.t_decided_ns < MARGIN + 30 * MS
    assert waited < 0.3  # long before the 0.4 s inference finished
    time.sleep(0.5)
    assert len(sink.items) == 1
    assert sched.summary()["late_results"] == 1  # the late "ok" was logged and counted, not published
    sched.stop()


def test_overload_rejects_the_excess_and_keeps_the_queue_bounded() -> None:
    """With two frames in flight allowed, a burst of ten gives two results and eight overload rejects."""
    sink, fake = Sink(), FakeInspector(infer_s=0.05)
    sched = scheduler(fake, sink, queue_depth=2)
    for i in range(10):
        sched.submit(frame(i))
    got = sink.wait(10)
    sched.stop()
    assert [d.frame_id for d in got] == list(range(10))
    assert [d.reason for d in got] == ["ok", "ok"] + ["overload"] * 8
    assert len(fake.inferred) == 2
    assert all(d.deadline_met for d in got)


def test_decisions_wait_for_slower_predecessors() -> None:
    """A frame that finishes before its slow predecessor is published after it."""
    sink, fake = Sink(), FakeInspector(prepare_s=0.03)
    sched = scheduler(fake, sink, workers=3)
    sched.submit(frame(0, value=21))  # prepare takes 5x longer
    sched.submit(frame(1))
    sched.submit(frame(2))
    got = sink.wait(3)
    sched.stop()
    assert [d.frame_id for d in got] == [0, 1, 2]
    assert fake.inferred[0] != 21  # frame 1 really was inferred first


def test_cameras_are_ordered_independently() -> None:
    """A slow frame of one camera does not hold up another camera's decisions."""
    sink, fake = Sink(), FakeInspector(prepare_s=0.04)
    sched = scheduler(fake, sink, workers=2)
    sched.submit(frame(0, value=21, camera="slow"))
    sched.submit(frame(0, camera="fast"))
    got = sink.wait(2)
    sched.stop()
    assert [d.camera_id for d in got] == ["fast", "slow"]


def test_backwards_deadline_pulls_the_predecessor_deadline_down() -> None:
    """When a later frame's deadline is earlier, order holds and no decision misses its deadline."""
    sink, fake = Sink(), FakeInspector(infer_s=0.3)
    sched = scheduler(fake, sink)
    now = time.time_ns()
    sched.submit(frame(0, deadline_ns=now + 1000 * MS))
    sched.submit(frame(1, deadline_ns=now + 80 * MS))
    got = sink.wait(2)
    sched.stop()
    assert [d.frame_id for d in got] == [0, 1]
    assert [d.reason for d in got] == ["deadline", "deadline"]
    assert all(d.deadline_met for d in got)
    assert got[0].deadline_ns == got[1].deadline_ns


def test_stage_failures_become_rejects_and_the_next_frame_is_served() -> None:
    """Registration failure, backend crash and wrong geometry each give a reject; serving goes on."""
    sink, fake = Sink(), FakeInspector()
    sched = scheduler(fake, sink)
    sched.submit(frame(0, value=7))
    sched.submit(frame(1, value=13))
    wrong = Frame("cam1", 2, "raw", memoryview(bytes(10)), time.time_ns())
    sched.submit(wrong)
    sched.submit(frame(3))
    got = sink.wait(4)
    sched.stop()
    assert [(d.frame_id, d.reason) for d in got] == [(0, "registration"), (1, "error"), (2, "error"), (3, "ok")]
    assert "backend exploded" in got[1].detail


def test_bad_frames_are_answered_or_counted() -> None:
    """A bad frame with an id gets a bad_frame reject; one without an id is only counted."""
    sink, fake = Sink(), FakeInspector()
    sched = scheduler(fake, sink)
    sched.submit(BadFrame("header is not UTF-8 JSON", time.time_ns()))
    sched.submit(BadFrame("unknown dtype", time.time_ns(), camera_id="cam1", frame_id=9))
    got = sink.wait(1)
    summary = sched.summary()
    sched.stop()
    assert [(d.frame_id, d.reason, d.detail) for d in got] == [(9, "bad_frame", "unknown dtype")]
    assert summary["unidentified_bad_messages"] == 1 and summary["decisions"] == 1


def test_inference_runs_on_one_thread_overlapped_with_prepare() -> None:
    """Infer is always called from the same thread while other frames are prepared meanwhile."""
    sink, fake = Sink(), FakeInspector(infer_s=0.02, prepare_s=0.01)
    sched = scheduler(fake, sink, workers=4)
    for i in range(8):
        sched.submit(frame(i))
    sink.wait(8)
    sched.stop()
    assert len(fake.infer_threads) == 1
    assert fake.overlapped > 0


def test_drain_rejects_what_cannot_finish() -> None:
    """At shutdown, frames still in flight after the drain time get an error reject."""
    sink, fake = Sink(), FakeInspector(infer_s=0.5)
    sched = scheduler(fake, sink)
    sched.submit(frame(0))
    time.sleep(0.05)
    assert sched.drain(0.05) == 1
    sched.stop()
    (decision,) = sink.items
    assert decision.reason == "error" and "stopping" in decision.detail


def test_swap_engine_serves_new_frames_with_the_new_model() -> None:
    """After a swap, new frames use the new model and the old one is reported unused."""
    sink, old, new = Sink(), FakeInspector(infer_s=0.05), FakeInspector(bundle_id="fake-2")
    sched = scheduler(old, sink)
    sched.submit(frame(0))
    assert sched.swap_engine(new) is old
    sched.submit(frame(1))
    got = sink.wait(2)
    assert sched.wait_unused(old, 2.0)
    sched.stop()
    assert [d.model for d in got] == ["fake-1", "fake-2"]


def test_frames_that_would_miss_their_deadline_are_refused_on_arrival() -> None:
    """Once stage times are known, a frame whose expected finish is past its deadline is an overload reject."""
    sink, fake = Sink(), FakeInspector(infer_s=0.1)
    sched = scheduler(fake, sink, cycle_ns=250 * MS, queue_depth=8)
    sched.submit(frame(0))  # teaches the scheduler what inference costs
    sink.wait(1)
    for i in range(1, 5):
        sched.submit(frame(i))
    got = sink.wait(5)
    sched.stop()
    assert [d.reason for d in got] == ["ok", "ok", "ok", "overload", "overload"]
    assert "expected to finish" in got[3].detail
