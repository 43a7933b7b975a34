"""``inspectd serve``: startup, main loop and shutdown as named phases (uvicorn-style).

startup   load + warm the model, bind the decision sinks, bind the frame sockets, start
          the scheduler, run the model's mean part through each of its stage threads (no
          decision), start the intake thread, start HTTP, then report ready (HTTP /readyz,
          systemd READY=1).
main loop tick every TICK_S: supervision (supervision.py: restart dead observers; a dead
          or stalled frame-path thread makes /healthz and /readyz 503 and stops the
          watchdog; a dead one makes the daemon exit 1 after ``fatal_exit_s``), the systemd
          watchdog and /healthz liveness, a STATUS= line for systemd, periodic summary, and
          acting on the flags that signal handlers set (handlers do nothing else).
shutdown  stop reading frames, let in-flight frames finish for up to ``drain_s``, reject
          the rest, publish every decision, close sockets, free the model; exit 0.

SIGHUP reloads the bundle on a helper thread: the new model is loaded and warmed while
the old one keeps serving, then swapped in for frames admitted from then on; the old
one is freed once its last frame is decided. A failed reload keeps the old model and
logs why.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from daemon import config as config_mod
from daemon import heap
from daemon import logging as daemon_logging
from daemon import metrics as metrics_mod
from daemon.config import Config
from daemon.cpu_latency import CpuLatencyRequest
from daemon.http import Health, HttpServer
from daemon.intake import Intake
from daemon.outputs import Outputs, ReplySink, Sink, ZmqPubSink
from daemon.scheduler import Engine, Scheduler, run_niced
from daemon.security import Curve
from daemon.status import StatusBoard
from daemon.supervision import State, Supervisor, Watch
from daemon.systemd import Notifier
from engines.errors import UserError
from engines.version import VERSION

log = structlog.get_logger("inspectd.server")

TICK_S = 0.1
STATUS_S = 5.0  # period of the systemd STATUS= line
Loader = Callable[[str, str], Engine]


def load_engine(model: str, backend: str) -> Engine:
    """Load a bundle, activate it and inspect its own mean part once: every stage runs before it serves."""
    from engines.inspector import Inspector  # the engines stack is imported only when serving

    inspector = Inspector.load(model, backend=backend)
    inspector.activate()
    try:
        inspector.inspect(inspector.reference_frame())
    except Exception:
        inspector.deactivate()
        raise
    return inspector


class Server:
    """One daemon instance: owns the engine, scheduler, sockets, sinks and HTTP."""

    def __init__(
        self,
        config: Config,
        loader: Loader = load_engine,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._loader = loader
        self._notifier = notifier or Notifier()
        # Every thread registers here; ``clock`` times stalls and the exit after a fatal death.
        self.supervisor = Supervisor(config.stall_s, clock)
        self._state = State()
        self._fatal_at: float | None = None
        self.health = Health()
        self.ready = threading.Event()
        self.endpoints: dict[str, str] = {}
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reloading: threading.Thread | None = None
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.outputs = Outputs()
        self.intake: Intake | None = None
        self.http: HttpServer | None = None
        self.status: StatusBoard | None = None
        self.metrics: metrics_mod.MetricsSink | None = None
        self.curve: Curve | None = None
        self._gpu_memory: metrics_mod.GpuMemory | None = None
        self.cpu_latency = CpuLatencyRequest(config.cpu_wakeup_latency_us)
        self.frames_seen = 0  # the intake's count at the main loop's last look, and when it last moved
        self._line_moved_at = clock()
        self.exit_code = 0

    # -- flags (what signal handlers may touch) -------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    # -- the three phases ----------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> int:
        """startup, main loop, shutdown; returns the exit code."""
        if install_signals and threading.current_thread() is threading.main_thread():
            self.install_signal_handlers()
        try:
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()
        return self.exit_code

    def startup(self) -> None:
        cfg = self.config
        log.info("starting", version=VERSION, model=cfg.model, backend=cfg.backend, cycle_ms=cfg.cycle_ms)
        # A thread waiting for the GIL (the deadline timer, the intake) gets it within 1 ms
        # rather than the default 5 ms while compute threads run Python code.
        sys.setswitchinterval(0.001)
        if cfg.curve_secret_key:
            self.curve = Curve(self._ctx, cfg.curve_secret_key, cfg.curve_clients)
            self.supervisor.add(Watch.of("curve-auth", self.curve.thread, fatal=True))
        secure = self.curve.apply if self.curve is not None else None
        if cfg.http_listen:  # first, so /readyz answers 503 while the model loads
            self._start_http()
        self.health.status = "loading model"
        self.engine = run_niced(lambda: self._loader(cfg.model, cfg.backend))
        log.info("model_ready", model=self.engine.bundle_id, geometry=self.engine.geometry.describe())
        if self.status is not None:
            self.status.set_model(self.engine.bundle_id)
        pub = _bind(
            "decisions_endpoint",
            lambda: ZmqPubSink(self._ctx, cfg.decisions_endpoint, secure=secure, maxsize=cfg.decision_queue),
        )
        self.outputs.add(pub)
        for sink in (self.status, self.metrics, *self._line_outputs()):
            if sink is not None:
                self.outputs.add(sink)
        self.scheduler = Scheduler(
            self.engine,
            self.outputs.publish,
            admitted=self.outputs.admit if self.outputs.wants_admissions else None,
            cycle_ns=cfg.cycle_ns,
            queue_depth=cfg.queue_depth,
            workers=cfg.workers,
            max_defects=cfg.max_defects,
            margin_ns=int(cfg.deadline_margin_ms * 1e6),
            supervisor=self.supervisor,
        )
        scheduler = self.scheduler
        cpu_latency = self.cpu_latency

        def submit(item: Any) -> None:
            cpu_latency.hold()  # again, if the line stood: before the frame is inspected (a no-op while held)
            scheduler.submit(item)

        self.intake = Intake(
            self._ctx,
            cfg,
            lambda: scheduler.engine.geometry,
            submit,
            secure=secure,
            supervisor=self.supervisor,
        )
        if self.intake.imagezmq is not None and cfg.imagezmq_mode == "reqrep":
            intake = self.intake
            replies = ReplySink(
                self._ctx, intake.reply_endpoint, cfg.decision_queue, undelivered=lambda: intake.replies_undelivered
            )
            self.outputs.add(replies)
        self.endpoints.update(
            frames=self.intake.endpoint(self.intake.native),
            imagezmq=self.intake.endpoint(self.intake.imagezmq),
            decisions=pub.endpoint,
        )
        self.outputs.start(self.supervisor)
        self.scheduler.start()
        self.health.status = "warming up"
        _warm_up(self.scheduler)
        self.cpu_latency.hold()  # from the first frame on; not having it is logged, never a fault
        self._line_moved_at = self.supervisor.clock()  # the line's idle time counts from here, not from loading
        self.intake.start()
        self.health.tick()
        self.health.ready = True
        self.health.status = "serving"
        self.ready.set()
        self._notifier.notify("READY=1", f"STATUS={self.status_line()}")
        self._warn_exposed()
        log.info("ready", **self.endpoints)

    def _start_http(self) -> None:
        cfg = self.config
        host, port = config_mod.parse_host_port(cfg.http_listen)
        try:
            self.http = HttpServer(
                host,
                port,
                self.health,
                max_connections=cfg.http_max_connections,
                timeout_s=cfg.http_timeout_s,
                clock=self.supervisor.clock,
            )
        except OSError as exc:
            raise UserError(f"http_listen: cannot listen on {cfg.http_listen}: {exc.strerror}") from None
        self.status = StatusBoard(
            cycle_ms=cfg.cycle_ms,
            recent=cfg.status_recent,
            shifts=config_mod.parse_shifts(cfg.status_shifts),
            refresh_s=cfg.status_refresh_s,
            health=self.health_summary,
        )
        self.status.add_routes(self.http)
        if metrics_mod.available():
            self.metrics = metrics_mod.MetricsSink(self.metric_sources)
            self.metrics.add_routes(self.http)
            self._gpu_memory = metrics_mod.GpuMemory()
        else:
            log.warning("metrics_off", detail="prometheus-client is not installed; /metrics answers 404")
        self.http.start(self.supervisor)
        self.endpoints["http"] = "{}:{}".format(*self.http.address)

    def _line_outputs(self) -> list[Sink]:
        """The optional outputs the configuration asks for: PLC, digital line, audit trail."""
        cfg = self.config
        sinks: list[Sink] = []
        if cfg.plc_host:
            from daemon.modbus import ModbusSink

            sinks.append(
                ModbusSink(
                    cfg.plc_host,
                    cfg.plc_port,
                    device_id=cfg.plc_device_id,
                    register=cfg.plc_register,
                    coil=cfg.plc_coil,
                    mode=cfg.plc_mode,
                    pulse_ms=cfg.plc_pulse_ms,
                    reject_by_default=cfg.plc_reject_by_default,
                    timeout_s=cfg.plc_timeout_s,
                    capacity=cfg.decision_queue,
                )
            )
        if cfg.gpio_chip:
            from daemon.gpio import GpiodLine, GpioSink

            line = GpiodLine(cfg.gpio_chip, cfg.gpio_line, cfg.gpio_active_low)
            sinks.append(
                GpioSink(
                    line,
                    mode=cfg.gpio_mode,
                    pulse_ms=cfg.gpio_pulse_ms,
                    reject_by_default=cfg.gpio_reject_by_default,
                    capacity=cfg.decision_queue,
                )
            )
        if cfg.audit_dir:
            from daemon.audit import AuditSink

            sinks.append(AuditSink(cfg.audit_dir, cfg.audit_max_mb, cfg.audit_max_count, cfg.audit_pass_sample))
        return sinks

    def _warn_exposed(self) -> None:
        """Say so when a socket listens beyond loopback (an explicit setting) without CurveZMQ."""
        for name in ("frames", "imagezmq", "decisions"):
            endpoint = self.endpoints.get(name, "")
            host = endpoint.partition("://")[2].rpartition(":")[0].strip("[]")
            exposed = endpoint.startswith("tcp://") and host not in ("127.0.0.1", "::1", "localhost")
            if exposed and self.curve is None:
                log.warning("listening_beyond_loopback", endpoint=endpoint, detail="unencrypted; see curve_*")
        host = self.endpoints.get("http", "").rpartition(":")[0]
        if host and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("listening_beyond_loopback", endpoint=self.endpoints["http"], detail="read-only status page")

    def main_loop(self) -> None:
        next_summary = time.monotonic() + self.config.summary_s
        next_ping = 0.0
        next_status = time.monotonic() + STATUS_S
        while not self._stop.wait(TICK_S):
            state = self._supervise()
            if self._fatal_exit_due():
                log.error("exiting", detail="a frame-path thread died; exit 1 for a restart", problem=state.problem)
                self.exit_code = 1
                return
            self.health.tick()
            self._follow_the_line()
            now = time.monotonic()
            # No watchdog ping while a frame-path thread is dead or stalled: systemd restarts the daemon.
            if state.healthy and self._notifier.watchdog_s and now >= next_ping:
                self._notifier.notify("WATCHDOG=1")
                next_ping = now + self._notifier.watchdog_s
            if now >= next_status:
                self._notifier.notify(f"STATUS={self.status_line()}")
                next_status = now + STATUS_S
            if now >= next_summary:
                self.log_summary()
                next_summary = now + self.config.summary_s
            if self._reload.is_set():
                self._reload.clear()
                self._start_reload()

    def _supervise(self) -> State:
        """Ask the supervisor about every thread; turn what it found into health, STATUS= and the exit timer."""
        state = self._state = self.supervisor.check()
        problem = state.problem
        # the exit timer starts before the problem is published: whoever sees the daemon unhealthy
        # (the status page, /healthz, a test's clock) sees a timer that is already running
        if state.fatal and self._fatal_at is None:
            self._fatal_at = self.supervisor.clock()
            log.error("fatal", problem=problem, exit_in_s=self.config.fatal_exit_s)
        if problem != self.health.problem:
            self.health.problem = problem
            if problem:
                log.error("unhealthy", problem=problem)
                self._notifier.notify(f"STATUS=unhealthy: {problem}")
            else:
                log.info("healthy_again")
        return state

    def _follow_the_line(self) -> None:
        """Let the CPU wake-up request go once no frame came for ``cpu_wakeup_hold_s`` (the intake takes it again)."""
        if self.intake is None or self.config.cpu_wakeup_hold_s <= 0:
            return
        now = self.supervisor.clock()
        if self.intake.received != self.frames_seen:
            self.frames_seen, self._line_moved_at = self.intake.received, now
        elif self.cpu_latency.held and now - self._line_moved_at >= self.config.cpu_wakeup_hold_s:
            # Only if no frame came meanwhile: the intake counts a frame before it takes the request again, so a
            # frame at the boundary either stops this release or takes the request back before it is inspected.
            seen, intake = self.frames_seen, self.intake
            reason = f"no frame for {self.config.cpu_wakeup_hold_s:g} s"
            self.cpu_latency.release(reason=reason, still=lambda: intake.received == seen)

    def _fatal_exit_due(self) -> bool:
        return self._fatal_at is not None and self.supervisor.clock() - self._fatal_at >= self.config.fatal_exit_s

    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by ``systemctl status``)."""
        model = self.scheduler.engine.bundle_id if self.scheduler else "-"
        if self.health.problem:
            return f"unhealthy: {self.health.problem}"
        if self.scheduler is None:
            return f"{self.health.status} {model}"
        totals = self.scheduler.totals()
        decisions = totals.get("decisions", 0)
        rejects = decisions - totals.get("ok", 0)
        rate = 100 * rejects / decisions if decisions else 0.0
        line = f"serving {model}: {decisions} decisions, {rejects} rejected ({rate:.1f} %)"
        if self.status is not None:
            p99 = self.status.snapshot()["latency_ms"]["p99"]
            if p99 is not None:
                line += f", p99 {p99:.0f} ms of {self.config.cycle_ms:g} ms"
        return line

    def health_summary(self) -> dict[str, Any]:
        """For the status page: ok or the problems, in words (a dead frame-path thread first)."""
        state = self._state
        problems = [f"FATAL: {p}, restarting" for p in state.fatal] + state.stalled
        if not self.health.ready and not state.fatal:
            problems.append(self.health.status)
        problems += state.degraded
        for name, stats in self.outputs.stats().items():
            if stats.get("connected") == 0 and stats.get("failed"):
                problems.append(f"{name} unreachable")
        summary = ", ".join(problems) or "ok"
        if state.notes and not problems:
            summary = f"ok ({'; '.join(state.notes)})"
        return {
            "ok": not problems,
            "fatal": bool(state.fatal),
            "summary": summary,
            "live": self.health.live,
            "healthy": self.health.healthy,
        }

    def metric_sources(self) -> dict[str, Any]:
        """Scrape-time values for /metrics."""
        out: dict[str, Any] = {
            "ready": self.health.ready,
            "healthy": self.health.healthy,
            "queue_limit": self.config.queue_depth,
            "threads": self.supervisor.stats(),
        }
        if self.cpu_latency.wanted:
            out["cpu_latency_held"] = self.cpu_latency.held
        if self.intake is not None:
            out["frames_received"] = self.intake.received
            out["peers_dropped"] = self.intake.peers_dropped
            if self.intake.slot_socket is not None:
                out["slot_grabbers"] = self.intake.slot_socket.served
                out["slot_handouts_failed"] = self.intake.slot_socket.failed
        if self.scheduler is not None:
            out["in_flight"] = self.scheduler.in_flight
            totals = self.scheduler.totals()
            out["unidentified"] = totals.get("unidentified_bad_messages", 0)
            out["t_capture_dropped"] = totals.get("t_capture_dropped", 0)
            engine = self.scheduler.engine
            backend = type(getattr(engine, "backend", None)).__name__
            out["model"] = {"bundle_id": engine.bundle_id, "backend": backend, "threshold": engine.threshold}
        out["sinks"] = self.outputs.stats()
        if self.http is not None:
            out["http"] = self.http.stats()
        if self._gpu_memory is not None:
            out["gpu_memory"] = self._gpu_memory()
        return out

    def shutdown(self) -> None:
        log.info("stopping")
        self.supervisor.stopping()  # threads ending from here on are stopped, not dead
        self.health.ready = False
        self.health.status = "stopping"
        self._notifier.notify("STOPPING=1")
        if self.intake is not None:
            self.intake.pause()
        if self.scheduler is not None:
            rejected = self.scheduler.drain(self.config.drain_s)
            if rejected:
                log.warning("drain_rejected", frames=rejected)
            self.scheduler.stop()
        self.outputs.close(flush_s=1.0)
        if self.status is not None and not self.outputs.sinks.count(self.status):
            self.status.close_resources()  # never started (a failed startup): end its event streams
        if self.intake is not None:
            self.intake.stop()
        if self.http is not None:
            self.http.stop()
        if self.curve is not None:
            self.curve.stop()
        if self._reloading is not None:
            self._reloading.join(timeout=5.0)
        if self.scheduler is not None and self.intake is not None:
            self.log_summary()
        self.cpu_latency.release()
        _deactivate(self.scheduler.engine if self.scheduler else self.engine)
        if self._fatal_at is not None:
            self.exit_code = 1  # stopped by a signal, but a frame-path thread had died: still a failure
        self._ctx.destroy(linger=0)  # closes anything a stuck thread still holds
        log.info("stopped", exit_code=self.exit_code)

    # -- helpers --------------------------------------------------------------------------------
    def log_summary(self) -> None:
        assert self.scheduler is not None and self.intake is not None
        log.info("summary", received=self.intake.received, outputs=self.outputs.stats(), **self.scheduler.summary())

    def _start_reload(self) -> None:
        if self._reloading is not None and self._reloading.is_alive():
            log.warning("reload_ignored", detail="a reload is already in progress")
            return
        self._reloading = threading.Thread(target=self._reload_logged, name="inspectd-reload", daemon=True)
        self._reloading.start()

    def _reload_logged(self) -> None:
        """The reload thread: short-lived, so not supervised, but an error in it is logged with its traceback."""
        try:
            self.reload()
        except Exception:
            log.exception("reload_failed", detail="internal error; the old model may still be serving")

    def reload(self) -> bool:
        """Load and warm the bundle again, then swap it in; on failure keep serving the old one."""
        assert self.scheduler is not None
        log.info("reload_started", model=self.config.model)
        try:
            new = run_niced(lambda: self._loader(self.config.model, self.config.backend))
        except Exception as exc:
            log.error("reload_failed", detail=f"{type(exc).__name__}: {exc}", kept=self.scheduler.engine.bundle_id)
            return False
        old = self.scheduler.engine
        if new.geometry != old.geometry:
            _deactivate(new)
            detail = f"new model wants {new.geometry.describe()}, the daemon serves {old.geometry.describe()}"
            log.error("reload_failed", detail=detail + " (restart to change geometry)", kept=old.bundle_id)
            return False
        self.scheduler.swap_engine(new)
        if self.status is not None:
            self.status.set_model(new.bundle_id)
        self._notifier.notify(f"STATUS={self.status_line()}")
        log.info("reloaded", model=new.bundle_id, previous=old.bundle_id)
        if self.scheduler.wait_unused(old, timeout_s=60.0):
            _deactivate(old)
        return True


def _bind(what: str, make: Callable[[], Any]) -> Any:
    """Create sockets, turning ZeroMQ's errors (address in use, bad endpoint) into one-line UserErrors."""
    try:
        return make()
    except zmq.ZMQError as exc:
        raise UserError(f"{what}: cannot open the socket: {exc}") from None


def _warm_up(scheduler: Scheduler) -> None:
    """The engine's mean part through every stage thread before frames are taken (``Scheduler.warm_up``);
    an engine without one starts cold."""
    reference = getattr(scheduler.engine, "reference_frame", None)
    if reference is not None:
        scheduler.warm_up(reference())


def _deactivate(engine: Engine | None) -> None:
    deactivate = getattr(engine, "deactivate", None)
    if deactivate is not None:
        try:
            deactivate()
        except Exception as exc:
            log.warning("deactivate_failed", error=f"{type(exc).__name__}: {exc}")


# -- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``inspectd serve``; each overrides the TOML file and INSPECTD_* variables."""
    parser.add_argument("--model", help="model bundle directory (or `model` in the config / INSPECTD_MODEL)")
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--frames", dest="frames_endpoint", metavar="ENDPOINT", help="native frame endpoint")
    parser.add_argument("--frames-mode", choices=config_mod.FRAME_MODES, help="pull (bind) or sub (connect)")
    parser.add_argument("--imagezmq", dest="imagezmq_endpoint", metavar="ENDPOINT", help="imagezmq endpoint")
    parser.add_argument("--imagezmq-mode", choices=config_mod.IMAGEZMQ_MODES, help="reqrep (bind) or pubsub")
    parser.add_argument("--decisions", dest="decisions_endpoint", metavar="ENDPOINT", help="decision PUB endpoint")
    parser.add_argument(
        "--http", dest="http_listen", metavar="HOST:PORT", help="status page, /metrics, /healthz, /readyz ('' = off)"
    )
    parser.add_argument("--audit-dir", dest="audit_dir", metavar="DIR", help="audit trail directory ('' = off)")
    parser.add_argument("--plc", dest="plc_host", metavar="HOST", help="Modbus TCP PLC for the reject output")
    parser.add_argument("--cycle-ms", type=float, help="default time from receipt to decision")
    parser.add_argument("--backend", choices=config_mod.BACKENDS, help="inference backend")
    parser.add_argument("--queue-depth", type=int, help="frames in flight before overload rejects")
    parser.add_argument("--log-format", choices=config_mod.LOG_FORMATS, help="json, console or auto")
    parser.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="log level")


CLI_FIELDS = (
    "model",
    "frames_endpoint",
    "frames_mode",
    "imagezmq_endpoint",
    "imagezmq_mode",
    "decisions_endpoint",
    "http_listen",
    "audit_dir",
    "plc_host",
    "cycle_ms",
    "backend",
    "queue_depth",
    "log_format",
    "log_level",
)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name, None) for name in CLI_FIELDS}
    return config_mod.load(getattr(args, "config", None), overrides=overrides)


def main(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; UserError (bad config or bundle) propagates to the CLI."""
    cfg = config_from_args(args)
    daemon_logging.configure(cfg.log_format, cfg.log_level)
    heap.keep_frame_blocks()  # before the first frame-sized block (daemon/heap.py)
    return Server(cfg).run()
