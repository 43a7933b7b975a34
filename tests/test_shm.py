"""Frames handed over in the daemon's shared-memory slots (daemon/shm.py): real memfds, Unix sockets and ZeroMQ."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.config import ConfigError
from daemon.outputs import Outputs
from daemon.protocol import Decision, Evidence
from daemon.sender import send_frames
from daemon.shm import OFFSET, FrameSlots, SlotSocket, SlotWriter
from engines.errors import UserError
from tests.test_daemon_hostile import http_get
from tests.test_daemon_server import start_error
from tests.test_daemon_support import GEOMETRY, Client, FakeInspector, header, image, make_config, running


def slotted(tmp_path: Path, **overrides: object) -> dict[str, object]:
    return {"frames_shm": str(tmp_path / "slots"), "frames_shm_slots": 3, **overrides}


def test_frames_in_slots_are_decided_as_the_same_frames_sent_whole(tmp_path: Path) -> None:
    """A grabber writes frames into the daemon's slots and sends headers alone; each slot is written again only
    after its frame's decision (``send_frames`` with ``shm``): ten frames through three slots, each judged on its
    own pixels, exactly as the same frames sent with their payload."""
    frames = [(f"p{i}", image(100 + i, defect=i % 3 == 0)) for i in range(10)]
    with running(**slotted(tmp_path, queue_depth=16)) as (server, _):
        assert stat.S_IMODE((tmp_path / "slots").stat().st_mode) == 0o660  # the daemon's group may connect
        endpoints = {"endpoint": server.endpoints["frames"], "decisions": server.endpoints["decisions"]}
        through = send_frames(frames, rate_hz=0, camera_id="cam1", shm=str(tmp_path / "slots"), **endpoints)
        whole = send_frames(frames, rate_hz=0, camera_id="cam2", **endpoints)
    assert through.complete and whole.complete and through.duplicates == 0
    verdicts = {i: (d["verdict"], d["reason"], d["score"]) for i, d in through.decisions.items()}
    assert verdicts == {i: (d["verdict"], d["reason"], d["score"]) for i, d in whole.decisions.items()}
    assert [verdicts[i][1] for i in range(10)] == ["defect" if i % 3 == 0 else "ok" for i in range(10)]
    assert not (tmp_path / "slots").exists()  # removed at stop


def test_slot_handouts_are_counted_in_the_metrics(tmp_path: Path) -> None:
    with running(**slotted(tmp_path)) as (server, _):
        SlotWriter.connect(tmp_path / "slots").close()
        metrics = http_get(server.endpoints["http"], "/metrics")[1].decode()
    assert 'inspectd_frame_slot_handouts_total{outcome="ok"} 1.0' in metrics
    assert 'inspectd_frame_slot_handouts_total{outcome="failed"} 0.0' in metrics


@pytest.mark.parametrize(
    ("stage", "first", "rewritten"),
    [
        ("infer", 60, 61),  # read across the rewrite, and judged on it were it not for the check
        ("prepare", 65, 13),  # a stage fails on the mixed pixels (the fake backend's crash on 13)
    ],
)
def test_a_slot_written_again_before_its_decision_rejects_the_frame(
    tmp_path: Path, stage: str, first: int, rewritten: int
) -> None:
    """The grabber must wait for the decision before it reuses a slot; one that does not changes the slot's sequence
    word first, so the frame read across the rewrite is a ``bad_frame`` reject, never judged on mixed pixels. Where
    the mixed pixels make a stage fail, the reject says why (the slot was written again), not what failed."""
    fake = FakeInspector()
    release = fake.hold(stage, first)
    with running(fake, **slotted(tmp_path)) as (server, _), Client(server) as client:
        writer = SlotWriter.connect(tmp_path / "slots")
        client.send_parts(json.dumps(header(1, **writer.write(0, image(first)))).encode())
        fake.wait_until(lambda: (stage, first) in fake.started)
        writer.write(0, image(rewritten))  # too early: frame 1 is still being inspected
        release.set()
        client.send_parts(json.dumps(header(2, **writer.write(1, image(62)))).encode())
        got = {d["frame_id"]: d for d in client.decisions(2)}
        writer.close()
    assert got[1]["reason"] == "bad_frame" and "too early" in got[1]["detail"], got[1]
    assert got[2]["reason"] == "ok"


@pytest.mark.parametrize(
    ("extra", "parts", "expected"),
    [
        ({"slot": 3, "slot_seq": 2}, 1, "slot must be an integer in 0-2"),
        ({"slot": True, "slot_seq": 2}, 1, "slot must be an integer"),
        ({"slot": 0}, 1, "slot_seq must be an integer"),
        ({"slot": 0, "slot_seq": 4}, 1, "slot 0 holds sequence 2"),
        ({"slot": 0, "slot_seq": 2}, 2, "expected 1 message part"),
        ({"slot": 0, "slot_seq": 2, "encoding": "png"}, 1, "a frame in a slot is raw"),
    ],
)
def test_slot_headers_that_cannot_be_read_are_bad_frames(
    tmp_path: Path, extra: dict[str, object], parts: int, expected: str
) -> None:
    """Every field naming a slot is checked; a bad one is a ``bad_frame`` reject naming it, and the daemon goes on."""
    with running(**slotted(tmp_path)) as (server, _), Client(server) as client:
        writer = SlotWriter.connect(tmp_path / "slots")
        assert writer.write(0, image(90)) == {"slot": 0, "slot_seq": 2}
        message = [json.dumps(header(1, **extra)).encode(), image().tobytes()][:parts]
        client.send_parts(*message)
        client.send_parts(json.dumps(header(2, **writer.write(1, image(91)))).encode())
        got = {d["frame_id"]: d for d in client.decisions(2)}
        writer.close()
    assert got[1]["reason"] == "bad_frame" and expected in got[1]["detail"], got[1]
    assert got[2]["reason"] == "ok"


def test_a_slot_header_to_a_daemon_without_slots_is_a_bad_frame() -> None:
    with running() as (server, _), Client(server) as client:
        client.send_parts(json.dumps(header(1, slot=0, slot_seq=2)).encode())
        got = client.decisions(1)
    assert got[0]["reason"] == "bad_frame" and "frames_shm is not set" in got[0]["detail"]


def test_a_grabber_cannot_resize_a_slot_under_the_daemon(tmp_path: Path) -> None:
    """Shrinking a mapped file makes the next read of it SIGBUS: the slots' sizes are sealed, also for the
    descriptors a grabber receives."""
    slots = FrameSlots(2, 1000)
    server = SlotSocket(tmp_path / "slots", slots)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(tmp_path / "slots"))
            server.serve()
            hello, fds, _, _ = socket.recv_fds(sock, 4096, 8)
        assert json.loads(hello) == {"v": 1, "slots": 2, "offset": OFFSET, "capacity": 1000}
        for fd in fds:
            assert os.fstat(fd).st_size == OFFSET + 1000
            for size in (0, OFFSET + 10_000):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            os.close(fd)
    finally:
        server.close()
        slots.close()


def test_the_slot_socket_path_is_claimed_like_an_ipc_endpoint(tmp_path: Path) -> None:
    """A path a running daemon serves is refused; a stale socket file is taken over; a file that is not a socket
    is left alone and refused; a relative path is a config error."""
    path = tmp_path / "slots"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with running(frames_shm=str(path)):
        assert "running process" in start_error(make_config(frames_shm=str(path)))
    (tmp_path / "notes").write_text("keep")
    assert "not a socket" in start_error(make_config(frames_shm=str(tmp_path / "notes")))
    assert (tmp_path / "notes").read_text() == "keep"
    with pytest.raises(ConfigError, match="frames_shm: expected an absolute path"):
        make_config(frames_shm="slots")
    with pytest.raises(ConfigError, match="frames_shm_slots"):
        make_config(frames_shm=str(path), frames_shm_slots=1)
    with pytest.raises(UserError, match="cannot fetch the daemon's frame slots"):
        SlotWriter.connect(tmp_path / "nothing-here", timeout_s=1)


def test_evidence_of_a_frame_in_a_slot_outlives_the_slot(tmp_path: Path) -> None:
    """The audit trail writes a reject's frame after its decision is out, when the grabber may already have
    written the next frame into the slot: the frame is copied out of the slot for it. The audit sink's thread
    is held here until the grabber has rewritten the slot, so without the copy the record shows the new frame."""
    audit = tmp_path / "audit"
    original = image(70, defect=True)
    entered, gate = threading.Event(), threading.Event()
    with running(**slotted(tmp_path, audit_dir=str(audit))) as (server, _), Client(server) as client:
        sink = next(s for s in server.outputs.sinks if s.name == "audit")
        write = sink.send
        sink.send = lambda decision: (entered.set(), gate.wait(10), write(decision))  # type: ignore[method-assign]
        writer = SlotWriter.connect(tmp_path / "slots")
        client.send_parts(json.dumps(header(1, **writer.write(0, original))).encode())
        assert client.decisions(1)[0]["reason"] == "defect"
        assert entered.wait(10)  # the audit sink has the decision, and with it whatever it was given
        writer.write(0, image(71))  # the decision is out: the slot is the grabber's again
        gate.set()
        record = _wait_for_record(audit)
        writer.close()
    assert np.array_equal(cv2.imread(str(record / "image.png"), cv2.IMREAD_UNCHANGED), original)


def test_sinks_that_keep_evidence_get_a_copy_of_a_frame_in_a_slot(tmp_path: Path) -> None:
    """Exactly: the sinks that want a decision's evidence get the frame copied out of its slot before any sink
    sees the decision; a frame whose slot was already written again reaches them without its image."""
    slots = FrameSlots(2, GEOMETRY.nbytes)
    server = SlotSocket(tmp_path / "slots", slots)
    try:
        writer = _connect(server, tmp_path / "slots")
        kept = []
        for rewrite in (False, True):
            fields = writer.write(0, image(80))
            view, where, why = slots.take(fields["slot"], fields["slot_seq"], GEOMETRY.nbytes)
            assert view is not None and where is not None and not why
            frame = np.frombuffer(view, np.uint8).reshape(GEOMETRY.shape)
            if rewrite:
                writer.write(0, image(81))
            evidence = Evidence(frame, slot=where)
            decision = Decision(1, "cam1", None, "reject", "defect", 0, 0, 0, "m", evidence=evidence)
            Outputs([Keeper(kept)]).publish(decision)
        first, second = kept
        assert first.image is not None and not np.shares_memory(first.image, frame)
        assert np.array_equal(first.image, image(80)) and first.slot is None
        assert second.image is None
        writer.close()
    finally:
        server.close()
        slots.close()


def _connect(server: SlotSocket, path: Path) -> SlotWriter:
    """A grabber connecting to a slot socket served on this thread (as the intake thread would)."""
    got: list[SlotWriter] = []
    grabber = threading.Thread(target=lambda: got.append(SlotWriter.connect(path)))
    grabber.start()
    end = time.monotonic() + 10
    while not server.served and time.monotonic() < end:
        server.serve()
        time.sleep(0.01)
    grabber.join(10)
    assert got, "the grabber got no slots"
    return got[0]


class Keeper:
    """A sink that keeps the evidence it is given (what the audit trail and the status page do)."""

    def __init__(self, kept: list[Evidence]) -> None:
        self.kept = kept

    def accepts(self, decision: Decision) -> bool:
        return True

    def wants_evidence(self, decision: Decision) -> bool:
        return True

    def offer(self, decision: Decision) -> None:
        assert decision.evidence is not None
        self.kept.append(decision.evidence)


def _wait_for_record(audit: Path, timeout_s: float = 30.0) -> Path:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        done = [p for p in audit.glob("*") if p.is_dir() and not p.name.startswith(".") and (p / "image.png").exists()]
        if done:
            return done[0]
        time.sleep(0.05)
    raise AssertionError("no audit record written")


def test_a_slot_socket_in_a_missing_folder_is_a_start_error(tmp_path: Path) -> None:
    cfg = replace(make_config(), frames_shm=str(tmp_path / "missing-dir" / "slots"))
    assert "frames_shm: cannot listen" in start_error(cfg)
