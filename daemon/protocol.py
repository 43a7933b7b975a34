"""Wire formats: frames in (native and imagezmq), decisions out. Pure functions, no sockets.

Parsing never trusts a size the sender declared: every header is checked against the
model's geometry and the message limits before anything is allocated, every field's type
and range is checked (``validation.py``), and a message that cannot be read becomes a
``BadFrame`` (never an exception) so the scheduler can answer it with a ``bad_frame``
reject. ``parse_native`` and ``parse_imagezmq`` are total: whatever the bytes, they return.
docs/protocol.md is the user-facing description.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from daemon import validation as check
from daemon.validation import DEFAULT_MAX_AHEAD_NS, MAX_ID_CHARS, is_int, short
from engines.decode import encoded_limit
from engines.types import DTYPES, Geometry, Result
from engines.version import VERSION

if TYPE_CHECKING:
    from daemon.shm import FrameSlots, SlotFrame

log = structlog.get_logger("inspectd.protocol")

PROTOCOL_VERSION = 1
ENCODINGS = ("raw", "png", "jpeg", "tiff")
MAX_HEADER_BYTES = 16 * 1024
HEADER_FIELDS = ("v", "frame_id", "camera_id", "width", "height", "channels", "dtype", "encoding")
IMAGEZMQ_CAMERA = "imagezmq"  # camera id for imagezmq messages whose name cannot be read

FrameId = int | str


def message_limit(geometry: Geometry) -> int:
    """Largest acceptable message part in bytes: the largest encoded image (``engines.decode.encoded_limit``)."""
    return encoded_limit(geometry)


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
    dropped: tuple[str, ...] = ()  # informational header fields dropped as unreadable (t_capture_ns)
    slot: SlotFrame | None = None  # the shared-memory slot the payload lies in (shm.py), else None


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
    dropped: tuple[str, ...] = ()
    internal: bool = False  # the checks themselves failed (a bug, logged with its traceback)


@dataclass(frozen=True, eq=False)
class Evidence:
    """What an operator or an auditor wants to see of a decided frame; references, not copies.

    ``image`` is the decoded frame (frame pixels), ``anomaly_map`` the float32 map in the
    reference frame and ``pose_matrix`` the 2x3 affine from reference to frame pixels; any
    may be None (a deadline reject before decoding has none). Only sinks that ask for it
    (``Sink.wants_evidence``) receive it, and they render or write it on their own thread.
    The one copy: a frame in a grabber's shared-memory slot (``slot``), which the grabber
    reuses once the decision is out (``kept``).
    """

    image: Any = None
    anomaly_map: Any = None
    pose_matrix: Any = None
    slot: SlotFrame | None = None  # ``image`` lies in the grabber's shared memory, reused after the decision

    def kept(self) -> Evidence:
        """Evidence the sinks may keep after the decision is out: an image in a shared-memory slot is copied
        (and dropped if the grabber has already written into the slot again)."""
        if self.slot is None or self.image is None:
            return self
        image = np.array(self.image)
        if self.slot.changed():
            image = None
        return Evidence(image, self.anomaly_map, self.pose_matrix)


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
            "version": VERSION,  # the inspectd that decided; an added field, so `v` stays 1
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    def to_json(self, **extra: Any) -> bytes:
        """The published JSON; ``extra`` fields are added by the output that sends it (the PUB's ``seq``)."""
        return json.dumps({**self.to_dict(), **extra}, separators=(",", ":")).encode()


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
def parse_native(
    parts: Sequence[Any],
    t_received_ns: int,
    geometry: Geometry,
    max_ahead_ns: int = DEFAULT_MAX_AHEAD_NS,
    slots: FrameSlots | None = None,
) -> Frame | BadFrame:
    """Check a native message (JSON header, payload): every field, then the model's geometry.

    ``max_ahead_ns`` is how far past receipt a deadline may lie (``deadline_max_s``). A header that
    names a ``slot`` comes alone: its raw frame lies in that slot of ``slots`` (shm.py).
    """
    bad = BadFrame("", t_received_ns)
    try:
        return _parse_native(parts, bad, geometry, max_ahead_ns, slots)
    except Exception as exc:  # a gap in the checks: the frame is still answered if it named itself
        return _internal(bad, exc)


def _parse_native(
    parts: Sequence[Any], bad: BadFrame, geometry: Geometry, max_ahead_ns: int, slots: FrameSlots | None
) -> Frame | BadFrame:
    if not parts:
        return _bad(bad, "empty message")
    header, why = check.json_object(_view(parts[0]), MAX_HEADER_BYTES)
    deadline_why = ""
    if header is not None:
        deadline_why = _read_ids(header, bad, max_ahead_ns)
    in_slot = header is not None and "slot" in header
    if len(parts) != 2 - in_slot:
        expected = "1 message part (a header naming a slot)" if in_slot else "2 message parts (header, payload)"
        return _bad(bad, f"expected {expected}, got {len(parts)}")
    if header is None:
        return _bad(bad, why)
    why = _check_header(header, bad) or deadline_why or _check_image_fields(header, geometry)
    if why:
        return _bad(bad, why)
    slot = None
    if in_slot:
        payload, slot, why = _slot_payload(header, geometry, slots)
    else:
        payload = _view(parts[1])
        why = _check_payload(len(payload), header["encoding"], geometry)
    if why or payload is None:
        return _bad(bad, why)
    t_capture, dropped = check.capture_time(header.get("t_capture_ns"))
    assert bad.camera_id is not None and bad.frame_id is not None  # _check_header made sure
    return Frame(
        camera_id=bad.camera_id,
        frame_id=bad.frame_id,
        encoding=header["encoding"],
        payload=payload,
        t_received_ns=bad.t_received_ns,
        deadline_ns=bad.deadline_ns,
        t_capture_ns=t_capture,
        part_id=bad.part_id,
        dropped=("t_capture_ns",) if dropped else (),
        slot=slot,
    )


def _slot_payload(
    header: dict[str, Any], geometry: Geometry, slots: FrameSlots | None
) -> tuple[memoryview | None, SlotFrame | None, str]:
    """The raw frame a header places in a shared-memory slot (shm.py)."""
    if slots is None:
        return None, None, "slot: this daemon hands out no frame slots (frames_shm is not set)"
    if header["encoding"] != "raw":
        return None, None, f"a frame in a slot is raw, got encoding {short(header['encoding'])}"
    return slots.take(header["slot"], header.get("slot_seq"), geometry.nbytes)


def _read_ids(header: dict[str, Any], bad: BadFrame, max_ahead_ns: int) -> str:
    """Pick up whatever ids a header carries, so even a rejected frame can be named; returns why the deadline is bad."""
    bad.frame_id = check.frame_id(header.get("frame_id"))
    bad.camera_id = check.camera_id(header.get("camera_id"))
    bad.part_id, _ = check.part_id(header.get("part_id"))
    bad.deadline_ns, why = check.deadline(header.get("deadline_ns"), bad.t_received_ns, max_ahead_ns)
    return why


def _check_header(header: dict[str, Any], bad: BadFrame) -> str | None:
    """Presence, version and ids; None when all are fine."""
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        return f"header misses {', '.join(missing)}"
    version = header["v"]
    if not is_int(version) or version != PROTOCOL_VERSION:
        return f"protocol version {short(version)}, this daemon speaks {PROTOCOL_VERSION}"
    if bad.frame_id is None:
        return f"frame_id must be a 64-bit integer or a text of 1-{MAX_ID_CHARS} characters"
    if bad.camera_id is None:
        return f"camera_id must be a text of 1-{MAX_ID_CHARS} characters, got {short(header['camera_id'])}"
    _, why = check.part_id(header.get("part_id"))
    return why or None


def _check_image_fields(header: dict[str, Any], geometry: Geometry) -> str | None:
    width, height, channels = header["width"], header["height"], header["channels"]
    if not all(is_int(x) and x > 0 for x in (width, height)) or not (is_int(channels) and channels in (1, 3)):
        return f"bad image size {short(width)}x{short(height)}x{short(channels)} (channels must be 1 or 3)"
    dtype, encoding = header["dtype"], header["encoding"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"unknown dtype {short(dtype)}, expected one of {', '.join(DTYPES)}"
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        return f"unknown encoding {short(encoding)}, expected one of {', '.join(ENCODINGS)}"
    return _check_geometry(height, width, channels, dtype, geometry)


def _check_geometry(height: int, width: int, channels: int, dtype: str, geometry: Geometry) -> str | None:
    got = (height, width, channels, dtype)
    if got != (geometry.height, geometry.width, geometry.channels, geometry.dtype):
        kind = "mono" if channels == 1 else "colour"
        return f"frame is {short(width)}x{short(height)} {kind} {dtype}, model expects {geometry.describe()}"
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
    A name that is not valid text counts under ``IMAGEZMQ_CAMERA`` and the frame is a
    ``bad_frame`` (every imagezmq message is answered: its REQ sender waits for the reply).
    """
    header, why = check.json_object(_view(parts[0]), MAX_HEADER_BYTES) if parts else (None, "empty message")
    name = header.get("msg") if header is not None else None
    camera = check.camera_id(name) or IMAGEZMQ_CAMERA
    bad = BadFrame("", t_received_ns, camera_id=camera, frame_id=next_id(camera), source="imagezmq")
    try:
        return _parse_imagezmq(parts, header, why, bad, geometry)
    except Exception as exc:  # a gap in the checks: the sender still gets its reply
        return _internal(bad, exc)


def _parse_imagezmq(
    parts: Sequence[Any], header: dict[str, Any] | None, why: str, bad: BadFrame, geometry: Geometry
) -> Frame | BadFrame:
    if len(parts) != 2:
        return _bad(bad, f"expected 2 message parts (metadata, image), got {len(parts)}")
    if header is None:
        return _bad(bad, why)
    if "msg" not in header:
        return _bad(bad, "imagezmq metadata misses msg")
    if check.camera_id(header["msg"]) is None:
        return _bad(bad, f"imagezmq msg must be a text of 1-{MAX_ID_CHARS} characters, got {short(header['msg'])}")
    payload = _view(parts[1])
    if "shape" in header or "dtype" in header:
        encoding = "raw"
        why = _check_imagezmq_array(header, geometry) or _check_payload(len(payload), "raw", geometry) or ""
    else:
        encoding = "jpeg"
        why = _check_payload(len(payload), "jpeg", geometry) or ""
    if why:
        return _bad(bad, why)
    assert bad.camera_id is not None and bad.frame_id is not None
    return Frame(bad.camera_id, bad.frame_id, encoding, payload, bad.t_received_ns, source="imagezmq")


def _check_imagezmq_array(header: dict[str, Any], geometry: Geometry) -> str | None:
    shape, dtype = header.get("shape"), header.get("dtype")
    sizes_ok = isinstance(shape, list) and len(shape) in (2, 3) and all(is_int(x) and x > 0 for x in shape)
    if not sizes_ok:
        return f"imagezmq shape must be [h, w] or [h, w, c], got {short(shape)}"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"unknown dtype {short(dtype)}, expected one of {', '.join(DTYPES)}"
    channels = shape[2] if len(shape) == 3 else 1
    if channels not in (1, 3):
        return f"imagezmq image has {short(channels)} channels, expected 1 or 3"
    return _check_geometry(shape[0], shape[1], channels, dtype, geometry)


# -- helpers -----------------------------------------------------------------------------------
def _view(part: Any) -> memoryview:
    """A zero-copy view of a message part (zmq.Frame, bytes or any buffer)."""
    buffer = getattr(part, "buffer", part)
    return memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer.cast("B")


def _bad(bad: BadFrame, detail: str) -> BadFrame:
    bad.detail = detail[:200]
    return bad


def _internal(bad: BadFrame, exc: Exception) -> BadFrame:
    log.exception("parse_failed", frame_id=bad.frame_id, source=bad.source)
    bad.internal = True
    return _bad(bad, f"unreadable header ({type(exc).__name__})")
