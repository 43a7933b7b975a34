"""The sensor frame's clutter: occluders found per frame, learned from good images, left out; the user's mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration import synth
from engines import registration as reg
from engines import sensor as sn

SIZE = 1024
FACTOR = 4  # the fine registration level of a 1024 px image


@pytest.fixture(scope="module")
def part() -> np.ndarray:
    return synth.render_design(synth.SynthConfig(size=SIZE, seed=5)).image


def scene(part: np.ndarray, seed: int, bar: tuple[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(frame, expected) on the fine level: a posed part with band glow, vignetting and clutter (synth's),
    and a dark fixture bar (edge, depth in px) if asked; the expected part is the same part without any of it."""
    rng = np.random.default_rng(seed)
    band = round(0.04 * SIZE)
    matrix = synth._pose_matrix({"dx": 3.0, "dy": -2.0, "angle_deg": 0.8, "cx": SIZE / 2, "cy": SIZE / 2})
    clean = synth._warp(part, matrix, synth.SynthConfig(size=SIZE), rng)[0]
    frame = clean.copy()
    gain = np.ones_like(frame)
    synth._band_vignette(gain, band, (0.12, 0.3), rng)
    frame *= gain
    synth._band_glow(frame, band, rng.uniform(0, 60, 4).astype(np.float32))
    if bar is not None:
        view = sn.edge_view(frame, bar[0])
        view[: int(bar[1])] = synth.FIXTURE
    synth._clutter(frame, band, rng)
    frame += rng.normal(0, 2, frame.shape).astype(np.float32)
    return reg.downscale(np.clip(frame, 0, 255), FACTOR), reg.downscale(clean, FACTOR)


@pytest.mark.parametrize(("edge", "depth"), [(0, 12.0), (1, 20.0), (2, 16.0), (3, 22.0)])
def test_a_fixture_bar_is_found_on_its_edge_only(part, edge, depth):
    """A dark bar along one edge is found there, to its depth (one fine pixel of slack); glow,
    vignetting and clutter along the other edges are not occluders."""
    frame, expected = scene(part, edge, (edge, depth))
    depths = sn.occluder_depths(frame, expected, 20)
    for e, d in enumerate(depths):
        if e != edge:
            assert not d.any(), f"edge {e} has an occluder"
            continue
        covered = d[d > 0] * FACTOR
        assert (d > 0).mean() > 0.8, "the bar covers the whole edge"
        assert np.median(covered) >= depth and np.median(covered) <= depth + 2 * FACTOR


def test_defects_in_the_band_are_not_occluders(part):
    """A dark chip in the band, a long dark scratch parallel to the edge (not attached to it) and a dark
    patch attached to the edge but short are all left to the detector."""
    frame, expected = scene(part, 7, None)
    frame[9:11, 40:200] = 10.0  # a 160 px (fine level) scratch, 36-44 px from the top edge at full size
    frame[12:15, 100:104] = 5.0  # a chip
    frame[0:8, 60:90] = 5.0  # attached to the left part of the top edge, 12 % of its length
    assert not any(d.any() for d in sn.occluder_depths(frame, expected, 20))


def streaks(view: np.ndarray, start: int, stop: int) -> None:
    """Dark streaks across the band on an edge's fine-level view (row = distance from the edge), from row
    ``start`` to ``stop``: straight across, slanted, and a dark line parallel to the edge beyond ``start``."""
    for col in (30, 90, 150, 210):
        view[start:stop, col : col + 2] = 5.0
    for row in range(start, stop):  # slanted, 2 fine px a row along the edge
        view[row, 100 + 2 * row : 103 + 2 * row] = 5.0
    view[start + 2 : start + 3, 160:200] = 5.0


@pytest.mark.parametrize("edge", [0, 3])
def test_streaks_across_the_band_do_not_deepen_a_bar(part, edge):
    """Dark streaks from a bar's edge deep into the band (a cable's shadow, debris) and a dark line beside
    it are not more bar: the bar is found to its own depth (one fine pixel of slack plus the search's)."""
    depth = 20.0
    frame, expected = scene(part, 3, (edge, depth))
    streaks(sn.edge_view(frame, edge), int(depth) // FACTOR, 18)
    found = sn.occluder_depths(frame, expected, 20)[edge]
    assert (found > 0).mean() > 0.8
    deepest = found[20:-20].max() * FACTOR  # the corners' vignetting, the darkest, is another matter
    assert deepest <= depth + 2 * FACTOR, f"{deepest} px against a {depth} px bar"


def test_streaks_from_an_edge_without_a_bar_are_not_an_occluder(part):
    """Streaks that reach an edge with no bar there are not an occluder, however many columns they cross."""
    frame, expected = scene(part, 4, None)
    view = sn.edge_view(frame, 1)
    streaks(view, 0, 18)
    for col in range(20, 236, 8):
        view[0:18, col : col + 2] = 5.0
    assert not sn.occluder_depths(frame, expected, 20)[1].any()


def test_good_images_without_a_fixture_teach_no_occluder(part):
    """With no bar in the good images the learned depth is 0 and the model leaves nothing out."""
    frames = [scene(part, seed, None) for seed in range(4)]
    depth = sn.learn_max_depth(frames, FACTOR, (SIZE, SIZE))
    assert depth == 0
    assert not sn.SensorModel(depth, np.zeros((1, 4, 4), np.float16)).active


def test_the_learned_depth_caps_what_is_left_out(part):
    """Bars of 12-20 px in the good images teach about 25 % more; a 40 px bar is left out only to that depth."""
    frames = [scene(part, seed, (seed % 4, 12.0 + 2 * seed)) for seed in range(5)]
    depth = sn.learn_max_depth(frames, FACTOR, (SIZE, SIZE))
    assert 20 * 1.25 <= depth <= (20 + 2 * FACTOR) * 1.25
    model = sn.SensorModel(depth, np.zeros((1, SIZE, SIZE), np.float16))
    frame, expected = scene(part, 11, (0, 40.0))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    mask = model.frame_clutter(frame, expected, FACTOR).covers(ys, xs, (SIZE, SIZE))
    deepest = int(np.flatnonzero(mask[:, SIZE // 2]).max()) + 1
    assert deepest <= depth + sn.MARGIN_PX + 1 < 40, "deeper than the good images showed: the rest still scores"
    assert mask[: int(depth), SIZE // 4 : 3 * SIZE // 4].all()


@pytest.mark.parametrize(("dtype", "channels"), [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3)])
def test_left_out_pixels_take_the_reference_under_the_frames_lighting(dtype, channels):
    """Replaced pixels are gain * mean + offset of the frame's lighting model, in the frame's own units."""
    shape = (64, 80)
    mean = np.random.default_rng(0).uniform(40, 200, (channels, *shape)).astype(np.float16)
    coef = np.array([1.1, 0.02, -0.01, 0, 0, 0, 3.0, 1.0, 0], np.float32)
    registered = np.zeros((*shape, channels) if channels == 3 else shape, dtype)
    mask = np.zeros(shape, bool)
    mask[5:9, 10:30] = True
    unit = 1 / 257 if dtype == np.uint16 else 1.0
    assert sn.leave_out(registered, [(slice(0, 64), slice(0, 80), mask)], mean, coef, unit) == mask.sum()
    ys, xs = np.nonzero(mask)
    gain, offset = reg.lighting_fields(coef, xs.astype(float), ys.astype(float), shape)
    want = (gain * mean[0, ys, xs].astype(np.float32) + offset) / unit
    got = registered[ys, xs] if channels == 1 else registered[ys, xs, 0]
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-3
    assert not registered[~mask].any(), "nothing else is touched"


def test_clutter_is_carried_into_the_reference_frame_with_the_pose():
    """A bar 20 px deep along the top of the sensor covers reference rows below 20 + dy where the part sits dy lower
    up; a user's mask box moves the same way; only boxes around them are computed."""
    shape = (200, 300)
    user = np.zeros(shape, bool)
    user[100:110, 200:220] = True
    clutter = sn.FrameClutter({0: np.full(300, 20, np.int32)}, user)
    matrix = np.array([[1.0, 0, 5.0], [0, 1.0, -7.0]])  # the part sits 5 px right and 7 px up in the frame
    full = np.zeros(shape, bool)
    for rows, cols, mask in clutter.in_reference(matrix, shape):
        full[rows, cols] |= mask
        assert mask.size < 0.5 * full.size
    assert full[:27].all() and not full[28:90].any()
    assert full[107:117, 195:215].all() and full.sum() == 27 * 300 + 10 * 20
    level = np.zeros((100, 150), bool)
    for rows, cols, mask in clutter.in_reference(matrix, shape, step=2):
        level[rows, cols] |= mask
    assert level[:13].all() and not level[15:50].any()


def test_clutter_depth_is_learned_where_the_good_images_show_clutter(part):
    """Synth's clutter reaches 60 % of the 41 px band (25 px) on every edge, fading over its last 6 px: each edge
    learns a depth of at least two fine pixels and at most that reach (a fine pixel of slack), short of the band's
    inner edge where the part's markers are measured."""
    frames = [scene(part, seed, None) for seed in range(6)]
    depths = sn.learn_clutter_depth(frames, FACTOR, (SIZE, SIZE))
    reach = 0.6 * round(0.04 * SIZE)
    for edge, depth in enumerate(depths):
        assert 2 * FACTOR <= depth <= reach + FACTOR, f"edge {edge}: {depth} px"


def test_a_part_that_moved_a_little_teaches_no_clutter(part):
    """Without band effects, a part 1.5 px off its expected place (what a bend leaves after the rigid pose) and
    noise leave nothing unexplained: no depth on any edge, and a sensor model with nothing else is inactive."""
    rng = np.random.default_rng(3)
    frames = []
    for shift in (-1.5, 1.5):
        moved = synth._pose_matrix({"dx": shift, "dy": -shift, "angle_deg": 0.0, "cx": SIZE / 2, "cy": SIZE / 2})
        frame = synth._warp(part, moved, synth.SynthConfig(size=SIZE), rng)[0]
        frame += rng.normal(0, 2, frame.shape).astype(np.float32)
        frames.append((reg.downscale(np.clip(frame, 0, 255), FACTOR), reg.downscale(part, FACTOR)))
    depths = sn.learn_clutter_depth(frames, FACTOR, (SIZE, SIZE))
    assert depths == (0.0, 0.0, 0.0, 0.0)
    assert not sn.SensorModel(0.0, np.zeros((1, 4, 4), np.float16), None, depths).active


def test_the_clutter_band_is_each_edges_learned_depth():
    """``clutter_band``: the band along each edge with a learned depth (rounded up), none along the others; a model
    without any has none; a model with only the band leaves nothing out of a frame."""
    mean = np.zeros((1, 100, 160), np.float16)
    band = sn.SensorModel(0.0, mean, None, (10.0, 0.0, 0.0, 30.5)).clutter_band()
    assert sorted(band.depths) == [0, 3]
    assert (band.depths[0] == 10).all() and len(band.depths[0]) == 160
    assert (band.depths[3] == 31).all() and len(band.depths[3]) == 100
    ys, xs = np.mgrid[0:100, 0:160]
    covered = band.covers(ys, xs, (100, 160))
    assert covered[:10].all() and covered[:, 129:].all() and not covered[10:, :129].any()
    assert sn.SensorModel(3.0, mean).clutter_band() is None
    banded = sn.SensorModel(0.0, mean, None, (10.0, 0.0, 0.0, 0.0))
    assert banded.active and not banded.leaves_out, "a fit keeps it; frames have nothing left out by it"


@pytest.mark.parametrize("angle", [0.0, 0.9, -1.5])
def test_the_band_is_carried_into_the_reference_as_in_reference_carries_it(angle):
    """``band_in_reference``: the union of its pieces on the field's level is the union of ``in_reference``'s, to the
    pixel, under rotated and shifted poses (each piece holds its own edge's band only)."""
    shape, step = (600, 840), 4
    band = sn.SensorModel(0.0, np.zeros((1, *shape), np.float16), None, (26.0, 0.0, 31.0, 19.5)).clutter_band()
    a = math.radians(angle)
    matrix = np.array([[math.cos(a), -math.sin(a), 7.3], [math.sin(a), math.cos(a), -11.6]])
    level = (-(-shape[0] // step), -(-shape[1] // step))
    unions = []
    for pieces in (band.in_reference(matrix, shape, step=step), band.band_in_reference(matrix, shape, step)):
        union = np.zeros(level, bool)
        for rows, cols, mask in pieces:
            union[rows, cols] |= mask
        unions.append(union)
    assert unions[0].any() and np.array_equal(unions[0], unions[1])
