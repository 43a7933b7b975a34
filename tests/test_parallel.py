"""calibration.parallel: a fit phase's items side by side, results and exceptions in order."""

from __future__ import annotations

import threading
import time

import pytest

from calibration import parallel


def test_in_order_keeps_the_items_order_whatever_finishes_first():
    delays = [0.05, 0.0, 0.03, 0.0, 0.01, 0.0]

    def slow_square(i: int) -> int:
        time.sleep(delays[i])  # later items finish before earlier ones on the other worker
        return i * i

    assert list(parallel.in_order(slow_square, range(len(delays)))) == [i * i for i in range(len(delays))]


def test_in_order_raises_at_the_failing_item_and_starts_no_more(monkeypatch):
    """An item's exception comes out where its result would have; items not yet started never start, and no
    worker thread outlives the loop."""
    monkeypatch.setattr(parallel, "FIT_WORKERS", 2)
    never = threading.Event()
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 1:
            raise ValueError("image 1 is broken")
        if i > 1:
            never.wait(0.2)  # busy: the queue behind it waits for a free worker
        return i

    seen = []
    with pytest.raises(ValueError, match="image 1 is broken"):
        for value in parallel.in_order(work, range(50)):
            seen.append(value)
    assert seen == [0]
    assert len(started) < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("inspectd-fit")]
