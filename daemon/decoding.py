"""Frame payload -> image array, checked against the model geometry before any allocation.

Raw payloads become a zero-copy read-only view of the received message buffer.
Compressed payloads first have the image size they declare read from their own header
(PNG IHDR, JPEG SOF, TIFF IFD), so a small file claiming a gigapixel image is refused
before a decoder allocates for it; then ``engines.decode.decode_bytes`` (the decoder
``inspectd predict`` uses) decodes and conforms them.
"""

from __future__ import annotations

import struct

import numpy as np

from daemon.protocol import Frame
from engines.decode import decode_bytes
from engines.errors import ImageError, InspectError
from engines.types import DTYPES, Geometry

HEAD_BYTES = 65536  # enough for any header we read dimensions from (JPEG EXIF comes first)


def decode_frame(frame: Frame, geometry: Geometry) -> np.ndarray:
    """The frame's image in the model's geometry; InspectError("bad_frame", why) otherwise."""
    if frame.encoding == "raw":
        # protocol.parse_* already checked the length, so this is a view, never a copy.
        return np.frombuffer(frame.payload, dtype=DTYPES[geometry.dtype]).reshape(geometry.shape)
    declared = declared_size(bytes(frame.payload[:HEAD_BYTES]), frame.encoding)
    if declared is None:
        raise InspectError("bad_frame", f"corrupt {frame.encoding}: cannot read its image size")
    if declared != (geometry.width, geometry.height):
        width, height = declared
        raise InspectError("bad_frame", f"{frame.encoding} is {width}x{height}, model expects {geometry.describe()}")
    try:
        return decode_bytes(frame.payload, frame.encoding, geometry, source=frame.encoding)
    except ImageError as exc:
        raise InspectError("bad_frame", str(exc)) from None


def declared_size(head: bytes, encoding: str) -> tuple[int, int] | None:
    """(width, height) a compressed image declares in its header, or None if unreadable."""
    try:
        if encoding == "png":
            return _png_size(head)
        if encoding == "jpeg":
            return _jpeg_size(head)
        if encoding == "tiff":
            return _tiff_size(head)
    except (struct.error, IndexError):
        return None
    return None


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def _tiff_size(head: bytes) -> tuple[int, int] | None:
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or struct.unpack(order + "H", head[2:4])[0] != 42:
        return None
    ifd = struct.unpack(order + "I", head[4:8])[0]
    count = struct.unpack(order + "H", head[ifd : ifd + 2])[0]
    found: dict[int, int] = {}
    for i in range(count):
        tag, kind, _n, value = struct.unpack(order + "HHI4s", head[ifd + 2 + 12 * i : ifd + 14 + 12 * i])
        if tag in (256, 257):
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack(order + fmt, value[: struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None
