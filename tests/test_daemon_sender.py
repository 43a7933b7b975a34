"""The `inspectd send` camera simulator against a running daemon."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon import sender
from engines.errors import UserError
from engines.types import Geometry
from tests.test_daemon_support import FakeInspector, image, running


def args(folder: Path, endpoints: dict[str, str], **extra: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sender.add_arguments(parser)
    argv = [str(folder), "--endpoint", endpoints["frames"], "--decisions", endpoints["decisions"], "--rate", "50"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_send_prints_one_line_per_decision_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each image is sent, each decision printed, and the exit code says all were decided."""
    (tmp_path / "good").mkdir()
    cv2.imwrite(str(tmp_path / "good" / "a.png"), image())
    cv2.imwrite(str(tmp_path / "b.png"), image(defect=True))
    with running() as (server, _):
        code = sender.main(args(tmp_path, server.endpoints, count=4, encoding="png"))
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("frame ") == 4 and "reject defect" in out and "pass   ok" in out
    assert "sent 4, decided 4: 2 pass, 2 reject" in out


def test_send_refuses_an_empty_folder(tmp_path: Path) -> None:
    """A folder without images is a one-line user error."""
    with pytest.raises(UserError, match="no images"):
        sender.main(args(tmp_path, {"frames": "tcp://127.0.0.1:1", "decisions": "tcp://127.0.0.1:2"}))


@pytest.mark.parametrize("encoding", ["tiff", "jpeg", "png"])
def test_send_encoded_frames_of_a_real_sensor_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    """`inspectd send --encoding tiff|jpeg|png` of 512x384 frames: every frame decided, none a bad_frame.

    OpenCV writes a TIFF's index after the pixels; noisy frames put it past the first 64 KiB.
    """
    geometry = Geometry(384, 512, 1, "uint8")
    rng = np.random.default_rng(3)
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, geometry.shape).astype(np.uint8))
    with running(FakeInspector(geometry, threshold=2.5)) as (server, _):  # every pixel value passes
        code = sender.main(args(tmp_path, server.endpoints, count=4, encoding=encoding))
    out = capsys.readouterr().out
    assert code == 0 and "sent 4, decided 4: 4 pass, 0 reject" in out, out


def test_send_through_the_daemons_shared_memory_slots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`inspectd send --shm PATH`: frames written into the daemon's slots, headers alone over the socket; more
    frames than slots, each slot reused after its frame's decision. `--encoding png` with `--shm` is refused."""
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames" / "a.png"), image())
    cv2.imwrite(str(tmp_path / "frames" / "b.png"), image(defect=True))
    slots = str(tmp_path / "slots")
    with running(frames_shm=slots, frames_shm_slots=2) as (server, _):
        code = sender.main(args(tmp_path / "frames", server.endpoints, count=6, shm=slots))
        with pytest.raises(UserError, match="--shm: frames in shared memory are raw"):
            sender.main(args(tmp_path / "frames", server.endpoints, encoding="png", shm=slots))
    out = capsys.readouterr().out
    assert code == 0 and "sent 6, decided 6: 3 pass, 3 reject" in out, out
