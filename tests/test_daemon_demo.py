"""`inspectd demo`: synthesise, fit, serve and stream end to end in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from daemon import demo


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo decides every streamed frame, rejects defective parts and says where to look."""
    code = demo.main(argparse.Namespace(workdir=tmp_path, rate=50.0))
    out = capsys.readouterr().out
    assert code == 0
    assert "10 frames sent, 10 decisions" in out and "0 defective parts passed" in out
    assert "where to look" in out and (tmp_path / "daemon.log").is_file()
    assert '"event": "stopped"' in (tmp_path / "daemon.log").read_text()
