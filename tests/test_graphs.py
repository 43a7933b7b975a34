"""The template anomaly graph: its arithmetic against numpy, its coarse path, FP16 accuracy and its I/O."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from engines.graphs import (
    BLOB_RADIUS,
    FINE_GAIN_LEVEL,
    HALO,
    LEVELS,
    LINE_CELL,
    LINE_FILL,
    LINE_TAPS,
    TemplateGraphSpec,
    build_template_graph,
    line_segments,
)
from engines.onnxruntime_backend import OnnxRuntimeBackend
from engines.registration import PHOTO_TERMS
from tests.helpers import render_part

CORE = 64
TILE = CORE + 2 * HALO


def run_graph(tmp: Path, spec: TemplateGraphSpec, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Build ``spec``, run it on ONNX Runtime with every input fed (resident ones as a resident range)."""
    path = (
        tmp / f"g_{spec.precision}_{spec.components}_{spec.channels}_{spec.input_dtype}_{spec.gains}_{spec.core}.onnx"
    )
    onnx.save(build_template_graph(spec), path)
    resident = {k: v for k, v in feeds.items() if k not in ("image", "photo")}
    with OnnxRuntimeBackend(path, threads=2) as backend:
        backend.activate({k: v.astype(backend.inputs[k].dtype) for k, v in resident.items()})
        out = backend.infer({"image": feeds["image"], "photo": feeds["photo"]}, range(len(feeds["image"])))
    return out["anomaly"]


def tile_inputs(
    mu: np.ndarray,
    half_band: np.ndarray,
    weight: np.ndarray,
    inv: float | np.ndarray,
    image: np.ndarray,
    photo: np.ndarray,
    gains: int = 1,
) -> dict[str, np.ndarray]:
    """Graph feeds for tiles: mu/half_band [N, C, T, T], weight [N, 1, T, T], image [N, C, T, T], photo [N, 9]."""
    n, c, tile = *mu.shape[:2], mu.shape[-1]
    feeds = {"image": image, "photo": photo.astype(np.float32)}
    stats = {"mean": mu, "low": mu - half_band, "high": mu + half_band, "weight": weight}
    feeds.update({k: v.astype(np.float16) for k, v in stats.items()})
    for level in LEVELS:
        side = tile >> level
        value = inv if np.isscalar(inv) else inv[level]
        feeds[f"coarse{level}"] = np.broadcast_to(np.asarray(value, np.float16), (n, c, side, side)).copy()
    feeds["fine_gain"] = np.ones((n, gains, tile >> FINE_GAIN_LEVEL, tile >> FINE_GAIN_LEVEL), np.float16)
    return feeds


def numpy_fields(photo: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Gain and offset fields [N, 1, T, T] of the graph's per-tile lighting model."""
    u = np.arange(tile, dtype=np.float32)[None, :]
    v = np.arange(tile, dtype=np.float32)[:, None]
    p = photo.astype(np.float32)[:, :, None, None]
    a = p[:, 0] + p[:, 1] * u + p[:, 2] * v + p[:, 3] * u * u + p[:, 4] * v * v + p[:, 5] * u * v
    b = p[:, 6] + p[:, 7] * u + p[:, 8] * v
    return a[:, None], b[:, None]


def numpy_fine(feeds: dict[str, np.ndarray], channels: int, core: int = CORE) -> np.ndarray:
    """Band excess of the lighting-corrected tile, max over channels, times the weight, on the core."""
    return numpy_fine_tile(feeds)[:, :, HALO : HALO + core, HALO : HALO + core]


def numpy_fine_tile(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The fine score (band excess times the weight) over the whole tile."""
    a, b = numpy_fields(feeds["photo"], feeds["image"].shape[-1])
    xn = (feeds["image"].astype(np.float32) - b) / a
    lo, hi, w = (feeds[k].astype(np.float32) for k in ("low", "high", "weight"))
    return np.maximum(np.maximum(xn - hi, lo - xn), 0).max(axis=1, keepdims=True) * w


def numpy_shapes(feeds: dict[str, np.ndarray], core: int = CORE) -> tuple[np.ndarray, np.ndarray]:
    """Blob and line scores [N, 1, core, core] in numpy: disc erosion; the best run of LINE_FILL cells along a line."""
    fine = numpy_fine_tile(feeds)[:, 0]
    r = BLOB_RADIUS
    disc = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    disc[0, 0] = disc[0, -1] = disc[-1, 0] = disc[-1, -1] = 0
    blob = np.stack([cv2.erode(f, disc) for f in fine])[:, None, HALO : HALO + core, HALO : HALO + core]
    n, t = fine.shape[0], fine.shape[-1]
    cells = fine.reshape(n, t // LINE_CELL, LINE_CELL, t // LINE_CELL, LINE_CELL).max(axis=(2, 4))
    cells = np.stack([cv2.dilate(c, np.ones((3, 3), np.uint8)) for c in cells])
    mc, m = HALO // LINE_CELL, core // LINE_CELL
    best = np.zeros((n, m, m), np.float32)
    for starts, taps in line_segments():
        assert len(starts) == LINE_TAPS - LINE_FILL + 1 and len(taps) == LINE_FILL
        for ay, ax in starts:  # the run of LINE_FILL cells from (c + start): its minimum, the best run kept
            run = [cells[:, mc + ay + dy : mc + ay + dy + m, mc + ax + dx : mc + ax + dx + m] for dy, dx in taps]
            best = np.maximum(best, np.min(run, axis=0))
    best = np.minimum(best, cells[:, mc : mc + m, mc : mc + m])
    line = np.repeat(np.repeat(best, LINE_CELL, axis=1), LINE_CELL, axis=2)[:, None]
    return blob, line


def numpy_coarse(feeds: dict[str, np.ndarray], channels: int) -> np.ndarray:
    """|3x3 neighbourhood mean of 2^l block means of the weighted residual| * inv_sigma, max over levels."""
    a, b = numpy_fields(feeds["photo"], TILE)
    xn = (feeds["image"].astype(np.float32) - b) / a
    resid = (xn - feeds["mean"].astype(np.float32)) * feeds["weight"].astype(np.float32)
    n = resid.shape[0]
    best = np.zeros((n, 1, CORE, CORE), np.float32)
    pooled = resid.astype(np.float64)
    for level in range(1, max(LEVELS) + 1):
        s = pooled.shape[-1] // 2
        pooled = pooled.reshape(n, channels, s, 2, s, 2).mean(axis=(3, 5))
        if level not in LEVELS:
            continue
        hood = np.stack([[cv2.blur(p, (3, 3), borderType=cv2.BORDER_REPLICATE) for p in t] for t in pooled])
        z = (np.abs(hood) * feeds[f"coarse{level}"].astype(np.float64)).max(axis=1, keepdims=True)
        full = np.repeat(np.repeat(z, 2**level, axis=2), 2**level, axis=3)
        best = np.maximum(best, full[:, :, HALO : HALO + CORE, HALO : HALO + CORE])
    return best.astype(np.float32)


def realistic_tiles(rng: np.random.Generator, n: int, channels: int) -> dict[str, np.ndarray]:
    """Tiles cut from the synthetic part: band from edges and noise, lighting drift, a dot and a stain."""
    part = render_part(512)
    mus, bands, images, photos = [], [], [], []
    edges = cv2.morphologyEx(part, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    for _ in range(n):
        y, x = rng.integers(0, 512 - TILE, 2)
        mu = np.repeat(part[None, y : y + TILE, x : x + TILE], channels, axis=0)
        band = 6.0 + 0.5 * np.repeat(edges[None, y : y + TILE, x : x + TILE], channels, axis=0)
        curve = rng.uniform(-2e-7, 2e-7, 3)  # per px^2: up to 2 % of gain across a tile
        photo = np.array([rng.uniform(0.95, 1.05), 1e-4, -1e-4, *curve, rng.uniform(-5, 5), 0.01, -0.01], np.float32)
        a, b = numpy_fields(photo[None], TILE)
        img = a[0] * mu + b[0] + rng.normal(0, 2, mu.shape)
        cy, cx = rng.integers(HALO, HALO + CORE - 40, 2)
        img[:, cy : cy + 6, cx : cx + 6] -= 50
        yy, xx = np.mgrid[0:TILE, 0:TILE]
        img += 15 * np.exp(-(((yy - cy - 20) / 10.0) ** 2 + ((xx - cx - 10) / 25.0) ** 2))
        mus.append(mu)
        bands.append(band)
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        photos.append(photo)
    inv = {level: rng.uniform(0.5, 3.0) for level in LEVELS}
    weight = np.ones((n, 1, TILE, TILE), np.float32)
    weight[:, :, :, : HALO + 8] = 0  # part of each core outside the inspection region
    return tile_inputs(np.stack(mus), np.stack(bands), weight, inv, np.stack(images), np.stack(photos))


@pytest.mark.parametrize("channels", [1, 3])
def test_fine_score_matches_numpy(tmp_path, channels):
    """With the coarse path silenced, the map is the weighted band excess divided by fine_scale."""
    rng = np.random.default_rng(channels)
    feeds = realistic_tiles(rng, 2, channels)
    for level in LEVELS:
        feeds[f"coarse{level}"][:] = 0
    fine_scale = 2.5
    spec = TemplateGraphSpec(channels, CORE, fine_scale=fine_scale, coarse_scale=3.0)
    got = run_graph(tmp_path, spec, feeds)
    want = numpy_fine(feeds, channels) / fine_scale
    assert want.max() > 5, "the dot must exceed the band, or the comparison proves little"
    assert (want[:, :, :, :8] == 0).all(), "the zero-weight columns must be masked"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_components_match_numpy(tmp_path, channels):
    """The fitting graph's channels equal numpy's fine excess, coarse pyramid, blob and line scores."""
    rng = np.random.default_rng(10 + channels)
    feeds = realistic_tiles(rng, 2, channels)
    spec = TemplateGraphSpec(channels, CORE, components=True, blob_scale=1.0, line_scale=1.0)
    got = run_graph(tmp_path, spec, feeds)
    assert got.shape == (2, 4, CORE, CORE)
    without = run_graph(tmp_path, TemplateGraphSpec(channels, CORE, components=True), feeds)
    np.testing.assert_array_equal(without, got[:, :2])  # fit without --shape-scores: fine and coarse only
    np.testing.assert_allclose(got[:, :1], numpy_fine(feeds, channels), rtol=1e-5, atol=1e-4)
    coarse = numpy_coarse(feeds, channels)
    assert coarse.max() > 5
    np.testing.assert_allclose(got[:, 1:2], coarse, rtol=1e-4, atol=1e-4)
    blob, line = numpy_shapes(feeds)
    assert blob.max() > 5 and line.max() > 1, "the dot must reach the shape scores, or the comparison proves little"
    np.testing.assert_allclose(got[:, 2:3], blob, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[:, 3:4], line, rtol=1e-5, atol=1e-4)


def test_the_map_is_the_largest_scaled_score_each_with_its_own_gain(tmp_path):
    """With shape scales the map is max(fine g0 / fs, coarse / cs, blob g1 / bs, line g2 / ls), per-score gains."""
    rng = np.random.default_rng(5)
    feeds = realistic_tiles(rng, 2, 1)
    blob, line = numpy_shapes(feeds)
    fine, coarse = numpy_fine(feeds, 1), numpy_coarse(feeds, 1)
    feeds["fine_gain"] = np.stack([np.full(feeds["fine_gain"].shape[2:], g, np.float16) for g in (0.5, 0.75, 0.25)])[
        None
    ]
    feeds["fine_gain"] = np.repeat(feeds["fine_gain"], 2, axis=0)
    scales = dict(fine_scale=2.0, coarse_scale=3.0, blob_scale=1.5, line_scale=0.7)
    got = run_graph(tmp_path, TemplateGraphSpec(1, CORE, gains=3, **scales), feeds)
    want = np.maximum.reduce([fine * 0.5 / 2.0, coarse / 3.0, blob * 0.75 / 1.5, line * 0.25 / 0.7])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="3 gain maps"):
        TemplateGraphSpec(1, CORE, **scales)


def test_shape_scores_tell_long_faint_scratches_and_compact_dots_from_short_strong_marks(tmp_path):
    """A 2 px x 36 px mark 23 grey beyond the band scores far less on the line score than a 1 px x 200 px scratch
    15 grey beyond it, and neither holds the blob score's disc, which a 7 px dot does."""
    core = 256
    tile = core + 2 * HALO
    mu = np.full((1, 1, tile, tile), 120.0, np.float32)
    image = mu.copy()
    image[0, 0, HALO + 40 : HALO + 42, HALO + 30 : HALO + 66] += 28  # the mark: 5 + 23
    image[0, 0, HALO + 120, HALO + 20 : HALO + 220] += 20  # the scratch: 5 + 15
    yy, xx = np.mgrid[:tile, :tile]
    image[0, 0][(yy - HALO - 200) ** 2 + (xx - HALO - 200) ** 2 <= 3.5**2] += 30  # the dot: 5 + 25
    photo = np.eye(1, PHOTO_TERMS, dtype=np.float32)
    feeds = tile_inputs(mu, np.full_like(mu, 5.0), np.ones_like(mu), 1.0, image.astype(np.uint8), photo)
    got = run_graph(tmp_path, TemplateGraphSpec(1, core, components=True, blob_scale=1.0, line_scale=1.0), feeds)[0]
    fine, blob, line = got[0], got[2], got[3]
    mark, scratch, dot = (
        (slice(HALO - HALO + 30, 50), slice(20, 66)),
        (slice(110, 130), slice(20, 220)),
        (
            slice(190, 211),
            slice(190, 211),
        ),
    )
    assert fine[mark].max() == pytest.approx(23) and fine[scratch].max() == pytest.approx(15)
    assert line[scratch].max() == pytest.approx(15) and line[mark].max() == 0
    elsewhere = np.r_[0:32, 52:112, 132:180]  # rows away from the mark (40-41) and the scratch (120), above the dot
    assert not (line[elsewhere] > 1).any(), "the line score stays on what holds the evidence (4 px cells, 3x3)"
    assert blob[mark].max() == 0 and blob[scratch].max() == 0 and blob[dot].max() == pytest.approx(25)


def test_coarse_score_finds_a_faint_blob_but_not_noise_of_equal_energy(tmp_path):
    """A 10-grey 40x40 blob inside the band lights the coarse score; zero-mean noise of equal energy does not."""
    rng = np.random.default_rng(3)
    mu = np.full((1, 1, TILE, TILE), 128.0, np.float32)
    band = np.full_like(mu, 40.0)
    weight = np.ones_like(mu)
    y0 = x0 = HALO + 12
    blob = np.full_like(mu, 128.0)
    blob[:, :, y0 : y0 + 40, x0 : x0 + 40] += 10
    noise = np.full_like(mu, 128.0)
    noise[:, :, y0 : y0 + 40, x0 : x0 + 40] += rng.choice([-10.0, 10.0], (40, 40))
    assert np.isclose(np.square(blob - 128).sum(), np.square(noise - 128).sum())
    photo = np.eye(1, PHOTO_TERMS, dtype=np.float32)
    spec = TemplateGraphSpec(1, CORE, components=True)
    maps = {}
    for name, image in (("blob", blob), ("noise", noise), ("flat", mu)):
        maps[name] = run_graph(tmp_path, spec, tile_inputs(mu, band, weight, 1.0, image.astype(np.uint8), photo))
    assert maps["blob"][:, 0].max() == maps["noise"][:, 0].max() == 0, "both stay inside the per-pixel band"
    assert maps["flat"][:, 1].max() == 0
    blob_score, noise_score = maps["blob"][:, 1].max(), maps["noise"][:, 1].max()
    print(f"coarse score: blob {blob_score:.2f}, equal-energy noise {noise_score:.2f}")
    assert blob_score >= 9.0
    assert noise_score < 0.3 * blob_score
    ys, xs = np.nonzero(maps["blob"][0, 1] > 0.5 * blob_score)
    assert abs(ys.mean() - 32) < 6 and abs(xs.mean() - 32) < 6, "the response sits on the blob"


@pytest.mark.parametrize("shapes", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_fp16_graph_stays_within_1e_2_of_fp32(tmp_path, channels, shapes):
    """The FP16 graph's map differs from the FP32 graph's by at most 1e-2 relative to max(|map|, 1)."""
    rng = np.random.default_rng(20 + channels)
    feeds = realistic_tiles(rng, 4, channels)
    extra = dict(gains=3, blob_scale=1.7, line_scale=0.9) if shapes else {}
    if shapes:
        feeds["fine_gain"] = np.repeat(feeds["fine_gain"], 3, axis=1)
    maps = {}
    for precision in ("fp32", "fp16"):
        spec = TemplateGraphSpec(channels, CORE, fine_scale=2.4, coarse_scale=3.4, precision=precision, **extra)
        maps[precision] = run_graph(tmp_path, spec, feeds)
    ref32, got16 = maps["fp32"], maps["fp16"].astype(np.float32)
    abs_err = np.abs(got16 - ref32)
    rel_err = abs_err / np.maximum(np.abs(ref32), 1.0)
    print(
        f"C={channels}: FP16 vs FP32 max abs {abs_err.max():.3e}, max rel {rel_err.max():.3e}, "
        f"map max {ref32.max():.2f}"
    )
    assert ref32.max() > 3, "the defects must reach the map"
    assert rel_err.max() <= 1e-2


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_io_matches_the_architecture(tmp_path, channels, input_dtype, precision):
    """Inputs image/photo/statistics/coarse<l> and output anomaly have the documented types and shapes."""
    spec = TemplateGraphSpec(channels, CORE, input_dtype=input_dtype, precision=precision)
    path = tmp_path / "g.onnx"
    onnx.save(build_template_graph(spec), path)
    backend = OnnxRuntimeBackend(path, threads=1)
    ins, outs = backend.inputs, backend.outputs
    statistics = {"mean", "low", "high", "weight", "fine_gain"}
    assert set(ins) == {"image", "photo", *statistics, *(f"coarse{lv}" for lv in LEVELS)}
    stat_dtype = np.float16 if precision == "fp16" else np.float32
    assert ins["image"].dtype == np.dtype(input_dtype) and ins["image"].shape == (-1, channels, TILE, TILE)
    assert ins["photo"].dtype == np.float32 and ins["photo"].shape == (-1, PHOTO_TERMS)
    for name in ("mean", "low", "high"):
        assert ins[name].dtype == stat_dtype and ins[name].shape == (-1, channels, TILE, TILE)
    assert ins["weight"].dtype == stat_dtype and ins["weight"].shape == (-1, 1, TILE, TILE)
    for level in LEVELS:
        spec_l = ins[f"coarse{level}"]
        assert spec_l.dtype == stat_dtype and spec_l.shape == (-1, channels, TILE >> level, TILE >> level)
    assert list(outs) == ["anomaly"]
    want = np.float16 if precision == "fp16" else np.float32
    assert outs["anomaly"].dtype == want and outs["anomaly"].shape == (-1, 1, CORE, CORE)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, channels, TILE, TILE)).astype(input_dtype)
    mu = np.full((3, channels, TILE, TILE), 128.0, np.float32)
    feeds = tile_inputs(
        mu,
        np.full_like(mu, 5.0),
        np.ones((3, 1, TILE, TILE), np.float32),
        1.0,
        image,
        np.tile(np.eye(1, PHOTO_TERMS), (3, 1)),
    )
    out = run_graph(tmp_path, spec, feeds)
    assert out.dtype == want and out.shape == (3, 1, CORE, CORE)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["inspectd.precision"] == precision and props["inspectd.core"] == str(CORE)


@pytest.mark.parametrize(("core", "halo"), [(48, HALO), (CORE, HALO - 32), (CORE, HALO + 16)])
def test_spec_rejects_misaligned_or_short_halo(core, halo):
    """Cores and halos off the coarsest block grid, or a halo below the receptive field, are refused."""
    with pytest.raises(ValueError):
        TemplateGraphSpec(1, core, halo=halo)
