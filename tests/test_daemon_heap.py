"""daemon/heap.py: the C heap keeps frame-sized blocks while serving."""

from __future__ import annotations

import sys

import pytest

from daemon import heap


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_frame_sized_blocks_stay_in_the_heap_and_freed_ones_are_kept() -> None:
    libc = FakeLibc()
    assert heap.keep_frame_blocks(libc)
    calls = dict(libc.calls)
    assert calls[heap.M_MMAP_THRESHOLD] >= 27 * 1024 * 1024  # a padded 5120 px uint8 frame stays below it
    assert calls[heap.M_TRIM_THRESHOLD] > calls[heap.M_MMAP_THRESHOLD]  # freed blocks are not handed back at once
    assert calls[heap.M_TOP_PAD] >= 64 * 1024 * 1024  # a thread arena's heaps stay mapped


def test_a_refused_setting_is_reported() -> None:
    assert not heap.keep_frame_blocks(FakeLibc(answer=0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_the_settings() -> None:
    assert heap.keep_frame_blocks()


RECEIVER = """
import collections, os, sys
import numpy as np, zmq
from daemon import heap
if sys.argv[2] == "keep":
    heap.keep_frame_blocks()

def io_faults():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        stat = open(f"/proc/self/task/{tid}/stat").read()
        if stat[stat.index("(") + 1 : stat.rindex(")")].startswith("ZMQbg/IO"):
            total += int(stat[stat.rindex(")") + 2 :].split()[7])
    return total

ctx = zmq.Context()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
push.connect(f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
payload = np.ones(5120 * 5120, np.uint8).data
alive = collections.deque(maxlen=int(sys.argv[1]))
for i in range(24):
    if i == 8:
        start = io_faults()
    push.send(payload, copy=False)
    alive.append(pull.recv(copy=False))  # the oldest frame freed here, off the I/O thread, as in the daemon
print((io_faults() - start) / 16)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas, /proc")
@pytest.mark.parametrize("alive", [2, 4])
def test_received_frames_do_not_come_back_as_fresh_pages(alive: int) -> None:
    """5120 px frames received over real ZeroMQ sockets, a few alive at once and freed on another thread: with the
    daemon's settings the I/O thread finds its arena's memory mapped already (without them, ~1000 faults a frame)."""
    import subprocess

    def faults(settings: str) -> float:
        argv = [sys.executable, "-c", RECEIVER, str(alive), settings]
        return float(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout)

    without = faults("glibc")
    if without < 200:
        pytest.skip(f"this C library keeps the arena's heaps mapped by itself ({without:.0f} faults a frame)")
    assert faults("keep") < 50


def test_serve_sets_them_before_the_server_starts(monkeypatch) -> None:
    from daemon import server

    order: list[str] = []
    monkeypatch.setattr(heap, "keep_frame_blocks", lambda: order.append("heap"))

    class Started:
        def __init__(self, cfg) -> None:
            order.append("server")

        def run(self) -> int:
            return 0

    monkeypatch.setattr(server, "Server", Started)
    monkeypatch.setattr(server.daemon_logging, "configure", lambda *args: None)
    config = type("Config", (), {"log_format": "json", "log_level": "info"})
    monkeypatch.setattr(server, "config_from_args", lambda args: config)
    assert server.main(None) == 0
    assert order == ["heap", "server"]
