"""Turn image files and network payloads into numpy images, checking sizes before allocating."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engines.errors import ImageError
from engines.image_header import read_header
from engines.types import DTYPES, Geometry

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
ENCODINGS = ("raw", "png", "jpeg", "tiff")
METADATA_BYTES = 1 << 20  # room for an encoded image's metadata (EXIF, ICC profile, XMP) beyond its pixels


def read_image(path: Path) -> np.ndarray:
    """Read an image file as stored (8/16 bit, mono or BGR); ImageError names the file on failure.

    The file's header (``engines.image_header``) must declare a PNG, TIFF, BMP or JPEG image
    before it is decoded.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    header = read_header(data)
    if header is None:
        raise ImageError(f"{path}: not a readable PNG/TIFF/BMP/JPEG image (corrupt or truncated?)")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{path}: corrupt or truncated {header.format} ({header.width}x{header.height} declared)")
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


def encoded_limit(geometry: Geometry) -> int:
    """Largest acceptable encoded image for ``geometry``, in bytes (files, payloads and message parts).

    The pixels (PNG or TIFF of incompressible data come out slightly larger than raw) plus
    room for metadata real encoders add in front of or after them: EXIF with a thumbnail, an
    ICC profile over several APP2 segments, XMP.
    """
    return geometry.nbytes + geometry.nbytes // 8 + METADATA_BYTES


def decode_bytes(data: bytes | memoryview, encoding: str, geometry: Geometry, source: str = "payload") -> np.ndarray:
    """Decode a frame payload for a model of ``geometry``; raw payloads are viewed, not copied.

    Encoded payloads have the size they declare read first (``engines.image_header``, over the
    whole payload), so a wrong-size image or a decompression bomb is refused without decoding.
    """
    buf = memoryview(data).cast("B")
    if encoding == "raw":
        if buf.nbytes != geometry.nbytes:
            raise ImageError(
                f"{source}: raw payload of {buf.nbytes} bytes, expected {geometry.nbytes} ({geometry.describe()})"
            )
        return np.frombuffer(buf, DTYPES[geometry.dtype]).reshape(geometry.shape)
    if encoding not in ENCODINGS:
        raise ImageError(f"{source}: unknown encoding {encoding!r}, expected one of {', '.join(ENCODINGS)}")
    if buf.nbytes > encoded_limit(geometry):
        raise ImageError(f"{source}: {encoding} payload of {buf.nbytes} bytes is larger than any valid frame")
    header = read_header(buf)
    if header is None:
        raise ImageError(f"{source}: corrupt {encoding}: cannot read its image size (not a PNG, JPEG or TIFF image)")
    if (header.width, header.height) != (geometry.width, geometry.height):
        raise ImageError(
            f"{source}: {header.format} is {header.width}x{header.height}, model expects {geometry.describe()}"
        )
    image = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{source}: corrupt {encoding} payload")
    return conform(normalise_layout(image, source), geometry, source)
