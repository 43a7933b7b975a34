"""Scheduler: exactly one decision per frame, deadlines, overload, ordering, errors, drain, swap.

The scheduler runs its real threads; time is a ``ManualClock`` that only the tests and the fake
inspector's stages move, and ``FakeInspector.hold`` stops a stage until a test releases it, so each
test sets up the order of events it is about and none depends on how fast the machine is.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from structlog.testing import capture_logs

from daemon.protocol import BadFrame, Decision, Frame
from daemon.scheduler import COMPUTE_NICE, PREPARE_NICE, Scheduler
from tests.test_daemon_support import FakeInspector, ManualClock, image

MS = 1_000_000
MARGIN = 20 * MS
GREY = 100  # the first pixel of an ordinary frame (image()'s default)


class Sink:
    """Collects published decisions."""

    def __init__(self) -> None:
        self.items: list[Decision] = []
        self.cv = threading.Condition()

    def __call__(self, decision: Decision) -> None:
        with self.cv:
            self.items.append(decision)
            self.cv.notify_all()

    def wait(self, count: int, timeout_s: float = 10.0) -> list[Decision]:
        """The first ``count`` decisions; a bounded wait for progress, never a speed expectation."""
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.items) >= count, timeout_s), f"{len(self.items)} of {count}"
            return list(self.items)


def frame(clock: ManualClock, frame_id: int, value: int = GREY, deadline_ns: int | None = None, camera: str = "cam1"):
    img = image(value)
    return Frame(camera, frame_id, "raw", memoryview(img.tobytes()), clock(), deadline_ns=deadline_ns)


def scheduler(fake: FakeInspector, sink: Sink, **kwargs: object) -> Scheduler:
    """A started scheduler on the fake's clock (created when the fake has none)."""
    if fake.clock is None:
        fake.clock = ManualClock()
    options: dict = {"cycle_ns": 2000 * MS, "queue_depth": 8, "workers": 2, "margin_ns": MARGIN} | kwargs
    sched = Scheduler(fake, sink, clock=fake.clock, stage_clock=fake.clock, **options)
    fake.clock.listeners.append(sched.wake)
    sched.start()
    return sched


def test_each_frame_gets_one_decision_in_order() -> None:
    """Twenty frames give twenty decisions, in frame order, with the model's verdicts."""
    sink, fake = Sink(), FakeInspector(infer_s=0.002)
    sched = scheduler(fake, sink, queue_depth=32)
    for i in range(20):
        sched.submit(frame(fake.clock, i, value=255 if i == 5 else GREY))
    got = sink.wait(20)
    sched.stop()
    assert sink.items == got  # nothing after the twentieth
    assert [d.frame_id for d in got] == list(range(20))
    assert [d.reason for d in got].count("defect") == 1 and got[5].verdict == "reject"
    assert all(d.deadline_met and d.model == "fake-1" for d in got)


def test_deadline_reject_goes_out_at_the_deadline_not_after() -> None:
    """A frame not inferred by its deadline is rejected at the deadline less the margin; the late result is dropped."""
    sink, fake = Sink(), FakeInspector()
    release = fake.hold("infer", GREY)
    sched = scheduler(fake, sink, cycle_ns=60 * MS)
    sched.submit(frame(fake.clock, 1))
    fake.wait_until(lambda: ("infer", GREY) in fake.started)
    fake.clock.advance((60 * MS - MARGIN - 1) / 1e9)  # one ns before the reject is due
    assert not sink.items
    fake.clock.advance(1e-9)
    (decision,) = sink.wait(1)
    assert decision.reason == "deadline" and decision.verdict == "reject" and "at infer" in decision.detail
    assert decision.deadline_met and decision.deadline_ns - decision.t_decided_ns == MARGIN
    release.set()  # the result comes after the decision: counted as late, never published
    fake.wait_until(lambda: fake.inferred == [GREY])
    deadline = time.monotonic() + 10
    while sched.totals().get("late_results", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    sched.stop()
    assert sched.totals()["late_results"] == 1
    assert sink.items == [decision]


def test_overload_rejects_the_excess_and_keeps_the_queue_bounded() -> None:
    """With two frames in flight allowed, a burst of ten gives two results and eight overload rejects."""
    sink, fake = Sink(), FakeInspector(infer_s=0.05)
    release = fake.hold("infer", GREY)  # the burst is over before any inference ends
    sched = scheduler(fake, sink, queue_depth=2)
    for i in range(10):
        sched.submit(frame(fake.clock, i))
    release.set()
    got = sink.wait(10)
    sched.stop()
    assert [d.frame_id for d in got] == list(range(10))
    assert [d.reason for d in got] == ["ok", "ok"] + ["overload"] * 8
    assert fake.inferred == [GREY, GREY]
    assert all(d.deadline_met for d in got)


def test_decisions_wait_for_slower_predecessors() -> None:
    """Frames inferred before their slow predecessor are published after it."""
    sink, fake = Sink(), FakeInspector()
    release = fake.hold("prepare", 21)
    sched = scheduler(fake, sink, workers=3)
    sched.submit(frame(fake.clock, 0, value=21))
    sched.submit(frame(fake.clock, 1))
    sched.submit(frame(fake.clock, 2))
    fake.wait_until(lambda: fake.inferred == [GREY, GREY])  # frames 1 and 2 are done ...
    assert not sink.items  # ... and wait for frame 0
    release.set()
    got = sink.wait(3)
    sched.stop()
    assert [d.frame_id for d in got] == [0, 1, 2]
    assert fake.inferred == [GREY, GREY, 21]


def test_cameras_are_ordered_independently() -> None:
    """A slow frame of one camera does not hold up another camera's decisions."""
    sink, fake = Sink(), FakeInspector()
    release = fake.hold("prepare", 21)
    sched = scheduler(fake, sink, workers=2)
    sched.submit(frame(fake.clock, 0, value=21, camera="slow"))
    sched.submit(frame(fake.clock, 0, camera="fast"))
    (first,) = sink.wait(1)
    release.set()
    got = sink.wait(2)
    sched.stop()
    assert first.camera_id == "fast" and [d.camera_id for d in got] == ["fast", "slow"]


def test_backwards_deadline_pulls_the_predecessor_deadline_down() -> None:
    """When a later frame's deadline is earlier, order holds and no decision misses its deadline."""
    sink, fake = Sink(), FakeInspector()
    release = fake.hold("infer", GREY)
    sched = scheduler(fake, sink)
    now = fake.clock()
    sched.submit(frame(fake.clock, 0, deadline_ns=now + 1000 * MS))
    sched.submit(frame(fake.clock, 1, deadline_ns=now + 80 * MS))
    fake.clock.advance((80 * MS - MARGIN) / 1e9)
    got = sink.wait(2)
    release.set()
    sched.stop()
    assert [d.frame_id for d in got] == [0, 1]
    assert [d.reason for d in got] == ["deadline", "deadline"]
    assert all(d.deadline_met for d in got)
    assert got[0].deadline_ns == got[1].deadline_ns == now + 80 * MS


def test_stage_failures_become_rejects_and_the_next_frame_is_served() -> None:
    """Registration failure, backend crash and wrong geometry each give a reject; serving goes on."""
    sink, fake = Sink(), FakeInspector()
    sched = scheduler(fake, sink)
    sched.submit(frame(fake.clock, 0, value=7))
    sched.submit(frame(fake.clock, 1, value=13))
    wrong = Frame("cam1", 2, "raw", memoryview(bytes(10)), fake.clock())
    sched.submit(wrong)
    sched.submit(frame(fake.clock, 3))
    got = sink.wait(4)
    sched.stop()
    assert [(d.frame_id, d.reason) for d in got] == [(0, "registration"), (1, "error"), (2, "error"), (3, "ok")]
    assert "backend exploded" in got[1].detail


def test_bad_frames_are_answered_or_counted() -> None:
    """A bad frame with an id gets a bad_frame reject; one without an id is only counted."""
    sink, fake = Sink(), FakeInspector()
    sched = scheduler(fake, sink)
    sched.submit(BadFrame("header is not UTF-8 JSON", fake.clock()))
    sched.submit(BadFrame("unknown dtype", fake.clock(), camera_id="cam1", frame_id=9))
    got = sink.wait(1)
    summary = sched.summary()
    sched.stop()
    assert [(d.frame_id, d.reason, d.detail) for d in got] == [(9, "bad_frame", "unknown dtype")]
    assert summary["unidentified_bad_messages"] == 1 and summary["decisions"] == 1


def test_inference_runs_on_one_thread_overlapped_with_prepare() -> None:
    """Infer is always called from the same thread, and other frames are prepared while one is inferred."""
    sink, fake = Sink(), FakeInspector(infer_s=0.02, prepare_s=0.01)
    release = fake.hold("infer", 50)
    sched = scheduler(fake, sink, workers=4)
    sched.submit(frame(fake.clock, 0, value=50))
    fake.wait_until(lambda: ("infer", 50) in fake.started)
    for i in range(1, 8):
        sched.submit(frame(fake.clock, i))
    fake.wait_until(lambda: fake.overlapped == 7)  # prepared while frame 0 is inferred
    release.set()
    sink.wait(8)
    sched.stop()
    assert len(fake.infer_threads) == 1
    assert fake.inferred[0] == 50 and len(fake.inferred) == 8


def test_drain_rejects_what_cannot_finish() -> None:
    """At shutdown, frames still in flight after the drain time get an error reject."""
    sink, fake = Sink(), FakeInspector()
    release = fake.hold("infer", GREY)
    sched = scheduler(fake, sink)
    sched.submit(frame(fake.clock, 0))
    fake.wait_until(lambda: ("infer", GREY) in fake.started)
    assert sched.drain(0.05) == 1
    release.set()
    sched.stop()
    (decision,) = sink.items
    assert decision.reason == "error" and "stopping" in decision.detail


def test_swap_engine_serves_new_frames_with_the_new_model() -> None:
    """After a swap, new frames use the new model; the old one is in use until its last frame is done."""
    sink, old, new = Sink(), FakeInspector(), FakeInspector(bundle_id="fake-2")
    release = old.hold("infer", GREY)
    sched = scheduler(old, sink)
    sched.submit(frame(old.clock, 0))
    assert sched.swap_engine(new) is old
    sched.submit(frame(old.clock, 1))
    old.wait_until(lambda: ("infer", GREY) in old.started)
    assert not sched.wait_unused(old, 0.0)
    release.set()
    got = sink.wait(2)
    assert sched.wait_unused(old, 10.0)
    sched.stop()
    assert [d.model for d in got] == ["fake-1", "fake-2"]
    assert old.inferred == new.inferred == [GREY]


def test_frames_that_would_miss_their_deadline_are_refused_on_arrival() -> None:
    """Once stage times are known, a frame whose expected finish is past its deadline is an overload reject."""
    sink, fake = Sink(), FakeInspector(infer_s=0.1)
    sched = scheduler(fake, sink, cycle_ns=250 * MS, queue_depth=8)
    sched.submit(frame(fake.clock, 0))  # teaches the scheduler that inference takes 100 ms (prepare and decide: 0)
    sink.wait(1)
    release = fake.hold("infer", 101)  # nothing finishes while the next four arrive
    for i in range(1, 5):
        sched.submit(frame(fake.clock, i, value=101))
    release.set()
    got = sink.wait(5)
    sched.stop()
    # frame 1: nothing ahead; frame 2: 100 + 100 ms <= 250; frames 3 and 4: 2 x 100 + 100 ms > 250
    assert [d.reason for d in got] == ["ok", "ok", "ok", "overload", "overload"]
    assert "expected to finish in 300 ms, 250 ms left" in got[3].detail


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are Linux's")
def test_the_next_frame_is_prepared_nicer_than_the_frame_ahead_is_inferred_and_decided() -> None:
    """Preparing yields the cores to inference and decide: its threads are PREPARE_NICE steps nicer.

    Checked on the threads the stages really ran on (a newer frame's preparation stretching the
    inference of the frame ahead is what made the daemon's overhead over bare predict unstable).
    """
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base + COMPUTE_NICE + PREPARE_NICE > 19:
        pytest.skip(f"this process already runs at nice {base}: no room for the levels")
    sink, fake = Sink(), FakeInspector()
    sched = scheduler(fake, sink, workers=2)
    for i in range(4):
        sched.submit(frame(fake.clock, i))
    sink.wait(4)
    sched.stop()
    assert fake.nice == {
        "prepare": {base + COMPUTE_NICE + PREPARE_NICE},
        "infer": {base + COMPUTE_NICE},
        "decide": {base + COMPUTE_NICE},
    }


class ThreadRecorder(FakeInspector):
    """Notes the thread each stage call ran on."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.threads: dict[str, list[str]] = {"prepare": [], "infer": [], "decide": []}

    def _note(self, stage: str) -> None:
        self._changed(lambda: self.threads[stage].append(threading.current_thread().name))

    def prepare(self, image):
        self._note("prepare")
        return super().prepare(image)

    def infer(self, prepared):
        self._note("infer")
        return super().infer(prepared)

    def decide(self, prepared, amap):
        self._note("decide")
        return super().decide(prepared, amap)


def test_warm_up_runs_every_stage_thread_once_and_publishes_nothing() -> None:
    """Each prepare and decide thread and the engine thread take the warm-up frame once; no decision goes out;
    the real frames after it are served on those same threads."""
    sink, fake = Sink(), ThreadRecorder()
    sched = scheduler(fake, sink, workers=2)
    with capture_logs() as logs:
        assert sched.warm_up(image(GREY)) is True
    assert [e["threads"] for e in logs if e["event"] == "warmed_up"] == [5]  # 2 prepare, the engine, 2 decide
    warm = {stage: list(names) for stage, names in fake.threads.items()}
    assert not sink.items
    for i in range(6):
        sched.submit(frame(fake.clock, i))
    got = sink.wait(6)
    sched.stop()
    assert [d.frame_id for d in got] == list(range(6)) and sink.items == got
    assert len(warm["prepare"]) == 2 and len(set(warm["prepare"])) == 2  # both threads, once each
    assert len(warm["decide"]) == 2 and len(set(warm["decide"])) == 2
    assert len(warm["infer"]) == 1 and set(fake.threads["infer"]) == set(warm["infer"])  # the engine thread
    assert set(fake.threads["prepare"]) == set(warm["prepare"])  # no new (cold) thread for the real frames
    assert set(fake.threads["decide"]) == set(warm["decide"])
    assert all(name.startswith("inspectd-prepare") for name in warm["prepare"])


def test_a_failed_warm_up_is_logged_and_frames_are_served_all_the_same() -> None:
    """A warm-up frame the engine refuses (first pixel 7: a registration failure) returns False with a warning;
    nothing is published for it and the next frames are decided as usual."""
    sink, fake = Sink(), FakeInspector()
    sched = scheduler(fake, sink, workers=2)
    with capture_logs() as logs:
        assert sched.warm_up(image(7)) is False
    for i in range(3):
        sched.submit(frame(fake.clock, i))
    got = sink.wait(3)
    sched.stop()
    assert [(d.frame_id, d.reason) for d in got] == [(0, "ok"), (1, "ok"), (2, "ok")] and sink.items == got
    warnings = [e for e in logs if e["event"] == "warm_up_failed"]
    assert len(warnings) == 1 and "part not found" in warnings[0]["detail"]
