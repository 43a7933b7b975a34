"""Reject actuator on a PLC over Modbus TCP (pymodbus; the ``plc`` extra).

Per turn of the actuator (actuator.py), one "write multiple registers" request puts the
9-register result record at ``plc_register`` (counter, verdict, reason, frame id low word,
covered, rejects, reject bits, missed, unfired; ``actuator.Record``), so the PLC sees the
record change atomically and can use the counter as its result-ready handshake. The reject
coil ``plc_coil`` is pulsed or follows the verdict (``plc_mode``).

The link is opened lazily and reopened with exponential back-off (0.5 s doubling to 10 s)
after a failure; while it is down, records and reject signals fail (counted: ``failed``,
``unfired_rejects``), the results are held, and the first record after the reconnect covers
them and says how many were missed. The loss and the recovery are logged once each. Each
request has a short timeout (``plc_timeout_s``) and no retries, and all of it runs on the
sink's own thread: an unreachable PLC never delays a decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from daemon.actuator import ActuatorSink, Record
from daemon.outputs import DECISION_QUEUE
from engines.errors import UserError

log = structlog.get_logger("inspectd.modbus")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
REPEAT_LOG_S = 60.0  # the same refusal (e.g. registers the PLC does not have) is logged once a minute


class PlcUnavailable(ConnectionError):
    """The PLC link is down and its back-off has not expired yet."""


class ModbusSink(ActuatorSink):
    """Writes each decision's result record and drives the reject coil on a Modbus TCP server."""

    name = "plc"

    def __init__(
        self,
        host: str,
        port: int = 502,
        *,
        device_id: int = 1,
        register: int = 0,
        coil: int = 0,
        mode: str = "pulse",
        pulse_ms: float = 100.0,
        reject_by_default: bool = False,
        timeout_s: float = 0.3,
        backoff_s: tuple[float, float] = (BACKOFF_MIN_S, BACKOFF_MAX_S),
        capacity: int = DECISION_QUEUE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] = time.time_ns,
    ) -> None:
        try:
            from pymodbus.client import ModbusTcpClient
        except ImportError:
            raise UserError("plc_host: Modbus output needs pymodbus (pip install 'inspectd[plc]')") from None
        super().__init__(mode, pulse_ms, reject_by_default, capacity, clock=clock, wall=wall)
        self.host, self.port = host, port
        self.device_id, self.register, self.coil = device_id, register, coil
        self._client = ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)
        self._backoff_min, self._backoff_max = backoff_s
        self._backoff = self._backoff_min
        self._retry_at = 0.0
        self.connected = False
        self.reconnects = 0
        self._last_error, self._last_error_at = "", 0.0
        self._ever_connected = False

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "connected": int(self.connected), "reconnects": self.reconnects}

    # -- hardware calls ----------------------------------------------------------------------
    def write_result(self, record: Record) -> None:
        self._call("write_registers", self.register, list(record))

    def retry_at(self) -> float:
        return 0.0 if self.connected else self._retry_at

    def set_output(self, on: bool) -> None:
        self._call("write_coil", self.coil, on)

    def close_resources(self) -> None:
        self._client.close()

    def on_failure(self, exc: Exception) -> None:
        if isinstance(exc, PlcUnavailable):  # the loss was logged once, by _lost
            return
        error, now = f"{type(exc).__name__}: {exc}", self._clock()
        if error != self._last_error or now - self._last_error_at >= REPEAT_LOG_S:  # not one line per retry
            log.warning("plc_failed", host=self.host, port=self.port, error=error)
            self._last_error, self._last_error_at = error, now

    # -- the link ------------------------------------------------------------------------------
    def _call(self, method: str, address: int, value: Any) -> None:
        from pymodbus.exceptions import ModbusException

        self._ensure_connected()
        try:
            response = getattr(self._client, method)(address, value, device_id=self.device_id)
        except (ModbusException, OSError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            raise PlcUnavailable(str(exc)) from None
        if response.isError():  # the PLC answered with an exception code: the link is fine
            raise RuntimeError(f"{method}({address}) refused by the PLC: {response}")

    def _ensure_connected(self) -> None:
        if self.connected:
            return
        now = self._clock()
        if now < self._retry_at:
            raise PlcUnavailable(f"{self.host}:{self.port} unreachable; retrying in {self._retry_at - now:.1f} s")
        if not self._client.connect():
            self._lost("connect failed")
            raise PlcUnavailable(f"cannot connect to {self.host}:{self.port}")
        self.connected = True
        self._backoff = self._backoff_min
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        log.info("plc_connected", host=self.host, port=self.port, device_id=self.device_id)

    def _lost(self, why: str) -> None:
        if self.connected or not self._retry_at:
            log.warning("plc_unreachable", host=self.host, port=self.port, detail=why, retry_s=self._backoff)
        self.connected = False
        self._client.close()
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, self._backoff_max)
