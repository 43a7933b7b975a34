"""Turn image files and network payloads into numpy images, checking sizes before allocating."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engines.errors import ImageError
from engines.types import DTYPES, Geometry

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
ENCODINGS = ("raw", "png", "jpeg", "tiff")


def read_image(path: Path) -> np.ndarray:
    """Read an image file as stored (8/16 bit, mono or BGR); ImageError names the file on failure."""
    path = Path(path)
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable PNG/TIFF/BMP/JPEG image (corrupt or truncated?)")
    return normalise_layout(image, str(path))


def normalise_layout(image: np.ndarray, source: str) -> np.ndarray:
    """Mono as [H, W]; colour as [H, W, 3] BGR; alpha dropped; only uint8/uint16 accepted."""
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{source}: pixel type {image.dtype}, expected uint8 or uint16")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 3 and image.shape[2] != 3:
        raise ImageError(f"{source}: {image.shape[2]} channels, expected 1 or 3")
    return image


def conform(image: np.ndarray, geometry: Geometry, source: str) -> np.ndarray:
    """Check ``image`` against the model geometry; colour frames for a mono model are converted."""
    if geometry.channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    problem = geometry.check(image)
    if problem:
        raise ImageError(f"{source}: {problem}")
    return image


def decode_bytes(data: bytes | memoryview, encoding: str, geometry: Geometry, source: str = "payload") -> np.ndarray:
    """Decode a frame payload for a model of ``geometry``; raw payloads are viewed, not copied."""
    buf = memoryview(data).cast("B")
    if encoding == "raw":
        if buf.nbytes != geometry.nbytes:
            raise ImageError(
                f"{source}: raw payload of {buf.nbytes} bytes, expected {geometry.nbytes} ({geometry.describe()})"
            )
        return np.frombuffer(buf, DTYPES[geometry.dtype]).reshape(geometry.shape)
    if encoding not in ENCODINGS:
        raise ImageError(f"{source}: unknown encoding {encoding!r}, expected one of {', '.join(ENCODINGS)}")
    if buf.nbytes > 2 * geometry.nbytes + 65536:
        raise ImageError(f"{source}: {encoding} payload of {buf.nbytes} bytes is larger than any valid frame")
    declared = declared_size(bytes(buf[:65536]))
    if declared is None:
        raise ImageError(f"{source}: not a {encoding} image (no size in its header)")
    if declared != (geometry.width, geometry.height):
        raise ImageError(f"{source}: {encoding} declares {declared[0]}x{declared[1]}, expected {geometry.describe()}")
    image = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{source}: corrupt {encoding} payload")
    return conform(normalise_layout(image, source), geometry, source)


def declared_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) an encoded PNG, JPEG or TIFF declares in its header, read before any decoding.

    Checking it first means a small compressed payload cannot make us allocate a huge image.
    """
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(head)
    return None


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 9 < len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(head[pos + 7 : pos + 9], "big"), int.from_bytes(head[pos + 5 : pos + 7], "big")
        pos += 2 + length
    return None


def _tiff_size(head: bytes) -> tuple[int, int] | None:
    order = "little" if head[:2] == b"II" else "big"
    ifd = int.from_bytes(head[4:8], order)
    if ifd + 2 > len(head):
        return None
    count = int.from_bytes(head[ifd : ifd + 2], order)
    size: dict[int, int] = {}
    for i in range(count):
        entry = head[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        if len(entry) < 12:
            return None
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            size[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (size[256], size[257]) if len(size) == 2 else None
