"""systemd integration: the notify protocol over a real datagram socket, the watchdog on a stall, the unit file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
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


def test_lifecycle_status_and_a_stalled_pipeline_stops_the_watchdog(tmp_path: Path) -> None:
    """READY=1 and a STATUS line at start, WATCHDOG=1 while healthy, none while an inference hangs, STOPPING=1."""
    systemd = FakeSystemd(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"})
    fake = FakeInspector()
    server = Server(make_config(stall_s=0.3, cycle_ms=5000, drain_s=0.1), loader=lambda m, b: fake, notifier=notifier)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    assert server.ready.wait(10)
    time.sleep(0.3)
    with Client(server) as client:
        fake.infer_s = 2.0  # the backend hangs
        client.send(1)
        time.sleep(1.2)
        systemd.drain()  # what came before the stall was certain
        stalled_at = time.monotonic()
        time.sleep(0.5)
        assert server.health_summary()["summary"] == "engine stalled (no progress for over 0.3 s)"
        server.request_stop()
        thread.join(10)
    messages = systemd.drain()
    systemd.close()
    assert messages[0].startswith("READY=1\nSTATUS=serving fake-1: 0 decisions")
    assert messages.count("WATCHDOG=1") >= 3
    assert any(m.startswith("STATUS=unhealthy: engine stalled") for m in messages)
    late_pings = [t for t, m in systemd.messages if m == "WATCHDOG=1" and t > stalled_at]
    assert not late_pings and messages[-1] == "STOPPING=1"


def test_example_configuration_loads() -> None:
    """The example instance configuration shipped next to the unit is valid."""
    cfg = config_mod.load(REPO / "systemd" / "cam1.toml", environ={})
    assert cfg.http_listen == "127.0.0.1:7780" and cfg.plc_register == 100 and cfg.status_shifts


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """An instance of the template unit passes systemd-analyze verify (with ExecStart pointing at a real binary)."""
    text = (REPO / "systemd" / "inspectd@.service").read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "ProtectSystem=strict" in text
    unit = tmp_path / "inspectd@cam1.service"
    unit.write_text(text.replace("/opt/inspectd/venv/bin/inspectd", shutil.which("true") or "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
