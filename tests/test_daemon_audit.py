"""Audit trail: rejects stored with image and map, caps enforced oldest first, bad disks survived, CLI."""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon import cli
from daemon.audit import AuditSink
from daemon.protocol import Decision, Evidence
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
        time.sleep(0.3)
        assert sink.stats()["records"] == 1
        os.rename(target, tmp_path / "moved")
        target.write_text("not a directory")  # every write fails now, as on a full or read-only disk
        for i in range(2, 6):
            client.send(i, image(defect=True))
        assert len(client.decisions(4)) == 4
        time.sleep(0.3)
        assert sink.failed == 4


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
