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


def test_a_refused_setting_is_reported() -> None:
    assert not heap.keep_frame_blocks(FakeLibc(answer=0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_the_settings() -> None:
    assert heap.keep_frame_blocks()


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
