"""Wire formats: frames in (native and imagezmq), decisions out. Pure functions, no sockets.

Parsing never trusts a size the sender declared: every header is checked against the
model's geometry and the message limits before anything is allocated, and a message
that cannot be read becomes a ``BadFrame`` (never an exception) so the scheduler can
answer it with a ``bad_frame`` reject. docs/protocol.md is the user-facing description.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.types import DTYPES, Geometry, Result

PROTOCOL_VERSION = 1
ENCODINGS = ("raw", "png", "jpeg", "tiff")
MAX_HEADER_BYTES = 16 * 1024
MAX_ID_CHARS = 256
HEADER_FIELDS = ("v", "frame_id", "camera_id", "width", "height", "channels", "dtype", "encoding")
IMAGEZMQ_CAMERA = "imagezmq"  # camera id for imagezmq messages whose name cannot be read

FrameId = int | str


def message_limit(geometry: Geometry) -> int:
    """Largest acceptable message part in bytes: the raw image plus room for compressor overhead."""
    # PNG/TIFF of incompressible data can come out slightly larger than the raw pixels.
    return geometry.nbytes + geometry.nbytes // 8 + 64 * 1024


@dataclass
class Frame:
    """One well-formed frame: who sent it, how it is encoded and its (not yet decoded) payload."""

    camera_id: str
    frame_id: FrameId
    encoding: str
    payload: memoryview
    t_received_ns: int
    deadline_ns: int | None = None
    t_capture_ns: int | None = None
    part_id: str | int | None = None
    reply: bytes | None = None  # ROUTER identity of an imagezmq REQ sender awaiting the decision
    source: str = "native"


@dataclass
class BadFrame:
    """A message that cannot be inspected; ids are None where they could not be read."""

    detail: str
    t_received_ns: int
    camera_id: str | None = None
    frame_id: FrameId | None = None
    part_id: str | int | None = None
    deadline_ns: int | None = None
    reply: bytes | None = None
    source: str = "native"


@dataclass(frozen=True, eq=False)
class Evidence:
    """What an operator or an auditor wants to see of a decided frame; references, never copies.

    ``image`` is the decoded frame (frame pixels), ``anomaly_map`` the float32 map in the
    reference frame and ``pose_matrix`` the 2x3 affine from reference to frame pixels; any
    may be None (a deadline reject before decoding has none). Only sinks that ask for it
    (``Sink.wants_evidence``) receive it, and they render or write it on their own thread.
    """

    image: Any = None
    anomaly_map: Any = None
    pose_matrix: Any = None


@dataclass
class Decision:
    """The one answer to one frame, as published (``to_json``)."""

    frame_id: FrameId | None
    camera_id: str | None
    part_id: str | int | None
    verdict: str
    reason: str
    t_received_ns: int
    t_decided_ns: int
    deadline_ns: int
    model: str
    score: float | None = None
    threshold: float | None = None
    defects: list[dict[str, Any]] = field(default_factory=list)
    defects_more: int = 0
    detail: str = ""
    reply: bytes | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Not published: references to the frame and its map for the sinks that ask (outputs.py).
    evidence: Evidence | None = field(default=None, repr=False, compare=False)

    @property
    def latency_ms(self) -> float:
        return (self.t_decided_ns - self.t_received_ns) / 1e6

    @property
    def deadline_met(self) -> bool:
        return self.t_decided_ns <= self.deadline_ns

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "frame_id": self.frame_id,
            "camera_id": self.camera_id,
            "part_id": self.part_id,
            "verdict": self.verdict,
            "reason": self.reason,
            "score": _round(self.score),
            "threshold": _round(self.threshold),
            "defects": self.defects,
            "defects_more": self.defects_more,
            "t_received_ns": self.t_received_ns,
            "t_decided_ns": self.t_decided_ns,
            "deadline_ns": self.deadline_ns,
            "latency_ms": round(self.latency_ms, 3),
            "deadline_met": self.deadline_met,
            "model": self.model,
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 4)


def result_fields(result: Result, max_defects: int) -> dict[str, Any]:
    """The Decision fields that come from an Inspector Result (defects capped, the rest counted)."""
    defects = sorted(result.defects, key=lambda d: d.score, reverse=True)
    return {
        "verdict": result.verdict,
        "reason": result.reason,
        "score": result.score,
        "threshold": result.threshold,
        "defects": [d.to_dict() for d in defects[:max_defects]],
        "defects_more": max(0, len(defects) - max_defects),
        "detail": result.detail,
        "timings_ms": dict(result.timings_ms),
    }


# -- native protocol -------------------------------------------------------------------------
def parse_native(parts: Sequence[Any], t_received_ns: int, geometry: Geometry) -> Frame | BadFrame:
    """Check a native two-part message (JSON header, payload) against the model's geometry."""
    bad = BadFrame("", t_received_ns)
    if not parts:
        return _bad(bad, "empty message")
    header, why = _json_object(_view(parts[0]))
    if header is not None:
        _read_ids(header, bad)
    if len(parts) != 2:
        return _bad(bad, f"expected 2 message parts (header, payload), got {len(parts)}")
    if header is None:
        return _bad(bad, why)
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        return _bad(bad, f"header misses {', '.join(missing)}")
    if header["v"] != PROTOCOL_VERSION:
        return _bad(bad, f"protocol version {header['v']!r}, this daemon speaks {PROTOCOL_VERSION}")
    if bad.frame_id is None or bad.camera_id is None:
        return _bad(bad, "frame_id must be an int or a short string and camera_id a non-empty short string")
    for key in ("t_capture_ns", "deadline_ns"):
        if key in header and header[key] is not None and not _is_int(header[key]):
            return _bad(bad, f"{key} must be an integer (Unix ns), got {header[key]!r}")
    why = _check_image_fields(header, geometry)
    if why:
        return _bad(bad, why)
    payload = _view(parts[1])
    why = _check_payload(len(payload), header["encoding"], geometry)
    if why:
        return _bad(bad, why)
    return Frame(
        camera_id=bad.camera_id,
        frame_id=bad.frame_id,
        encoding=header["encoding"],
        payload=payload,
        t_received_ns=t_received_ns,
        deadline_ns=header.get("deadline_ns"),
        t_capture_ns=header.get("t_capture_ns"),
        part_id=bad.part_id,
    )


def _read_ids(header: dict[str, Any], bad: BadFrame) -> None:
    """Pick up whatever ids a header carries, so even a rejected frame can be named."""
    frame_id = header.get("frame_id")
    if _is_int(frame_id) or (isinstance(frame_id, str) and 0 < len(frame_id) <= MAX_ID_CHARS):
        bad.frame_id = frame_id
    camera_id = header.get("camera_id")
    if isinstance(camera_id, str) and 0 < len(camera_id) <= MAX_ID_CHARS:
        bad.camera_id = camera_id
    part_id = header.get("part_id")
    if _is_int(part_id) or (isinstance(part_id, str) and len(part_id) <= MAX_ID_CHARS):
        bad.part_id = part_id
    deadline = header.get("deadline_ns")
    if _is_int(deadline):
        bad.deadline_ns = deadline


def _check_image_fields(header: dict[str, Any], geometry: Geometry) -> str | None:
    width, height, channels = header["width"], header["height"], header["channels"]
    if not all(_is_int(x) and x > 0 for x in (width, height)) or channels not in (1, 3):
        return f"bad image size {width!r}x{height!r}x{channels!r} (channels must be 1 or 3)"
    if header["dtype"] not in DTYPES:
        return f"unknown dtype {header['dtype']!r}, expected one of {', '.join(DTYPES)}"
    if header["encoding"] not in ENCODINGS:
        return f"unknown encoding {header['encoding']!r}, expected one of {', '.join(ENCODINGS)}"
    return _check_geometry(height, width, channels, header["dtype"], geometry)


def _check_geometry(height: int, width: int, channels: int, dtype: str, geometry: Geometry) -> str | None:
    got = (height, width, channels, dtype)
    if got != (geometry.height, geometry.width, geometry.channels, geometry.dtype):
        kind = "mono" if channels == 1 else "colour"
        return f"frame is {width}x{height} {kind} {dtype}, model expects {geometry.describe()}"
    return None


def _check_payload(size: int, encoding: str, geometry: Geometry) -> str | None:
    if encoding == "raw":
        if size != geometry.nbytes:
            return f"payload is {size} bytes, header says {geometry.nbytes} (raw)"
    elif size == 0:
        return f"empty {encoding} payload"
    elif size > message_limit(geometry):
        return f"{encoding} payload of {size} bytes exceeds the limit {message_limit(geometry)}"
    return None


# -- imagezmq ---------------------------------------------------------------------------------
def parse_imagezmq(
    parts: Sequence[Any], t_received_ns: int, geometry: Geometry, next_id: Callable[[str], int]
) -> Frame | BadFrame:
    """Read an imagezmq message (``send_image``: raw array; ``send_jpg``: JPEG bytes).

    imagezmq carries no frame id: the camera id is the message name (``msg``, by
    convention the sender's name) and the frame id a per-camera counter from ``next_id``.
    """
    header, why = _json_object(_view(parts[0])) if parts else (None, "empty message")
    camera = IMAGEZMQ_CAMERA
    if header is not None and isinstance(header.get("msg"), str) and 0 < len(header["msg"]) <= MAX_ID_CHARS:
        camera = header["msg"]
    bad = BadFrame("", t_received_ns, camera_id=camera, frame_id=next_id(camera), source="imagezmq")
    if len(parts) != 2:
        return _bad(bad, f"expected 2 message parts (metadata, image), got {len(parts)}")
    if header is None:
        return _bad(bad, why)
    if "msg" not in header:
        return _bad(bad, "imagezmq metadata misses msg")
    payload = _view(parts[1])
    if "shape" in header or "dtype" in header:
        encoding = "raw"
        why = _check_imagezmq_array(header, geometry) or _check_payload(len(payload), "raw", geometry)
    else:
        encoding = "jpeg"
        why = _check_payload(len(payload), "jpeg", geometry)
    if why:
        return _bad(bad, why)
    assert bad.camera_id is not None and bad.frame_id is not None
    return Frame(bad.camera_id, bad.frame_id, encoding, payload, t_received_ns, source="imagezmq")


def _check_imagezmq_array(header: dict[str, Any], geometry: Geometry) -> str | None:
    shape, dtype = header.get("shape"), header.get("dtype")
    sizes_ok = isinstance(shape, list) and len(shape) in (2, 3) and all(_is_int(x) and x > 0 for x in shape)
    if not sizes_ok:
        return f"imagezmq shape must be [h, w] or [h, w, c], got {shape!r}"
    if dtype not in DTYPES:
        return f"unknown dtype {dtype!r}, expected one of {', '.join(DTYPES)}"
    channels = shape[2] if len(shape) == 3 else 1
    if channels not in (1, 3):
        return f"imagezmq image has {channels} channels, expected 1 or 3"
    return _check_geometry(shape[0], shape[1], channels, dtype, geometry)


# -- helpers -----------------------------------------------------------------------------------
def _view(part: Any) -> memoryview:
    """A zero-copy view of a message part (zmq.Frame, bytes or any buffer)."""
    buffer = getattr(part, "buffer", part)
    return memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer.cast("B")


def _json_object(data: memoryview) -> tuple[dict[str, Any] | None, str]:
    if len(data) > MAX_HEADER_BYTES:
        return None, f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}"
    try:
        header = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "header is not UTF-8 JSON"
    if not isinstance(header, dict):
        return None, "header is not a JSON object"
    return header, ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(bad: BadFrame, detail: str) -> BadFrame:
    bad.detail = detail[:200]
    return bad
