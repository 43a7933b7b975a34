"""``inspectd serve``: startup, main loop and shutdown as named phases (uvicorn-style).

startup   load + warm the model, bind the decision sinks, bind the frame sockets, start
          the scheduler and intake threads, start HTTP, then report ready (HTTP /readyz,
          systemd READY=1).
main loop tick every TICK_S: systemd watchdog and /healthz liveness (only while the
          engine, deadline and intake threads are alive), periodic summary, and acting
          on the flags that signal handlers set (handlers do nothing else).
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

import numpy as np
import structlog
import zmq

from daemon import config as config_mod
from daemon import logging as daemon_logging
from daemon.config import Config
from daemon.http import Health, HttpServer
from daemon.intake import Intake
from daemon.outputs import Outputs, ReplySink, ZmqPubSink
from daemon.scheduler import Engine, Scheduler, run_niced
from daemon.systemd import Notifier
from engines.errors import UserError
from engines.types import DTYPES

log = structlog.get_logger("inspectd.server")

TICK_S = 0.1
Loader = Callable[[str, str], Engine]


def load_engine(model: str, backend: str) -> Engine:
    """Load a bundle, activate it and run one frame through it so the first real frame is not slow."""
    from engines.inspector import Inspector  # the engines stack is imported only when serving

    inspector = Inspector.load(model, backend=backend)
    inspector.activate()
    try:
        blank = np.zeros(inspector.geometry.shape, DTYPES[inspector.geometry.dtype])
        inspector.inspect(blank)
    except Exception:
        inspector.deactivate()
        raise
    return inspector


class Server:
    """One daemon instance: owns the engine, scheduler, sockets, sinks and HTTP."""

    def __init__(self, config: Config, loader: Loader = load_engine, notifier: Notifier | None = None) -> None:
        self.config = config
        self._loader = loader
        self._notifier = notifier or Notifier()
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
        log.info("starting", model=cfg.model, backend=cfg.backend, cycle_ms=cfg.cycle_ms)
        # A thread waiting for the GIL (the deadline timer, the intake) gets it within 1 ms
        # rather than the default 5 ms while compute threads run Python code.
        sys.setswitchinterval(0.001)
        if cfg.http_listen:  # first, so /readyz answers 503 while the model loads
            host, port = config_mod.parse_host_port(cfg.http_listen)
            try:
                self.http = HttpServer(host, port, self.health)
            except OSError as exc:
                raise UserError(f"http_listen: cannot listen on {cfg.http_listen}: {exc.strerror}") from None
            self.http.start()
            self.endpoints["http"] = "{}:{}".format(*self.http.address)
        self.health.status = "loading model"
        self.engine = run_niced(lambda: self._loader(cfg.model, cfg.backend))
        log.info("model_ready", model=self.engine.bundle_id, geometry=self.engine.geometry.describe())
        pub = _bind("decisions_endpoint", lambda: ZmqPubSink(self._ctx, cfg.decisions_endpoint))
        self.outputs.add(pub)
        self.scheduler = Scheduler(
            self.engine,
            self.outputs.publish,
            cycle_ns=cfg.cycle_ns,
            queue_depth=cfg.queue_depth,
            workers=cfg.workers,
            max_defects=cfg.max_defects,
            margin_ns=int(cfg.deadline_margin_ms * 1e6),
        )
        scheduler = self.scheduler
        self.intake = Intake(self._ctx, cfg, lambda: scheduler.engine.geometry, scheduler.submit)
        if self.intake.imagezmq is not None and cfg.imagezmq_mode == "reqrep":
            self.outputs.add(ReplySink(self._ctx, self.intake.reply_endpoint))
        self.endpoints.update(
            frames=self.intake.endpoint(self.intake.native),
            imagezmq=self.intake.endpoint(self.intake.imagezmq),
            decisions=pub.endpoint,
        )
        self.outputs.start()
        self.scheduler.start()
        self.intake.start()
        self.health.tick()
        self.health.ready = True
        self.health.status = "serving"
        self.ready.set()
        self._notifier.notify("READY=1", f"STATUS=serving {self.engine.bundle_id}")
        log.info("ready", **self.endpoints)

    def main_loop(self) -> None:
        next_summary = time.monotonic() + self.config.summary_s
        next_ping = 0.0
        while not self._stop.wait(TICK_S):
            if not self._threads_alive():
                log.error("thread_died", detail="a frame-path thread stopped; exiting for a restart")
                self.exit_code = 1
                return
            self.health.tick()
            now = time.monotonic()
            if self._notifier.watchdog_s and now >= next_ping:
                self._notifier.notify("WATCHDOG=1")
                next_ping = now + self._notifier.watchdog_s
            if now >= next_summary:
                self.log_summary()
                next_summary = now + self.config.summary_s
            if self._reload.is_set():
                self._reload.clear()
                self._start_reload()

    def shutdown(self) -> None:
        log.info("stopping")
        self.health.ready = False
        self._notifier.notify("STOPPING=1")
        if self.intake is not None:
            self.intake.pause()
        if self.scheduler is not None:
            rejected = self.scheduler.drain(self.config.drain_s)
            if rejected:
                log.warning("drain_rejected", frames=rejected)
            self.scheduler.stop()
        self.outputs.close(flush_s=1.0)
        if self.intake is not None:
            self.intake.stop()
        if self.http is not None:
            self.http.stop()
        if self._reloading is not None:
            self._reloading.join(timeout=5.0)
        if self.scheduler is not None and self.intake is not None:
            self.log_summary()
        _deactivate(self.scheduler.engine if self.scheduler else self.engine)
        self._ctx.destroy(linger=0)  # closes anything a stuck thread still holds
        log.info("stopped", exit_code=self.exit_code)

    # -- helpers --------------------------------------------------------------------------------
    def _threads_alive(self) -> bool:
        return bool(self.scheduler and self.scheduler.alive and self.intake and self.intake.alive)

    def log_summary(self) -> None:
        assert self.scheduler is not None and self.intake is not None
        log.info("summary", received=self.intake.received, outputs=self.outputs.stats(), **self.scheduler.summary())

    def _start_reload(self) -> None:
        if self._reloading is not None and self._reloading.is_alive():
            log.warning("reload_ignored", detail="a reload is already in progress")
            return
        self._reloading = threading.Thread(target=self.reload, name="inspectd-reload", daemon=True)
        self._reloading.start()

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
        self._notifier.notify(f"STATUS=serving {new.bundle_id}")
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
    parser.add_argument("--http", dest="http_listen", metavar="HOST:PORT", help="health endpoint ('' = off)")
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
    return Server(cfg).run()
