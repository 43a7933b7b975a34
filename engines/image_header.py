"""The one image-header reader: what size a PNG, JPEG, TIFF or BMP declares, before any decoding.

Files and frames both go through it (``engines.decode``), so a small compressed payload
cannot make a decoder allocate a huge image and a wrong-size frame is refused undecoded.
It reads the whole encoded image, which is already in memory, because real encoders do not
put the size first: OpenCV and Pillow write a TIFF's index (IFD) after the pixel data, at
the end of the file, and a camera's JPEG may carry EXIF, an ICC profile split over several
APP2 segments and XMP (each segment up to 64 KiB) before its frame header. Walking the
structure costs microseconds however large the file is: only the markers are visited.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic);
# 0xC4 (DHT), 0xC8 (JPG extension) and 0xCC (DAC) share the range but are not frame headers.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 carry no length
_JPEG_SOS = 0xDA  # entropy-coded data follows: a frame header can no longer come
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257  # ImageWidth, ImageLength
_TIFF_INTS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8 (BigTIFF)


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image declares about itself."""

    format: str  # "png" | "jpeg" | "tiff" | "bmp"
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes | bytearray | memoryview) -> ImageHeader | None:
    """The format and size ``data`` (a whole encoded image) declares; None if it is no image we read.

    Never copies ``data`` and never raises on damaged input: a header that cannot be followed
    (truncated, offsets outside the data, a zero size) is None, like an unknown format.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    try:
        if buf[:8] == PNG_SIGNATURE:
            return _png(buf)
        if buf[:2] == b"\xff\xd8":
            return _jpeg(buf)
        if buf[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff(buf)
        if buf[:2] == b"BM":
            return _bmp(buf)
    except (struct.error, ValueError, IndexError):
        return None
    return None


def _sized(fmt: str, width: int, height: int) -> ImageHeader | None:
    return ImageHeader(fmt, width, height) if width > 0 and height > 0 else None


def _png(buf: memoryview) -> ImageHeader | None:
    # The IHDR chunk must come first: length (13), type, width, height.
    if buf[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", buf, 16)
    return _sized("png", width, height)


def _jpeg(buf: memoryview) -> ImageHeader | None:
    pos = 2
    while pos + 2 <= len(buf):
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == _JPEG_SOS or marker == 0xD9:  # scan data or end of image before any frame header
            return None
        (length,) = struct.unpack_from(">H", buf, pos + 2)
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", buf, pos + 5)  # after the sample precision byte
            return _sized("jpeg", width, height)  # height 0 (set later by a DNL marker) is refused
        pos += 2 + length
    return None


def _tiff(buf: memoryview) -> ImageHeader | None:
    order = "<" if buf[:2] == b"II" else ">"
    big = buf[2:4] in (b"+\x00", b"\x00+")
    if big:  # BigTIFF: 8-byte offsets, 8-byte entry counts, 20-byte entries
        if struct.unpack_from(order + "HH", buf, 4) != (8, 0):
            return None
        (ifd,) = struct.unpack_from(order + "Q", buf, 8)
        count_fmt, entry_size, value_at = "Q", 20, 12
    else:
        (ifd,) = struct.unpack_from(order + "I", buf, 4)
        count_fmt, entry_size, value_at = "H", 12, 8
    if ifd < 8:
        return None
    (count,) = struct.unpack_from(order + count_fmt, buf, ifd)
    first = ifd + struct.calcsize(count_fmt)
    if first + count * entry_size > len(buf):
        return None
    found: dict[int, int] = {}
    for i in range(count):
        entry = first + i * entry_size
        tag, kind = struct.unpack_from(order + "HH", buf, entry)
        if tag in (_TIFF_WIDTH, _TIFF_HEIGHT) and kind in _TIFF_INTS:
            (found[tag],) = struct.unpack_from(order + _TIFF_INTS[kind], buf, entry + value_at)
    if len(found) < 2:
        return None
    return _sized("tiff", found[_TIFF_WIDTH], found[_TIFF_HEIGHT])


def _bmp(buf: memoryview) -> ImageHeader | None:
    (dib,) = struct.unpack_from("<I", buf, 14)
    if dib == 12:  # BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = struct.unpack_from("<HH", buf, 18)
    elif dib >= 40:  # BITMAPINFOHEADER and later: signed, a negative height is a top-down bitmap
        width, height = struct.unpack_from("<ii", buf, 18)
    else:
        return None
    return _sized("bmp", width, abs(height))
