"""The fit's per-pixel statistics, streamed a strip of rows at a time, equal the whole-frame computation bit for bit.

The reference implementations below are the whole-frame code the streamed one replaced (every
image normalised at full size, float64 sums over the frame, ``np.stack(...).std``); the streamed
statistics must give exactly their arrays, and use a bounded amount of memory while doing so.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from calibration import fit_pipeline as fp
from calibration import tolerance_fit as tol
from calibration.fit_pipeline import FitConfig
from engines import registration as reg
from engines.graphs import ALIGN, HALO, LEVELS, TemplateGraphSpec, build_template_graph
from engines.inspector import resident_inputs
from engines.tiling import TilePlan
from engines.types import Geometry


def whole_frame_statistics(training: fp.Training, indices, config: FitConfig) -> dict[str, np.ndarray]:
    """The statistics as computed before streaming: whole frames, full-size float64 sums, stacked pyramids."""
    geo = training.geometry
    full = (geo.height, geo.width)
    n = len(indices)
    trim = config.band_trim if config.band_trim is not None else int(n >= fp.TRIM_FROM)
    total = np.zeros((geo.channels, *full), np.float64)
    total_sq = np.zeros_like(total)
    lows = [np.full((geo.channels, *full), np.inf, np.float32) for _ in range(trim + 1)]
    highs = [np.full((geo.channels, *full), -np.inf, np.float32) for _ in range(trim + 1)]
    for i in indices:
        xn = fp.normalise(fp.planes(training.registered[i], training.unit), training.coefs[i], full, full)
        total += xn
        total_sq += np.square(xn, dtype=np.float64)
        fp._keep_extremes(lows, xn, np.minimum, np.maximum)
        fp._keep_extremes(highs, xn, np.maximum, np.minimum)
    for extreme in (*lows[:trim], *highs[:trim]):
        total -= extreme
        total_sq -= np.square(extreme, dtype=np.float64)
    n -= 2 * trim
    lo, hi = lows[trim], highs[trim]
    mu = (total / n).astype(np.float32)
    sigma = np.sqrt(np.maximum(total_sq / n - np.square(mu, dtype=np.float64), 0) * n / (n - 1)).astype(np.float32)
    k = 2 * config.band_dilate + 1
    kernel = np.ones((k, k), np.uint8)
    lo = np.stack([cv2.erode(p, kernel) for p in lo])
    hi = np.stack([cv2.dilate(p, kernel) for p in hi])
    lo = np.minimum(lo, mu - config.band_sigma * sigma) - config.band_tol
    hi = np.maximum(hi, mu + config.band_sigma * sigma) + config.band_tol
    stats = {
        "mu": mu,
        "lo": lo,
        "hi": hi,
        "weight": training.weight,
        "fine_gain": np.ones(tol.block_shape(geo), np.float32),
        "fine_ring_gain": np.ones(tol.block_shape(geo), np.float32),
    }
    noise = max(float(np.median(sigma[:, training.weight > 0])), 0.5)
    for level in LEVELS:
        s = np.stack([training.pyramids[i][level] for i in indices]).std(axis=0, ddof=1)
        s = np.maximum(s, max(noise / (3 * 2**level), fp.COARSE_FLOOR))
        s = np.stack([cv2.dilate(p, np.ones((3, 3), np.uint8)) for p in s])
        inside = fp.block_means(training.weight[None].astype(np.float32))[level] > 0.999
        stats[f"inv_sigma{level}"] = np.where(inside, 1.0 / s, 0.0).astype(np.float32)
    return {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in stats.items()}


def whole_frame_pyramid(frame: np.ndarray, coef: np.ndarray, unit: float, weight: np.ndarray) -> dict:
    full = weight.shape
    return fp.block_means(fp.normalise(fp.planes(frame, unit), coef, full, full) * weight)


def random_coef(rng: np.random.Generator) -> np.ndarray:
    """A lighting model with every term in play: gain 0.9-1.1 with slopes and curvature, an offset with slopes."""
    gain = [rng.uniform(0.9, 1.1), *rng.uniform(-0.05, 0.05, 2), *rng.uniform(-0.03, 0.03, 3)]
    return np.array([*gain, rng.uniform(-6, 6), *rng.uniform(-2, 2, 2)], np.float32)


def training_set(n: int, height: int, width: int, channels: int = 1, dtype: str = "uint8") -> fp.Training:
    """Registered noisy frames, each with its own lighting model, a region with holes, and their pyramids."""
    rng = np.random.default_rng(height * 7 + width + channels)
    top = 255 if dtype == "uint8" else 65535
    unit = 1.0 if dtype == "uint8" else 1 / 257
    base = rng.uniform(0.2, 0.8, (height, width, channels)) * top
    frames = np.clip(base + rng.normal(0, 0.02 * top, (n, height, width, channels)), 0, top).astype(dtype)
    if channels == 1:
        frames = frames[..., 0]
    weight = np.ones((height, width), np.uint8)
    weight[:5], weight[:, -3:], weight[height // 3 : height // 2, width // 4 : width // 3] = 0, 0, 0
    coefs = np.stack([random_coef(rng) for _ in range(n)])
    pyramids = [whole_frame_pyramid(f, c, unit, weight) for f, c in zip(frames, coefs, strict=True)]
    poses = np.tile(np.eye(2, 3), (n, 1, 1))
    return fp.Training(Geometry(height, width, channels, dtype), unit, weight, frames, coefs, poses, pyramids)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize(
    ("n", "height", "width", "channels", "dtype", "trim"),
    [
        (fp.TRIM_FROM, 3 * fp.STRIP + 37, 101, 1, "uint8", None),  # trimmed, a short last strip
        (9, 2 * fp.STRIP, 64, 1, "uint8", None),  # untrimmed, whole strips
        (10, fp.STRIP - 5, 70, 3, "uint8", 1),  # colour, one strip only
        (8, fp.STRIP + 1, 45, 1, "uint16", 0),  # 16 bit, a one-row last strip
    ],
)
def test_streamed_statistics_equal_the_whole_frame_ones_bit_for_bit(n, height, width, channels, dtype, trim):
    """Every reference array, for every fold's subset of images too, is the whole-frame computation's exactly."""
    training = training_set(n, height, width, channels, dtype)
    config = FitConfig(band_trim=trim)
    for indices in (range(n), [i for i in range(n) if i % 3 != 1]):
        if trim is None and len(indices) < fp.TRIM_FROM <= n:
            continue  # the default trim differs between the two subsets; each is covered elsewhere
        assert_same(fp.statistics(training, indices, config), whole_frame_statistics(training, indices, config))


@pytest.mark.parametrize(
    ("height", "width", "channels", "dtype"), [(2 * fp.STRIP + 45, 77, 1, "uint8"), (90, 64, 3, "uint16")]
)
def test_lit_block_means_equal_the_whole_frame_pyramid(height, width, channels, dtype):
    """register_all's pyramid, a strip at a time, equals block_means of the whole lit frame times the region."""
    training = training_set(2, height, width, channels, dtype)
    frame, coef = training.registered[1], training.coefs[1]
    got = fp.lit_block_means(frame, coef, training.unit, training.weight)
    want = whole_frame_pyramid(frame, coef, training.unit, training.weight)
    assert set(got) == set(want) == set(LEVELS)
    for level in LEVELS:
        np.testing.assert_array_equal(got[level], want[level])


def test_spread_equals_numpy_std_of_the_stack():
    """The coarse spread without a stack is np.stack(...).std(axis=0, ddof=1) exactly."""
    rng = np.random.default_rng(3)
    for n in (2, 5, 30):
        arrays = [(rng.normal(2, 3, (2, 33, 47)) * rng.uniform(0.1, 50)).astype(np.float32) for _ in range(n)]
        np.testing.assert_array_equal(fp._spread(arrays), np.stack(arrays).std(axis=0, ddof=1))


def test_statistics_allocate_a_few_frames_not_a_frame_per_term():
    """Streaming bounds the memory: at most 8 full-size float32 planes allocated at once (whole frames: about 18).

    The frame is 16 strips tall, so the strips in flight (``parallel.FIT_WORKERS``) are a small part of it, as at
    5120 px (80).
    """
    height, width = 16 * fp.STRIP, 256
    training = training_set(fp.TRIM_FROM, height, width)
    config = FitConfig()
    plane = height * width * 4
    peaks = {}
    for name, fn in (("streamed", fp.statistics), ("whole frames", whole_frame_statistics)):
        tracemalloc.start()
        fn(training, range(fp.TRIM_FROM), config)
        peaks[name] = tracemalloc.get_traced_memory()[1] / plane
        tracemalloc.stop()
    print({k: round(v, 1) for k, v in peaks.items()})
    assert peaks["streamed"] <= 8 < peaks["whole frames"]


def test_photometric_terms_reach_the_statistics():
    """The lighting model is applied (so the comparisons above exercise it): lit and unlit statistics differ."""
    training = training_set(9, 70, 40)
    flat = fp.Training(**{**training.__dict__, "coefs": np.tile(np.eye(1, reg.PHOTO_TERMS, dtype=np.float32), (9, 1))})
    lit, unlit = fp.statistics(training, range(9), FitConfig()), fp.statistics(flat, range(9), FitConfig())
    assert not np.array_equal(lit["mu"], unlit["mu"])


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read resident memory")
def test_released_pages_leave_the_resident_set_and_keep_their_data(tmp_path):
    """Released frames of a disk-backed stack no longer count as resident; reading them gives what was written."""
    frames = np.lib.format.open_memmap(tmp_path / "registered.npy", "w+", np.uint8, (4, 1024, 8192))
    for i in range(len(frames)):
        frames[i] = i + 1
    touched = _rss_file_mb()
    fp.release_pages(frames)
    released = _rss_file_mb()
    assert touched - released >= 24, (touched, released)  # 32 MB written, at most a little still mapped
    assert [int(frames[i, 512:520, 100:900].min()) for i in range(4)] == [1, 2, 3, 4]
    fp.release_pages(np.zeros(3))  # plain arrays: nothing to do


def test_the_fit_graph_reads_fp16_statistics_and_scores_as_with_fp32(tmp_path):
    """The fit's components graph takes the statistics in FP16 (as the fit holds them): the same held-out maps as
    the graph that takes them in FP32, from half the resident memory."""
    training = training_set(fp.TRIM_FROM, 300, 260)
    stats = fp.statistics(training, range(fp.TRIM_FROM), FitConfig())
    blocks, resident = {}, {}
    for precision in ("fp32", "fp16"):
        spec = TemplateGraphSpec(1, 128, components=True, blob_scale=1.0, line_scale=1.0, resident_precision=precision)
        path = tmp_path / f"{precision}.onnx"
        onnx.save(build_template_graph(spec), path)
        with fp.block_scorer(path, stats, training.geometry, 128, 4) as score:
            blocks[precision] = np.concatenate([score(training, [i]) for i in range(3)])
        plan = TilePlan(300, 260, 128, HALO, ALIGN)
        resident[precision] = sum(
            a.nbytes for a in resident_inputs(plan, stats, np.dtype(precision.replace("fp", "float"))).values()
        )
    np.testing.assert_array_equal(blocks["fp16"], blocks["fp32"])
    assert blocks["fp32"].max() > 0  # the maps are not all zero: the comparison means something
    assert resident["fp16"] * 2 == resident["fp32"]


@pytest.mark.parametrize(("channels", "height", "width"), [(1, 64, 5120), (3, 32, 96), (1, 2, 2), (2, 16, 2464)])
def test_mean_2x2_equals_numpys_block_mean_bit_for_bit(channels, height, width):
    """The pyramid's 2x2 mean adds in numpy's order: the same float32 values to the last bit, at any magnitude."""
    rng = np.random.default_rng(channels * height + width)
    planes = rng.normal(size=(channels, height, width)) * 10.0 ** rng.uniform(-3, 4, (channels, height, width))
    planes = planes.astype(np.float32)
    want = planes.reshape(channels, height // 2, 2, width // 2, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(fp._mean_2x2(planes), want)


def test_scoring_only_the_tiles_under_windows_gives_their_blocks_exactly(tmp_path):
    """The self-test scores a probed copy only where its probes are: the tiles under the windows, each window's
    blocks as the whole map has them (one straddles a tile boundary), every other tile's blocks left 0."""
    training = training_set(fp.TRIM_FROM, 300, 260)
    stats = fp.statistics(training, range(fp.TRIM_FROM), FitConfig())
    path = tmp_path / "graph.onnx"
    onnx.save(build_template_graph(TemplateGraphSpec(1, 128, components=True, blob_scale=1.0, line_scale=1.0)), path)
    per_core = 128 // fp.BLOCK
    windows = [(2, 4, 3, 5), (per_core - 1, per_core + 1, 1, 2)]  # in tile 0; across tiles 0 and 2 (3 columns)
    plan = TilePlan(300, 260, 128, HALO, ALIGN)
    assert fp.tiles_under(plan, windows) == [0, plan.cols]
    with fp.block_scorer(path, stats, training.geometry, 128, 4) as score:
        whole = score(training, [1])[0]
        some = score(training, [1], windows)[0]
    assert whole.max() > 0
    for r0, r1, c0, c1 in windows:
        np.testing.assert_array_equal(some[:, r0:r1, c0:c1], whole[:, r0:r1, c0:c1])
    assert not some[:, :, per_core:].any()  # tile 1 (right of tile 0) was not scored
