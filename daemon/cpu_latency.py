"""Cores that wake at once while the daemon serves: a CPU wake-up latency request (Linux PM QoS).

A line feeds the daemon below its rate (at 70 % of it, ~30 % of each cycle is idle), and an idle
core sleeps: a deep C-state on a board, a halted vCPU on a virtual machine. The next frame then
starts on cores that must first wake (their caches perhaps cold too), and it pays for that in every
stage: on this project's 2-core machine bare predict with 90 ms of idle before each frame took a
median 1.06-1.09x as long as back to back (``benchmarks/paced_bare.py``), about the daemon's
whole overhead over bare predict. Holding the request removed the difference (docs/frame_path.md,
"Cores that stay awake").

While ``/dev/cpu_dma_latency`` is held open with a value written to it, the kernel keeps every
core in idle states that wake within that many microseconds (0: the cores poll instead of
sleeping); closing it ends the request, and the kernel closes it for a process that dies, so a
crashed daemon never leaves the machine's idle policy changed. The price is power and heat:
cores that never sleep. Camera makers give the same advice for vision hosts (C-states off); a
fan-less box where that matters more than the latency sets ``cpu_wakeup_latency_us = -1``.

Not having the request (no such device, not permitted: the device is root's unless a udev rule
gives the daemon's group write access, ``systemd/60-inspectd-cpu-latency.rules``) is not a fault:
the daemon serves as before and says so once in its log and on ``/metrics``; it does not ask again.

While the line stands (no frame for ``cpu_wakeup_hold_s``, a minute by default: a break, a shift
change, a weekend) the daemon lets the request go so that the cores may sleep, and takes it again
with the next frame, before that frame is inspected (``server.py``).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("inspectd.cpu_latency")

DEVICE = Path("/dev/cpu_dma_latency")
OFF = -1  # leave the machine's idle policy alone
MAX_US = 2_000_000_000  # the kernel's largest request (PM_QOS_CPU_LATENCY_DEFAULT_VALUE): none at all
_VALUE = struct.Struct("=i")  # the device takes and gives one native s32


class CpuLatencyRequest:
    """One request: ``hold()`` while frames come, ``release()`` while the line stands and at the stop (or the
    kernel, at the process's end)."""

    def __init__(self, limit_us: int, device: Path | None = None) -> None:
        if not OFF <= limit_us <= MAX_US:
            raise ValueError(f"limit_us: expected {OFF}..{MAX_US}, got {limit_us}")
        self.limit_us = limit_us
        self.device = device or DEVICE
        self.problem: str | None = None  # why the request could not be had, in words (then never asked again)
        self._fd: int | None = None
        self._lock = threading.Lock()  # the intake thread takes it again, the main loop lets it go

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def wanted(self) -> bool:
        """False where the setting leaves the machine's idle policy alone (``OFF``)."""
        return self.limit_us != OFF

    def hold(self) -> bool:
        """Register the request; False (the reason in ``problem``, logged once) where it cannot be had."""
        if self.held or not self.wanted or self.problem is not None:  # the common case without the lock
            return self.held
        with self._lock:
            return self.held or self._open()

    def _open(self) -> bool:
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            return self._not_held(f"{self.device}: {exc.strerror or exc}")
        try:
            os.write(fd, _VALUE.pack(self.limit_us))
        except OSError as exc:
            os.close(fd)
            return self._not_held(f"{self.device}: writing the request: {exc.strerror or exc}")
        self._fd = fd
        log.info("cpu_latency_held", limit_us=self.limit_us, device=str(self.device))
        return True

    def release(self, reason: str = "stopping", still: Callable[[], bool] = lambda: True) -> None:
        """Let the request go, if ``still()`` holds under the lock that ``hold()`` takes (the caller's condition
        cannot turn between its check and the release)."""
        with self._lock:
            if self._fd is not None and still():
                fd, self._fd = self._fd, None
                os.close(fd)
                log.info("cpu_latency_released", device=str(self.device), reason=reason)

    def _not_held(self, problem: str) -> bool:
        self.problem = problem
        log.warning(
            "cpu_latency_not_held",
            problem=problem,
            limit_us=self.limit_us,
            hint="idle cores may sleep between frames and wake slowly; systemd/60-inspectd-cpu-latency.rules "
            "gives the daemon's group the device (or set cpu_wakeup_latency_us = -1 to not ask)",
        )
        return False

    def __enter__(self) -> CpuLatencyRequest:
        self.hold()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
