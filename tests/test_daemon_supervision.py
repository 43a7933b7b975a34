"""Supervised threads: a fault injected into each kind of thread, seen on /healthz, the page, /metrics and the watchdog.

Faults are injected with the supervisor's failpoint (``Supervisor.inject``): the named
thread raises at its next checkpoint, exactly as if its own code had. Stalls are made with
an injected clock; a short systemd watchdog period (a real datagram socket stands in for
systemd) shows whether the pings stop. A FakeInspector stands in for the model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
from structlog.testing import capture_logs

from daemon.gpio import GpioSink
from daemon.protocol import Decision
from daemon.server import Server
from daemon.supervision import RESTART_MAX_S, Supervisor, Watch, restart_delay
from daemon.systemd import Notifier
from tests.test_daemon_hostile import http_get, wait_for
from tests.test_daemon_support import LOOPBACK, Client, FakeInspector, ModbusPeer, image, make_config
from tests.test_daemon_systemd import FakeSystemd

FATAL_KINDS = ["intake", "engine", "deadlines", "zmq-pub", "imagezmq-reply", "plc"]
RESTART_KINDS = ["status", "metrics", "audit", "http", "stages"]


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fault(RuntimeError):
    """What the failpoint raises."""


# -- the supervisor on its own ----------------------------------------------------------------------
@contextmanager
def looping(watch: Watch) -> Iterator[threading.Event]:
    """Run ``watch`` on a loop that meets its checkpoint until the event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            watch.checkpoint()
            time.sleep(0.002)

    watch._target = loop
    watch.start()
    try:
        yield stop
    finally:
        stop.set()
        watch.join(2)


def test_idle_is_not_stalled_and_held_work_beyond_stall_s_is() -> None:
    """A thread idle for ever is fine; one holding work longer than stall_s is stalled until it lets go."""
    clock = FakeClock()
    sup = Supervisor(stall_s=5.0, clock=clock)
    engine, audit = sup.watch("engine", None, fatal=True), sup.watch("audit", None, fatal=False)
    with looping(engine), looping(audit):
        clock.advance(1000)
        assert sup.check().healthy and not sup.check().degraded
        engine.busy()
        audit.busy()
        clock.advance(4.9)
        assert sup.check().healthy
        clock.advance(0.2)
        state = sup.check()
        assert state.stalled == ["engine stalled (no progress for over 5 s)"] and not state.healthy
        assert state.degraded == ["audit stalled (no progress for over 5 s)"]
        sup.check()
        assert engine.stats()["stalls"] == 1 and engine.stats()["stalled"] == 1  # one stall, counted once
        engine.idle()
        audit.idle()
        assert sup.check().healthy and engine.stats()["stalled"] == 0


def test_deaths_are_counted_and_observers_restart_with_a_back_off() -> None:
    """An observer is restarted at once, then after 1, 2, 4 ... 60 s; a fatal thread is never restarted."""
    clock = FakeClock()
    sup = Supervisor(clock=clock)
    status, intake = sup.watch("status", None, fatal=False), sup.watch("intake", None, fatal=True)
    with looping(status), looping(intake):
        sup.inject("status", Fault("first"))
        assert wait_for(lambda: not status.alive)
        assert sup.check().healthy and status.restarts == 1 and status.alive
        sup.inject("status", Fault("second"))
        assert wait_for(lambda: not status.alive)
        assert sup.check().degraded == ["status thread died (Fault: second), restarting"]
        clock.advance(1.0)
        state = sup.check()
        assert status.alive and status.deaths == 2 and status.restarts == 2
        assert state.notes == ["status restarted 2x (Fault: second)"]
        sup.inject("intake", Fault("gone"))
        assert wait_for(lambda: not intake.alive)
        clock.advance(3600)
        assert sup.check().fatal == ["intake thread died (Fault: gone)"] and not intake.alive
    assert [restart_delay(n) for n in range(1, 5)] == [0.0, 1.0, 2.0, 4.0] and restart_delay(99) == RESTART_MAX_S


def test_a_loop_that_returns_or_a_foreign_thread_that_ends_is_a_death_unless_stopping() -> None:
    """A loop returning by itself counts as a death; the same while stopping does not."""
    sup = Supervisor()
    quitter = sup.watch("deadlines", lambda: None, fatal=True)
    foreign = threading.Thread(target=lambda: None)
    sup.add(Watch.of("curve-auth", foreign))
    quitter.start()
    foreign.start()
    quitter.join(2)
    foreign.join(2)
    state = sup.check()
    assert len(state.fatal) == 2 and quitter.deaths == 1 and sup.get("curve-auth").deaths == 1
    sup.check()
    assert quitter.deaths == 1  # counted once
    calm = Supervisor()
    ended = calm.watch("engine", lambda: None, fatal=True)
    calm.stopping()
    ended.start()
    ended.join(2)
    assert calm.check().healthy and ended.deaths == 0


def test_conditions_other_than_threads_make_the_daemon_unhealthy_while_they_hold() -> None:
    """A registered condition (e.g. a decision queue that overflowed) counts like a stall while it reports a problem."""
    sup = Supervisor()
    overflowing = {"now": "queue full (4096 decisions)"}
    sup.condition("zmq-pub queue", lambda: overflowing["now"])
    sup.condition("audit disk", lambda: "read-only", fatal=False)
    state = sup.check()
    assert state.problem == "zmq-pub queue: queue full (4096 decisions)" and state.degraded == ["audit disk: read-only"]
    overflowing["now"] = None
    assert sup.check().healthy


def test_a_final_condition_counts_like_a_dead_thread_and_stays() -> None:
    """A final condition (a line sink lost a decision) is fatal from its first report on, even once it clears."""
    sup = Supervisor()
    lost = {"now": None}
    sup.condition("zmq-pub queue", lambda: lost["now"], final=True)
    assert sup.check().healthy
    lost["now"] = "1 decisions lost (the queue of 16 was full)"
    assert sup.check().fatal == ["zmq-pub queue: 1 decisions lost (the queue of 16 was full)"]
    lost["now"] = None
    state = sup.check()
    assert state.fatal == ["zmq-pub queue: 1 decisions lost (the queue of 16 was full)"] and not state.healthy


def test_an_escaping_stage_task_is_counted_and_its_frame_handed_back() -> None:
    """run_task logs and counts an exception that escaped a pool task and calls its clean-up."""
    sup = Supervisor()
    stages = sup.watch("stages", None, fatal=False)
    cleaned: list[str] = []

    def broken() -> None:
        raise KeyError("bug")

    sup.run_task(stages, broken, on_failure=lambda: cleaned.append("done"))
    assert cleaned == ["done"] and stages.deaths == 1 and "KeyError" in stages.error


def test_a_dead_digital_line_actuator_is_fatal() -> None:
    """The GPIO actuator (a recorder for the line) is a fatal thread: its death is the daemon's."""

    class Line:
        def __init__(self) -> None:
            self.values: list[bool] = []

        def set(self, on: bool) -> None:
            self.values.append(on)

        def release(self) -> None:
            pass

    sup = Supervisor()
    sink = GpioSink(Line())
    sink.start(sup)
    sup.inject("gpio", Fault("line driver"))
    now = time.time_ns()
    sink.offer(Decision(1, "cam1", None, "reject", "defect", now, now, now, "m"))
    assert wait_for(lambda: not sink.watch.alive)
    assert sup.check().fatal == ["gpio thread died (Fault: line driver)"]
    sink.close()


# -- a daemon with a thread killed ---------------------------------------------------------------------
@contextmanager
def daemon(
    tmp_path: Path, clock: FakeClock, inspector: FakeInspector | None = None, **overrides: Any
) -> Iterator[tuple[Server, FakeSystemd, list[int]]]:
    """A daemon with every kind of thread (imagezmq, PLC, audit, page, metrics) and a 100 ms watchdog."""
    systemd = FakeSystemd(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"})
    peer = ModbusPeer()
    options = {
        "imagezmq_endpoint": LOOPBACK,
        "plc_host": "127.0.0.1",
        "plc_port": peer.port,
        "plc_pulse_ms": 10,
        "audit_dir": str(tmp_path / "audit"),
        "fatal_exit_s": 3600.0,
        "queue_depth": 8,
        "drain_s": 0.2,
        **overrides,
    }
    fake = inspector or FakeInspector()
    server = Server(make_config(**options), loader=lambda m, b: fake, notifier=notifier, clock=clock)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(server.run(install_signals=False)), daemon=True)
    thread.start()
    assert server.ready.wait(10)
    try:
        yield server, systemd, codes
    finally:
        server.request_stop()
        thread.join(15)
        systemd.drain()
        systemd.close()
        peer.stop()


def poke(server: Server, client: Client, frame_id: int, wait_s: float = 30.0) -> list[dict[str, Any]]:
    """Give every thread something to do: a rejected native frame (its decision returned, if one comes within
    ``wait_s``: a bound, returned from as soon as it is there), then an imagezmq frame (its reply not awaited)."""
    client.send(frame_id, image(defect=True))
    got: list[dict[str, Any]] = []
    end = time.monotonic() + wait_s
    while time.monotonic() < end and not any(d["camera_id"] == "cam1" and d["frame_id"] == frame_id for d in got):
        got += client.decisions(1, timeout_s=0.1)
    req = client.ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 5000)  # closed when garbage-collected: the message must still go out
    req.connect(server.endpoints["imagezmq"])
    req.send_multipart([json.dumps({"msg": "pi", "dtype": "uint8", "shape": [32, 48]}).encode(), image().tobytes()])
    return [d for d in got if d["camera_id"] == "cam1"]


def page_health(server: Server) -> dict[str, Any]:
    return json.loads(http_get(server.endpoints["http"], "/status.json")[1])["health"]


def metrics(server: Server) -> str:
    return http_get(server.endpoints["http"], "/metrics")[1].decode()


def died_logs(logs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "thread_died" and e["thread"] == kind]


@pytest.mark.parametrize("kind", FATAL_KINDS)
def test_a_dead_frame_path_thread_makes_the_daemon_unhealthy(tmp_path: Path, kind: str) -> None:
    """/healthz and /readyz 503, the page says FATAL, the death metric is 1, no watchdog ping after the STATUS= line."""
    clock = FakeClock()
    with capture_logs() as logs, daemon(tmp_path, clock) as (server, systemd, codes), Client(server) as client:
        assert wait_for(lambda: "WATCHDOG=1" in systemd.drain())
        server.supervisor.inject(kind, Fault("injected"))
        poke(server, client, 1, wait_s=0)
        assert wait_for(lambda: server.health.problem is not None, 10)
        time.sleep(0.3)  # a few main-loop ticks: chances for a wrong ping
        address = server.endpoints["http"]
        codes_now = (http_get(address, "/healthz")[0], http_get(address, "/readyz")[0])
        health, text = page_health(server), metrics(server)
        messages = systemd.drain()
    assert codes_now == (503, 503)
    assert health["ok"] is False and health["fatal"] is True
    assert f"FATAL: {kind} thread died (Fault: injected)" in health["summary"]
    assert f'inspectd_thread_deaths_total{{policy="fatal",thread="{kind}"}} 1.0' in text
    assert "inspectd_healthy 0.0" in text
    unhealthy = next(i for i, m in enumerate(messages) if m.startswith(f"STATUS=unhealthy: {kind} thread died"))
    assert "WATCHDOG=1" in messages[:unhealthy] and "WATCHDOG=1" not in messages[unhealthy:]
    deaths = died_logs(logs, kind)
    assert len(deaths) == 1 and isinstance(deaths[0]["exc_info"], Fault)  # logged once, with its traceback
    assert codes == [1]


@pytest.mark.parametrize("kind", RESTART_KINDS)
def test_a_dead_observer_is_restarted_in_place_and_works_again(tmp_path: Path, kind: str) -> None:
    """Health stays 200, the watchdog keeps pinging, the death and the restart are counted, the thread serves again."""
    clock = FakeClock()
    with capture_logs() as logs, daemon(tmp_path, clock) as (server, systemd, codes), Client(server) as client:
        server.supervisor.inject(kind, Fault("injected"))
        first = poke(server, client, 1)
        assert wait_for(lambda: server.supervisor.get(kind).restarts == 1, 10)
        seen = len(systemd.drain())
        before = 0 if kind == "http" else _work_done(server, kind)
        second = poke(server, client, 2)
        assert wait_for(lambda: _work_done(server, kind) > before)
        assert wait_for(lambda: "WATCHDOG=1" in systemd.drain()[seen:])  # pings go on after the restart
        status = http_get(server.endpoints["http"], "/healthz")[0]
        health, text = page_health(server), metrics(server)
    assert status == 200 and health["ok"] is True
    assert f"{kind} restarted 1x (Fault: injected)" in health["summary"]
    assert f'inspectd_thread_deaths_total{{policy="restart",thread="{kind}"}} 1.0' in text
    assert f'inspectd_thread_restarts_total{{thread="{kind}"}} 1.0' in text
    assert len(died_logs(logs, kind)) == 1
    expected_first = "error" if kind == "stages" else "defect"  # the task that died rejected its frame
    assert [(d["frame_id"], d["reason"]) for d in first + second] == [(1, expected_first), (2, "defect")]
    assert codes == [0]


def _work_done(server: Server, kind: str) -> int:
    """How much the restarted thread has done so far (it must grow after the restart)."""
    if kind in ("status", "metrics", "audit"):
        return next(s for s in server.outputs.sinks if s.name == kind).sent
    if kind == "http":
        return int(http_get(server.endpoints["http"], "/healthz")[0] == 200)
    return server.scheduler.totals().get("defect", 0)


def test_the_daemon_exits_1_once_fatal_exit_s_has_passed(tmp_path: Path) -> None:
    """After a fatal death the daemon stays up (unhealthy) until fatal_exit_s on its clock, then exits 1."""
    clock = FakeClock()
    with daemon(tmp_path, clock, fatal_exit_s=5.0) as (server, _, codes), Client(server) as client:
        server.supervisor.inject("engine", Fault("injected"))
        poke(server, client, 1, wait_s=0)
        assert wait_for(lambda: server.health.problem is not None)
        clock.advance(4.9)
        time.sleep(0.3)
        assert codes == []  # still up, still unhealthy
        clock.advance(0.2)
        # a bound, not a timing: the exit runs the whole capped shutdown (drain, flush, joins)
        assert wait_for(lambda: codes == [1], timeout_s=30.0)


def test_the_exit_timer_runs_before_the_daemon_shows_unhealthy(tmp_path: Path) -> None:
    """Whoever sees the fatal problem (health, the page, a clock advanced on seeing it) sees the exit timer running:
    before, the problem was published first, and a clock moved in between started the timer late."""
    clock = FakeClock()
    with daemon(tmp_path, clock, fatal_exit_s=5.0) as (server, _, _codes), Client(server) as client:
        timer_when_shown: list[float | None] = []
        health = server.health

        class Watched(type(health)):  # type: ignore[misc]
            def __setattr__(self, name: str, value: Any) -> None:
                if name == "problem" and value:
                    timer_when_shown.append(server._fatal_at)
                super().__setattr__(name, value)

        health.__class__ = Watched
        server.supervisor.inject("engine", Fault("injected"))
        poke(server, client, 1, wait_s=0)
        assert wait_for(lambda: timer_when_shown)
        assert timer_when_shown[0] is not None


def test_a_hung_inference_is_a_stall_and_an_idle_daemon_is_not(tmp_path: Path) -> None:
    """Idle 1000 s (injected clock): healthy. An inference held beyond stall_s: 503, no pings until it returns."""

    class Hanging(FakeInspector):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.gate = threading.Event(), threading.Event()

        def infer(self, prepared: Any) -> Any:
            self.entered.set()
            self.gate.wait(10)
            return super().infer(prepared)

    clock, fake = FakeClock(), Hanging()
    with daemon(tmp_path, clock, stall_s=5.0, inspector=fake) as (server, systemd, codes), Client(server) as client:
        clock.advance(1000)
        time.sleep(0.3)
        assert server.health.problem is None and "WATCHDOG=1" in systemd.drain()
        client.send(1)
        assert fake.entered.wait(5)
        clock.advance(5.5)
        assert wait_for(lambda: server.health.problem is not None)
        time.sleep(0.3)
        stalled = (http_get(server.endpoints["http"], "/healthz")[0], page_health(server)["summary"], metrics(server))
        messages = systemd.drain()
        fake.gate.set()
        assert wait_for(lambda: server.health.problem is None)
        assert wait_for(lambda: "WATCHDOG=1" in systemd.drain())
        assert http_get(server.endpoints["http"], "/healthz")[0] == 200
    assert stalled[0] == 503 and stalled[1] == "engine stalled (no progress for over 5 s)"
    assert 'inspectd_thread_stalled{thread="engine"} 1.0' in stalled[2]
    unhealthy = next(i for i, m in enumerate(messages) if m.startswith("STATUS=unhealthy: engine stalled"))
    assert "WATCHDOG=1" not in messages[unhealthy:]
    assert codes == [0]
