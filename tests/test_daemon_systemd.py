"""systemd integration: the notify protocol over a real datagram socket, the watchdog on a stall, the unit file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon import config as config_mod
from daemon.server import Server
from daemon.systemd import Notifier
from tests.test_daemon_support import Client, FakeInspector, make_config

REPO = Path(__file__).resolve().parents[1]


class FakeSystemd:
    """A datagram socket standing in for systemd's notify socket; collects the messages."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


def test_notifier_speaks_the_protocol_including_abstract_sockets(tmp_path: Path) -> None:
    """Messages arrive as one datagram each; a leading @ selects the abstract namespace; no socket = no-op."""
    systemd = FakeSystemd(tmp_path / "notify")
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}).notify("READY=1", "STATUS=ok")
    assert systemd.drain() == ["READY=1\nSTATUS=ok"]
    systemd.close()
    name = f"inspectd-test-{time.monotonic_ns()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0" + name)
    abstract.settimeout(2)
    Notifier({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
    assert abstract.recv(100) == b"WATCHDOG=1"
    abstract.close()
    silent = Notifier({})
    assert not silent.enabled and silent.watchdog_s == 0.0
    silent.notify("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}).watchdog_s == 2.0


class SupervisionClock:
    """The server's supervision clock (monotonic seconds), moved only by the test: stalls without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lifecycle_status_and_a_stalled_pipeline_stops_the_watchdog(tmp_path: Path) -> None:
    """READY=1 and a STATUS line at start, WATCHDOG=1 while healthy, none while an inference hangs, STOPPING=1.

    The inference is held and the stall timed on an injected clock; the checks are on the order of the
    datagrams (one socket keeps it), so none depends on how fast the machine is.
    """
    systemd = FakeSystemd(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"})
    clock, fake = SupervisionClock(), FakeInspector()
    hang = fake.hold("infer", 100)  # the backend hangs
    config = make_config(stall_s=0.3, cycle_ms=60_000, drain_s=0.1)
    server = Server(config, loader=lambda m, b: fake, notifier=notifier, clock=clock)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    try:
        assert server.ready.wait(10)
        assert received(systemd, lambda messages: messages.count("WATCHDOG=1") >= 3)
        with Client(server) as client:
            client.send(1)
            fake.wait_until(lambda: ("infer", 100) in fake.started)
            clock.now += 0.5  # the frame has been held past stall_s
            assert received(systemd, lambda messages: any(m.startswith("STATUS=unhealthy") for m in messages))
            assert server.health_summary()["summary"] == "engine stalled (no progress for over 0.3 s)"
            time.sleep(0.3)  # main-loop ticks: chances for a wrong ping (none may come)
            server.request_stop()
            thread.join(10)
    finally:
        hang.set()
        server.request_stop()
        thread.join(10)
    messages = systemd.drain()
    systemd.close()
    assert messages[0].startswith("READY=1\nSTATUS=serving fake-1: 0 decisions")
    stalled = next(i for i, m in enumerate(messages) if m.startswith("STATUS=unhealthy: engine stalled"))
    assert messages[:stalled].count("WATCHDOG=1") >= 3
    assert "WATCHDOG=1" not in messages[stalled:] and messages[-1] == "STOPPING=1"


def received(systemd: FakeSystemd, condition: Callable[[list[str]], bool], timeout_s: float = 30.0) -> bool:
    """True once the messages received so far satisfy ``condition`` (a bounded wait)."""
    end = time.monotonic() + timeout_s
    while not condition(systemd.drain()):
        if time.monotonic() > end:
            return False
    return True


def test_example_configuration_loads() -> None:
    """The example instance configuration shipped next to the unit is valid."""
    cfg = config_mod.load(REPO / "systemd" / "cam1.toml", environ={})
    assert cfg.http_listen == "127.0.0.1:7780" and cfg.plc_register == 100 and cfg.status_shifts
    assert cfg.cpu_wakeup_latency_us == 0  # [cpu] wakeup_latency_us: the table flattens into the field


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """An instance of the template unit passes systemd-analyze verify (with ExecStart pointing at a real binary)."""
    text = (REPO / "systemd" / "inspectd@.service").read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "ProtectSystem=strict" in text
    unit = tmp_path / "inspectd@cam1.service"
    unit.write_text(text.replace("/opt/inspectd/venv/bin/inspectd", shutil.which("true") or "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
