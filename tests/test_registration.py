"""Registration: known poses recovered sub-pixel, failures reported, lighting fitted robustly, boxes mapped."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from engines import registration as reg
from engines.errors import InspectError
from engines.tiling import TilePlan
from tests.helpers import (
    lighting,
    lighting_truth,
    place_frame,
    pose_matrix,
    render_part,
    render_speckled_part,
    sensor_clutter,
)

SIZE = 512
MARGIN = 16


@pytest.fixture(scope="module")
def part() -> np.ndarray:
    """The canonical part at SIZE px (float32 grey levels)."""
    return render_part(SIZE)


def reference_for(part: np.ndarray) -> reg.RegistrationReference:
    """A registration reference built from the canonical part, border margin masked out."""
    coarse_f, fine_f = reg.level_factors(*part.shape)
    coarse, fine = reg.downscale(part, coarse_f), reg.downscale(part, fine_f)

    def mask(shape: tuple[int, int], factor: int) -> np.ndarray:
        m = np.zeros(shape, np.uint8)
        k = MARGIN // factor
        m[k:-k, k:-k] = 255
        return m

    return reg.RegistrationReference(
        coarse=coarse,
        fine=fine,
        coarse_mask=mask(coarse.shape, coarse_f),
        fine_mask=mask(fine.shape, fine_f),
        factors=(coarse_f, fine_f),
        full_shape=part.shape,
        max_shift_px=0.04 * SIZE,
        max_rotation_deg=3.0,
        min_correlation=0.5,
    )


def register(ref: reg.RegistrationReference, frame: np.ndarray) -> reg.Pose:
    coarse_f, fine_f = ref.factors
    return ref.register(reg.downscale(frame, coarse_f), reg.downscale(frame, fine_f))


def corners_error(found: np.ndarray, truth: np.ndarray, height: int, width: int) -> float:
    """Largest distance between where the two reference-to-frame matrices put the image corners."""
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1], [width - 1, height - 1, 1]], float)
    return float(np.linalg.norm(corners @ found.T - corners @ truth.T, axis=1).max())


def test_level_factors_keep_the_short_side_of_elongated_sensors():
    """A long narrow sensor keeps at least MIN_LEVEL_SIDE px across at both levels; usual sizes are unchanged."""
    for height, width in [(128, 5472), (160, 2400), (256, 4096), (200, 3000)]:
        coarse, fine = reg.level_factors(height, width)
        assert height // coarse >= reg.MIN_LEVEL_SIDE and height // fine >= reg.MIN_LEVEL_SIDE
    assert reg.level_factors(3648, 5472) == reg.level_factors(5120, 5120) == (16, 8)
    assert reg.level_factors(1080, 1440) == (4, 2)


def test_recovers_a_known_pose_on_an_elongated_sensor():
    """A 4096x256 strip registers within 1.5 px at the corners (on 16 and 32 rows it was off by 5-8 px)."""
    height, width = 256, 4096
    strip = render_part(height, width)
    coarse_f, fine_f = reg.level_factors(height, width)
    coarse, fine = reg.downscale(strip, coarse_f), reg.downscale(strip, fine_f)

    def mask(shape: tuple[int, int], factor: int) -> np.ndarray:
        m = np.zeros(shape, np.uint8)
        k = max(1, MARGIN // factor)
        m[k:-k, k:-k] = 255
        return m

    ref = reg.RegistrationReference(
        coarse,
        fine,
        mask(coarse.shape, coarse_f),
        mask(fine.shape, fine_f),
        (coarse_f, fine_f),
        strip.shape,
        0.04 * width,
        3.0,
        0.5,
    )
    rng = np.random.default_rng(1)
    for dx, dy, angle in [(3.2, -1.7, 0.1), (-2.5, 1.2, -0.1), (1.3, 2.1, 0.05)]:
        truth = pose_matrix(angle, dx, dy, height, width)
        frame = lighting(place_frame(strip, truth), 1.03, 4.0, -3.0, offset=2.0) + rng.normal(0, 2, strip.shape)
        frame = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
        pose = register(ref, frame)
        assert corners_error(pose.matrix, truth, height, width) < 1.5


def test_level_factors_aim_at_320_and_1280_px():
    """The coarse and fine levels are about 320 and 1280 px on the long side, never upscaled."""
    assert reg.level_factors(384, 384) == (1, 1)
    assert reg.level_factors(512, 300) == (2, 1)
    coarse, fine = reg.level_factors(5120, 4096)
    assert 5120 / coarse == pytest.approx(320, rel=0.5) and 5120 / fine == pytest.approx(1280, rel=0.5)


@pytest.mark.parametrize(("dx", "dy", "angle"), [(0.02, -0.015, 0.5), (-0.0195, 0.008, -0.5), (0.0117, 0.0193, 0.23)])
def test_recovers_a_known_pose_to_a_fifth_of_a_pixel(part, dx, dy, angle):
    """A frame shifted up to ~2 % of the side (sub-pixel) and rotated up to 0.5 deg registers within 0.2 px."""
    rng = np.random.default_rng(1)
    truth = pose_matrix(angle, dx * SIZE, dy * SIZE, SIZE, SIZE)
    frame = lighting(place_frame(part, truth), 1.03, 4.0, -3.0, offset=2.0)
    frame = np.clip(np.rint(frame + rng.normal(0, 2, frame.shape)), 0, 255).astype(np.uint8)
    pose = register(reference_for(part), frame)
    err = corners_error(pose.matrix, truth, SIZE, SIZE)
    print(
        f"shift ({dx * SIZE:.2f}, {dy * SIZE:.2f}) px, {angle} deg: "
        f"corner error {err:.3f} px, ecc {pose.correlation:.3f}"
    )
    assert err <= 0.2
    assert pose.angle_deg == pytest.approx(reg.Pose(truth, 1.0).angle_deg, abs=0.03)
    assert pose.correlation > 0.9


def test_identity_pose_for_the_reference_itself(part):
    """Registering the reference against itself gives the identity to well below a tenth of a pixel."""
    pose = register(reference_for(part), np.rint(part).astype(np.uint8))
    assert corners_error(pose.matrix, np.eye(2, 3), SIZE, SIZE) < 0.1


@pytest.mark.parametrize("kind", ["noise", "blank", "other part"])
def test_unrelated_images_raise_registration_errors(part, kind):
    """Noise, a blank frame or a different part raise InspectError with reason "registration"."""
    rng = np.random.default_rng(2)
    if kind == "noise":
        frame = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    elif kind == "blank":
        frame = np.full((SIZE, SIZE), 90, np.uint8)
    else:
        frame = np.rint(np.flipud(np.fliplr(part))).astype(np.uint8)
        frame = cv2.warpAffine(frame, pose_matrix(20, 0, 0, SIZE, SIZE), (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
    with pytest.raises(InspectError) as info:
        register(reference_for(part), frame)
    assert info.value.reason == "registration" and info.value.detail


def test_pose_beyond_the_limits_is_refused(part):
    """A correct registration outside max_shift_px is refused with the limits in the message."""
    truth = pose_matrix(0.0, 6.0, 0.0, SIZE, SIZE)
    frame = np.rint(place_frame(part, truth)).astype(np.uint8)
    ref = reference_for(part)
    tight = reg.RegistrationReference(**{**ref.__dict__, "max_shift_px": 3.0})
    with pytest.raises(InspectError, match="outside limits") as info:
        register(tight, frame)
    assert info.value.reason == "registration"


def test_pose_within_both_limits_is_accepted(part):
    """A 2.5 deg rotation with a 6 px shift of the part (limits 3 deg, ~20 px) registers instead of being refused."""
    truth = pose_matrix(2.5, 0.0, 6.0, SIZE, SIZE)
    frame = np.rint(place_frame(part, truth)).astype(np.uint8)
    pose = register(reference_for(part), frame)
    assert corners_error(pose.matrix, truth, SIZE, SIZE) <= 0.2


def synthetic_lit(reference: np.ndarray, coef: np.ndarray, full_shape: tuple[int, int]) -> np.ndarray:
    """gain * reference + offset on a coarse grid of full-resolution pixel centres."""
    h, w = reference.shape
    sy, sx = full_shape[0] / h, full_shape[1] / w
    xs = (np.arange(w) * sx + (sx - 1) / 2)[None, :]
    ys = (np.arange(h) * sy + (sy - 1) / 2)[:, None]
    gain, offset = lighting_truth(coef, xs, ys, *full_shape)
    return (gain * reference + offset).astype(np.float32)


# gain 1.08 with a tilt and a vignetting-like curvature; offset -6 with a gradient (unit coordinates)
TRUE_COEF = np.array([1.08, 0.03, -0.02, -0.04, -0.03, 0.015, -6.0, 3.0, 1.8])


def assert_fields_close(coef: np.ndarray, truth: np.ndarray, full_shape: tuple[int, int], grey: float) -> None:
    """The fitted gain*150+offset field agrees with the true one within ``grey`` levels everywhere."""
    ys, xs = np.mgrid[0 : full_shape[0] : 16, 0 : full_shape[1] : 16]

    def field(c: np.ndarray) -> np.ndarray:
        gain, offset = lighting_truth(c, xs, ys, *full_shape)
        return gain * 150 + offset

    assert np.abs(field(coef) - field(truth)).max() < grey


def test_photometric_fit_recovers_gain_offset_and_gradients(part):
    """fit_photometric recovers known quadratic gain and linear offset fields from a noisy coarse frame."""
    rng = np.random.default_rng(4)
    ref = reference_for(part)
    lit = synthetic_lit(ref.coarse, TRUE_COEF, ref.full_shape) + rng.normal(0, 1, ref.coarse.shape).astype(np.float32)
    coef = reg.fit_photometric(lit, ref.coarse, ref.coarse_mask, ref.full_shape)
    assert coef.dtype == np.float32 and coef.shape == (reg.PHOTO_TERMS,)
    assert coef[0] == pytest.approx(TRUE_COEF[0], abs=0.01)
    assert coef[6] == pytest.approx(TRUE_COEF[6], abs=1.5)
    assert_fields_close(coef, TRUE_COEF, ref.full_shape, 0.5)


def test_photometric_fit_ignores_a_defect_patch(part):
    """A bright 40x40 defect patch does not bend the lighting model (robust reweighting)."""
    rng = np.random.default_rng(5)
    ref = reference_for(part)
    lit = synthetic_lit(ref.coarse, TRUE_COEF, ref.full_shape) + rng.normal(0, 1, ref.coarse.shape).astype(np.float32)
    clean = reg.fit_photometric(lit, ref.coarse, ref.coarse_mask, ref.full_shape)
    k = 40 // ref.factors[0]
    lit[200 // ref.factors[0] : 200 // ref.factors[0] + k, 300 // ref.factors[0] : 300 // ref.factors[0] + k] += 80
    dirty = reg.fit_photometric(lit, ref.coarse, ref.coarse_mask, ref.full_shape)
    assert_fields_close(dirty, TRUE_COEF, ref.full_shape, 0.5)
    assert_fields_close(dirty, clean, ref.full_shape, 0.3)


def test_photometric_end_to_end_through_the_pose(part):
    """RegistrationReference.photometric fits the lighting of a shifted, rotated full-resolution frame."""
    truth_pose = pose_matrix(0.3, 4.4, -2.7, SIZE, SIZE)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # lighting defined in reference coordinates, then the lit part is placed with the pose
    gain, offset = lighting_truth(TRUE_COEF, xs, ys, SIZE, SIZE)
    lit_ref = gain * part + offset
    frame = np.clip(np.rint(place_frame(lit_ref.astype(np.float32), truth_pose)), 0, 255).astype(np.uint8)
    ref = reference_for(part)
    coarse_f, fine_f = ref.factors
    coarse = reg.downscale(frame, coarse_f)
    pose = ref.register(coarse, reg.downscale(frame, fine_f))
    coef = ref.photometric(coarse, pose)
    assert_fields_close(coef, TRUE_COEF, ref.full_shape, 1.0)


def render_pad_field(size: int, pads: int = 400, seed: int = 7) -> np.ndarray:
    """A plate dense with dark and bright pads (structure edges everywhere) and a bright plate near the top-right
    corner with a dark inset: the layout where a pose-dependent lighting fit shows as grey levels at a corner."""
    s = 4
    n = size * s
    canvas = np.full((n, n), 30, np.float32)
    cv2.rectangle(canvas, (int(0.05 * n), int(0.05 * n)), (int(0.95 * n), int(0.95 * n)), 140, -1)
    rng = np.random.default_rng(seed)
    for _ in range(pads):
        x, y = rng.uniform(0.12, 0.88, 2) * n
        w, h = rng.uniform(0.01, 0.04, 2) * n
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + w), int(y + h)), float(rng.choice([60, 220])), -1)
    cv2.rectangle(canvas, (int(0.80 * n), int(0.08 * n)), (int(0.92 * n), int(0.20 * n)), 240, -1)
    cv2.rectangle(canvas, (int(0.84 * n), int(0.12 * n)), (int(0.88 * n), int(0.16 * n)), 20, -1)
    return cv2.GaussianBlur(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA), (0, 0), 0.8)


def test_lighting_fit_does_not_jump_at_the_corners_with_the_pose():
    """Over a sweep of sub-pixel shifts and small rotations the fitted gain at the four corners stays within
    0.5 % of the true quadratic field, and the corner plate's lit level within a grey level.

    The hard 3 x MAD trim ("trim", bundles from before "light_fit") kept a pose-dependent set of edge
    pixels: 5-10 % off at the corners and up to 6-7 grey levels on the plate for some of these poses.
    """
    size = 1024
    part = render_pad_field(size)
    ref = reference_for(part)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    gain, offset = lighting_truth(TRUE_COEF, xs, ys, size, size)
    lit = (gain * part + offset).astype(np.float32)
    corners = np.array([[100, 100], [size - 100, 100], [100, size - 100], [size - 100, size - 100]], np.float64)
    true_gain = lighting_truth(TRUE_COEF, corners[:, 0], corners[:, 1], size, size)[0]
    plate = (slice(int(0.08 * size), int(0.20 * size)), slice(int(0.80 * size), int(0.92 * size)))
    rng = np.random.default_rng(1)
    for angle in (-0.3, -0.1, 0.05, 0.2):
        for dx, dy in ((0.0, 0.0), (0.37, -0.81), (-1.55, 1.23)):
            noisy = place_frame(lit, pose_matrix(angle, dx, dy, size, size)) + rng.normal(0, 1.5, lit.shape)
            frame = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
            coarse = reg.downscale(frame, ref.factors[0])
            coef = ref.photometric(coarse, ref.register(coarse, reg.downscale(frame, ref.factors[1])))
            fitted = reg.lighting_fields(coef, corners[:, 0], corners[:, 1], ref.full_shape)[0]
            assert np.abs(fitted / true_gain - 1).max() < 0.005, (angle, dx, dy)
            g, o = reg.lighting_fields(coef, xs[plate], ys[plate], ref.full_shape)
            assert np.abs(g * part[plate] + o - lit[plate]).max() < 1.0, (angle, dx, dy)


def render_one_level_plate(size: int, dots: int = 600, seed: int = 3) -> np.ndarray:
    """A plate that is one grey level (140) but for five dark holes in bright rings and a dense dot field: the
    flat pixels are nearly all one level, so only the holes' few pixels tell gain from offset (the
    fixture lines' part, whose flat pixels are 95 % within 135-141 grey)."""
    s = 4
    n = size * s
    canvas = np.full((n, n), 30, np.float32)
    cv2.rectangle(canvas, (int(0.03 * n), int(0.03 * n)), (int(0.97 * n), int(0.97 * n)), 140, -1)
    for fx, fy in ((0.12, 0.12), (0.88, 0.12), (0.12, 0.88), (0.88, 0.88), (0.5, 0.5)):
        cv2.circle(canvas, (int(fx * n), int(fy * n)), int(0.06 * n), 200, -1)
        cv2.circle(canvas, (int(fx * n), int(fy * n)), int(0.04 * n), 30, -1)
    rng = np.random.default_rng(seed)
    for _ in range(dots):
        x, y = rng.uniform(0.6, 0.8, 2) * n
        cv2.circle(canvas, (int(x), int(y)), int(0.004 * n), 210, -1)
    return cv2.GaussianBlur(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA), (0, 0), 0.8)


def test_lighting_fit_tells_gain_from_offset_on_a_one_level_part():
    """A gain gradient under a constant offset, on a part that is mostly one grey level: the lit level of a dark
    (30) pixel near each corner stays within half a grey level, whatever the pose.

    The trim fit kept a pose-dependent set of edge pixels (the dots, the rings) and traded gain slope
    for offset slope: 1-5 grey levels off in the dark at a corner, where the part's edge meets the
    dark background (on fixture-hard seed 12 the trim fit was 3-6 grey levels off there against the
    generator's truth, the flat-tukey fit 0.1-0.2).
    """
    size = 1024
    part = render_one_level_plate(size)
    ref = reference_for(part)
    truth = np.array([1.08, 0.04, -0.03, 0.05, 0.03, 0.01, 8.0, 0.0, 0.0])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    gain, offset = lighting_truth(truth, xs, ys, size, size)
    lit = (gain * part + offset).astype(np.float32)
    corners = np.array([[60, 60], [size - 60, 60], [60, size - 60], [size - 60, size - 60]], np.float64)
    true_gain, true_offset = lighting_truth(truth, corners[:, 0], corners[:, 1], size, size)
    rng = np.random.default_rng(1)
    for angle, dx, dy in ((-0.3, 0.4, -0.8), (0.2, -1.5, 1.2), (0.05, 0.0, 0.0)):
        noisy = place_frame(lit, pose_matrix(angle, dx, dy, size, size)) + rng.normal(0, 1.5, lit.shape)
        frame = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        coarse = reg.downscale(frame, ref.factors[0])
        coef = ref.photometric(coarse, ref.register(coarse, reg.downscale(frame, ref.factors[1])))
        g, o = reg.lighting_fields(coef, corners[:, 0], corners[:, 1], ref.full_shape)
        assert np.abs(g * 30 + o - (true_gain * 30 + true_offset)).max() < 0.5, (angle, dx, dy)


def test_flat_mask_keeps_edges_out_but_not_the_grey_levels():
    """The flat mask leaves structure edges out; where the flat pixels would be one grey level only (a small
    part on a wide background: gain and offset could not be told apart), it keeps the whole mask."""
    mask = np.full((128, 128), 255, np.uint8)
    ramp = np.repeat(np.linspace(30, 220, 8), 16)[None, :].repeat(128, axis=0).astype(np.float32)
    flat = reg.flat_mask(ramp, mask)
    assert 0 < np.count_nonzero(flat) < mask.size and not flat[:, 15:17].any()  # the steps between levels
    small_part = np.full((128, 128), 30, np.float32)
    small_part[48:80, 48:80] = 200 - 120 * ((np.indices((32, 32)).sum(axis=0) // 2) % 2)  # all edges, no flat inside
    assert (reg.flat_mask(small_part, mask) == mask).all()


def test_photometric_fit_fails_on_a_black_frame(part):
    """A frame with no signal (gain near zero) raises InspectError("registration") rather than dividing by ~0."""
    ref = reference_for(part)
    black = np.zeros_like(ref.coarse)
    with pytest.raises(InspectError) as info:
        reg.fit_photometric(black, ref.coarse, ref.coarse_mask, ref.full_shape)
    assert info.value.reason == "registration"


@pytest.mark.parametrize(
    ("angle", "dx", "dy"), [(0.0, 0.0, 0.0), (0.0, 7.0, -3.0), (0.4, 3.3, -5.7), (-0.5, -8.2, 1.9)]
)
def test_bbox_to_frame_follows_the_pose(angle, dx, dy):
    """A reference-frame box maps to the smallest integer box holding its four corners under the pose."""
    h, w = 300, 400
    pose = reg.Pose(pose_matrix(angle, dx, dy, h, w), 1.0)
    rng = np.random.default_rng(6)
    for _ in range(20):
        x0, y0 = int(rng.integers(20, 300)), int(rng.integers(20, 200))
        box = (x0, y0, x0 + int(rng.integers(1, 60)), y0 + int(rng.integers(1, 60)))
        fx0, fy0, fx1, fy1 = reg.bbox_to_frame(box, pose, h, w)
        corners = np.array([[box[0], box[1], 1], [box[2], box[1], 1], [box[0], box[3], 1], [box[2], box[3], 1]], float)
        pts = corners @ pose.matrix.T
        assert fx0 <= pts[:, 0].min() and fy0 <= pts[:, 1].min()
        assert fx1 >= pts[:, 0].max() and fy1 >= pts[:, 1].max()
        assert pts[:, 0].min() - fx0 < 1 and pts[:, 1].min() - fy0 < 1
        assert fx1 - pts[:, 0].max() < 1 and fy1 - pts[:, 1].max() < 1
        if angle == 0 and float(dx).is_integer() and float(dy).is_integer():
            assert (fx0, fy0, fx1, fy1) == (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def test_bbox_to_frame_clips_to_the_image():
    """Boxes partly pushed past the image edge by the pose are clipped to the image."""
    pose = reg.Pose(pose_matrix(0.0, 10.0, 10.0, 100, 100), 1.0)
    assert reg.bbox_to_frame((80, 80, 95, 95), pose, 100, 100) == (90, 90, 100, 100)
    back = reg.Pose(pose_matrix(0.0, -10.0, -10.0, 100, 100), 1.0)
    assert reg.bbox_to_frame((2, 3, 12, 13), back, 100, 100) == (0, 0, 2, 3)


def test_bbox_to_frame_never_returns_an_inverted_box():
    """Whatever the pose, the mapped box satisfies 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."""
    pose = reg.Pose(pose_matrix(0.0, 10.0, 10.0, 100, 100), 1.0)
    x0, y0, x1, y1 = reg.bbox_to_frame((95, 95, 100, 100), pose, 100, 100)
    assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 100


def test_tile_photometric_matches_the_full_image_field():
    """Per-tile coefficients in tile-local (u, v) reproduce the full-image gain and offset at every tile pixel."""
    coef = TRUE_COEF.astype(np.float32)
    plan = TilePlan(250, 330, 64, 64, 32)
    origins = [plan.origin(i) for i in range(plan.n_tiles)]
    tiles = reg.tile_photometric(coef, origins, plan.halo, (250, 330))
    assert tiles.shape == (plan.n_tiles, reg.PHOTO_TERMS) and tiles.dtype == np.float32
    v, u = np.mgrid[0 : plan.tile : 7, 0 : plan.tile : 7].astype(np.float64)
    for (y0, x0), t in zip(origins, tiles, strict=True):
        xs, ys = x0 - plan.halo + u, y0 - plan.halo + v  # image pixel of tile pixel (u, v)
        gain_full, offset_full = lighting_truth(coef, xs, ys, 250, 330)
        gain_tile = t[0] + t[1] * u + t[2] * v + t[3] * u * u + t[4] * v * v + t[5] * u * v
        np.testing.assert_allclose(gain_tile, gain_full, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t[6] + t[7] * u + t[8] * v, offset_full, rtol=1e-5, atol=1e-4)


def test_warp_to_reference_undoes_the_pose(part):
    """Resampling a posed frame with its pose brings the part back onto the reference grid."""
    truth = reg.Pose(pose_matrix(0.4, 5.5, -3.25, SIZE, SIZE), 1.0)
    frame = place_frame(part, truth.matrix)
    back = reg.warp_to_reference(frame, truth)
    inner = (slice(40, -40), slice(40, -40))
    assert np.abs(back[inner] - part[inner]).mean() < 1.0
    assert np.abs(frame[inner] - part[inner]).mean() > 5 * np.abs(back[inner] - part[inner]).mean()


def test_pose_reports_shift_and_angle():
    """Pose.shift/angle_deg/to_dict read the translation and rotation of the matrix."""
    angle = 0.7
    m = np.array(
        [
            [math.cos(math.radians(angle)), -math.sin(math.radians(angle)), 3.5],
            [math.sin(math.radians(angle)), math.cos(math.radians(angle)), -2.25],
        ]
    )
    pose = reg.Pose(m, 0.97)
    assert pose.shift == (3.5, -2.25) and pose.angle_deg == pytest.approx(angle)
    assert pose.to_dict() == {"dx": 3.5, "dy": -2.25, "angle_deg": 0.7, "ecc": 0.97}


def test_lighting_is_fitted_away_from_the_border_band(part):
    """Vignetting confined to a band along the image edges does not bend the lighting model of the interior."""
    rng = np.random.default_rng(8)
    ref = reference_for(part)
    lit = synthetic_lit(ref.coarse, TRUE_COEF, ref.full_shape) + rng.normal(0, 1, ref.coarse.shape).astype(np.float32)
    h, w = lit.shape
    ys, xs = np.mgrid[0:h, 0:w]
    to_edge = np.minimum(np.minimum(ys, h - 1 - ys), np.minimum(xs, w - 1 - xs))
    vignetted = np.where(to_edge < 0.055 * min(h, w), lit * 0.6, lit).astype(np.float32)
    mask = np.zeros_like(ref.coarse_mask)
    mask[1:-1, 1:-1] = 255  # a region reaching the image edge, as a real inspection region may
    coef = reg.fit_photometric(vignetted, ref.coarse, reg.light_mask(mask), ref.full_shape)
    assert_fields_close(coef, TRUE_COEF, ref.full_shape, 0.1)
    everywhere = reg.fit_photometric(vignetted, ref.coarse, mask, ref.full_shape)
    with pytest.raises(AssertionError):  # the control: fitted on the band too, the model bends
        assert_fields_close(everywhere, TRUE_COEF, ref.full_shape, 0.2)


def fit_weight(shape: tuple[int, int]) -> np.ndarray:
    """The inspection region ``inspectd fit`` uses without an ROI: all but its default margin."""
    weight = np.ones(shape, np.uint8)
    margin = max(4, math.ceil(shape[0] / 512) + 2)
    weight[:margin] = weight[-margin:] = 0
    weight[:, :margin] = weight[:, -margin:] = 0
    return weight


def fitted_reference(part: np.ndarray, search: bool = True) -> reg.RegistrationReference:
    """A reference as ``inspectd fit`` builds one (margin, masks without the border zone, the pose search);
    ``search=False``: as fits before the search did (whole region as mask, ECC from the identity)."""
    from calibration.fit_pipeline import FitConfig, level_reference

    coarse_f, fine_f = reg.level_factors(*part.shape)
    levels = reg.downscale(part, coarse_f), reg.downscale(part, fine_f)
    limits = FitConfig(max_shift_px=0.04 * part.shape[0], max_rotation_deg=3.0)
    return level_reference(*levels, fit_weight(part.shape), limits, search=search)


def cluttered_frame(part: np.ndarray, truth: np.ndarray, seed: int) -> np.ndarray:
    """The part under pose ``truth``, with fixture bars and vignetting that stay with the camera, noise, uint8."""
    frame = sensor_clutter(place_frame(part, truth))
    noise = np.random.default_rng(seed).normal(0, 2, frame.shape).astype(np.float32)
    return np.clip(np.rint(frame + noise), 0, 255).astype(np.uint8)


LARGE_POSES = [(1.5, 24.0, -24.0), (-1.5, -24.0, 12.0), (1.0, 12.0, 20.0), (-0.7, 20.0, 24.0)]


@pytest.fixture(scope="module")
def speckled_2048() -> tuple[np.ndarray, reg.RegistrationReference]:
    part = render_speckled_part(2048)
    return part, fitted_reference(part)


def test_pose_search_starts_ecc_near_the_truth(speckled_2048):
    """The rotation sweep with phase correlation puts the start within a coarse pixel of the pose (2048 px)."""
    part, ref = speckled_2048
    for i, (angle, dx, dy) in enumerate(LARGE_POSES):
        truth = pose_matrix(angle, dx, dy, *part.shape)
        coarse = reg.downscale(cluttered_frame(part, truth, i), ref.factors[0])
        start = reg._scale_matrix(ref.search.find(coarse), part.shape, coarse.shape)
        assert corners_error(start, truth, *part.shape) <= ref.factors[0], (angle, dx, dy)


def registration_errors(part: np.ndarray, ref: reg.RegistrationReference) -> list[float]:
    """Corner error (px) of each LARGE_POSES frame's registration; inf where it was refused."""
    errors = []
    for i, (angle, dx, dy) in enumerate(LARGE_POSES):
        truth = pose_matrix(angle, dx, dy, *part.shape)
        try:
            errors.append(corners_error(register(ref, cluttered_frame(part, truth, i)).matrix, truth, *part.shape))
        except InspectError:
            errors.append(math.inf)
    return errors


def test_large_poses_register_with_a_fixture_bar_and_vignetting_in_view(speckled_2048):
    """±1.5 deg and ±24 px with fixture bars and vignetting along two edges register within 0.1 px (2048 px).

    The control: ECC from the identity with the border zone in its mask, as fits did before, lands
    pixels off (the bars and the vignetting stay with the camera and pull towards its own pose).
    """
    part, ref = speckled_2048
    errors = registration_errors(part, ref)
    print("corner errors with the search (px):", [round(e, 3) for e in errors])
    assert max(errors) <= 0.1
    before = registration_errors(part, fitted_reference(part, search=False))
    print("corner errors as before (px):", [round(e, 3) for e in before])
    assert max(before) > 1.0


@pytest.mark.slow
def test_large_poses_register_at_full_size():
    """The same poses at 5120 px (±1.5 deg, ±24 px) with the bars and vignetting: within 0.15 px."""
    part = render_speckled_part(5120)
    errors = registration_errors(part, fitted_reference(part))
    print("corner errors at 5120 px (px):", [round(e, 3) for e in errors])
    assert max(errors) <= 0.15


@pytest.mark.parametrize("kind", ["noise", "blank", "other part"])
def test_the_search_does_not_make_unrelated_images_register(speckled_2048, kind):
    """With the pose search, noise, a blank frame or another part are still refused for registration."""
    part, ref = speckled_2048
    rng = np.random.default_rng(2)
    if kind == "noise":
        frame = rng.integers(0, 256, part.shape, dtype=np.uint8)
    elif kind == "blank":
        frame = np.full(part.shape, 90, np.uint8)
    else:
        other = render_part(part.shape[0])
        frame = np.rint(sensor_clutter(np.flipud(other))).astype(np.uint8)
    with pytest.raises(InspectError) as info:
        register(ref, frame)
    assert info.value.reason == "registration" and info.value.detail


def test_the_pose_search_computes_its_spectra_without_intel_ipp(monkeypatch):
    """The same frame gets the same pose: the search's spectra are computed with OpenCV's IPP paths off.

    With IPP on, the same good images registered twice in one process at 5120 px moved by up to
    2e-6 px and two fits of the same images gave other thresholds (1.8248, 1.8243); with the
    spectra computed without it they are bit-identical. The flag is per thread and is restored.
    """
    seen = []
    dft = cv2.dft

    def recording_dft(*args, **kwargs):
        seen.append(cv2.ipp.useIPP())
        return dft(*args, **kwargs)

    monkeypatch.setattr(reg.cv2, "dft", recording_dft)
    before = cv2.ipp.useIPP()
    level = cv2.GaussianBlur(np.random.default_rng(2).random((256, 256)).astype(np.float32) * 255, (0, 0), 2)
    search = reg.PoseSearch.build(level, np.full(level.shape, 255, np.uint8), 3.0)
    found = [search.find(np.roll(level, (3, -2), axis=(0, 1))) for _ in range(2)]
    assert seen and not any(seen)
    np.testing.assert_array_equal(found[0], found[1])
    assert cv2.ipp.useIPP() == before


def _lit_frame(part: np.ndarray) -> tuple[reg.RegistrationReference, np.ndarray, reg.Pose]:
    """The canonical part lit with TRUE_COEF and placed with a small pose: reference, coarse frame, its pose."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    gain, offset = lighting_truth(TRUE_COEF, xs, ys, SIZE, SIZE)
    lit = (gain * part + offset).astype(np.float32)
    frame = np.clip(np.rint(place_frame(lit, pose_matrix(0.2, 3.1, -1.6, SIZE, SIZE))), 0, 255).astype(np.uint8)
    ref = reference_for(part)
    coarse = reg.downscale(frame, ref.factors[0])
    return ref, coarse, ref.register(coarse, reg.downscale(frame, ref.factors[1]))


def test_a_failed_flat_fit_falls_back_to_the_trim_fit_on_the_whole_light_mask(part, monkeypatch):
    """Where the flat-pixel Tukey fit gives no sane gain, ``photometric`` returns the trim fit over the whole
    light mask instead of failing the frame. The failure is emulated (a Tukey solve that returns an all-zero
    model): a reference that makes the real one fail is a 333x200 first image, too slow to fit here."""
    ref, coarse, pose = _lit_frame(part)
    assert ref.light_fit == "flat-tukey"
    monkeypatch.setattr(reg, "_tukey_solve", lambda design, target, scale: np.zeros(reg.PHOTO_TERMS))
    coef = ref.photometric(coarse, pose)
    assert_fields_close(coef, TRUE_COEF, ref.full_shape, 1.0)
    registered = cv2.warpAffine(
        coarse,
        reg._scale_matrix(pose.matrix, ref.coarse.shape, ref.full_shape),
        ref.coarse.shape[::-1],
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    trim = reg.fit_photometric(registered, ref.coarse, reg.light_mask(ref.coarse_mask), ref.full_shape, "trim")
    np.testing.assert_array_equal(coef, trim)


def test_a_failed_trim_fit_fails_the_frame(part, monkeypatch):
    """A bundle that fits with "trim" has no older fit to fall back to: the frame fails registration."""
    ref, coarse, pose = _lit_frame(part)
    ref = replace(ref, light_fit="trim")
    monkeypatch.setattr(reg, "_trimmed_solve", lambda design, target, scale: np.zeros(reg.PHOTO_TERMS))
    with pytest.raises(InspectError) as info:
        ref.photometric(coarse, pose)
    assert info.value.reason == "registration"


@pytest.mark.parametrize("shape", [(301, 437), (211, 173, 3)])
def test_resampling_into_a_view_of_a_larger_frame_is_the_same(shape):
    """``warp_to_reference(out=...)`` writes into a view (the interior of the padded frame) what it would return."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    pose = reg.Pose(pose_matrix(0.8, 3.3, -2.7, *shape[:2]), 1.0)
    padded = np.zeros((shape[0] + 16, shape[1] + 24, *shape[2:]), np.uint8)
    interior = padded[8 : 8 + shape[0], 5 : 5 + shape[1]]
    assert reg.warp_to_reference(image, pose, interior) is interior
    assert np.array_equal(interior, reg.warp_to_reference(image, pose))
    assert not padded[:8].any()  # nothing written outside it
    with pytest.raises(ValueError, match="out is"):
        reg.warp_to_reference(image, pose, padded)
