"""The one image-header reader (``engines.image_header``): sizes from real encodings, damaged input never raises.

The decoders built on it (files, payloads, daemon frames) are tested in test_decode.py.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from engines.decode import decode_bytes
from engines.errors import ImageError
from engines.image_header import ImageHeader, read_header
from engines.types import Geometry
from tests.encoders import CASES, HEIGHT, WIDTH, noise, opencv, tiff_index_offset


@pytest.mark.parametrize("name", sorted(CASES))
def test_header_reader_finds_the_size(name: str) -> None:
    """Format and size come from the whole encoded image (index at the end, 240 KB of APPn first)."""
    make, channels, dtype, _ = CASES[name]
    header = read_header(memoryview(make(noise(channels, dtype))))
    assert header == ImageHeader(name.split("-")[1], WIDTH, HEIGHT)


def test_bmp_and_bigtiff_headers() -> None:
    """BMP (bottom-up and top-down) and BigTIFF headers give their sizes."""
    bmp = opencv(noise(1, "uint8")[:100, :90], ".bmp")
    assert read_header(bmp) == ImageHeader("bmp", 90, 100)
    top_down = bytearray(bmp)
    top_down[22:26] = struct.pack("<i", -100)
    assert read_header(bytes(top_down)) == ImageHeader("bmp", 90, 100)
    # BigTIFF: header, 8-byte IFD offset, 8-byte entry count, 20-byte entries (width LONG, height LONG8).
    entries = struct.pack("<HHQQ", 256, 4, 1, 4024) + struct.pack("<HHQQ", 257, 16, 1, 3036)
    big = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2) + entries
    assert read_header(big) == ImageHeader("tiff", 4024, 3036)


@pytest.mark.parametrize(
    "damage",
    ["empty", "garbage", "tiff-cut-before-index", "tiff-index-outside", "jpeg-no-frame-header", "png-no-ihdr", "zero"],
)
def test_damaged_headers_are_none_and_refused_with_a_reason(damage: str) -> None:
    """Headers that cannot be followed give None, and the decoders say they cannot read the size."""
    tiff = opencv(noise(1, "uint8"), ".tiff")
    data = {
        "empty": b"",
        "garbage": np.random.default_rng(0).bytes(5000),
        "tiff-cut-before-index": tiff[: tiff_index_offset(tiff)],
        "tiff-index-outside": tiff[:4] + struct.pack("<I", len(tiff) + 10) + tiff[8:],
        "jpeg-no-frame-header": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(7) + b"\xff\xda\x00\x02" + bytes(100),
        "png-no-ihdr": b"\x89PNG\r\n\x1a\n" + bytes(40),
        "zero": opencv(np.zeros((4, 4), np.uint8), ".png")[:16] + bytes(8) + b"\x08\x00\x00\x00\x00",
    }[damage]
    assert read_header(data) is None
    with pytest.raises(ImageError, match="cannot read its image size"):
        decode_bytes(data, "tiff", Geometry(HEIGHT, WIDTH, 1, "uint8"), "cam")


def test_the_reader_never_raises_on_mutated_headers() -> None:
    """Random byte changes in the first 64 bytes and the index of real encodings give a header or None."""
    rng = np.random.default_rng(7)
    samples = [opencv(noise(1, "uint8")[:64, :80], ext) for ext in (".png", ".tiff", ".jpg", ".bmp")]
    for _ in range(400):
        data = bytearray(samples[int(rng.integers(len(samples)))])
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(min(64, len(data)))) if rng.random() < 0.7 else int(rng.integers(len(data)))
            data[at] = int(rng.integers(256))
        header = read_header(bytes(data))
        assert header is None or isinstance(header, ImageHeader)
