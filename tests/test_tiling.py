"""Tile plans: the tiled anomaly map equals the untiled one, and the plan's geometry is exact."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from engines.graphs import ALIGN, HALO, TemplateGraphSpec, build_template_graph
from engines.inspector import Inspector, Prepared, gain_tiles, resident_inputs
from engines.learned_graph import ARCHITECTURES, LearnedGraphSpec, build_learned_graph, weight_shapes
from engines.onnxruntime_backend import OnnxRuntimeBackend
from engines.registration import Pose, tile_photometric
from engines.tiling import TilePlan, block_max
from tests.helpers import lighting_truth, random_photo, random_reference

# Tiled and untiled maps run the same FP32 arithmetic on the same pixels; the only difference is
# where the per-tile lighting field is anchored (float32 rounding of a0 + ax * x0), so they agree
# to float32 round-off: 1e-4 of scores of a few units (relative to the score where it is larger).
ATOL = 1e-4
SCALES = (1.7, 2.3, 0.9, 0.6)  # fine, coarse, blob, line scales: not 1, so the scaling is part of what is compared


def graph_backend(
    tmp: Path, plan: TilePlan, channels: int, input_dtype: str, shapes: bool = False
) -> OnnxRuntimeBackend:
    """An ONNX Runtime backend on the FP32 template graph sized for ``plan`` (with the shape scores if asked)."""
    extra = dict(gains=3, blob_scale=SCALES[2], line_scale=SCALES[3]) if shapes else {}
    spec = TemplateGraphSpec(
        channels,
        plan.core,
        halo=plan.halo,
        input_dtype=input_dtype,
        fine_scale=SCALES[0],
        coarse_scale=SCALES[1],
        **extra,
    )
    path = tmp / f"graph_c{channels}_{input_dtype}_{plan.core}_{shapes}.onnx"
    if not path.exists():
        onnx.save(build_template_graph(spec), path)
    return OnnxRuntimeBackend(path, threads=2)


def learned_backend(tmp: Path, plan: TilePlan, network: str) -> OnnxRuntimeBackend:
    """An ONNX Runtime backend on the FP32 learned graph of ``network`` sized for ``plan``, fixed random weights
    (He-scaled, biases too, so every layer's activations stay in range and the map varies)."""
    rng = np.random.default_rng(5)
    weights = {
        k: rng.normal(0, np.sqrt(2 / np.prod(shape[1:] or (16,))), shape).astype(np.float32)
        for k, shape in weight_shapes(1, network).items()
    }
    path = tmp / f"learned_{network}_{plan.core}.onnx"
    if not path.exists():
        onnx.save(build_learned_graph(LearnedGraphSpec(1, plan.core, halo=plan.halo), weights, network), path)
    return OnnxRuntimeBackend(path, threads=2)


def synthetic_frame(
    rng: np.random.Generator, ref: dict[str, np.ndarray], coef: np.ndarray, input_dtype: str
) -> np.ndarray:
    """A frame near the reference mean under the lighting ``coef``, with noise and a few blobs: [H, W(, C)]."""
    mu = ref["mu"].astype(np.float32)
    c, h, w = mu.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    gain, offset = lighting_truth(coef, xs, ys, h, w)
    frame = gain * mu + offset + rng.normal(0, 6, mu.shape).astype(np.float32)
    for _ in range(4):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        frame[:, y : y + rng.integers(3, 30), x : x + rng.integers(3, 30)] += rng.choice([-30.0, 30.0])
    frame = np.clip(frame, 0, 255)
    frame = frame[0] if c == 1 else frame.transpose(1, 2, 0)
    if input_dtype == "uint8":
        return np.rint(frame).astype(np.uint8)
    return np.ascontiguousarray(frame, np.float32)


def run_map(
    backend: OnnxRuntimeBackend,
    plan: TilePlan,
    image: np.ndarray,
    coef: np.ndarray,
    gain_map: np.ndarray,
    batch: int,
    lock: threading.Lock | None = None,
) -> np.ndarray:
    """Inspector.infer's loop: pad, per-tile lighting, extract batches, run, stitch into [H, W]."""
    padded = plan.pad(image)
    photo = tile_photometric(coef, [plan.origin(i) for i in range(plan.n_tiles)], plan.halo, (plan.height, plan.width))
    gain = gain_tiles(plan, gain_map.astype(np.float32))
    amap = np.full((plan.height, plan.width), np.nan, np.float32)
    for tiles in plan.batches(batch):
        feeds = {
            "image": plan.extract(padded, tiles),
            "photo": photo[tiles.start : tiles.stop],
            "fine_gain": gain[tiles.start : tiles.stop],
        }
        if lock is None:
            out = backend.infer(feeds, tiles)
        else:
            with lock:
                out = backend.infer(feeds, tiles)
        plan.stitch(out["anomaly"], tiles, amap)
    return amap


def untiled_map(
    tmp: Path,
    ref: dict[str, np.ndarray],
    image: np.ndarray,
    coef: np.ndarray,
    channels: int,
    input_dtype: str,
    shapes: bool = False,
) -> np.ndarray:
    """The reference answer: one tile covering the whole image."""
    h, w = image.shape[:2]
    plan = TilePlan.covering(h, w, HALO, ALIGN)
    assert plan.n_tiles == 1
    backend = graph_backend(tmp, plan, channels, input_dtype, shapes)
    with backend:
        backend.activate(resident_inputs(plan, ref))
        return run_map(backend, plan, image, coef, ref["fine_gain"], 1)


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("height", "width", "core", "shapes"),
    [(97, 203, 64, False), (250, 130, 96, False), (250, 230, 64, True), (97, 203, 64, True)],
)
def test_tiled_map_equals_untiled_map(tmp_path, height, width, core, shapes, channels, input_dtype):
    """The anomaly map computed tile by tile equals the single-tile map on awkward image sizes (with the shape
    scores too, which read beyond the core)."""
    rng = np.random.default_rng(height * 7 + width + channels)
    ref = random_reference(rng, height, width, channels)
    if shapes:  # one gain map per score, different ones
        ref["fine_gain"] = np.stack([ref["fine_gain"], ref["fine_gain"][::-1], ref["fine_gain"][:, ::-1]])
    coef = random_photo(rng, height, width)
    image = synthetic_frame(rng, ref, coef, input_dtype)

    plan = TilePlan(height, width, core, HALO, ALIGN)
    assert plan.n_tiles > 2, "the tiled plan must really cut the image"
    backend = graph_backend(tmp_path, plan, channels, input_dtype, shapes)
    with backend:
        backend.activate(resident_inputs(plan, ref))
        tiled = run_map(backend, plan, image, coef, ref["fine_gain"], batch=3)
    whole = untiled_map(tmp_path, ref, image, coef, channels, input_dtype, shapes)

    assert np.isfinite(tiled).all(), "every pixel must be written by exactly one tile core"
    assert tiled.max() > 1.0, "the frame's blobs must light the map up, or the comparison proves little"
    err = np.abs(tiled - whole) / np.maximum(np.abs(whole), 1)
    print(f"{height}x{width} C={channels} {input_dtype}: max |tiled - untiled| / max(|untiled|, 1) = {err.max():.2e}")
    assert err.max() <= ATOL


@pytest.mark.parametrize("network", ARCHITECTURES)
@pytest.mark.parametrize(("height", "width", "core"), [(97, 203, 64), (250, 130, 96)])
def test_learned_tiled_map_equals_untiled_map(tmp_path, height, width, core, network):
    """Every learned network's map, tile by tile, equals its single-tile map: valid convolutions on the core plus
    the receptive radius, and for the two-scale network 2x2 blocks that sit on the same frame grid in every tile."""
    rng = np.random.default_rng(height + width)
    ref = random_reference(rng, height, width, 1)
    coef = random_photo(rng, height, width)
    image = synthetic_frame(rng, ref, coef, "uint8")
    maps = []
    for plan in (TilePlan(height, width, core, HALO, ALIGN), TilePlan.covering(height, width, HALO, ALIGN)):
        with learned_backend(tmp_path, plan, network) as backend:
            backend.activate(resident_inputs(plan, ref))
            maps.append(run_map(backend, plan, image, coef, ref["fine_gain"], batch=3))
    tiled, whole = maps
    assert np.isfinite(tiled).all(), "every pixel must be written by exactly one tile core"
    assert whole.std() > 0.1, "the map must vary, or the comparison proves little"
    err = np.abs(tiled - whole) / np.maximum(np.abs(whole), 1)
    print(f"{network} {height}x{width}: max |tiled - untiled| / max(|untiled|, 1) = {err.max():.2e}")
    assert err.max() <= ATOL


def test_inspector_infer_uses_the_tiling_exactly(tmp_path):
    """Inspector.infer (batching, resident slices, stitching) gives the untiled map on a stub bundle."""
    rng = np.random.default_rng(11)
    height, width, core = 150, 230, 64
    ref = random_reference(rng, height, width, 1)
    ref.update(
        reg_coarse=np.zeros((8, 8), np.float32),
        reg_fine=np.zeros((8, 8), np.float32),
        reg_coarse_mask=np.ones((8, 8), np.uint8),
        reg_fine_mask=np.ones((8, 8), np.uint8),
    )
    coef = random_photo(rng, height, width)
    image = synthetic_frame(rng, ref, coef, "uint8")
    plan = TilePlan(height, width, core, HALO, ALIGN)
    bundle = SimpleNamespace(
        geometry=SimpleNamespace(height=height, width=width, channels=1, dtype="uint8"),
        bundle_id="stub",
        calibration={"threshold": 1.0},
        manifest={
            "tiling": {"core": core, "halo": HALO, "align": ALIGN},
            "registration": {"factors": [1, 1], "max_shift_px": 5, "max_rotation_deg": 1, "min_correlation": 0.5},
        },
        reference=lambda: ref,
    )
    inspector = Inspector(bundle, graph_backend(tmp_path, plan, 1, "uint8"), batch=4)
    photo = tile_photometric(coef, [plan.origin(i) for i in range(plan.n_tiles)], plan.halo, (plan.height, plan.width))
    with inspector:
        gain = gain_tiles(plan, ref["fine_gain"].astype(np.float32))
        amap = inspector.infer(Prepared(plan.pad(image), photo, gain, Pose(np.eye(2, 3), 1.0)))
    whole = untiled_map(tmp_path, ref, image, coef, 1, "uint8")
    assert amap.shape == (height, width) and amap.dtype == np.float32
    assert np.abs(amap - whole).max() <= ATOL


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("height", "width", "core", "halo"), [(97, 203, 32, 16), (250, 130, 64, 0), (40, 40, 64, 8)])
def test_pad_extract_stitch_round_trip(height, width, core, halo, channels):
    """Tile cores extracted from the padded image and stitched back reproduce the image exactly."""
    rng = np.random.default_rng(height + width)
    shape = (height, width) if channels == 1 else (height, width, channels)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    plan = TilePlan(height, width, core, halo, 8)
    padded = plan.pad(image)
    bottom, right = plan.rows * core - height + halo, plan.cols * core - width + halo
    pads = ((halo, bottom), (halo, right)) + (((0, 0),) if channels > 1 else ())
    np.testing.assert_array_equal(padded, np.pad(image, pads, mode="edge"))
    tiles = plan.extract(padded, range(plan.n_tiles))
    assert tiles.shape == (plan.n_tiles, channels, plan.tile, plan.tile)
    for c in range(channels):
        out = np.zeros((height, width), np.uint8)
        plan.stitch(tiles[:, c, halo : halo + core, halo : halo + core], range(plan.n_tiles), out)
        np.testing.assert_array_equal(out, image if channels == 1 else image[:, :, c])
    for index in range(plan.n_tiles):  # a tile's window is its extracted copy, without the copy
        window = plan.window(padded, index)
        assert np.shares_memory(window, padded)
        np.testing.assert_array_equal(window, tiles[index : index + 1])
    # the image written into a padded buffer's interior, its border then replicated in place: the same pixels
    written = np.zeros(plan.padded_shape() + shape[2:], np.uint8)
    plan.interior(written)[...] = image
    np.testing.assert_array_equal(plan.replicate(written), padded)


def test_stitch_writes_every_pixel_from_its_own_tile():
    """Each output pixel is written once, by the tile whose core contains it ([n, 1, core, core] input)."""
    plan = TilePlan(70, 100, 32, 32, 32)
    cores = np.broadcast_to(np.arange(plan.n_tiles, dtype=np.float32)[:, None, None, None], (plan.n_tiles, 1, 32, 32))
    out = np.full((70, 100), -1, np.float32)
    for tiles in plan.batches(2):
        plan.stitch(cores[tiles.start : tiles.stop], tiles, out)
    ys, xs = np.mgrid[0:70, 0:100]
    np.testing.assert_array_equal(out, (ys // 32) * plan.cols + xs // 32)


def test_extract_reuses_and_validates_the_buffer():
    """extract fills a caller's buffer in place and refuses one of the wrong shape or dtype."""
    plan = TilePlan(50, 60, 32, 32, 32)
    padded = plan.pad(np.arange(50 * 60, dtype=np.float32).reshape(50, 60))
    buf = np.empty((4, 1, plan.tile, plan.tile), np.float32)
    got = plan.extract(padded, range(1, 3), buf)
    assert np.shares_memory(got, buf) and got.shape[0] == 2
    y, x = plan.origin(2)
    np.testing.assert_array_equal(got[1, 0], padded[y : y + plan.tile, x : x + plan.tile])
    with pytest.raises(ValueError):
        plan.extract(padded, range(0, 4), np.empty((4, 1, plan.tile, plan.tile), np.uint8))
    with pytest.raises(ValueError):
        plan.extract(padded, range(0, 4), np.empty((2, 1, plan.tile, plan.tile), np.float32))


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 6, 7, 100])
def test_batches_cover_every_tile_exactly_once(batch):
    """batches(n) yields consecutive ranges of at most n tiles covering 0..n_tiles once each."""
    plan = TilePlan(97, 203, 32, 32, 32)
    ranges = list(plan.batches(batch))
    flat = [i for r in ranges for i in r]
    assert flat == list(range(plan.n_tiles))
    assert all(1 <= len(r) <= batch and r.step == 1 for r in ranges)


def test_batches_reject_non_positive_sizes():
    """A non-positive batch size is an error, never an empty (map-less) iteration."""
    plan = TilePlan(97, 203, 32, 32, 32)
    for batch in (0, -1):
        with pytest.raises(ValueError):
            list(plan.batches(batch))


def test_covering_plan_is_one_aligned_tile():
    """TilePlan.covering gives one tile whose aligned core covers both sides."""
    for h, w in ((97, 203), (250, 130), (32, 32), (1, 1)):
        plan = TilePlan.covering(h, w, HALO, ALIGN)
        assert plan.n_tiles == 1 and plan.core >= max(h, w) and plan.core % ALIGN == 0 and plan.core - max(h, w) < ALIGN


def test_plan_is_immutable_and_pure():
    """A plan cannot be changed after creation, and padding never modifies the caller's image."""
    plan = TilePlan(97, 203, 64, 64, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.core = 32  # type: ignore[misc]
    assert plan == TilePlan(97, 203, 64, 64, 32) and hash(plan) == hash(TilePlan(97, 203, 64, 64, 32))
    image = np.random.default_rng(0).integers(0, 256, (97, 203), dtype=np.uint8)
    before = image.copy()
    plan.pad(image)
    np.testing.assert_array_equal(image, before)


def test_one_plan_shared_by_threads_matches_sequential_use(tmp_path):
    """One plan used from several threads on different frames gives the same maps as sequential use."""
    rng = np.random.default_rng(5)
    height, width = 130, 170
    ref = random_reference(rng, height, width, 1)
    plan = TilePlan(height, width, 64, HALO, ALIGN)
    frames = []
    for _ in range(6):
        coef = random_photo(rng, height, width)
        frames.append((synthetic_frame(rng, ref, coef, "uint8"), coef))
    backend = graph_backend(tmp_path, plan, 1, "uint8")
    lock = threading.Lock()  # the backend has one owner; the plan itself is shared freely
    with backend:
        backend.activate(resident_inputs(plan, ref))
        sequential = [run_map(backend, plan, image, coef, ref["fine_gain"], 2) for image, coef in frames]
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(lambda f: run_map(backend, plan, f[0], f[1], ref["fine_gain"], 2, lock), frames))
    for a, b in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(sequential[0], s) for s in sequential[1:]), "frames must differ"


@pytest.mark.parametrize(
    ("height", "width", "core", "halo", "align"),
    [
        (0, 10, 32, 0, 1),
        (10, 0, 32, 0, 1),
        (10, 10, 0, 0, 1),
        (10, 10, 32, -1, 1),
        (10, 10, 48, 64, 32),
        (10, 10, 64, 48, 32),
    ],
)
def test_invalid_plans_are_rejected(height, width, core, halo, align):
    """Empty images, empty cores, negative or misaligned halos and misaligned cores raise ValueError."""
    with pytest.raises(ValueError):
        TilePlan(height, width, core, halo, align)


@pytest.mark.parametrize("align", [0, -32])
def test_non_positive_align_is_rejected(align):
    """An alignment below 1 is rejected with ValueError like every other bad plan parameter."""
    with pytest.raises(ValueError):
        TilePlan(64, 64, 64, 64, align)


def test_pad_rejects_an_image_of_another_size():
    """pad() refuses an image whose size differs from the plan's."""
    plan = TilePlan(97, 203, 64, 64, 32)
    with pytest.raises(ValueError, match="203x97"):
        plan.pad(np.zeros((203, 97), np.uint8))


@pytest.mark.parametrize("shape, cell", [((64, 48), 8), ((3, 32, 16), 8), ((2, 2, 12, 18), 3), ((5, 5), 1)])
def test_block_max_equals_the_reshaped_max(shape, cell):
    rng = np.random.default_rng(sum(shape) + cell)
    planes = rng.normal(size=shape).astype(np.float32)
    planes.flat[5] = np.nan  # numpy's max and np.maximum both propagate a NaN in its block
    *lead, h, w = shape
    expected = planes.reshape(*lead, h // cell, cell, w // cell, cell).max(axis=(-3, -1))
    np.testing.assert_array_equal(block_max(planes, cell), expected)
    assert block_max(planes, cell).dtype == planes.dtype


def test_block_max_refuses_partial_blocks():
    with pytest.raises(ValueError, match="whole number of 8 px blocks"):
        block_max(np.zeros((16, 20), np.float32), 8)
