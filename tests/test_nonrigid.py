"""Non-rigid alignment: the resampling through pose and field, the field found on bent parts, defects left alone."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from calibration import synth
from engines import nonrigid as nr
from engines import registration as reg
from tests.helpers import pose_matrix, sensor_clutter
from tests.test_registration import fit_weight, fitted_reference

SIZE = 2048


def test_zero_field_resamples_like_warp_affine():
    """With a zero field the strip-wise remap equals cv2.warpAffine, on an awkward size and a rotated pose."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.uniform(0, 255, (301, 437)).astype(np.float32), (0, 0), 2).astype(np.uint8)
    matrix = pose_matrix(0.8, 3.3, -2.7, 301, 437)
    field = nr.Field(np.zeros((2, nr.NODES, nr.NODES)), (301, 437))
    got = field.resample(image, matrix)
    want = reg.warp_to_reference(image, reg.Pose(matrix, 1.0))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.abs(got.astype(int) - want).max() <= 1


def test_field_resampling_follows_a_known_field():
    """A constant field of (1.5, -0.75) px resamples like the pose shifted by it."""
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.uniform(0, 255, (256, 320)).astype(np.float32), (0, 0), 3)
    coef = np.stack([np.full((nr.NODES, nr.NODES), 1.5), np.full((nr.NODES, nr.NODES), -0.75)])
    got = nr.Field(coef, (256, 320)).resample(image, np.eye(2, 3))
    want = reg.warp_to_reference(image, reg.Pose(np.array([[1, 0, 1.5], [0, 1, -0.75]]), 1.0))
    assert np.abs(got - want)[4:-4, 4:-4].max() < 0.05


def resample_with_copies(field: nr.Field, image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``Field.resample`` as it was before it remapped straight into the output (kept to compare with)."""
    h, w = image.shape[:2]
    step = nr.MAP_STEP
    nodes_y, nodes_x = -(-h // step) + 2, -(-w // step) + 2
    ys = (np.arange(nodes_y) - 1) * step + (step - 1) / 2
    xs = (np.arange(nodes_x) - 1) * step + (step - 1) / 2
    dx, dy = field.at(xs, ys)
    m = np.asarray(matrix, np.float64)
    map_x = (m[0, 0] * xs[None, :] + m[0, 1] * ys[:, None] + m[0, 2] + dx).astype(np.float32)
    map_y = (m[1, 0] * xs[None, :] + m[1, 1] * ys[:, None] + m[1, 2] + dy).astype(np.float32)
    out = np.empty_like(image)
    for y0 in range(0, h, nr.STRIP):
        y1 = min(h, y0 + nr.STRIP)
        r0, r1 = y0 // step, min(nodes_y - 1, (y1 - 1) // step + 2)
        size = (nodes_x * step, (r1 - r0 + 1) * step)
        strip_x = cv2.resize(map_x[r0 : r1 + 1], size, interpolation=cv2.INTER_LINEAR)
        strip_y = cv2.resize(map_y[r0 : r1 + 1], size, interpolation=cv2.INTER_LINEAR)
        rows, cols = slice(y0 + step - r0 * step, y0 + step - r0 * step + (y1 - y0)), slice(step, step + w)
        out[y0:y1] = cv2.remap(
            image, strip_x[rows, cols], strip_y[rows, cols], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
    return out


@pytest.mark.parametrize(("shape", "dtype"), [((613, 587, 3), np.uint8), ((530, 701), np.uint16)])
def test_resampling_into_the_output_is_bit_for_bit_as_before(shape, dtype):
    """Remapping each strip straight into the output's rows gives exactly what copying the strips gave."""
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.uniform(0, np.iinfo(dtype).max, shape).astype(np.float32), (0, 0), 2).astype(dtype)
    field = nr.Field(rng.normal(0, 1.5, (2, nr.NODES, nr.NODES)), shape[:2])
    matrix = pose_matrix(-0.7, 5.25, 3.5, *shape[:2])
    got = field.resample(image, matrix)
    assert got.dtype == image.dtype and got.shape == image.shape
    assert np.array_equal(got, resample_with_copies(field, image, matrix))
    padded = np.zeros((shape[0] + 20, shape[1] + 30, *shape[2:]), dtype)  # into a view, as the inspector does
    interior = padded[7 : 7 + shape[0], 11 : 11 + shape[1]]
    assert field.resample(image, matrix, interior) is interior
    assert np.array_equal(interior, got)
    with pytest.raises(ValueError, match="out is"):
        field.resample(image, matrix, padded)


@pytest.fixture(scope="module")
def design() -> np.ndarray:
    return synth.render_design(synth.SynthConfig(size=SIZE, seed=11)).image


@pytest.fixture(scope="module")
def references(design) -> tuple[reg.RegistrationReference, reg.RegistrationReference]:
    """Rigid and non-rigid references built from the golden part as the fit builds them."""
    weight = fit_weight((SIZE, SIZE))
    rigid = fitted_reference(design)
    field = nr.FieldReference.from_full(design, weight, (SIZE, SIZE))
    return rigid, replace(rigid, field=field)


def bent_frame(design: np.ndarray, seed: int, clutter: bool = True) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A posed (±1.5 deg, ±24 px) and bent (9x9 grid, 0.8 px) part with light drift, a fixture bar, noise."""
    config = synth.SynthConfig(size=SIZE, seed=seed, bend_px=0.8, max_rotation_deg=1.5, max_shift_px=24)
    rng = np.random.default_rng(seed)
    matrix = synth._pose_matrix(synth._sample_pose(config, rng))
    image, disp = synth._warp(design, matrix, config, rng)
    image = image * np.float32(rng.uniform(0.95, 1.05)) + np.float32(rng.uniform(-4, 4))
    if clutter:
        image = sensor_clutter(image, edges=(int(rng.integers(4)),))
    image = np.clip(np.rint(image + rng.normal(0, 2, image.shape)), 0, 255).astype(np.uint8)
    return image, matrix, disp


def normal_misalignment(design: np.ndarray, pose: reg.Pose, matrix: np.ndarray, disp: tuple) -> np.ndarray:
    """|found - true| frame position of the reference's edge pixels, along each edge's normal (px).

    Only the normal component shows in the residual (an edge slid along itself looks the same);
    the outer 3 % of the side, where the fixture bar may hide the part, is left out.
    """
    gx = cv2.Sobel(design, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(design, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    strength = np.hypot(gx, gy)
    ys, xs = np.nonzero(strength > 10)
    keep = np.minimum(np.minimum(xs, SIZE - 1 - xs), np.minimum(ys, SIZE - 1 - ys)) >= 0.03 * SIZE
    ys, xs = ys[keep], xs[keep]
    # synth: image(q) = design(A^-1 q + d(q)), so reference point p appears at q = A p - A_lin d(A p)
    q = matrix[:, :2] @ np.stack([xs, ys]) + matrix[:, 2:]
    qi = np.clip(np.rint(q).astype(int), 0, SIZE - 1)
    true = q - matrix[:, :2] @ np.stack([disp[0][qi[1], qi[0]], disp[1][qi[1], qi[0]]])
    found = pose.matrix[:, :2] @ np.stack([xs, ys]) + pose.matrix[:, 2:]
    if pose.field is not None:
        bx, by = nr._basis(xs, SIZE), nr._basis(ys, SIZE)
        found = found + np.stack([np.einsum("nk,kl,nl->n", by, pose.field.coef[c], bx) for c in range(2)])
    error = found - true
    return np.abs(error[0] * gx[ys, xs] + error[1] * gy[ys, xs]) / strength[ys, xs]


def test_the_field_removes_a_bend_to_a_quarter_pixel(design, references):
    """On bent parts (±1.5 deg, ±24 px, fixture bar, light drift, noise) the edges land within 0.25 px (95 %).

    The control: the rigid pose alone leaves them about a pixel off.
    """
    rigid, nonrigid = references
    for seed in (1, 2):
        image, matrix, disp = bent_frame(design, seed)
        before = normal_misalignment(design, reg.align(image, rigid).pose, matrix, disp)
        after = normal_misalignment(design, reg.align(image, nonrigid).pose, matrix, disp)
        p95 = np.percentile(before, 95), np.percentile(after, 95)
        print(f"seed {seed}: 95 % of edge misalignment {p95[0]:.3f} -> {p95[1]:.3f} px")
        assert np.percentile(after, 95) <= 0.25
        assert np.percentile(before, 95) >= 0.6


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_shared_levels_are_the_direct_ones_unrounded(references, dtype):
    """A field that shares its level: the registration's levels are area averages of it, within a grey level of the
    frame downscaled directly (each rounds the true average to the frame's type once, by up to half a level);
    without sharing, the direct ones exactly."""
    rigid, nonrigid = references
    rng = np.random.default_rng(5)
    scale = 257 if dtype == np.uint16 else 1
    image = (cv2.GaussianBlur(rng.uniform(0, 255, (SIZE, SIZE)).astype(np.float32), (0, 0), 3) * scale).astype(dtype)
    coarse, fine, level = reg.frame_levels(image, nonrigid)
    assert np.array_equal(level, reg.downscale(image, nonrigid.field.factor))
    for got, factor in ((coarse, nonrigid.factors[0]), (fine, nonrigid.factors[1])):
        want = reg.downscale(image, factor)
        assert got.shape == want.shape and got.dtype == np.float32
        assert 0 < np.abs(got - want).max() <= 1
    own = replace(nonrigid, field=replace(nonrigid.field, shared_levels=False))
    for got, factor in zip(reg.frame_levels(image, own), (*nonrigid.factors, nonrigid.field.factor), strict=True):
        assert np.array_equal(got, reg.downscale(image, factor))
    coarse, fine, level = reg.frame_levels(image, rigid)
    assert level is None and np.array_equal(fine, reg.downscale(image, rigid.factors[1]))


def test_coupled_steps_land_the_edges_closer_than_the_diagonal_did(design, references):
    """Two Gauss-Newton steps with each block's x-y coupling land a bent part's edges within 0.2 px (95 %); three
    with the diagonal only, as bundles before it run, left these frames' 0.21 and 0.26 px."""
    _, nonrigid = references
    before = replace(nonrigid, field=replace(nonrigid.field, steps=3, coupled=False, shared_levels=False))
    for seed in (1, 3):
        image, matrix, disp = bent_frame(design, seed)
        now = np.percentile(normal_misalignment(design, reg.align(image, nonrigid).pose, matrix, disp), 95)
        then = np.percentile(normal_misalignment(design, reg.align(image, before).pose, matrix, disp), 95)
        print(f"seed {seed}: 95 % of edge misalignment {then:.3f} (3 diagonal steps) -> {now:.3f} px (2 coupled)")
        assert now <= 0.2 < then


def test_a_first_step_on_the_coarser_level_lands_the_edges_as_close(design, references):
    """The first Gauss-Newton step on the level twice as coarse (``coarse_steps``, off by default: it left a good
    part's border band beside a fixture bar further off), the frame's level smoothed once before the steps resample
    it: a bent part's edges within 0.2 px (95 %), within 0.02 px of both steps on the field's level with the resampled
    level smoothed per step (bundles before either, which still run so)."""
    _, nonrigid = references
    assert nonrigid.field.coarse_steps == nr.COARSE_STEPS == 0 and nonrigid.field._coarse is None
    assert nonrigid.field.smooth_first
    coarse = replace(nonrigid, field=replace(nonrigid.field, coarse_steps=1))
    assert coarse.field._coarse.level.shape == tuple(s // 2 for s in nonrigid.field.level.shape)
    before = replace(nonrigid, field=replace(nonrigid.field, smooth_first=False, coarse_steps=0))
    for seed in (1, 3):
        image, matrix, disp = bent_frame(design, seed, clutter=True)
        then = np.percentile(normal_misalignment(design, reg.align(image, before).pose, matrix, disp), 95)
        for label, ref in (("smoothed first", nonrigid), ("and a coarse step", coarse)):
            now = np.percentile(normal_misalignment(design, reg.align(image, ref).pose, matrix, disp), 95)
            print(f"seed {seed}: 95 % of edge misalignment {then:.3f} (before) -> {now:.3f} px ({label})")
            assert now <= 0.2 and now <= then + 0.02


def test_new_fits_take_one_step_on_a_level_four_times_coarser_and_two_on_finer():
    """``steps_for``: one Gauss-Newton step from a field's level 4x coarser than the frame on (5120 px frames), two
    on finer ones (2048 px and below), as ``from_full`` builds a new fit's reference; a reference given its steps
    (a bundle's record) keeps them."""
    assert [nr.steps_for(f) for f in (1, 2, 4, 8)] == [nr.STEPS, nr.STEPS, 1, 1] and nr.STEPS == 2
    rng = np.random.default_rng(2)
    for shape, factor, steps in (((256, 3840), 4, 1), ((256, 2048), 2, 2)):
        mean = cv2.GaussianBlur(rng.uniform(0, 255, shape).astype(np.float32), (0, 0), 4)
        ref = nr.FieldReference.from_full(mean, np.ones(shape, np.uint8), shape)
        assert (ref.factor, ref.steps) == (factor, steps)
        assert replace(ref, steps=2).steps == 2


def test_the_coarser_level_sees_what_an_occluder_hides():
    """An occluder's pixels on the coarser level: a coarse pixel is hidden where any of its four is (odd sides too)."""
    rng = np.random.default_rng(3)
    hidden = rng.random((41, 37)) > 0.9
    want = hidden[:40, :36].reshape(20, 2, 18, 2).any(axis=(1, 3))
    assert np.array_equal(nr._shrink(hidden, (20, 18)), want)


def visible_on_the_whole_level(ref: nr.FieldReference, hidden: np.ndarray) -> tuple[np.ndarray, nr._BlockSystems]:
    """``FieldReference._visible`` as it was before it looked only at the blocks an occluder reaches (kept to compare
    with): the grown occluder, the weight and the touched blocks over the whole level. Returns (weight, blocks)."""
    grow = math.ceil(nr.HIDDEN_GROW * ref.block / nr.BLOCK)
    grown = cv2.dilate(hidden.astype(np.uint8), np.ones((2 * grow + 1,) * 2, np.uint8))
    seen = np.pad(1 - grown.astype(np.float32), ref._pad, constant_values=1)
    weight = ref._weight * seen
    touched = nr._block_sums(ref._weight - weight, ref._blocks) > 0
    blocks = nr._BlockSystems(**{k: np.copy(v) for k, v in vars(ref._reference_blocks).items()})
    if touched.any():
        rows, cols = (np.flatnonzero(touched.any(axis=axis)) for axis in (1, 0))
        b = ref.block
        box = (slice(rows[0] * b, (rows[-1] + 1) * b), slice(cols[0] * b, (cols[-1] + 1) * b))
        inside = touched[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        part = nr._BlockSystems.measure(ref._jac[:, box[0], box[1]] * seen[box], weight[box], inside.shape, inside)
        touched = touched.reshape(-1)
        for name in ("pixels", "info", "inverse", "gain_part", "gain_inverse"):
            getattr(blocks, name)[touched] = getattr(part, name)
        blocks.shown[touched] = part.pixels >= nr.VISIBLE_MIN * np.maximum(ref._pixels[touched], 1)
    return weight, blocks


def test_what_an_occluder_hides_is_measured_as_on_the_whole_level():
    """Looking only at the blocks an occluder reaches leaves every weight and block system as the whole level's, to
    the bit: a bar along each edge, a corner, a speck inside, one at the padded corner of a level of odd sides, and a
    band along every edge (measured box by box, ``_block_boxes``)."""
    rng = np.random.default_rng(5)
    h, w = 301, 437  # not whole blocks: the level is padded
    level = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 2)
    mask = np.full((h, w), 255, np.uint8)
    mask[:6], mask[:, -5:] = 0, 0
    ref = nr.FieldReference(1, level, mask, (h, w))
    masks = []
    for rows, cols in [(slice(0, 9), slice(None)), (slice(-14, None), slice(30, 400)), (slice(None), slice(0, 3))]:
        masks.append(np.zeros((h, w), bool))
        masks[-1][rows, cols] = True
    corner = np.zeros((h, w), bool)
    corner[:20, -40:] = corner[:50, -8:] = True
    speck = np.zeros((h, w), bool)
    speck[157:160, 223] = True  # within the grow of the next blocks down and right
    padded = np.zeros((h, w), bool)
    padded[-1, -1] = True
    ring = np.zeros((h, w), bool)  # a band along every edge (``SensorModel.clutter_band``), tilted a little
    ys, xs = np.mgrid[0:h, 0:w]
    ring |= (ys < 9 + xs // 60) | (xs < 12 - ys // 80) | (ys > h - 8 - xs // 90) | (xs > w - 10 + ys // 70)
    for hidden in (*masks, corner, speck, padded, ring):
        unseen, blocks = ref._visible(hidden)
        want_weight, want_blocks = visible_on_the_whole_level(ref, hidden)
        weight = ref._weighted((slice(0, ref._weight.shape[0]), slice(0, ref._weight.shape[1])), unseen)
        assert np.array_equal(weight, want_weight)
        for name, value in vars(want_blocks).items():
            assert np.array_equal(getattr(blocks, name), value), name


def estimate_with_full_grids(ref: nr.FieldReference, frame_level: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The field's estimation as it was before its maps were interpolated from a grid (kept to compare with):
    full-size coordinate grids of the pose, the field added on its own LEVEL_STEP grid each step. Returns coef."""
    h, w = ref.level.shape
    hb, wb = ref._blocks
    a = reg._scale_matrix(np.asarray(matrix, np.float64), (h, w), ref.full_shape)
    xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    base_x = (a[0, 0] * xs + a[0, 1] * ys + a[0, 2]).astype(np.float32)
    base_y = (a[1, 0] * xs + a[1, 1] * ys + a[1, 2]).astype(np.float32)
    coef = np.zeros((2, nr.NODES * nr.NODES))
    frame = frame_level.astype(np.float32)
    per_node = ref._scale * (hb * wb) / nr.NODES**2
    bending = per_node * (nr.SMOOTHNESS * ref._bending + nr.RIDGE * np.eye(nr.NODES * nr.NODES))
    jac, weight, blocks = ref._jac, ref._weight, ref._reference_blocks
    for step in range(nr.STEPS):
        dx, dy = (ref._on_level(c.reshape(nr.NODES, nr.NODES), (w, h)) for c in coef)
        warped = cv2.remap(frame, base_x + dx, base_y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        resid = np.pad(nr._smooth(warped) - ref._smooth_level, ref._pad) * weight
        rhs = np.stack([nr._block_sums(j * resid, (hb, wb)).reshape(-1) for j in jac], axis=1).astype(np.float64)
        energy = nr._block_sums(resid * resid, (hb, wb)).reshape(-1).astype(np.float64)
        theta = np.einsum("bij,bj->bi", blocks.inverse, rhs)
        explained = np.einsum("bi,bi->b", rhs, theta)
        weights = ref._robust_weights(np.maximum(energy - explained, 0), theta[:, 2], blocks) * blocks.shown
        g = rhs[:, :2] - np.einsum("bij,bj->bi", blocks.gain_part, rhs[:, 2:])
        if step == 0:
            g = nr._held_to_affine(g, theta[:, :2], blocks.info, weights, ref._affine_basis, nr.BEND_PX / ref.factor)
        coef += ref._solve(weights, g, coef, bending, blocks.info)
        np.clip(coef, -nr.MAX_PX / ref.factor, nr.MAX_PX / ref.factor, out=coef)
    return (coef * ref.factor).reshape(2, nr.NODES, nr.NODES)


def test_the_estimate_matches_the_full_grid_implementation(design, references):
    """Maps interpolated from a grid (pose included) find the field the full-size grids found, to 0.01 px.

    Not bit for bit: the pose's coordinates come out of a float32 interpolation, and the field's
    outer LEVEL_STEP / 2 level pixels are extrapolated, not clamped. Both with every step on the field's level and
    its resampled level smoothed per step (as the full-grid implementation did).
    """
    _, nonrigid = references
    per_step = replace(nonrigid.field, smooth_first=False, coarse_steps=0)
    for seed in (1, 2):
        image, _, _ = bent_frame(design, seed)
        pose = reg.align(image, replace(nonrigid, field=None)).pose
        level = nr.to_level(image, nonrigid.field.factor)
        got = per_step.estimate(level, pose.matrix).coef
        want = estimate_with_full_grids(per_step, level, pose.matrix)
        assert np.abs(want).max() > 0.5, "there is a bend to find"
        assert np.abs(got - want).max() < 0.01


def test_a_block_is_held_to_the_affine_motion_along_its_information_only():
    """A block whose own shift departs from the affine motion of the rest by more than the radius counts as if it
    departed by the radius, along each direction of its information; along a direction it knows nothing about its
    "shift" changes nothing; the other blocks' measurements are untouched, to the bit."""
    rng = np.random.default_rng(0)
    blocks = (8, 10)
    basis = nr._affine_basis(blocks)
    motion = np.array([0.3, 0.01, -0.02, -0.2, 0.02, 0.01])
    moved = np.stack([basis @ motion[:3], basis @ motion[3:]], axis=1)
    own = moved + rng.normal(0, 0.05, (80, 2))
    root = rng.normal(0, 1, (80, 2, 2))
    info = np.einsum("bij,bkj->bik", root, root) + 0.1 * np.eye(2)
    info[7] = np.diag([50.0, 0.0])  # a block of lines along y: it tells x only
    own[3] += (4.0, -1.0)  # off by 4 px along x
    own[7] += (0.2, 40.0)  # its y is anything
    g = np.einsum("bij,bj->bi", info, own)
    weights = np.ones(80)
    weights[[3, 7]] = 0  # the fit of the motion leaves them out (the robust weights would)
    held = nr._held_to_affine(g, own, info, weights, basis, radius=1.0)
    others = np.setdiff1d(np.arange(80), [3, 7])
    assert np.array_equal(held[others], g[others])
    assert np.allclose(held[7], g[7])  # nothing to hold along y, and x is within the radius
    counted = np.linalg.solve(info[3], held[3]) - moved[3]
    along = np.linalg.eigh(info[3])[1].T @ counted
    assert np.abs(along).max() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("held", [True, False])
def test_a_block_that_reads_a_large_shift_pulls_the_field_only_so_far(design, monkeypatch, held):
    """Six blocks beside the left edge read a shift that is not there (a lighting ramp, clutter) at their full
    information, as in the one step taken at 5120 px: held to BEND_PX of the part's affine motion, the edges beside
    them are pulled as far by a 30 px misreading as by a 15 px one; not held (the control), twice as far."""
    ref = replace(nr.FieldReference.from_full(design, np.ones((SIZE, SIZE), np.uint8), (SIZE, SIZE)), steps=1)
    if not held:
        monkeypatch.setattr(nr, "BEND_PX", 1e9)
    wb = ref._blocks[1]
    strength = np.trace(ref._info, axis1=1, axis2=2)
    misread = sorted((r * wb + c for r in range(6, 14) for c in (1, 2, 3)), key=lambda k: -strength[k])[:6]
    normal = {k: np.linalg.pinv(ref._inverse[k]) for k in misread}  # what the block's moments are made of
    measured = nr.FieldReference._block_moments
    config = synth.SynthConfig(size=SIZE, seed=1, bend_px=0.8, max_rotation_deg=0, max_shift_px=0)
    image, disp = synth._warp(design, np.eye(2, 3), config, np.random.default_rng(1))
    image = np.clip(np.rint(image + np.random.default_rng(2).normal(0, 2, image.shape)), 0, 255).astype(np.uint8)
    gx = cv2.Sobel(design, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(design, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    block = ref.factor * ref.block
    ys, xs = np.nonzero(np.hypot(gx, gy) > 10)
    near = (ys >= 6 * block) & (ys < 14 * block) & (xs < 5 * block)
    ys, xs = ys[near], xs[near]
    off = {}
    for shift in (15.0, 30.0):

        def misreading(self, *args, shift=shift):
            rhs, energy = measured(self, *args)
            for k in misread:
                rhs[k] += normal[k] @ np.array([-shift, shift / 2, 0, 0]) / self.factor
            return rhs, energy

        monkeypatch.setattr(nr.FieldReference, "_block_moments", misreading)
        field = ref.estimate(nr.to_level(image, ref.factor), np.eye(2, 3))
        by, bx = nr._basis(ys, SIZE), nr._basis(xs, SIZE)
        dx, dy = (np.einsum("nk,kl,nl->n", by, field.coef[c], bx) for c in range(2))
        ex, ey = dx + disp[0][ys, xs], dy + disp[1][ys, xs]
        off[shift] = np.percentile(np.abs(ex * gx[ys, xs] + ey * gy[ys, xs]) / np.hypot(gx, gy)[ys, xs], 95)
    print(f"held {held}: edges beside the blocks off by {off[15.0]:.2f} / {off[30.0]:.2f} px (95 %)")
    if held:
        assert off[30.0] <= 1.1 * off[15.0] and off[30.0] < 1.5
    else:
        assert off[30.0] >= 1.6 * off[15.0]


def test_the_level_maps_are_the_pose_where_the_field_is_zero(references):
    """With a zero field the grid-interpolated maps are the pose at every level pixel, borders included."""
    _, nonrigid = references
    ref = nonrigid.field
    h, w = ref.level.shape
    a = reg._scale_matrix(pose_matrix(1.2, 17.5, -9.25, *ref.full_shape), (h, w), ref.full_shape)
    map_x, map_y = ref._level_maps(a, np.zeros((2, nr.NODES * nr.NODES)))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    assert map_x.shape == map_y.shape == (h, w)
    assert np.abs(map_x - (a[0, 0] * xs + a[0, 1] * ys + a[0, 2])).max() < 2e-3
    assert np.abs(map_y - (a[1, 0] * xs + a[1, 1] * ys + a[1, 2])).max() < 2e-3


def test_the_first_step_warps_the_level_by_the_pose_as_its_maps_would(design, references):
    """Without a field yet the level is warped by the pose alone (one affine warp): what the maps of a zero field
    gave, to float32 rounding of the coordinates (under 0.02 grey levels on a smoothed level); with a field, the maps.
    """
    _, nonrigid = references
    ref = nonrigid.field
    image, _, _ = bent_frame(design, 3)
    level = nr._smooth(nr.to_level(image, ref.factor), ref._sigma)
    a = reg._scale_matrix(pose_matrix(1.2, 17.5, -9.25, *ref.full_shape), level.shape, ref.full_shape)
    zero = np.zeros((2, nr.NODES * nr.NODES))
    by_maps = cv2.remap(level, *ref._level_maps(a, zero), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(ref._warp_level(level, a, zero) - by_maps).max() < 0.02
    bent = np.full_like(zero, 0.3)
    by_maps = cv2.remap(level, *ref._level_maps(a, bent), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.array_equal(ref._warp_level(level, a, bent), by_maps)


def test_a_frame_lit_otherwise_leaves_no_residual_for_a_field(references):
    """Each block's own gain and offset come out of the residual ``fit --alignment auto`` measures, flat blocks too.

    Before, a flat block (gain and offset the same unknown) kept its whole brightness difference: on fixture-hard
    seed 9004 the lighting drowned what the field removes (0.9 % for the median image) and the fit went rigid.
    """
    _, nonrigid = references
    ref = nonrigid.field
    identity = np.eye(2, 3)
    lit = ref.level * np.float32(1.04) + np.float32(12)  # the reference, lit brighter
    shifted = np.roll(ref.level, 1, axis=1)  # the reference, one level pixel off: what a field is for
    assert ref.residual_energy(ref.level, identity, None) < 1e-6 * ref.residual_energy(shifted, identity, None)
    assert ref.residual_energy(lit, identity, None) < 1e-3 * ref.residual_energy(shifted, identity, None)


def paint_missing_pad(image: np.ndarray, design: np.ndarray, matrix: np.ndarray) -> tuple[slice, slice]:
    """Paint one pad of the part over with the part's body grey, in the frame; returns the frame window."""
    s = SIZE
    cx, cy = 0.14 * s + 2.5 * 0.22 * s / 4, 0.2 * s + 4.5 * 0.6 * s / 9  # a pad in the middle of the pad array
    x, y = matrix[:, :2] @ np.array([cx, cy]) + matrix[:, 2]
    half = 0.02 * s
    win = (slice(int(y - half), int(y + half)), slice(int(x - half), int(x + half)))
    image[win] = np.uint8(np.median(image[int(y + 2.5 * half) : int(y + 3 * half), int(x - half) : int(x + half)]))
    return win


def test_the_field_does_not_explain_a_missing_structure_away(design, references):
    """A pad painted over moves the field there by less than 0.15 px, and its residual stays (a defect still scores)."""
    _, nonrigid = references
    image, matrix, _ = bent_frame(design, 3, clutter=False)
    clean = reg.align(image, nonrigid)
    damaged = image.copy()
    rows, cols = paint_missing_pad(damaged, design, matrix)
    with_defect = reg.align(damaged, nonrigid)
    ys = np.arange(rows.start, rows.stop, 4, dtype=float)
    xs = np.arange(cols.start, cols.stop, 4, dtype=float)
    moved = np.hypot(*(np.subtract(with_defect.pose.field.at(xs, ys), clean.pose.field.at(xs, ys))))
    assert moved.max() < 0.15
    residual = np.abs(with_defect.registered.astype(np.float32) - clean.registered.astype(np.float32))
    assert residual.max() > 40, "the missing pad is as visible after alignment as before"


def test_the_field_follows_a_bend_beside_an_occluder(design):
    """A fixture bar 24 px deep over the left edge: the part beside it (30-128 px in) is aligned to 0.3 px (95 %).

    The bar's pixels are hidden from the field's estimation; the blocks it covers in part are
    measured on what they still show. Dropping every block the bar touched left the outer
    64 px to the spline's extrapolation from the interior: 0.5-0.6 px off here, and 4-5 px
    on the markers of bent parts of the fixture lines, which then scored as defects.
    """
    weight = np.ones((SIZE, SIZE), np.uint8)
    weight[:6] = weight[-6:] = 0
    weight[:, :6] = weight[:, -6:] = 0
    ref = nr.FieldReference.from_full(design, weight, (SIZE, SIZE))
    gx = cv2.Sobel(design, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(design, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    strength = np.hypot(gx, gy)
    ys, xs = np.nonzero(strength > 10)
    bar = 24
    beside = (xs >= bar + 6) & (xs < 128) & (ys > 100) & (ys < SIZE - 100)
    ys, xs = ys[beside], xs[beside]
    for seed in (1, 2):
        config = synth.SynthConfig(size=SIZE, seed=seed, bend_px=0.8, max_rotation_deg=0, max_shift_px=0)
        rng = np.random.default_rng(seed)
        image, disp = synth._warp(design, np.eye(2, 3), config, rng)
        image[:, :bar] = 10
        image = np.clip(np.rint(image + rng.normal(0, 2, image.shape)), 0, 255).astype(np.uint8)
        level = nr.to_level(image, ref.factor)
        hidden = np.zeros(level.shape, bool)
        hidden[:, : -(-bar // ref.factor)] = True
        field = ref.estimate(level, np.eye(2, 3), hidden)
        by, bx = nr._basis(ys, SIZE), nr._basis(xs, SIZE)
        dx, dy = (np.einsum("nk,kl,nl->n", by, field.coef[c], bx) for c in range(2))
        # synth with the identity pose: image(q) = design(q + d(q)), so the field should find -d
        ex, ey = dx + disp[0][ys, xs], dy + disp[1][ys, xs]
        error = np.abs(ex * gx[ys, xs] + ey * gy[ys, xs]) / strength[ys, xs]
        bend = np.percentile(np.hypot(disp[0][ys, xs], disp[1][ys, xs]), 95)
        print(f"seed {seed}: bend {bend:.2f} px beside the bar, 95 % of misalignment {np.percentile(error, 95):.3f} px")
        assert bend > 1.0, "the bend to follow is there"
        assert np.percentile(error, 95) <= 0.3


@pytest.mark.slow
def test_the_field_removes_a_bend_at_full_size():
    """At 5120 px the same bends land within 0.25 px (95 % of edge pixels), in the one step a new fit takes there."""
    global SIZE
    size, SIZE = SIZE, 5120
    try:
        design = synth.render_design(synth.SynthConfig(size=SIZE, seed=11)).image
        field = nr.FieldReference.from_full(design, fit_weight((SIZE, SIZE)), (SIZE, SIZE))
        assert field.factor == 4 and field.steps == 1  # a new fit's one step on a level this coarse (steps_for)
        ref = replace(fitted_reference(design), field=field)
        image, matrix, disp = bent_frame(design, 1)
        error = normal_misalignment(design, reg.align(image, ref).pose, matrix, disp)
        print(f"5120 px: 95 % of edge misalignment {np.percentile(error, 95):.3f} px")
        assert np.percentile(error, 95) <= 0.25
    finally:
        SIZE = size


FIXTURE_HARD = {  # synth's fixture-hard line (benchmarks/detector_comparison.py)
    "fixture": "random",
    "fixture_depth": (0.25, 0.55),
    "band_vignette": (0.12, 0.30),
    "band_blur_px": (1.2, 2.2),
    "max_rotation_deg": 1.5,
    "max_shift_px": 24,
    "bend_px": 0.8,
    "light": 2.5,
}


def line_frame(config: synth.SynthConfig, design: synth.Design, index: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Training image ``index`` of a synth line, with where each reference pixel truly lies in it (x and y maps)
    and its fixture bars. synth: image(q) = design(A^-1 q + d(q)), so reference p lies at q - A_lin d(q), q = A p."""
    rng = np.random.default_rng([config.seed, 0, index])  # the stream render_frame draws the pose and bend from
    matrix = synth._pose_matrix(synth._sample_pose(config, rng))
    _, disp = synth._warp(design.image, matrix, config, rng)
    pixels, _, _, _, bars, _ = synth.render_frame(config, design, 0, index, "good")
    ys, xs = np.mgrid[0 : config.size, 0 : config.size].astype(np.float32)
    q = [(row[0] * xs + row[1] * ys + row[2]).astype(np.float32) for row in matrix]
    d = [cv2.remap(c.astype(np.float32), *q, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for c in disp]
    where = np.stack([q[c] - (matrix[c, 0] * d[0] + matrix[c, 1] * d[1]) for c in range(2)]).astype(np.float32)
    return pixels, where, bars


def back_to_reference(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    return cv2.remap(image.astype(np.float32), where[0], where[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def bar_mask(bars: list, size: int) -> np.ndarray:
    """The frame's fixture bars (with their tilt and blurred edge), as the sensor model would hide them."""
    mask = np.zeros((size, size), np.float32)
    for bar in bars:
        depth = int(np.ceil(bar["depth_px"] + abs(bar["tilt_px"]) + 3))
        edge = {0: mask[:depth], 1: mask[size - depth :], 2: mask[:, :depth], 3: mask[:, size - depth :]}
        edge[bar["edge"]][...] = 1
    return mask


@pytest.mark.parametrize(("seed", "index"), [(12, 23), (9004, 16)])
def test_the_band_beside_a_fixture_bar_stays_where_it_is(seed, index):
    """On the fixture lines the markers and edges of the part's outer 40-100 px land within 3 px of their place.

    The reference is the mean of the line's first 12 good images brought back with their true pose
    and bend (as the fit's mean, without its registration errors); the frame's bar is hidden as the
    sensor model hides it. With a ridge too weak for the band's blocks weighted down for clutter
    (1e-3), the field beside the bar went 3.05 px (seed 12) and 4.6 px (seed 9004, the spent
    held-back seed, whose marker dots then set the threshold: README) off; now 2.3 and 2.8 px.
    """
    config = synth.SynthConfig(size=SIZE, seed=seed, **FIXTURE_HARD)
    design = synth.render_design(config)
    mean = np.mean([back_to_reference(*line_frame(config, design, i)[:2]) for i in range(12)], axis=0)
    ref = nr.FieldReference.from_full(mean, fit_weight((SIZE, SIZE)), (SIZE, SIZE))
    image, where, bars = line_frame(config, design, index)
    hidden = cv2.resize(back_to_reference(bar_mask(bars, SIZE), where), ref.level.shape[::-1], cv2.INTER_AREA) > 0
    matrix = synth._pose_matrix(synth._sample_pose(config, np.random.default_rng([seed, 0, index])))
    field = ref.estimate(nr.to_level(image, ref.factor), matrix, hidden)
    gx = cv2.Sobel(design.image, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(design.image, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    strength = np.hypot(gx, gy)
    ys, xs = np.nonzero(strength > 10)
    inside = np.minimum(np.minimum(xs, SIZE - 1 - xs), np.minimum(ys, SIZE - 1 - ys))
    ys, xs = ys[(inside >= 40) & (inside <= 100)], xs[(inside >= 40) & (inside <= 100)]
    by, bx = nr._basis(ys, SIZE), nr._basis(xs, SIZE)
    found = [
        matrix[c, 0] * xs + matrix[c, 1] * ys + matrix[c, 2] + np.einsum("nk,kl,nl->n", by, field.coef[c], bx)
        for c in range(2)
    ]
    ex, ey = found[0] - where[0][ys, xs], found[1] - where[1][ys, xs]
    error = np.abs(ex * gx[ys, xs] + ey * gy[ys, xs]) / strength[ys, xs]
    print(f"seed {seed} image {index}: the band's structure at most {error.max():.2f} px off")
    assert error.max() <= 3.0


def test_a_band_along_every_edge_is_measured_in_four_boxes_not_the_whole_level():
    """``_block_boxes``: blocks touched along every edge (clutter here and there) fit in four boxes, one per edge,
    that together hold them and little else; blocks along one edge are one box, their bounding box."""
    rng = np.random.default_rng(2)
    touched = np.zeros((40, 40), bool)
    touched[:2] = touched[-3:] = rng.random((1, 40)) < 0.4
    touched[:, :2] |= rng.random((40, 1)) < 0.4
    touched[:, -1:] |= rng.random((40, 1)) < 0.4
    boxes = nr._block_boxes(touched)
    covered = np.zeros_like(touched, dtype=int)
    for rows, cols in boxes:
        covered[rows, cols] += 1
    assert len(boxes) == 4 and (covered[touched] >= 1).all()
    assert covered.sum() <= 0.3 * touched.size, "the boxes hold the bands, not the interior"
    left = np.zeros((40, 40), bool)
    left[5:30, :3] = True
    assert nr._block_boxes(left) == [(slice(5, 30), slice(0, 3))]


def test_the_clutter_band_not_measured_where_flat_brings_the_border_edges_closer(design, references):
    """Frames with the border band's nuisances (synth's band blur, glow, clutter and vignetting) on bent parts: with
    the learned clutter band (48 px, as fixture-hard fits learn it at this size) not measured where the part is
    flat, the part's edges 2.5-6 % of the side from the image edge land closer on every frame (95th percentile),
    and the edges overall no further off."""
    from engines.sensor import SensorModel

    _, nonrigid = references
    mean = design[None].astype(np.float16)
    plain = replace(nonrigid, sensor=SensorModel(0.0, mean, None, (0.0,) * 4))
    banded = replace(nonrigid, sensor=SensorModel(0.0, mean, None, (48.0,) * 4))
    band = round(0.04 * SIZE)
    for seed in (3, 4, 5):
        image, matrix, disp = bent_frame(design, seed, clutter=False)
        rng = np.random.default_rng(seed)
        img = image.astype(np.float32)
        gain = np.ones_like(img)
        synth._band_vignette(gain, band, (0.12, 0.3), rng)
        img *= gain
        synth._band_blur(img, band, (1.2, 2.2), rng)
        synth._band_glow(img, band, rng.uniform(0, 60, 4).astype(np.float32))
        synth._clutter(img, band, rng)
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        errors = [normal_misalignment(design, reg.align(img, ref).pose, matrix, disp) for ref in (plain, banded)]
        gx = cv2.Sobel(design, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
        gy = cv2.Sobel(design, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
        ys, xs = np.nonzero(np.hypot(gx, gy) > 10)
        d = np.minimum(np.minimum(xs, SIZE - 1 - xs), np.minimum(ys, SIZE - 1 - ys))
        zone = d[d >= 0.03 * SIZE] < 0.06 * SIZE  # normal_misalignment's edge pixels, in its order
        p95 = [(np.percentile(e[zone], 95), np.percentile(e, 95)) for e in errors]
        print(f"seed {seed}: border zone {p95[0][0]:.3f} -> {p95[1][0]:.3f} px, all {p95[0][1]:.3f} -> {p95[1][1]:.3f}")
        assert p95[1][0] < p95[0][0]
        assert p95[1][1] <= p95[0][1] + 0.01


def test_flat_is_where_the_part_has_no_structure_nearby():
    """``FieldReference.flat``: a bright square on a uniform ground is structure at its edges and STRUCTURE_GROW
    level px around them (smoothed, so a little more); the ground far from it and the square's inside are flat."""
    level = np.full((120, 160), 60.0, np.float32)
    level[40:80, 50:110] = 180.0
    ref = nr.FieldReference(1, level, np.full(level.shape, 255, np.uint8), level.shape)
    flat = ref.flat
    assert flat.shape == level.shape
    assert not flat[40 - nr.STRUCTURE_GROW : 40 + nr.STRUCTURE_GROW + 1, 60:100].any(), "the top edge and around"
    assert not flat[50:70, 50 - nr.STRUCTURE_GROW : 50 + nr.STRUCTURE_GROW + 1].any(), "the left edge and around"
    assert flat[:25].all() and flat[55:65, 70:90].all(), "far from the edges, and inside"


def test_the_block_systems_skip_products_with_the_weight_column_to_the_bit():
    """``_BlockSystems.measure`` takes a column's product with the fourth (the 0 / 1 weight) as the column itself:
    every sum and system equals the one from all ten products, on a Jacobian with signed zeros where unweighted."""
    rng = np.random.default_rng(8)
    weight = (rng.random((96, 128)) > 0.3).astype(np.float32)
    columns = [rng.normal(0, 20, weight.shape), rng.normal(0, 20, weight.shape), rng.uniform(20, 200, weight.shape)]
    jac = np.stack([*columns, np.ones(weight.shape)]).astype(np.float32) * weight
    got = nr._BlockSystems.measure(jac, weight, (3, 4))
    pairs = [(i, j) for i in range(4) for j in range(i, 4)]
    normal = np.empty((12, 4, 4))
    for i, j in pairs:
        normal[:, i, j] = normal[:, j, i] = nr._block_sums(jac[i] * jac[j], (3, 4)).reshape(-1)
    info, gain_part, gain_inverse = nr._schur(normal)
    np.testing.assert_array_equal(got.info, info)
    np.testing.assert_array_equal(got.gain_part, gain_part)
    np.testing.assert_array_equal(got.gain_inverse, gain_inverse)


@pytest.mark.parametrize("shape", [(2051, 1999), (1999, 3075)])
def test_a_bending_part_with_a_fixture_bar_aligns_on_sides_that_are_not_a_multiple_of_the_level(shape):
    """On a 2051 x 1999 sensor the field's level (2x) has 1025 x 999 whole pixels: what the occluder and the clutter
    band hide is carried onto that level, not one pixel past it (the frame was refused with a broadcast error)."""
    from engines.sensor import SensorModel, edge_view

    design = synth.render_design(synth.SynthConfig(width=shape[1], height=shape[0], seed=3)).image
    field = nr.FieldReference.from_full(design, fit_weight(design.shape), design.shape)
    assert field.factor == 2 and field.level.shape == (shape[0] // 2, shape[1] // 2)
    mean = design[None].astype(np.float16)
    frame = design.copy()
    edge_view(frame, 0)[:40] = synth.FIXTURE
    frame = np.clip(frame + 3, 0, 255).astype(np.uint8)
    for sensor in (SensorModel(60.0, mean), SensorModel(60.0, mean, None, (30.0, 25.0, 41.0, 19.0))):
        aligned = reg.align(frame, replace(fitted_reference(design), field=field, sensor=sensor))
        assert aligned.pose.field is not None and aligned.left_out > 0
        assert aligned.pose.field.magnitude < 1.0, "the part does not bend: the field stays small"
