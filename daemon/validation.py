"""Header field checks: what a camera may send in each field, as pure functions.

Every value in a header comes from the network, so each is checked for type and range
before anything else looks at it (docs/protocol.md lists the rules):

- numbers are JSON integers; ``true``/``false`` and ``1.0`` are not numbers (in Python a
  bool is an int and ``1.0 == 1``, so each check says ``is_int``);
- ids and names are text of bounded length (``MAX_ID_CHARS``) that encodes as UTF-8: a
  lone surrogate escaped in JSON (``"\\ud800"``) is not text and is refused;
- integer ids fit 64 bits (signed or unsigned), so every consumer (the PLC's frame word,
  other languages' JSON parsers) can hold them;
- deadlines: absent, ``null``, ``0`` and ``2**64 - 1`` mean "none" (receipt + cycle); any
  other value must lie within [receipt - ``PAST_WINDOW_NS``, receipt + the configured
  maximum]; outside that, the frame is a ``bad_frame`` (its deadline is receipt + cycle);
- ``t_capture_ns`` is informational: a value that is not a 64-bit unsigned integer is
  dropped (and counted by the scheduler), never a reason to reject.
"""

from __future__ import annotations

import json
from typing import Any

MAX_ID_CHARS = 256
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
NO_DEADLINE = (0, UINT64_MAX)  # what cameras send for "no deadline"
PAST_WINDOW_NS = 10 * 10**9  # a deadline this far in the past is still a deadline (then rejected at once)
DEFAULT_MAX_AHEAD_NS = 60 * 10**9  # config.deadline_max_s

FrameId = int | str


def is_int(value: Any) -> bool:
    """A JSON integer (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_text(value: Any, max_chars: int = MAX_ID_CHARS) -> bool:
    """Non-empty text of at most ``max_chars`` characters that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def frame_id(value: Any) -> FrameId | None:
    """A usable frame id (a 64-bit integer or a short text), or None."""
    if is_int(value) and INT64_MIN <= value <= UINT64_MAX:
        return value
    return value if is_text(value) else None


def camera_id(value: Any) -> str | None:
    return value if is_text(value) else None


def part_id(value: Any) -> tuple[FrameId | None, str]:
    """(the part id or None, why it is refused or "")."""
    if value is None or frame_id(value) is not None:
        return value, ""
    return None, f"part_id must be an integer or a text of 1-{MAX_ID_CHARS} characters, got {short(value)}"


def deadline(value: Any, t_received_ns: int, max_ahead_ns: int) -> tuple[int | None, str]:
    """(the deadline, or None for receipt + cycle; why it is refused or "")."""
    if value is None or (is_int(value) and value in NO_DEADLINE):
        return None, ""
    if not is_int(value):
        return None, f"deadline_ns must be an integer (Unix ns), got {short(value)}"
    if not t_received_ns - PAST_WINDOW_NS <= value <= t_received_ns + max_ahead_ns:
        offset_ns = value - t_received_ns  # an int: no float overflow for 10**400
        when = f"{offset_ns / 1e9:+.3g} s from receipt" if abs(offset_ns) < 10**30 else "beyond any clock"
        window = f"[-{PAST_WINDOW_NS / 1e9:g} s, +{max_ahead_ns / 1e9:g} s]"
        return None, f"deadline_ns is {when}, outside {window} (0 or 2**64-1 mean none)"
    return value, ""


def capture_time(value: Any) -> tuple[int | None, bool]:
    """(t_capture_ns or None, whether a value was there and dropped)."""
    if value is None:
        return None, False
    if is_int(value) and 0 <= value <= UINT64_MAX:
        return value, False
    return None, True


def short(value: Any, limit: int = 40) -> str:
    """A bounded, printable rendering of a value for a ``detail`` (repr escapes surrogates and controls)."""
    if is_int(value) and not INT64_MIN <= value <= UINT64_MAX:
        return "an integer beyond 64 bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_object(data: bytes | memoryview, limit: int) -> tuple[dict[str, Any] | None, str]:
    """Strict JSON (no NaN/Infinity) of at most ``limit`` bytes that is an object; else (None, why)."""
    if len(data) > limit:  # before any copy
        return None, f"header of {len(data)} bytes exceeds {limit}"
    try:
        header = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        return None, "header is not UTF-8 JSON"
    if not isinstance(header, dict):
        return None, "header is not a JSON object"
    return header, ""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
