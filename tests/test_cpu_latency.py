"""The CPU wake-up latency request (``daemon/cpu_latency.py``): on the kernel's real device where this
machine lets the tests write it, and on a file standing in for it where the point is what is written
and when it is let go."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import cpu_latency
from daemon.config import ConfigError
from daemon.cpu_latency import DEVICE, CpuLatencyRequest
from daemon.server import Server
from tests.test_daemon_hostile import http_get, wait_for
from tests.test_daemon_support import Client, make_config, running


def _open_on(device: Path) -> int:
    """How many of this process's descriptors are open on ``device``."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(device.resolve()))


def _effective_us() -> int:
    fd = os.open(DEVICE, os.O_RDONLY)
    try:
        return struct.unpack("=i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.access(DEVICE, os.R_OK | os.W_OK), reason=f"{DEVICE} is not this user's to write")
def test_the_kernel_keeps_the_request_while_it_is_held_and_drops_it_after() -> None:
    before = _effective_us()
    if before <= 7:
        pytest.skip(f"another request already holds the machine at {before} us")
    with CpuLatencyRequest(7) as request:
        assert request.held
        assert _effective_us() == 7  # every core now wakes within 7 us
    assert not request.held
    assert _effective_us() == before


def test_the_request_is_the_native_s32_written_once_and_let_go_at_release(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    request = CpuLatencyRequest(0, device)
    assert request.hold() and request.hold()  # a second hold keeps the one request
    assert device.read_bytes() == struct.pack("=i", 0)
    assert _open_on(device) == 1
    request.release()
    request.release()
    assert _open_on(device) == 0 and not request.held


def test_a_release_whose_condition_turned_keeps_the_request(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    with CpuLatencyRequest(0, device) as request:
        request.release(reason="idle", still=lambda: False)  # a frame came between the look and the release
        assert request.held and _open_on(device) == 1
    assert not request.held and _open_on(device) == 0


def test_a_request_that_cannot_be_had_is_logged_once_and_not_a_fault(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "cpu_dma_latency"
    with capture_logs() as logs:
        request = CpuLatencyRequest(0, missing)
        assert not request.hold()
    assert str(missing) in request.problem and "No such file" in request.problem
    (entry,) = logs
    assert entry["event"] == "cpu_latency_not_held" and entry["log_level"] == "warning"
    assert "cpu_wakeup_latency_us = -1" in entry["hint"]


def test_a_request_refused_once_is_not_asked_for_again(tmp_path: Path) -> None:
    request = CpuLatencyRequest(0, tmp_path / "missing")
    with capture_logs() as logs:
        assert not request.hold()
        (tmp_path / "missing").touch()  # even if the device turned up, the line's frames do not retry it
        assert not request.hold()
    assert len(logs) == 1 and not request.held


def test_off_never_opens_the_device(tmp_path: Path) -> None:
    with capture_logs() as logs:
        request = CpuLatencyRequest(-1, tmp_path / "missing")
        assert not request.hold()
    assert request.problem is None and logs == []


@pytest.mark.parametrize("value", [-2, 1_000_001])
def test_the_setting_is_checked_at_start(value: int) -> None:
    with pytest.raises(ConfigError, match="cpu_wakeup_latency_us"):
        make_config(cpu_wakeup_latency_us=value)
    with pytest.raises(ValueError, match="limit_us"):
        CpuLatencyRequest(-2)


def test_the_daemon_holds_the_request_while_serving_and_lets_go_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    monkeypatch.setattr(cpu_latency, "DEVICE", device)
    with running(cpu_wakeup_latency_us=0) as (server, _):
        assert _open_on(device) == 1 and device.read_bytes() == struct.pack("=i", 0)
        metrics = http_get(server.endpoints["http"], "/metrics")[1].decode()
    assert "inspectd_cpu_latency_request_held 1.0" in metrics
    assert _open_on(device) == 0  # released at stop


def test_a_daemon_without_the_device_serves_and_says_so_on_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_latency, "DEVICE", tmp_path / "missing")
    with running(cpu_wakeup_latency_us=0) as (server, _):
        metrics = http_get(server.endpoints["http"], "/metrics")[1].decode()
        assert server.health.healthy
    assert "inspectd_cpu_latency_request_held 0.0" in metrics


def _main_loop_looked(server: Server) -> bool:
    """True once the main loop has run a whole tick after this call (so it has looked at the clock as it is now)."""
    since = time.monotonic()
    first = wait_for(lambda: (server.health._last_tick or 0.0) > since, timeout_s=10.0)
    tick = server.health._last_tick or 0.0
    return first and wait_for(lambda: (server.health._last_tick or 0.0) > tick, timeout_s=10.0)


def test_the_request_is_let_go_while_the_line_stands_and_taken_again_with_the_next_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cpu_wakeup_hold_s`` on the daemon's injected clock: the main loop lets the request go once no frame came
    for that long, and the intake takes it again before the next frame is inspected."""
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    monkeypatch.setattr(cpu_latency, "DEVICE", device)
    now = [1000.0]
    with (
        running(clock=lambda: now[0], cpu_wakeup_latency_us=0, cpu_wakeup_hold_s=5) as (server, _),
        Client(server) as client,
    ):
        assert _open_on(device) == 1
        client.send(1)
        assert len(client.decisions(1)) == 1 and _main_loop_looked(server)  # the line moved at 1000
        now[0] = 1004.0
        client.send(2)
        assert len(client.decisions(1)) == 1 and _main_loop_looked(server)  # ... and at 1004
        now[0] = 1008.0  # 8 s after the first frame, 4 after the last
        assert _main_loop_looked(server)
        assert server.cpu_latency.held and _open_on(device) == 1
        now[0] = 1009.5  # 5.5 s without a frame: let go
        assert _main_loop_looked(server)
        assert not server.cpu_latency.held and _open_on(device) == 0
        client.send(3)
        (decision,) = client.decisions(1)
        assert decision["verdict"] == "pass"
        assert server.cpu_latency.held and _open_on(device) == 1  # taken again before frame 3 was inspected
