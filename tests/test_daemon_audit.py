"""Audit trail: rejects stored with image and map, caps enforced oldest first, bad disks survived, CLI."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon import cli
from daemon.audit import AuditSink
from daemon.protocol import Decision, Evidence
from tests.test_daemon_hostile import wait_for
from tests.test_daemon_support import Client, FakeInspector, image, running


def decision(frame_id: int, verdict: str = "reject", reason: str = "defect", with_evidence: bool = True) -> Decision:
    now = time.time_ns() + frame_id * 1_000_000  # distinct, increasing record names
    evidence = None
    if with_evidence:
        amap = np.zeros((32, 48), np.float32)
        amap[5, 6] = 2.0
        evidence = Evidence(np.full((32, 48), 100, np.uint8), amap, np.eye(2, 3))
    return Decision(
        frame_id, "cam1", None, verdict, reason, now, now, now + 10**9, "m", threshold=1.0, evidence=evidence
    )


def flush(sink: AuditSink) -> None:
    sink.close(flush_s=5.0)


def test_rejects_are_written_with_image_map_and_decision(tmp_path: Path) -> None:
    """A reject becomes a directory with decision.json, the lossless frame and the scaled anomaly map."""
    sink = AuditSink(tmp_path)
    sink.start()
    sink.offer(decision(1))
    flush(sink)
    (record,) = [p for p in tmp_path.iterdir()]
    assert record.name.endswith("_cam1_1_defect")
    meta = json.loads((record / "decision.json").read_text())
    assert meta["frame_id"] == 1 and meta["pose_matrix"][0] == [1.0, 0.0, 0.0]
    assert (cv2.imread(str(record / "image.png"), cv2.IMREAD_UNCHANGED) == 100).all()
    assert cv2.imread(str(record / "anomaly.png"), cv2.IMREAD_UNCHANGED)[5, 6] == 200  # 100 grey per threshold


def test_passes_are_sampled_and_caps_delete_the_oldest(tmp_path: Path) -> None:
    """Every other pass is kept with pass_sample 0.5; the count cap keeps only the newest records."""
    sink = AuditSink(tmp_path, max_count=3, pass_sample=0.5)
    assert [sink.accepts(decision(i, "pass", "ok")) for i in range(4)] == [False, True, False, True]
    sink.start()
    for i in range(6):
        sink.offer(decision(i))
        time.sleep(0.02)  # the queue holds 8 records; pace the producer like a line would
    flush(sink)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.split("_")[2] for n in names] == ["3", "4", "5"] and sink.deleted == 3
    sink2 = AuditSink(tmp_path, max_mb=1e-6)  # a restart with a tiny size cap trims what is there
    assert list(tmp_path.iterdir()) == [] and sink2.stats()["records"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_counted_not_fatal_as_user(tmp_path: Path) -> None:
    """Writes into a read-only directory fail, are counted, and the sink keeps running."""
    tmp_path.chmod(0o500)
    try:
        sink = AuditSink(tmp_path)
        sink.start()
        sink.offer(decision(1))
        flush(sink)
        assert sink.failed == 1 and sink.sent == 0
    finally:
        tmp_path.chmod(0o700)


def test_a_failing_disk_is_counted_and_the_daemon_keeps_deciding(tmp_path: Path) -> None:
    """With the audit directory replaced by a file (writes fail), frames are still decided and failures counted."""
    target = tmp_path / "audit"
    with running(FakeInspector(), audit_dir=str(target)) as (server, _), Client(server) as client:
        sink = next(s for s in server.outputs.sinks if s.name == "audit")
        client.send(1, image(defect=True))
        assert len(client.decisions(1)) == 1
        assert wait_for(
            lambda: sink.stats()["records"] == 1, timeout_s=30.0
        )  # the audit sink has its own (nicer) thread
        os.rename(target, tmp_path / "moved")
        target.write_text("not a directory")  # every write fails now, as on a full or read-only disk
        for i in range(2, 6):
            client.send(i, image(defect=True))
        assert len(client.decisions(4)) == 4
        assert wait_for(lambda: sink.failed == 4, timeout_s=30.0)


def test_cli_lists_and_exports_recent_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`inspectd audit list` prints newest first; `export` writes a tarball or a directory."""
    sink = AuditSink(tmp_path / "trail", pass_sample=1.0)
    sink.start()
    for i, (verdict, reason) in enumerate([("reject", "defect"), ("pass", "ok"), ("reject", "registration")]):
        sink.offer(decision(i, verdict, reason))
        time.sleep(0.02)
    flush(sink)
    assert cli.main(["audit", "list", str(tmp_path / "trail")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "registration" in lines[0] and "defect" in lines[1]
    assert cli.main(["audit", "list", str(tmp_path / "trail"), "--json", "--reason", "defect"]) == 0
    assert json.loads(capsys.readouterr().out)["frame_id"] == 0
    assert cli.main(["audit", "export", str(tmp_path / "trail"), "--out", str(tmp_path / "x.tar.gz")]) == 0
    with tarfile.open(tmp_path / "x.tar.gz") as tar:
        assert sum(n.endswith("decision.json") for n in tar.getnames()) == 2
    assert cli.main(["audit", "export", str(tmp_path / "trail"), "--passes", "--out", str(tmp_path / "d")]) == 0
    assert len(list((tmp_path / "d").iterdir())) == 3
    assert cli.main(["audit", "list", str(tmp_path / "missing")]) == 2


# -- issue 13, row 5: a full disk, then a read-only one ---------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def noisy(frame_id: int, verdict: str = "reject") -> Decision:
    """A record of about 20 KB (a 96x96 noise frame does not compress)."""
    now = time.time_ns() + frame_id * 1_000_000
    frame = np.random.default_rng(frame_id).integers(0, 256, (96, 96), dtype=np.uint8)
    evidence = Evidence(frame, np.zeros((96, 96), np.float32), np.eye(2, 3))
    reason = "ok" if verdict == "pass" else "defect"
    return Decision(
        frame_id, "cam1", None, verdict, reason, now, now, now + 10**9, "m", threshold=1.0, evidence=evidence
    )


def write_one(sink: AuditSink, d: Decision) -> None:
    """Offer one record and wait until the sink has written it or failed (a line paces its rejects too)."""
    done = sink.sent + sink.failed
    sink.offer(d)
    end = time.monotonic() + 10
    while sink.sent + sink.failed == done and time.monotonic() < end:
        time.sleep(0.005)
    assert sink.sent + sink.failed == done + 1


@contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Callable[[bool], None]]:
    """A real tiny file system (tmpfs) at ``path``; yields ``set_read_only(flag)``. Skips where it cannot mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the simulated disk test covers the same rules)")
    path.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)]
    mounted = subprocess.run(command, capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def set_read_only(flag: bool) -> None:
        options = f"remount,{'ro' if flag else 'rw'}"
        subprocess.run(["mount", "-o", options, str(path)], check=True, capture_output=True)

    try:
        yield set_read_only
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_up(root: Path) -> None:
    """Take a real file system's last free bytes with a file that is not the audit trail's."""
    with open(root / "filler", "ab", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)


def full_then_read_only(
    sink: AuditSink,
    root: Path,
    clock: FakeClock,
    set_read_only: Callable[[bool], None],
    fill: Callable[[Path], None] = fill_up,
) -> None:
    """The scenario of row 5, on any file system: 30 rejects on a disk that holds a few; then a sampled pass on a
    disk filled by someone else; then the disk turns read-only; then it recovers."""
    with capture_logs() as logs:
        sink.start()
        for i in range(30):
            write_one(sink, noisy(i))
        kept = sorted(int(p.name.split("_")[2]) for p in sink.directory.iterdir())
        assert sink.failed == 0 and sink.sent == 30 and sink.made_room > 0  # no reject was lost
        assert kept == list(range(30 - len(kept), 30)) and 2 <= len(kept) < 30  # the newest, oldest deleted
        fill(root)
        write_one(sink, noisy(30, "pass"))  # a pass does not push rejects out
        assert sink.failed == 1 and sink.problem() == "records not written (disk full)"
        set_read_only(True)
        write_one(sink, noisy(31))
        write_one(sink, noisy(32))  # the same cause again: not logged again yet
        assert sink.problem() == "records not written (read-only file system)"
        clock.now += 61
        write_one(sink, noisy(33))  # still failing a minute later: one line with the count
        set_read_only(False)
        (root / "filler").unlink()
        write_one(sink, noisy(34))
        sink.close(flush_s=5.0)
    events = [(e["event"], e.get("cause"), e.get("failures")) for e in logs if e["event"].startswith("audit_write")]
    assert events == [
        ("audit_write_failed", "disk full", None),
        ("audit_write_failure_changed", "read-only file system", None),
        ("audit_write_failing", "read-only file system", 2),
        ("audit_write_recovered", None, None),
    ]
    assert sink.failed == 4 and sink.problem() is None
    assert max(int(p.name.split("_")[2]) for p in sink.directory.iterdir()) == 34


def test_row5_a_tiny_real_file_system_full_then_read_only(tmp_path: Path) -> None:
    """Issue 13, row 5, on a real 192 KiB tmpfs: the newest rejects are kept by deleting the oldest (the old sink
    lost them), and failures are logged when they start, when their cause changes and once a minute while they last."""
    root = tmp_path / "fs"
    with tmpfs(root, 192) as set_read_only:
        clock = FakeClock()
        full_then_read_only(AuditSink(root / "audit", clock=clock), root, clock, set_read_only)


class TinyDisk(AuditSink):
    """An audit sink on a simulated disk of ``size`` bytes under ``root`` (ENOSPC beyond it; EROFS when
    read-only): the same rules where a tmpfs cannot be mounted. Only the file writes are simulated."""

    def __init__(self, root: Path, size: int, clock: FakeClock) -> None:
        self.root, self.size, self.read_only = root, size, False
        super().__init__(root / "audit", clock=clock)

    def _write_file(self, path: Path, data: bytes) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        used = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        if used + len(data) > self.size:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        super()._write_file(path, data)


def test_row5_a_simulated_tiny_disk_full_then_read_only(tmp_path: Path) -> None:
    """The same scenario on a simulated 100 KB disk, so it runs without root."""
    clock = FakeClock()
    sink = TinyDisk(tmp_path, 100_000, clock)

    def set_read_only(flag: bool) -> None:
        sink.read_only = flag

    def fill_simulated(root: Path) -> None:
        used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        (root / "filler").write_bytes(b"\0" * (sink.size - used))

    full_then_read_only(sink, tmp_path, clock, set_read_only, fill_simulated)
