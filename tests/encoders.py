"""Images encoded as OpenCV and Pillow really write them, for the decoder and header-reader tests.

Real encoders do not put the size first: both write a TIFF's index block (IFD) after the
pixels, at the end of the file, and a camera's JPEG can carry more than 64 KiB of EXIF, ICC
profile (split over several APP2 segments) and XMP before its frame header. ``CASES`` are
such payloads of a non-square image; ``tiff_index_offset`` and ``jpeg_frame_header_offset``
let a test check that the layout really is the awkward one.
"""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

HEIGHT, WIDTH = 384, 512  # non-square, and large enough that an index block at the end lies past 64 KiB
FAR = 65536


def noise(channels: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Incompressible pixels, so no encoder can squeeze the image data below 64 KiB."""
    top = 256 if dtype == "uint8" else 65536
    shape = (HEIGHT, WIDTH) if channels == 1 else (HEIGHT, WIDTH, 3)
    return np.random.default_rng(seed).integers(0, top, shape).astype(dtype)


def pillow(image: np.ndarray, fmt: str, **options: object) -> bytes:
    """``image`` (BGR order for colour, like OpenCV) encoded by Pillow."""
    rgb = image[..., ::-1] if image.ndim == 3 else image
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, fmt, **options)
    return out.getvalue()


def opencv(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def big_metadata() -> dict[str, bytes]:
    """EXIF (60 KB), an ICC profile of 150 KB (three APP2 segments) and 30 KB of XMP."""
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00" + bytes(60_000)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * 30_000 + b"</x:xmpmeta>"
    return {"exif": exif, "icc_profile": bytes(150_000), "xmp": xmp}


def pillow_jpeg_with_metadata(image: np.ndarray, quality: int = 90) -> bytes:
    """A JPEG written by Pillow with ``big_metadata`` before its frame header."""
    return pillow(image, "JPEG", quality=quality, **big_metadata())


def opencv_jpeg_with_metadata(image: np.ndarray) -> bytes:
    """A JPEG with 40 KB of EXIF and 30 KB of XMP written by OpenCV itself (``imencodeWithMetadata``)."""
    if not hasattr(cv2, "imencodeWithMetadata"):
        pytest.skip("this OpenCV cannot write JPEG metadata")
    exif = b"II*\x00\x08\x00\x00\x00\x00\x00" + bytes(40_000)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * 30_000 + b"</x:xmpmeta>"
    types = [cv2.IMAGE_METADATA_EXIF, cv2.IMAGE_METADATA_XMP]
    ok, buf = cv2.imencodeWithMetadata(".jpg", image, types, [np.frombuffer(m, np.uint8) for m in (exif, xmp)])
    assert ok
    return buf.tobytes()


# name -> (make payload, channels, dtype, lossless)
CASES = {
    "opencv-tiff-mono8": (lambda img: opencv(img, ".tiff"), 1, "uint8", True),
    "opencv-tiff-mono16": (lambda img: opencv(img, ".tiff"), 1, "uint16", True),
    "opencv-tiff-colour": (lambda img: opencv(img, ".tiff"), 3, "uint8", True),
    "pillow-tiff-lzw-mono8": (lambda img: pillow(img, "TIFF", compression="tiff_lzw"), 1, "uint8", True),
    "pillow-tiff-lzw-mono16": (lambda img: pillow(img, "TIFF", compression="tiff_lzw"), 1, "uint16", True),
    "pillow-tiff-lzw-colour": (lambda img: pillow(img, "TIFF", compression="tiff_lzw"), 3, "uint8", True),
    "pillow-jpeg-exif-icc-xmp": (lambda img: pillow_jpeg_with_metadata(img), 1, "uint8", False),
    "pillow-jpeg-colour-exif-icc-xmp": (lambda img: pillow_jpeg_with_metadata(img), 3, "uint8", False),
    "opencv-jpeg-exif-xmp": (opencv_jpeg_with_metadata, 1, "uint8", False),
    "opencv-png-mono16": (lambda img: opencv(img, ".png"), 1, "uint16", True),
}


def tiff_index_offset(data: bytes) -> int:
    order = "<" if data[:2] == b"II" else ">"
    return struct.unpack(order + "I", data[4:8])[0]


def jpeg_frame_header_offset(data: bytes) -> int:
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return pos
