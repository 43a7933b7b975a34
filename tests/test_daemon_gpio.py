"""Digital reject line: the GPIO sink drives an output line (a recorder here; no GPIO chip on CI)."""

from __future__ import annotations

import time

import pytest

from daemon.gpio import GpiodLine, GpioSink
from daemon.protocol import Decision
from engines.errors import UserError


class FakeLine:
    """Records what a libgpiod line request would have been set to."""

    def __init__(self) -> None:
        self.values: list[bool] = []
        self.released = False

    def set(self, on: bool) -> None:
        self.values.append(on)

    def release(self) -> None:
        self.released = True


def reject(frame_id: int) -> Decision:
    now = time.time_ns()
    return Decision(frame_id, "cam1", None, "reject", "defect", now, now, now + 10**9, "m")


def test_gpio_sink_pulses_the_line_and_leaves_it_off_when_closed() -> None:
    """A reject pulses the line; on close the line is set inactive and released."""
    line = FakeLine()
    sink = GpioSink(line, mode="pulse", pulse_ms=20)
    sink.start()
    sink.offer(reject(1))
    end = time.monotonic() + 30  # the pulse is the sink thread's: wait (bounded) until it has ended
    while line.values[:2] != [True, False] and time.monotonic() < end:
        time.sleep(0.005)
    sink.close()
    assert line.values[:2] == [True, False] and line.values[-1] is False and line.released


def test_missing_chip_is_a_one_line_user_error() -> None:
    """Requesting a line on a chip that does not exist names the chip (needs the gpiod bindings)."""
    pytest.importorskip("gpiod")
    with pytest.raises(UserError, match="gpiochip99"):
        GpiodLine("/dev/gpiochip99", 3)
