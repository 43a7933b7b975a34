"""Audit trail: every reject (and a sample of passes) on disk, capped, written off the frame path.

Layout: one directory per decision under ``audit_dir``, named so that names sort by time:
``20260101T120000.123Z_cam1_17_defect/`` with
  decision.json   the published decision, plus the pose matrix and how the map is scaled
  image.png       the frame as decoded (frame pixels, lossless)
  anomaly.png     the anomaly map (reference frame), 8 bit: value = score * 100 / threshold
                  (100 = the threshold, 255 = 2.55 times it or more)
A record is written into a ``.tmp-`` directory and renamed, so a reader never sees half of
one. After each write the oldest records are deleted until both caps (``audit_max_count``,
``audit_max_mb``) hold.

A full disk does not cost the newest reject: when a reject's write fails for lack of space
(ENOSPC, EDQUOT), the oldest records are deleted one at a time to make room and the write
is tried again, until it fits or no record is left (``made_room`` counts the deletions).
Any other failure (a read-only disk, a missing directory, permissions) and a pass that does
not fit are counted (``failed``) and the half-written record removed; the daemon carries on.
Failing writes are logged when they start, at once when their cause changes (full, then
read-only), every ``LOG_EVERY_S`` while they go on (with the count since the last line),
and when writes succeed again; meanwhile the status page shows the cause (a non-fatal
condition). The queue holds at most ``QUEUE`` records (each pins its frame in memory until
written); beyond that records are dropped and counted.

``inspectd audit list DIR`` and ``inspectd audit export DIR --out FILE.tar.gz|DIR`` read it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import os
import re
import shutil
import tarfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from daemon.outputs import OBSERVER_NICE, Sink
from daemon.protocol import Decision
from daemon.supervision import Supervisor
from engines.errors import UserError

log = structlog.get_logger("inspectd.audit")

QUEUE = 8
LOG_EVERY_S = 60.0  # while writes keep failing for one cause, one log line per this long
FULL = (errno.ENOSPC, errno.EDQUOT)
ANOMALY_SCALE = 100.0  # anomaly.png grey value per threshold
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def record_name(decision: Decision) -> str:
    when = dt.datetime.fromtimestamp(decision.t_decided_ns / 1e9, dt.timezone.utc)
    stamp = when.strftime("%Y%m%dT%H%M%S.") + f"{when.microsecond // 1000:03d}Z"
    parts = [stamp, str(decision.camera_id or "-"), str(decision.frame_id), decision.reason]
    return "_".join(_UNSAFE.sub("-", p)[:64] for p in parts)


class AuditSink(Sink):
    """Writes rejects and sampled passes with image and anomaly map; keeps the directory under its caps."""

    name = "audit"
    nice = OBSERVER_NICE

    def __init__(
        self,
        directory: str | Path,
        max_mb: float = 2048,
        max_count: int = 10_000,
        pass_sample: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(maxsize=QUEUE)
        self.directory = Path(directory)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.max_count = max_count
        self.pass_sample = pass_sample
        self._clock = clock
        self._credit = 0.0
        self.written = 0
        self.deleted = 0
        self.made_room = 0  # records deleted because the disk was full
        self._index: deque[tuple[str, int]] = deque()
        self._bytes = 0
        self.cause: str | None = None  # why writes are failing now; None while they succeed
        self._cause_failures = 0  # failures since the cause was last logged
        self._logged_at = 0.0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as exc:  # logged and counted on each write; never stops the daemon
            log.warning("audit_unavailable", directory=str(self.directory), error=str(exc))

    def start(self, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:  # shown on the status page while writes fail; never fatal
            supervisor.condition("audit", self.problem, fatal=False)
        super().start(supervisor)

    def problem(self) -> str | None:
        return None if self.cause is None else f"records not written ({self.cause})"

    # -- frame path (cheap) ------------------------------------------------------------------
    def accepts(self, decision: Decision) -> bool:
        if decision.verdict != "pass":
            return True
        if self.pass_sample <= 0:
            return False
        self._credit += self.pass_sample  # deterministic sampling: every 1/pass_sample-th pass
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False

    def wants_evidence(self, decision: Decision) -> bool:
        return True

    def stats(self) -> dict[str, int]:
        return {
            **super().stats(),
            "records": len(self._index),
            "bytes": self._bytes,
            "deleted": self.deleted,
            "made_room": self.made_room,
        }

    # -- the sink's thread -------------------------------------------------------------------
    def send(self, decision: Decision) -> None:
        name = record_name(decision)
        files = self._files(decision)
        while True:
            try:
                self._store(name, files)
                break
            except OSError as exc:
                if exc.errno in FULL and decision.verdict != "pass" and self._index:
                    self._delete_oldest()  # make room for the newest reject
                    self.made_room += 1
                    continue
                self._failed(exc)
                return
        self.written += 1
        self._index.append((name, sum(len(d) for d in files.values())))
        self._bytes += self._index[-1][1]
        if self.cause is not None:
            log.info("audit_write_recovered", directory=str(self.directory), after=self.cause)
            self.cause = None
        self._enforce()
        self.sent += 1  # last: whoever sees the count (metrics, tests) sees the trail and its health as they now are

    def _files(self, decision: Decision) -> dict[str, bytes]:
        """The record's files, encoded once (a write retried after making room does not encode again)."""
        evidence = decision.evidence
        record = decision.to_dict()
        files = {}
        if evidence is not None and evidence.image is not None:
            files["image.png"] = _png(np.asarray(evidence.image))
        if evidence is not None and evidence.anomaly_map is not None:
            threshold = decision.threshold or 1.0
            amap = np.asarray(evidence.anomaly_map, np.float32) * (ANOMALY_SCALE / threshold)
            files["anomaly.png"] = _png(np.clip(amap, 0, 255).astype(np.uint8))
            record["anomaly_png"] = {"frame": "reference", "grey_per_threshold": ANOMALY_SCALE}
        if evidence is not None and evidence.pose_matrix is not None:
            record["pose_matrix"] = np.asarray(evidence.pose_matrix, float).round(6).tolist()
        files["decision.json"] = json.dumps(record, indent=1).encode()
        return files

    def _store(self, name: str, files: dict[str, bytes]) -> None:
        """Write the record into a temporary directory and rename it into place; nothing is left on failure."""
        tmp = self.directory / f".tmp-{name}"
        try:
            tmp.mkdir()
            for filename, data in files.items():
                self._write_file(tmp / filename, data)
            final = self.directory / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_file(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as fh:
            fh.write(data)

    def _failed(self, exc: OSError) -> None:
        """Count a failed write (after its cause is recorded: whoever sees the count sees ``problem()`` too)."""
        try:
            self._note_failure(exc)
        finally:
            self.failed += 1

    def _note_failure(self, exc: OSError) -> None:
        """Record the failure's cause; log it when the cause is new or every ``LOG_EVERY_S`` while it lasts."""
        self._cause_failures += 1
        cause = failure_cause(exc)
        now = self._clock()
        if cause != self.cause:
            level = "audit_write_failed" if self.cause is None else "audit_write_failure_changed"
            log.warning(level, directory=str(self.directory), cause=cause, was=self.cause, error=str(exc))
        elif now - self._logged_at >= LOG_EVERY_S:
            log.warning(
                "audit_write_failing",
                directory=str(self.directory),
                cause=cause,
                failures=self._cause_failures,
                since_s=round(now - self._logged_at),
                error=str(exc),
            )
        else:
            return
        self.cause, self._logged_at, self._cause_failures = cause, now, 0

    def _delete_oldest(self) -> None:
        name, size = self._index.popleft()
        shutil.rmtree(self.directory / name, ignore_errors=True)
        self._bytes -= size
        self.deleted += 1

    def _enforce(self) -> None:
        while self._index and (len(self._index) > self.max_count or self._bytes > self.max_bytes):
            self._delete_oldest()

    def _scan(self) -> None:
        """Index what earlier runs left (oldest first); remove half-written records."""
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and (entry / "decision.json").exists():
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                self._index.append((entry.name, size))
                self._bytes += size
        self._enforce()


def failure_cause(exc: OSError) -> str:
    """A write failure's cause in words (what an operator acts on)."""
    if exc.errno in FULL:
        return "disk full"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "directory missing"
    return exc.strerror or type(exc).__name__


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError("PNG encoding failed")
    return data.tobytes()


# -- reading the trail ---------------------------------------------------------------------------
def records(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every complete record, newest first, with its decision."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such audit directory")
    out = []
    for entry in sorted(directory.iterdir(), reverse=True):
        path = entry / "decision.json"
        if entry.name.startswith(".") or not path.is_file():
            continue
        try:
            out.append((entry, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # a record being deleted or damaged: skip it
    return out


def select(directory: Path, args: argparse.Namespace) -> list[tuple[Path, dict[str, Any]]]:
    chosen = []
    for entry, decision in records(directory):
        if args.reason and decision.get("reason") != args.reason:
            continue
        if args.camera and decision.get("camera_id") != args.camera:
            continue
        if not args.passes and decision.get("verdict") == "pass":
            continue
        chosen.append((entry, decision))
        if len(chosen) >= args.limit:
            break
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("list", "print recent rejects, newest first"), ("export", "copy recent rejects")):
        p = sub.add_parser(action, help=help_text)
        p.add_argument("directory", type=Path, help="the audit directory (audit_dir)")
        p.add_argument("--limit", type=int, default=20 if action == "list" else 1000, help="at most this many")
        p.add_argument("--reason", help="only this reason (defect, registration, deadline, ...)")
        p.add_argument("--camera", help="only this camera id")
        p.add_argument("--passes", action="store_true", help="include sampled passes")
        if action == "list":
            p.add_argument("--json", action="store_true", help="one JSON decision per line")
        else:
            p.add_argument("--out", type=Path, required=True, help="a .tar.gz / .tar file or a directory")


def main(args: argparse.Namespace) -> int:
    chosen = select(args.directory, args)
    if args.action == "list":
        for entry, d in chosen:
            if args.json:
                print(json.dumps({"record": entry.name, **d}))
            else:
                when = dt.datetime.fromtimestamp(d.get("t_decided_ns", 0) / 1e9).isoformat(timespec="milliseconds")
                score = d.get("score")
                print(
                    f"{when}  {d.get('camera_id')}  frame {d.get('frame_id')}  {d.get('verdict')} {d.get('reason')}"
                    f"  score {'-' if score is None else score}  defects {len(d.get('defects', []))}  {entry.name}"
                )
        return 0
    out: Path = args.out
    try:
        if out.name.endswith((".tar.gz", ".tgz", ".tar")):
            mode = "w" if out.name.endswith(".tar") else "w:gz"
            with tarfile.open(out, mode) as tar:
                for entry, _ in chosen:
                    tar.add(entry, arcname=entry.name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            for entry, _ in chosen:
                shutil.copytree(entry, out / entry.name, dirs_exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the export: {exc.strerror or exc}") from None
    print(f"exported {len(chosen)} records to {out}")
    return 0
