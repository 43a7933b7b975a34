"""``benchmarks/tile_core.py``: every tile of the frame runs once, shared by the workers; a row per core side."""

from __future__ import annotations

import sys
import threading

from tests.helpers import load_benchmark

tile_core = load_benchmark("tile_core")


class CountingSession:
    """Stands in for an ONNX Runtime session: counts runs and the threads that made them."""

    def __init__(self) -> None:
        self.runs = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def run(self, outputs: None, feeds: dict) -> None:
        with self._lock:
            self.runs += 1
            self.threads.add(threading.get_ident())


def test_a_frame_runs_each_tile_once_over_the_workers() -> None:
    session = CountingSession()
    assert tile_core.frame_ms(session, {}, tiles=25, workers=2) >= 0
    assert session.runs == 25 and 1 <= len(session.threads) <= 2


def test_the_table_has_a_row_per_core_side_with_its_tiles(monkeypatch, capsys) -> None:
    argv = ["tile_core.py", "--side", "256", "--cores", "128", "64", "--rounds", "1", "--frames", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    assert tile_core.main() == 0
    rows = {
        int(line.split()[0]): line.split()
        for line in capsys.readouterr().out.splitlines()
        if line[:6].strip().isdigit()
    }
    assert sorted(rows) == [64, 128]
    assert (rows[128][1], rows[128][2]) == ("256", "4") and (rows[64][1], rows[64][2]) == ("192", "16")
    assert rows[128][-1] == "–"  # no 1024 px core in the run to compare with
