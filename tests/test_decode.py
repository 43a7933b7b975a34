"""Decoding: files and payloads become images of the model's layout, or errors naming the source."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.decoding import decode_frame
from daemon.protocol import Frame, message_limit
from engines import decode
from engines.decode import conform, decode_bytes, normalise_layout, read_image
from engines.errors import ImageError, InspectError
from engines.types import Geometry
from tests.encoders import (
    CASES,
    FAR,
    HEIGHT,
    WIDTH,
    jpeg_frame_header_offset,
    noise,
    pillow_jpeg_with_metadata,
    tiff_index_offset,
)

MONO = Geometry(48, 64, 1, "uint8")
COLOUR = Geometry(48, 64, 3, "uint8")
MONO16 = Geometry(48, 64, 1, "uint16")


def sample(geometry: Geometry, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 256 if geometry.dtype == "uint8" else 65536
    return rng.integers(0, top, geometry.shape).astype(geometry.dtype)


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("geometry", [MONO, COLOUR, MONO16, Geometry(48, 64, 3, "uint16")])
def test_read_image_round_trips_png_layouts(tmp_path, geometry):
    """8- and 16-bit, mono and colour PNGs read back with their exact pixels and layout."""
    image = sample(geometry)
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), image)
    got = read_image(path)
    assert got.dtype == image.dtype and got.shape == geometry.shape
    np.testing.assert_array_equal(got, image)


def test_read_image_drops_alpha(tmp_path):
    """A BGRA image is read as its three colour channels."""
    bgra = sample(Geometry(48, 64, 3, "uint8"))
    bgra = np.dstack([bgra, np.full(bgra.shape[:2], 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    got = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(got, bgra[:, :, :3])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path, damage):
    """Truncated, corrupt, empty or missing files raise ImageError whose message names the file."""
    path = tmp_path / f"bad_{damage}.png"
    data = png_bytes(sample(MONO))
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_float_images_are_refused(tmp_path):
    """Pixel types other than uint8/uint16 (e.g. a float32 TIFF) are refused with the type named."""
    path = tmp_path / "f.tiff"
    cv2.imwrite(str(path), np.ones((8, 8), np.float32))
    with pytest.raises(ImageError, match="float32"):
        read_image(path)


def test_normalise_layout_squeezes_single_channel_and_rejects_two():
    """[H, W, 1] becomes [H, W]; a two-channel image is refused."""
    assert normalise_layout(np.zeros((4, 5, 1), np.uint8), "x").shape == (4, 5)
    with pytest.raises(ImageError, match="2 channels"):
        normalise_layout(np.zeros((4, 5, 2), np.uint8), "x")


@pytest.mark.parametrize("geometry", [MONO, COLOUR, MONO16])
def test_decode_raw_payloads_are_viewed_not_copied(geometry):
    """A raw payload of the right size is reshaped in place into the model's layout."""
    image = sample(geometry)
    payload = bytearray(image.tobytes())
    got = decode_bytes(payload, "raw", geometry)
    np.testing.assert_array_equal(got, image)
    assert np.shares_memory(got, np.frombuffer(payload, np.uint8))


def test_decode_raw_size_mismatch():
    """A raw payload one byte short is refused with both sizes in the message."""
    with pytest.raises(ImageError, match=f"{MONO.nbytes - 1} bytes, expected {MONO.nbytes}"):
        decode_bytes(bytes(MONO.nbytes - 1), "raw", MONO, "cam1")


def test_decode_unknown_encoding():
    """An encoding outside raw/png/jpeg/tiff is refused by name."""
    with pytest.raises(ImageError, match="'webp'"):
        decode_bytes(png_bytes(sample(MONO)), "webp", MONO)


def test_decode_oversize_payload_is_refused_before_decoding(monkeypatch):
    """A compressed payload larger than any valid frame is refused without calling the decoder."""
    calls = []
    monkeypatch.setattr(decode.cv2, "imdecode", lambda *a: calls.append(a))
    with pytest.raises(ImageError, match="larger than any valid frame"):
        decode_bytes(bytes(decode.encoded_limit(MONO) + 1), "png", MONO)
    assert calls == []


def test_decode_corrupt_png():
    """A corrupt PNG payload raises ImageError naming the source."""
    data = png_bytes(sample(MONO))
    with pytest.raises(ImageError, match="cam7: corrupt png"):
        decode_bytes(data[:40], "png", MONO, "cam7")


@pytest.mark.parametrize(("geometry", "ext"), [(MONO, ".png"), (COLOUR, ".png"), (MONO16, ".png"), (MONO, ".tiff")])
def test_decode_encoded_payloads(geometry, ext):
    """PNG and TIFF payloads decode to the exact pixels in the model's layout."""
    image = sample(geometry)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    np.testing.assert_array_equal(decode_bytes(buf.tobytes(), ext[1:], geometry), image)


def test_decode_colour_payload_for_a_mono_model_is_converted():
    """A colour PNG sent to a mono model is converted to grey like cv2.cvtColor(BGR2GRAY)."""
    colour = sample(COLOUR)
    got = decode_bytes(png_bytes(colour), "png", MONO)
    np.testing.assert_array_equal(got, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))


def test_decode_refuses_oversized_dimensions_before_decoding(monkeypatch):
    """A small PNG declaring far more pixels than the geometry (decompression bomb) is refused undecoded."""
    bomb = png_bytes(np.zeros((MONO.height * 16, MONO.width * 16), np.uint8))
    assert len(bomb) < decode.encoded_limit(MONO), "the payload passes the byte-size check"
    calls = []
    real = decode.cv2.imdecode
    monkeypatch.setattr(decode.cv2, "imdecode", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(ImageError):
        decode_bytes(bomb, "png", MONO)
    assert calls == [], "the payload was decompressed before its dimensions were checked"


def test_conform_converts_colour_for_mono_models():
    """conform turns a BGR frame into grey for a mono model and passes a fitting frame unchanged."""
    colour = sample(COLOUR)
    np.testing.assert_array_equal(conform(colour, MONO, "f"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    mono = sample(MONO)
    assert conform(mono, MONO, "f") is mono


@pytest.mark.parametrize(
    ("image", "geometry", "fragment"),
    [
        (np.zeros((48, 65), np.uint8), MONO, "image 65x48, expected 64x48 mono uint8"),
        (np.zeros((48, 64), np.uint16), MONO, "pixel type uint16, expected uint8"),
        (np.zeros((48, 64), np.uint8), COLOUR, "image 64x48, expected 64x48 colour uint8"),
        (np.zeros((40, 64, 3), np.uint8), COLOUR, "image 64x40x3, expected 64x48 colour uint8"),
    ],
)
def test_conform_rejects_wrong_size_type_or_layout(image, geometry, fragment):
    """conform raises ImageError naming the source and the mismatch."""
    with pytest.raises(ImageError) as info:
        conform(image, geometry, "frame.png")
    assert str(info.value) == f"frame.png: {fragment}"


def test_read_image_accepts_str_paths(tmp_path):
    """read_image takes a str as well as a Path."""
    path = Path(tmp_path) / "s.png"
    cv2.imwrite(str(path), sample(MONO))
    assert read_image(str(path)).shape == MONO.shape


# -- files and frames as real encoders write them (tests/encoders.py) ----------------------------
@pytest.fixture(scope="module", params=sorted(CASES))
def encoded(request: pytest.FixtureRequest) -> tuple[str, bytes, np.ndarray, Geometry, bool]:
    make, channels, dtype, lossless = CASES[request.param]
    image = noise(channels, dtype)
    return request.param, make(image), image, Geometry(HEIGHT, WIDTH, channels, dtype), lossless


def test_encoded_cases_have_the_awkward_layouts(encoded) -> None:
    """The size really is far from the start: TIFF index past 64 KiB, JPEG frame header past 64 KiB."""
    name, data, *_ = encoded
    if "tiff" in name:
        assert tiff_index_offset(data) > FAR, name
    if "jpeg" in name:
        assert jpeg_frame_header_offset(data) > FAR, name


def test_payload_and_frame_decoders_read_real_encodings(encoded) -> None:
    """decode_bytes (predict, imagezmq) and decode_frame (the daemon) return the pixels in the model's layout."""
    name, data, image, geometry, lossless = encoded
    encoding = name.split("-")[1]
    got = decode_bytes(data, encoding, geometry, "cam")
    frame = Frame("cam", 1, encoding, memoryview(data), 0)
    np.testing.assert_array_equal(decode_frame(frame, geometry), got)
    assert got.shape == geometry.shape and got.dtype == image.dtype
    if lossless:
        np.testing.assert_array_equal(got, image)
    else:
        assert abs(float(got.mean()) - float(image.mean())) < 2


def test_file_reader_reads_real_encodings(encoded, tmp_path: Path) -> None:
    """read_image reads the same bytes from a file."""
    name, data, image, geometry, lossless = encoded
    path = tmp_path / f"{name}.{name.split('-')[1]}"
    path.write_bytes(data)
    got = read_image(path)
    assert got.shape == geometry.shape and got.dtype == image.dtype
    if lossless:
        np.testing.assert_array_equal(got, image)


def test_a_wrong_size_encoding_is_refused_before_decoding(encoded, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame of another size is refused from its header alone, naming both sizes."""
    name, data, _, geometry, _ = encoded
    monkeypatch.setattr(decode.cv2, "imdecode", lambda *a: pytest.fail("decoded before the size was checked"))
    other = Geometry(HEIGHT, WIDTH + 1, geometry.channels, geometry.dtype)
    with pytest.raises(InspectError, match=f"is {WIDTH}x{HEIGHT}, model expects {WIDTH + 1}x{HEIGHT}"):
        decode_frame(Frame("cam", 1, name.split("-")[1], memoryview(data), 0), other)


def test_metadata_larger_than_a_small_frame_is_accepted() -> None:
    """240 KB of EXIF/ICC/XMP on a 160x128 frame is within the payload limits (and the frame decodes)."""
    geometry = Geometry(128, 160, 1, "uint8")
    image = np.random.default_rng(1).integers(0, 256, geometry.shape).astype(np.uint8)
    data = pillow_jpeg_with_metadata(image, quality=95)
    assert len(data) > 200_000
    assert len(data) <= message_limit(geometry)
    assert decode_bytes(data, "jpeg", geometry).shape == geometry.shape
