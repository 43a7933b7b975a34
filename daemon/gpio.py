"""Reject actuator on a digital output line (Jetson-class boards), libgpiod v2 (the ``gpio`` extra).

The actuator logic (pulse, level, reject-by-default) is ``ActuatorSink``'s; this module
only owns the line. ``GpiodLine`` requests one output line through the ``gpiod`` v2
bindings (``gpiod.request_lines`` with ``LineSettings(direction=OUTPUT)``), initially
inactive; with ``gpio_active_low`` the kernel inverts it, so "active" always means reject.
Anything with ``set(on)`` and ``release()`` can stand in for it (the tests use a recorder).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from daemon.actuator import ActuatorSink
from daemon.outputs import DECISION_QUEUE
from engines.errors import UserError


class OutputLine(Protocol):
    def set(self, on: bool) -> None: ...
    def release(self) -> None: ...


class GpiodLine:
    """One output line requested through libgpiod v2."""

    def __init__(self, chip: str, offset: int, active_low: bool = False, consumer: str = "inspectd") -> None:
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError:
            raise UserError("gpio_chip: needs the libgpiod v2 bindings (pip install 'inspectd[gpio]')") from None
        self._offset = offset
        self._values = (Value.INACTIVE, Value.ACTIVE)
        settings = gpiod.LineSettings(direction=Direction.OUTPUT, output_value=Value.INACTIVE, active_low=active_low)
        try:
            self._request = gpiod.request_lines(chip, consumer=consumer, config={offset: settings})
        except (OSError, ValueError) as exc:
            raise UserError(f"gpio_chip: cannot request line {offset} of {chip}: {exc}") from None

    def set(self, on: bool) -> None:
        self._request.set_value(self._offset, self._values[bool(on)])

    def release(self) -> None:
        self._request.release()


class GpioSink(ActuatorSink):
    """Drives the reject line from decisions."""

    name = "gpio"

    def __init__(
        self,
        line: OutputLine,
        *,
        mode: str = "pulse",
        pulse_ms: float = 100.0,
        reject_by_default: bool = False,
        capacity: int = DECISION_QUEUE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] = time.time_ns,
    ) -> None:
        super().__init__(mode, pulse_ms, reject_by_default, capacity, clock=clock, wall=wall)
        self._line = line

    def set_output(self, on: bool) -> None:
        self._line.set(on)

    def close_resources(self) -> None:
        try:
            self._line.set(False)
        finally:
            self._line.release()
