"""The daemon figures of ``benchmarks/frame_path.py``: hops from the decision's own clocks, the paired overhead."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import load_benchmark

frame_path = load_benchmark("frame_path")


def report(*frames: tuple[int, int, int, int]) -> SimpleNamespace:
    """A sender's report from (sent, daemon received, daemon decided, sender received) ns per frame."""
    sent, decisions, received = {}, {}, {}
    for key, (t_sent, t_in, t_out, t_back) in enumerate(frames):
        sent[key], received[key] = t_sent, t_back
        decisions[key] = {"frame_id": key, "t_received_ns": t_in, "t_decided_ns": t_out}
    return SimpleNamespace(sent_ns=sent, received_ns=received, decisions=decisions)


def test_a_frame_splits_into_hop_in_inside_and_hop_out() -> None:
    row = frame_path._frame_rows(report((0, 9_000_000, 259_000_000, 262_000_000)), {"0": {"latency_ms": 250.0}})
    assert row == [{"e2e": 262.0, "hop_in": 9.0, "hop_out": 3.0, "t_in": 9.0, "t_out": 259.0, "latency_ms": 250.0}]


def test_frames_that_arrive_while_the_one_before_is_in_flight_are_told_apart(capsys) -> None:
    frames = [
        {"t_in": 0.0, "t_out": 100.0, "prepare": 50.0, "infer": 40.0, "latency_ms": 100.0},
        {"t_in": 90.0, "t_out": 200.0, "prepare": 70.0, "infer": 40.0, "latency_ms": 110.0},  # arrived at 90 < 100
        {"t_in": 300.0, "t_out": 390.0, "prepare": 46.0, "infer": 40.0, "latency_ms": 90.0},
    ]
    frame_path.print_overlap({"new": [{"frames": frames[::-1]}]})  # in any order: sorted by arrival
    assert "run 1: 1/3; prepare 70 / 48, infer 40 / 40, latency_ms 110 / 95" in capsys.readouterr().out


def test_a_decision_without_the_daemons_clocks_has_no_hops() -> None:
    rep = report((0, 1, 2, 5_000_000))
    del rep.decisions[0]["t_received_ns"]
    assert frame_path._frame_rows(rep, {}) == [{"e2e": 5.0}]


def test_each_frame_is_compared_with_the_bare_blocks_beside_its_own() -> None:
    # The machine slowed down during the run: bare 200, 220, then 300 ms before, between and after the two blocks.
    bare = [200.0, 220.0, 300.0]
    frames = [{"e2e": 220.5, "block": 0}] * 2 + [{"e2e": 273.0, "block": 1}] * 2  # 5 % over 210 and over 260
    assert frame_path._paired_overhead(frames, bare) == pytest.approx(0.05)
    # Pooled (e2e p50 246.75 over bare p50 220) the same frames read +12 %.
    assert frame_path._paired_overhead([], bare) is None


def test_the_paced_reference_is_shown_only_where_the_run_measured_it() -> None:
    row = {"p50": 231.0, "paced_p50": 220.0, "pause_ms": 94.6, "paired_paced": 0.042}
    cells = frame_path._paced(row)
    assert cells.split() == ["220.0", "(", "95)", "+5.0%", "+4.2%"]
    assert len(cells) == len(frame_path._paced({}))  # the columns line up with a row from before it existed
    assert frame_path._paced({}).strip() == ""
