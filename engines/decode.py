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
            raise ImageError(f"{source}: raw payload of {buf.nbytes} bytes, expected {geometry.nbytes} ({geometry.describe()})")
        return np.frombuffer(buf, DTYPES[geometry.dtype]).reshape(geometry.shape)
    if encoding not in ENCODINGS:
        raise ImageError(f"{source}: unknown encoding {encoding!r}, expected one of {', '.join(ENCODINGS)}")
    if buf.nbytes > 2 * geometry.nbytes + 65536:
        raise ImageError(f"{source}: {encoding} payload of {buf.nbytes} bytes is larger than any valid frame")
    image = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{source}: corrupt {encoding} payload")
    return conform(normalise_layout(image, source), geometry, source)
