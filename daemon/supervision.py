"""Supervised threads: no thread of the daemon dies or hangs unseen.

Every long-lived thread runs under a ``Watch``, and every Watch is registered with the
server's one ``Supervisor``, which the main loop asks each tick (``check``) how the
threads are. Two policies, decided per thread (docs/protocol.md, "Operation"):

fatal    the frame path and what the line waits for: intake, engine owner, deadlines, the
         decisions socket, imagezmq replies, reject actuators (and the CurveZMQ
         authenticator). When one dies the daemon is unhealthy from then on: /healthz and
         /readyz answer 503, the status page says which thread and why, the systemd
         watchdog pings stop, and the daemon exits 1 after ``fatal_exit_s`` (systemd
         restarts it either way). Frames keep getting decisions meanwhile where they can
         (an engine without its thread still has its deadline rejects).
restart  observers: status page, metrics, audit trail, the HTTP server. Restarted in place
         (a new thread on the same queue and state), at once the first time and with a
         back-off doubling from ``RESTART_MIN_S`` to ``RESTART_MAX_S`` after that.

Each death (an exception escaping the thread's loop, or a loop that returned while the
daemon was not stopping) is logged once with its traceback (``thread_died``) and counted
(``inspectd_thread_deaths_total``). Exceptions escaping a stage task of the worker pool
count as deaths of ``stages`` (the pool's thread itself carries on: restarted in place).

A stall is a thread that holds work and makes no progress for longer than ``stall_s``:
threads mark the start and end of each unit of work (``busy``/``idle``), so a thread
waiting for work is idle, never stalled. A stalled fatal thread makes the daemon unhealthy
while it lasts (it may still return); a stalled observer is reported on the status page.
Stalls are logged when they start and end and counted.

Health that is not a thread registers as a condition (``Supervisor.condition``): a check that
returns a problem in words. A fatal condition counts like a stall while it holds; a final one
(a sink that carries decisions overflowed, so a decision was lost) counts like a dead
frame-path thread from then on: the daemon exits after ``fatal_exit_s``.

Fault injection (``Supervisor.inject``) works like a failpoint: the named thread raises the
given exception at its next checkpoint (the start of its next unit of work or loop turn).
The tests use it to kill each kind of thread deterministically; it can serve a drill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("inspectd.supervision")

FATAL = "fatal"
RESTART = "restart"
RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0
Clock = Callable[[], float]


class Watch:
    """One supervised thread: runs ``target`` on a thread named ``inspectd-<name>`` and records how it ends.

    The watched thread calls ``busy()`` when it takes a unit of work, ``idle()`` when done,
    and ``checkpoint()`` once per loop turn where it can wait for long.
    """

    def __init__(self, name: str, target: Callable[[], Any] | None, *, fatal: bool, clock: Clock = time.monotonic):
        self.name = name
        self.policy = FATAL if fatal else RESTART
        self._target = target
        self.clock = clock
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._fault: BaseException | None = None
        self._lock = threading.Lock()
        self.deaths = 0
        self.restarts = 0
        self.stalls = 0
        self.error = ""  # how the last run ended, one line
        self.returned = False  # the last run's loop returned (normal when stopping)
        self.died_at: float | None = None  # supervisor clock when the death was noticed
        self.stall_reported = False

    @classmethod
    def of(cls, name: str, thread: threading.Thread, *, fatal: bool = True) -> Watch:
        """Watch a thread someone else owns (liveness only; it cannot be restarted)."""
        watch = cls(name, None, fatal=fatal)
        watch._thread = thread
        return watch

    @property
    def fatal(self) -> bool:
        return self.policy == FATAL

    # -- called by the watched thread ----------------------------------------------------------
    def checkpoint(self) -> None:
        """Raise an injected fault, if any (once, in whichever thread or task gets here first)."""
        if self._fault is None:
            return
        with self._lock:
            fault, self._fault = self._fault, None
        if fault is not None:
            raise fault

    def busy(self) -> None:
        """This thread holds a unit of work from now on."""
        self.checkpoint()
        self._busy_since = self.clock()

    def idle(self) -> None:
        self._busy_since = None

    def busy_s(self, now: float | None = None) -> float:
        """How long the unit of work in progress has been held (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else max(0.0, (self.clock() if now is None else now) - since)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._target is None:
            raise RuntimeError(f"{self.name}: an adopted thread cannot be started here")
        self.returned = False
        self._busy_since = None
        self._thread = threading.Thread(target=self._main, name=f"inspectd-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.ident is not None:
            thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._thread is not None and self._thread.ident is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def adopted(self) -> bool:
        """A thread someone else started (``Watch.of``): watched for liveness only."""
        return self._target is None

    @property
    def restartable(self) -> bool:
        return not self.adopted and self.policy == RESTART

    def inject(self, fault: BaseException) -> None:
        self._fault = fault

    def _main(self) -> None:
        try:
            assert self._target is not None
            self._target()
        except BaseException as exc:
            self._busy_since = None
            with self._lock:
                self.deaths += 1
                self.error = f"{type(exc).__name__}: {exc}"[:200]
            log.error("thread_died", thread=self.name, policy=self.policy, error=self.error, exc_info=exc)
            return
        self.returned = True

    def record_death(self, error: str, restarted: bool = False) -> None:
        """Count a death noticed from outside (a loop that returned; a task that raised)."""
        with self._lock:
            self.deaths += 1
            self.restarts += restarted
            self.error = error[:200]

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "alive": int(self.alive),
            "deaths": self.deaths,
            "restarts": self.restarts,
            "stalls": self.stalls,
            "stalled": int(self.stall_reported),
        }


@dataclass
class State:
    """What the supervisor found: problems that make the daemon unhealthy, and those that do not."""

    # Dead fatal threads and final conditions (a decision lost): unhealthy until the exit.
    fatal: list[str] = field(default_factory=list)
    # Stalled fatal threads and failing fatal conditions: unhealthy while they last.
    stalled: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)  # observers dead (awaiting restart) or stalled
    notes: list[str] = field(default_factory=list)  # observers restarted since start

    @property
    def healthy(self) -> bool:
        return not self.fatal and not self.stalled

    @property
    def problem(self) -> str | None:
        """One line for /healthz's state and systemd's STATUS=, or None when healthy."""
        return "; ".join(self.fatal + self.stalled) or None


class Supervisor:
    """The registry of watched threads; ``check()`` (from the main loop) restarts, detects and reports."""

    def __init__(self, stall_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self._watches: dict[str, Watch] = {}
        self._conditions: dict[str, tuple[Callable[[], str | None], bool, bool]] = {}
        self._final: dict[str, str] = {}  # final conditions reported so far: name -> their latest problem
        self._lock = threading.Lock()
        self._stopping = False

    def add(self, watch: Watch) -> Watch:
        """Register ``watch`` (its stall times then use this supervisor's clock)."""
        watch.clock = self.clock
        with self._lock:
            if watch.name in self._watches and self._watches[watch.name] is not watch:
                raise ValueError(f"a thread named {watch.name!r} is already supervised")
            self._watches[watch.name] = watch
        return watch

    def watch(self, name: str, target: Callable[[], Any] | None, *, fatal: bool) -> Watch:
        return self.add(Watch(name, target, fatal=fatal))

    def condition(self, name: str, check: Callable[[], str | None], *, fatal: bool = True, final: bool = False) -> None:
        """A health condition that is not a thread (e.g. a decision queue that overflowed).

        While ``check()`` returns a problem (text), it counts like a stall: a fatal condition makes
        the daemon unhealthy (503, no watchdog pings), another one is shown on the status page.
        ``final`` (with ``fatal``): the problem cannot be undone (a decision was lost), so it counts
        like a dead frame-path thread from the first time it is reported: it stays reported, and the
        daemon exits after ``fatal_exit_s`` for a restart.
        """
        with self._lock:
            self._conditions[name] = (check, fatal, final)

    def get(self, name: str) -> Watch:
        return self._watches[name]

    @property
    def watches(self) -> list[Watch]:
        with self._lock:
            return list(self._watches.values())

    def stopping(self) -> None:
        """The daemon is stopping: threads ending from now on are not deaths."""
        self._stopping = True

    def inject(self, name: str, fault: BaseException) -> None:
        """Failpoint: thread ``name`` raises ``fault`` at its next checkpoint."""
        self._watches[name].inject(fault)

    def run_task(self, watch: Watch, task: Callable[..., Any], *args: Any, on_failure: Callable[[], None]) -> None:
        """Run one pool task under ``watch``: an escaping exception is logged, counted and handed to ``on_failure``."""
        try:
            watch.checkpoint()
            task(*args)
        except BaseException as exc:
            # The pool's thread carries on with the next task: restarted in place.
            watch.record_death(f"{type(exc).__name__}: {exc}", restarted=True)
            log.error("thread_died", thread=watch.name, policy=watch.policy, error=watch.error, exc_info=exc)
            try:
                on_failure()
            except Exception:
                log.exception("task_cleanup_failed", thread=watch.name)

    # -- the main loop's question ----------------------------------------------------------------
    def check(self) -> State:
        """Look at every thread once: restart dead observers when due, report deaths and stalls."""
        state = State()
        now = self.clock()
        for watch in self.watches:
            if watch.started and not watch.alive:
                if not self._stopping:
                    self._dead(watch, now, state)
            elif watch.started:
                self._stall(watch, now, state)
            if watch.restarts:  # also a task group such as "stages", which has no thread of its own
                state.notes.append(f"{watch.name} restarted {watch.restarts}x ({watch.error})")
        self._check_conditions(state)
        return state

    def _check_conditions(self, state: State) -> None:
        with self._lock:
            conditions = list(self._conditions.items())
        for name, (check, fatal, final) in conditions:
            try:
                problem = check()
            except Exception as exc:  # a broken check is itself a problem, never a crash of the main loop
                problem = f"check failed ({type(exc).__name__}: {exc})"
            if final and fatal:
                if problem:
                    if name not in self._final:
                        log.error("condition_final", condition=name, problem=problem)
                    self._final[name] = problem
                if name in self._final:  # kept once reported: what it stands for cannot be undone
                    state.fatal.append(f"{name}: {self._final[name]}")
            elif problem:
                (state.stalled if fatal else state.degraded).append(f"{name}: {problem}")

    def _dead(self, watch: Watch, now: float, state: State) -> None:
        if watch.died_at is None and (watch.returned or watch.adopted):  # ended although nobody asked
            watch.record_death("the thread ended while the daemon was running")
            log.error("thread_died", thread=watch.name, policy=watch.policy, error=watch.error)
        if watch.died_at is None:
            watch.died_at = now
        watch.stall_reported = False
        if not watch.restartable:
            state.fatal.append(f"{watch.name} thread died ({watch.error or 'ended'})")
            return
        if now >= watch.died_at + restart_delay(watch.deaths):
            watch.restarts += 1
            log.warning("thread_restarted", thread=watch.name, deaths=watch.deaths, error=watch.error)
            watch.start()
            watch.died_at = None
        else:
            state.degraded.append(f"{watch.name} thread died ({watch.error}), restarting")

    def _stall(self, watch: Watch, now: float, state: State) -> None:
        held = watch.busy_s(now)
        if held > self.stall_s:
            if not watch.stall_reported:
                watch.stall_reported = True
                watch.stalls += 1
                log.error("thread_stalled", thread=watch.name, policy=watch.policy, held_s=round(held, 1))
            text = f"{watch.name} stalled (no progress for over {self.stall_s:g} s)"  # stable: logged once
            (state.stalled if watch.fatal else state.degraded).append(text)
        elif watch.stall_reported:
            watch.stall_reported = False
            log.info("thread_resumed", thread=watch.name)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {watch.name: watch.stats() for watch in self.watches}


def restart_delay(deaths: int) -> float:
    """Seconds before an observer is restarted after its ``deaths``-th death: 0, then 1, 2, 4 ... 60."""
    if deaths <= 1:
        return 0.0
    return min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (deaths - 2))
