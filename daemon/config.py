"""The daemon's configuration: one validated, immutable object built once at start.

Sources, later ones winning: built-in defaults, a TOML file, ``INSPECTD_*`` environment
variables (what systemd units set), then command-line options. Every value is checked
here, so the rest of the daemon never re-validates and never sees a half-built config.

TOML keys are the field names; a table flattens into its keys with ``_``:
``[frames] endpoint = "..."`` is ``frames_endpoint``. The environment variable for a
field is ``INSPECTD_`` + the field name in capitals (``INSPECTD_CYCLE_MS=150``).

Every endpoint binds to loopback by default; listening on other interfaces is an explicit
setting (``frames_endpoint = "tcp://*:7700"``, ``http_listen = "0.0.0.0:7780"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engines.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "INSPECTD_"
BACKENDS = ("auto", "onnxruntime", "tensorrt")
FRAME_MODES = ("pull", "sub")
IMAGEZMQ_MODES = ("reqrep", "pubsub")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACTUATOR_MODES = ("pulse", "level")
PATH_FIELDS = ("model", "frames_shm", "audit_dir", "curve_secret_key", "curve_clients")  # relative to the TOML file


class ConfigError(UserError):
    """A configuration value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Config:
    """Everything ``inspectd serve`` needs to run; see docs/protocol.md for the endpoints."""

    model: str = ""
    backend: str = "auto"
    cycle_ms: float = 200.0
    # Native frames: PULL binds (cameras PUSH to it); SUB connects to a camera that publishes.
    frames_endpoint: str = "tcp://127.0.0.1:7700"
    frames_mode: str = "pull"
    # Shared-memory frame slots for a grabber on the same host (shm.py): the Unix socket path that hands
    # them out ("" = off) and how many frames may be in flight in them.
    frames_shm: str = ""
    frames_shm_slots: int = 4
    # imagezmq: "" = off; reqrep binds a ROUTER (senders connect REQ); pubsub connects a SUB.
    imagezmq_endpoint: str = ""
    imagezmq_mode: str = "reqrep"
    decisions_endpoint: str = "tcp://127.0.0.1:7701"
    # Status page, /metrics, /healthz, /readyz; "" = no HTTP endpoint. Read-only.
    http_listen: str = "127.0.0.1:7780"
    # Open HTTP connections (event streams included; at most half of them streams); beyond, 503 + Retry-After.
    http_max_connections: int = 64
    # A request must arrive whole within this long, and each send to a client may block this long.
    http_timeout_s: float = 10.0
    # Frames admitted and not yet finished; the excess is rejected as overload at once.
    queue_depth: int = 4
    workers: int = 2  # decode + prepare + decide threads; inference always has one thread
    # While serving, idle cores wake within this many microseconds (0: they poll; cpu_latency.py); -1 = the
    # machine's own idle policy. Faster frames after idle gaps, at the price of power and heat.
    cpu_wakeup_latency_us: int = 0
    # ... let go after this long without a frame (the line stands: the cores may sleep), taken again with the
    # next frame; 0 = held for as long as the daemon serves.
    cpu_wakeup_hold_s: float = 60.0
    hwm: int = 4  # ZeroMQ high-water marks, in messages (frames), not bytes
    max_defects: int = 20  # defects listed per decision; the rest are counted
    # Decisions the line outputs (decision PUB, imagezmq replies, actuators) each hold while their thread
    # catches up; an overflow loses a decision and is a fatal health failure (outputs.py).
    decision_queue: int = 65_536
    summary_s: float = 10.0
    # Deadline rejects go out this long before the deadline, absorbing thread wake-up jitter.
    deadline_margin_ms: float = 2.0
    drain_s: float = 2.0  # at shutdown, how long in-flight frames may take before rejection
    # A thread holding one unit of work longer than this is stalled (supervision.py); on the frame
    # path (e.g. an inference that does not return) /healthz turns 503 and the watchdog pings stop.
    stall_s: float = 30.0
    # After a frame-path thread died, the daemon stays up this long (unhealthy: 503s, no watchdog
    # pings, the status page says why), then exits 1 for a restart.
    fatal_exit_s: float = 10.0
    # A header deadline_ns further ahead of receipt than this is refused (bad_frame).
    deadline_max_s: float = 60.0
    log_format: str = "auto"
    log_level: str = "info"
    # -- reject actuator on a PLC, Modbus TCP ([plc] table); plc_host "" = off
    plc_host: str = ""
    plc_port: int = 502
    plc_device_id: int = 1
    plc_register: int = 0  # first of the 9 holding registers of the result record (docs/protocol.md, "PLC")
    plc_coil: int = 0  # the reject coil
    plc_mode: str = "pulse"  # pulse: on for plc_pulse_ms per reject; level: the coil follows the verdict
    plc_pulse_ms: float = 100.0
    plc_reject_by_default: bool = False  # fire the reject at the deadline unless a pass was written
    plc_timeout_s: float = 0.3  # per request; the link is retried with back-off
    # -- reject actuator on a digital line, libgpiod v2 ([gpio] table); gpio_chip "" = off
    gpio_chip: str = ""  # e.g. /dev/gpiochip0
    gpio_line: int = 0  # line offset on the chip
    gpio_mode: str = "pulse"
    gpio_pulse_ms: float = 100.0
    gpio_active_low: bool = False
    gpio_reject_by_default: bool = False
    # -- operator status page ([status] table)
    status_recent: int = 20  # decisions listed
    status_shifts: str = ""  # local start times of shifts ("06:00,14:00,22:00"): shift counters restart there
    status_refresh_s: float = 1.0  # live-update period of the page
    # -- audit trail ([audit] table); audit_dir "" = off
    audit_dir: str = ""
    audit_max_mb: float = 2048.0
    audit_max_count: int = 10_000
    audit_pass_sample: float = 0.0  # fraction of passes stored too (0..1)
    # -- CurveZMQ on the bound frame and decision sockets ([curve] table); "" = plain TCP
    curve_secret_key: str = ""  # the daemon's secret key file (zmq.auth.create_certificates)
    curve_clients: str = ""  # directory of the public key files of the allowed cameras/subscribers

    @property
    def cycle_ns(self) -> int:
        return int(self.cycle_ms * 1e6)

    def validate(self) -> Config:
        """Return self when every field is acceptable; raise ConfigError naming the first bad one."""
        if not self.model:
            raise ConfigError("model: no model bundle given (--model, `model` in the TOML or INSPECTD_MODEL)")
        _choice("backend", self.backend, BACKENDS)
        _choice("frames_mode", self.frames_mode, FRAME_MODES)
        _choice("imagezmq_mode", self.imagezmq_mode, IMAGEZMQ_MODES)
        _choice("log_format", self.log_format, LOG_FORMATS)
        _choice("log_level", self.log_level, LOG_LEVELS)
        _endpoint("frames_endpoint", self.frames_endpoint, required=True)
        _endpoint("imagezmq_endpoint", self.imagezmq_endpoint, required=False)
        _endpoint("decisions_endpoint", self.decisions_endpoint, required=True)
        if self.frames_shm and not self.frames_shm.startswith("/"):
            raise ConfigError(f"frames_shm: expected an absolute path for the slot socket, got {self.frames_shm!r}")
        _range("frames_shm_slots", self.frames_shm_slots, 2, 64)
        if self.http_listen:
            parse_host_port(self.http_listen)
        _range("cycle_ms", self.cycle_ms, 1, 600_000)
        _range("queue_depth", self.queue_depth, 1, 1024)
        _range("workers", self.workers, 1, 64)
        _range("cpu_wakeup_latency_us", self.cpu_wakeup_latency_us, -1, 1_000_000)
        _range("cpu_wakeup_hold_s", self.cpu_wakeup_hold_s, 0, 86_400)
        _range("hwm", self.hwm, 1, 1000)
        _range("max_defects", self.max_defects, 0, 10_000)
        _range("decision_queue", self.decision_queue, 16, 10_000_000)
        _range("http_max_connections", self.http_max_connections, 2, 100_000)
        _range("http_timeout_s", self.http_timeout_s, 0.1, 3600)
        _range("summary_s", self.summary_s, 0.1, 86_400)
        _range("drain_s", self.drain_s, 0, 600)
        _range("stall_s", self.stall_s, 0.1, 3600)
        _range("fatal_exit_s", self.fatal_exit_s, 0, 3600)
        _range("deadline_max_s", self.deadline_max_s, 0.001, 86_400)
        _range("deadline_margin_ms", self.deadline_margin_ms, 0, 1000)
        _choice("plc_mode", self.plc_mode, ACTUATOR_MODES)
        _choice("gpio_mode", self.gpio_mode, ACTUATOR_MODES)
        _range("plc_port", self.plc_port, 1, 65535)
        _range("plc_device_id", self.plc_device_id, 0, 255)
        _range("plc_register", self.plc_register, 0, 65535 - 8)
        _range("plc_coil", self.plc_coil, 0, 65535)
        _range("plc_pulse_ms", self.plc_pulse_ms, 1, 60_000)
        _range("plc_timeout_s", self.plc_timeout_s, 0.01, 60)
        _range("gpio_line", self.gpio_line, 0, 1023)
        _range("gpio_pulse_ms", self.gpio_pulse_ms, 1, 60_000)
        _range("status_recent", self.status_recent, 1, 1000)
        _range("status_refresh_s", self.status_refresh_s, 0.05, 60)
        parse_shifts(self.status_shifts)
        _range("audit_max_mb", self.audit_max_mb, 1, 10_000_000)
        _range("audit_max_count", self.audit_max_count, 1, 10_000_000)
        _range("audit_pass_sample", self.audit_pass_sample, 0, 1)
        if bool(self.curve_secret_key) != bool(self.curve_clients):
            raise ConfigError("curve_secret_key, curve_clients: give both (the daemon's key and the allowed clients)")
        connects = self.frames_mode == "sub" or (self.imagezmq_endpoint and self.imagezmq_mode == "pubsub")
        if self.curve_secret_key and connects:
            raise ConfigError("curve_secret_key: CurveZMQ needs bound sockets (frames_mode pull, imagezmq_mode reqrep)")
        return self


FIELD_TYPES: dict[str, type] = {f.name: type(getattr(Config(), f.name)) for f in fields(Config)}


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (port 0 = any free port); ConfigError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"http_listen: expected HOST:PORT (e.g. 127.0.0.1:7780), got {text!r}")
    return host.strip("[]"), int(port)


def parse_shifts(text: str) -> list[tuple[int, int]]:
    """``"06:00,14:00"`` -> [(6, 0), (14, 0)], sorted; ConfigError when malformed."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        hour, sep, minute = part.partition(":")
        if not (sep and hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
            raise ConfigError(f"status_shifts: expected HH:MM[,HH:MM...] (e.g. 06:00,14:00,22:00), got {text!r}")
        out.append((int(hour), int(minute)))
    return sorted(out)


def load(
    toml_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the one Config from defaults, the TOML file, the environment and CLI overrides."""
    values: dict[str, Any] = {}
    if toml_path:
        values.update(_from_toml(Path(toml_path)))
    values.update(_from_env(os.environ if environ is None else environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return replace(Config(), **{k: _coerce(k, v, "option") for k, v in values.items()}).validate()


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}_{sub}"] = subvalue
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in FIELD_TYPES:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(FIELD_TYPES)}")
        flat[key] = _coerce(key, value, str(path))
    for key in PATH_FIELDS:
        if flat.get(key):
            # A relative path in a config file means relative to that file, not the cwd.
            flat[key] = str((path.parent / flat[key]).resolve())
    return flat


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELD_TYPES:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            out[name] = _coerce(name, raw, ENV_PREFIX + name.upper())
    return out


def _coerce(name: str, value: Any, source: str) -> Any:
    want = FIELD_TYPES[name]
    try:
        if want is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _BOOLS:
                return _BOOLS[value.strip().lower()]
            raise ValueError
        if isinstance(value, bool) or (want is not str and isinstance(value, str) and not value.strip()):
            raise ValueError
        if want is str:
            if not isinstance(value, str | Path):
                raise ValueError
            return str(value)
        if want is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {want.__name__}, got {value!r}") from None


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")


def _range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be between {low:g} and {high:g}, got {value:g}")


def _endpoint(name: str, value: str, required: bool) -> None:
    if not value and not required:
        return
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ConfigError(f"{name}: expected a ZeroMQ endpoint like tcp://127.0.0.1:7700, got {value!r}")
