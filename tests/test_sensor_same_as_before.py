"""The occluder step made cheaper leaves out exactly what it left out before, bit for bit.

``in_reference`` now tests only the strips of a box that an occluder or the user's mask can
reach, and ``leave_out`` replaces pixels by rectangles instead of gathered index lists. The
implementation before that change is kept here as the reference; both run on the same clutter
(occluders of uneven depth with gaps, on one to four edges, a user's mask) under poses up to
±3° and ±30 px (and a few far outside what a line has), on every level step a caller uses, with
and without a field's growth, and must give the same pieces, the same masks and the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from calibration import synth
from calibration.fit_pipeline import FitConfig, level_reference
from engines import nonrigid as nr
from engines import registration as reg
from engines import sensor as sn

# ---- the implementation before the change (engines/sensor.py at the alignment-cost release), unchanged ----


def reference_in_reference(
    clutter: sn.FrameClutter, matrix: np.ndarray, shape: tuple[int, int], step: int = 1, grow: float = 0.0
) -> list[tuple[slice, slice, np.ndarray]]:
    h, w = shape
    inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    pieces = []
    for y0, y1, x0, x1 in clutter.boxes(shape):
        corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64) @ inverse.T
        lo = np.floor(corners.min(axis=0) - grow - 1)
        hi = np.ceil(corners.max(axis=0) + grow + 1)
        rows = slice(max(0, int(lo[1]) // step), min(-(-h // step), int(hi[1]) // step + 1))
        cols = slice(max(0, int(lo[0]) // step), min(-(-w // step), int(hi[0]) // step + 1))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        py = (np.arange(rows.start, rows.stop) + 0.5) * step - 0.5
        px = (np.arange(cols.start, cols.stop) + 0.5) * step - 0.5
        qx = matrix[0, 0] * px[None, :] + matrix[0, 1] * py[:, None] + matrix[0, 2]
        qy = matrix[1, 0] * px[None, :] + matrix[1, 1] * py[:, None] + matrix[1, 2]
        mask = clutter.covers(qy, qx, shape)
        if grow > 0 and mask.any():
            k = 2 * math.ceil(grow / step) + 1
            mask = cv2.dilate(mask.view(np.uint8), np.ones((k, k), np.uint8)) > 0
        pieces.append((rows, cols, mask))
    return pieces


def reference_leave_out(registered: np.ndarray, pieces: list, mean: np.ndarray, coef: np.ndarray, unit: float) -> int:
    count = 0
    for rows, cols, mask in pieces:
        ys, xs = np.nonzero(mask)
        ys, xs = ys + rows.start, xs + cols.start
        if len(ys):
            gain, offset = reg.lighting_fields(coef, xs.astype(np.float64), ys.astype(np.float64), registered.shape[:2])
            values = gain[None] * mean[:, ys, xs].astype(np.float32) + offset[None]
            top = np.iinfo(registered.dtype).max
            values = np.clip(np.rint(values / np.float32(unit)), 0, top).astype(registered.dtype)
            registered[ys, xs] = values[0] if registered.ndim == 2 else values.T
        count += len(ys)
    return count


# ---- cases ----


def clutter_case(seed: int, shape: tuple[int, int]) -> tuple[sn.FrameClutter, np.ndarray]:
    """Random clutter as ``frame_clutter`` makes it (runs of uneven depth, zero between them) and a pose."""
    rng = np.random.default_rng(seed)
    h, w = shape
    depths = {}
    for edge in rng.choice(4, size=int(rng.integers(1, 5)), replace=False):
        length = w if edge < 2 else h
        depth = np.round(rng.uniform(0.03, 0.12) * min(shape) + rng.normal(0, 2, length)).clip(1, None)
        gap = rng.integers(0, length, 2)
        depth[min(gap) : max(gap) // 2 + min(gap) // 2] = 0  # a stretch of the edge without an occluder
        depths[int(edge)] = depth.astype(np.int32)
    user = None
    if seed % 3 == 0:
        user = np.zeros(shape, bool)
        y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 30))
        user[y : y + 17, x : x + 29] = rng.random((17, 29)) < 0.7
    far = seed % 7 == 6  # now and then a pose far outside a line's range: the result must not depend on it
    angle = math.radians(rng.uniform(-40, 40) if far else rng.uniform(-3, 3))
    scale = rng.uniform(0.9, 1.1) if far else 1.0
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    dx, dy = rng.uniform(-30, 30, 2)
    matrix = np.array([[c, -s, dx + (1 - c) * w / 2 + s * h / 2], [s, c, dy + (1 - c) * h / 2 - s * w / 2]])
    return sn.FrameClutter(depths, user), matrix


def same_pieces(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (rows, cols, mask), (w_rows, w_cols, w_mask) in zip(got, want, strict=True):
        assert (rows, cols) == (w_rows, w_cols)
        assert mask.dtype == w_mask.dtype and mask.shape == w_mask.shape
        assert np.array_equal(mask, w_mask), f"{int((mask != w_mask).sum())} pixels differ"


SHAPES = [(384, 512), (301, 257), (640, 96)]


@pytest.mark.parametrize("seed", range(14))
@pytest.mark.parametrize("shape", SHAPES)
def test_the_same_pieces_on_every_level_and_growth(seed, shape):
    clutter, matrix = clutter_case(seed, shape)
    for step, grow in [(1, 0.0), (1, 1.6), (2, 0.0), (4, 0.0), (4, 2.3), (8, 0.0)]:
        same_pieces(
            clutter.in_reference(matrix, shape, step, grow), reference_in_reference(clutter, matrix, shape, step, grow)
        )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("dtype", "channels"), [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3)])
def test_the_same_pixels_left_out(seed, dtype, channels):
    shape = SHAPES[seed % len(SHAPES)]
    rng = np.random.default_rng(100 + seed)
    clutter, matrix = clutter_case(seed, shape)
    pieces = reference_in_reference(clutter, matrix, shape, 1, 1.3 * (seed % 2))
    mean = rng.uniform(0, 255, (channels, *shape)).astype(np.float16)
    coef = np.array([1.05, 0.03, -0.02, 0.01, -0.015, 0.02, 2.0, 1.5, -0.5], np.float32)
    top = np.iinfo(dtype).max
    frame = rng.integers(0, top, (*shape, channels) if channels == 3 else shape, dtype=dtype, endpoint=True)
    unit = 1 / 257 if dtype == np.uint16 else 1.0
    got, want = frame.copy(), frame.copy()
    assert sn.leave_out(got, pieces, mean, coef, unit) == reference_leave_out(want, pieces, mean, coef, unit)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("field", [False, True])
def test_the_same_registered_frame_from_align(field, monkeypatch):
    """Through ``align``, on a part posed up to 1.5 deg with a fixture bar, with and without the non-rigid field:
    the frame the detectors see and the count left out are those the implementation before gave."""
    size = 768
    part = synth.render_design(synth.SynthConfig(size=size, seed=5)).image
    config = synth.SynthConfig(size=size, seed=3, max_rotation_deg=1.5, max_shift_px=8, bend_px=0.8)
    rng = np.random.default_rng(3)
    image = synth._warp(part, synth._pose_matrix(synth._sample_pose(config, rng)), config, rng)[0]
    sn.edge_view(image, 2)[:40] = synth.FIXTURE
    image = np.clip(np.rint(image + rng.normal(0, 2, image.shape)), 0, 255).astype(np.uint8)
    coarse_f, fine_f = reg.level_factors(size, size)
    weight = np.ones(part.shape, np.uint8)
    ref = level_reference(
        reg.downscale(part, coarse_f), reg.downscale(part, fine_f), weight, FitConfig(max_shift_px=30)
    )
    ref = replace(ref, sensor=sn.SensorModel(0.08 * size, part[None].astype(np.float16)))
    if field:
        ref = replace(ref, field=nr.FieldReference.from_full(part, weight, (size, size)))
    got = reg.align(image, ref)
    monkeypatch.setattr(sn.FrameClutter, "in_reference", reference_in_reference)
    monkeypatch.setattr(sn, "leave_out", reference_leave_out)
    want = reg.align(image, ref)
    assert want.left_out > 0.03 * size * size, "the bar is left out"
    assert got.left_out == want.left_out
    assert np.array_equal(got.pose.matrix, want.pose.matrix)
    assert np.array_equal(got.registered, want.registered)


@pytest.mark.parametrize("seed", [3, 4, 7])
def test_the_expected_part_on_the_edges_only_finds_the_same_occluders(seed):
    """``expected_on_level`` computed on the rows the occluder search reads (run time) against the whole level (as
    before, and as the fit still computes it): within a hundredth of a grey level there, zero elsewhere, and the same
    occluders found, on parts posed up to 1.5 deg with a fixture bar."""
    size = 768
    part = synth.render_design(synth.SynthConfig(size=size, seed=5)).image
    config = synth.SynthConfig(size=size, seed=seed, max_rotation_deg=1.5, max_shift_px=8, bend_px=0.8)
    rng = np.random.default_rng(seed)
    image = synth._warp(part, synth._pose_matrix(synth._sample_pose(config, rng)), config, rng)[0]
    sn.edge_view(image, seed % 4)[:40] = synth.FIXTURE
    image = np.clip(np.rint(image + rng.normal(0, 2, image.shape)), 0, 255).astype(np.uint8)
    coarse_f, fine_f = reg.level_factors(size, size)
    ref = level_reference(
        reg.downscale(part, coarse_f),
        reg.downscale(part, fine_f),
        np.ones(part.shape, np.uint8),
        FitConfig(max_shift_px=30),
    )
    sensor = sn.SensorModel(0.08 * size, part[None].astype(np.float16))
    coarse, fine = reg.downscale(image, coarse_f), reg.downscale(image, fine_f)
    pose = ref.register(coarse, fine)
    coef = ref.photometric(coarse, pose)
    rows = sensor.search_rows(fine_f)
    whole = reg.expected_on_level(ref, pose, coef)
    edges = reg.expected_on_level(ref, pose, coef, rows)
    near = np.zeros(whole.shape, bool)
    near[:rows], near[-rows:], near[:, :rows], near[:, -rows:] = True, True, True, True
    assert np.abs(edges[near] - whole[near]).max() < 0.01
    assert not edges[~near].any()
    found, before = sensor.frame_clutter(fine, edges, fine_f), sensor.frame_clutter(fine, whole, fine_f)
    assert list(found.depths) == list(before.depths) == [seed % 4]
    assert np.array_equal(found.depths[seed % 4], before.depths[seed % 4])
