"""Non-rigid alignment: a smooth displacement field after the global pose, folded into one resampling.

A part that bends by a pixel or two moves its structure edges against the reference by that
much after the best rigid pose, and the per-pixel tolerance band has to widen with it. After
the global pose (``engines.registration``), ``FieldReference.estimate`` finds a smooth field of
displacements on a level of about ``FIELD_SIDE`` px:

1. per block of ``BLOCK`` px at that level, one Lucas-Kanade step with a local gain and offset
   (``r = -gx dx - gy dy + a R + b``), reduced to the block's 2x2 information about (dx, dy):
   a block of horizontal lines says much about dy and nothing about dx;
2. all blocks together fit a cubic B-spline of ``NODES`` x ``NODES`` control points over the
   image, regularised by its bending energy, so the field is smooth at the scale of the part
   (hundreds of pixels) and cannot follow anything local; blocks whose residual stays far above
   the typical one (a defect, a missing structure) are down-weighted (reweighted each step), and
   in the first step no block's own shift counts further than ``BEND_PX`` from the affine motion
   of all of them (along each direction of its information): a block that reads a lighting ramp
   as a shift of 10 px pulls the spline no further than one that reads 3 px;
3. Gauss-Newton steps (two; one on a level 4x coarser than the frame, ``steps_for``), each resampling the level
   with the pose and the field found so far
   (both evaluated on a LEVEL_STEP grid and interpolated, as at full resolution below) and solving
   for both components' control points together, with each block's x-y coupling (``COUPLED``).
   The frame's level is smoothed once, before the steps resample it (``SMOOTH_FIRST``), not after
   each step's resampling. (``COARSE_STEPS``, off: the first steps on the level twice as coarse.)

The field is then folded into the full-resolution resampling: the reference-to-frame map
(affine pose + field) is evaluated on a 16 px grid, interpolated per strip of rows and applied
with one ``cv2.remap`` (float maps: converting them to fixed point first cost more than it saved).
With a zero field the result equals ``cv2.warpAffine``'s.

What it adds per 5120 px frame, over the rigid preparation with occluders (CPU of one thread, per stage, on the
alignment benchmark's frames, ``benchmarks/alignment_cost.py``; measured under load, so high): the estimation about
18-25 ms in its one step (the occluder's blocks measured again, ``_visible``, 1.4 ms over the blocks it reaches; the
smoothing 2.4 once, ``SMOOTH_FIRST``; the level's maps 1.1, remap 2-3, block sums 3.5-7.5 (they read the 26 MB
Jacobian and the level from memory: taken in strips that stay in cache, the same sums cost as much), the coupled
spline solve 2-5 of which the conjugate gradients 1.5), the resampling some 12-15 ms more than ``cv2.warpAffine``
(building the float maps per strip; the field at the map's nodes 2, its basis there made once per size; the remap
itself costs what warpAffine's does: fixed-point maps, ``cv2.convertMaps``, made it slower, and so did one
two-channel map, strips of 32-1024 rows cost the same or more), and the field's level nothing: the registration's
levels are averaged from it (``SHARED_LEVELS``), which saves 3 ms. Before (three uncoupled steps, the occluder's
blocks measured on the whole level, the level read on its own): about 75 ms in all, the estimation 50 ms of it.

The estimation measures the whole inspection region, border band included (the part's outermost
markers bend too), except what the sensor frame hides (``hidden``): a frame's occluders, the user's
mask, and, within the band along each edge where the good images showed clutter (the fit's
``SensorModel.clutter_band``), the part's flat stretches (``flat``): there clutter, or the steep
ramp of the band's vignetting that one gain per block cannot follow, is the only structure, and it
moved the markers beside it by 2-4 px. The part's edges and markers in the band still count
(hiding the whole band left the part's outer edge 3 px off on some poses).
Near the image edges the spline continues what the rest shows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

# what a fit may choose: the pose only, the pose and a field, or let the good images decide (do they bend?)
ALIGNMENTS = ("auto", "rigid", "nonrigid")
DEFAULT_ALIGNMENT = "auto"
FIELD_SIDE = 1280  # px: long side of the level the field is estimated on
BLOCK = 32  # px at that level: one local shift measurement per block
NODES = 17  # control points per axis of the cubic B-spline (over the whole image)
# Gauss-Newton steps, each with the x-y coupling of every block's information (COUPLED). Bundles before it solved
# x and y apart (the coupling left out) in 3 steps: a block of diagonal edges, whose information is all coupling, had
# its step doubled along the edge normal, and the third step still moved control points 0.15-0.37 px (rms, 5120 px
# benchmark frames). Coupled, the second step moves them 0.07-0.09 px and two steps leave the edges closer than three
# did (95 % of the edge misalignment, median over frames: 0.222 -> 0.189 px at 5120 px, 0.175 -> 0.142 at 2048).
# Both recorded per bundle (``FieldReference.steps``, ``.coupled``): bundles keep how they were fitted.
STEPS = 2
# On a field's level this many times (or more) coarser than the frame, fits take one step (``steps_for``): a bend of a
# pixel or two is a fraction of a level pixel there, well inside what one linearisation of the smoothed level
# (SMOOTH_SIGMA) covers, and the second step cost some 11 ms of the ~30 the estimation took at 5120 px. Measured on
# the alignment benchmark's frames (9x9 bend of 0.8 px, fixture bar; 95 % of the edge misalignment, median over 6
# frames): at 5120 px (level factor 4) one step 0.175 px against two 0.190, with a bend of 2 px 0.491 against 0.458;
# at 2048 px (factor 2) one step left 0.188 against 0.142, with a bend of 2 px 0.84 against 0.37, so finer levels
# keep two. Not closer on every part at 5120 px: the frames of other designs (seeds 12, 21, 22; 4 frames each) gave
# 0.171 / 0.200 / 0.248 px with one step against 0.167 / 0.178 / 0.186 with two (the 0.25 px the alignment is held
# to, but a trade: set this above any factor to take two steps again). Recorded per bundle (``steps``) like the rest:
# bundles before it take two steps at every size.
ONE_STEP_FACTOR = 4
COUPLED = True
SMOOTHNESS = 3e-4  # bending-energy weight, relative to the typical block's information per control point
MAX_PX = 6.0  # px (full resolution): no control point moves further; a larger "bend" is not one
# In the first step each block's own shift (from the rigid pose) counts at most this far (full-resolution px, along
# each direction of the block's information) from the affine motion all blocks show together: the pose's residual
# is affine, a bend is a few px, and a block that reads a lighting ramp or clutter as a shift of 5-20 px pulled the
# field 3-4 px off at the markers beside a fixture bar (spent seeds 9014-9016 at 5120 px, docs/measurements.md,
# "Streaks are not a bar, and a block's own shift held to the part's motion"). Along each direction: a block of
# lines along x says nothing about x, and its "shift" there is noise that the block's information already weighs
# down.
BEND_PX = 3.0
MAP_STEP = 16  # px: the full-resolution map is evaluated on this grid and interpolated bilinearly
LEVEL_STEP = 8  # px at the field's level: the grid the field is evaluated on while estimating
STRIP = 256  # rows resampled per remap call (keeps the maps in cache)
MOMENT_BAND = 4  # block rows of the field's level per band of the residual's products (``_block_moments``)
# Weight of the field's own size, relative like SMOOTHNESS: where blocks say little (flat part, or the border
# band's blocks weighted down for clutter) the field stays at the pose. At 1e-3 (bundles before it was raised
# keep it, see ``FieldReference.ridge``) a clutter block weighted down to a few percent still set the
# field around it: the band's marker dots of the fixture lines landed 4-6 px off and set the threshold. Not
# higher: at 1e-2 a part that does not bend measured a gain over FIELD_GAIN_MIN (fit_pipeline) and went
# non-rigid, and the field stayed a little further from the bends it should follow (tests/test_nonrigid.py).
RIDGE = 5e-3
# The frame is read once, at the field's level, and the registration's levels area-averaged from it (up to a grey
# level from a direct downscale, see ``registration.frame_levels``): two reads of a 5120 px frame fewer, some 10 ms.
# Recorded per bundle (``FieldReference.shared_levels``): bundles fitted before read the frame three times.
SHARED_LEVELS = True
SMOOTH_SIGMA = 1.5  # px at the field's level
# The frame's level is smoothed once, before the steps resample it, not after each step's resampling: the two
# differ only by what the bilinear interpolation itself blurs (a small part of SMOOTH_SIGMA), and one smoothing of
# the level costs what each step's did. Recorded per bundle (``FieldReference.smooth_first``): bundles before it
# smoothed per step.
SMOOTH_FIRST = True
# Of the STEPS, this many run first on the level twice as coarse (blocks of BLOCK / 2 px there: the same blocks of
# the part, smoothed and an occluder grown over the same width of it), a quarter of the pixels. Off: one coarse step
# then one on the field's level cut the estimation by a fifth (31.6 -> 25.0 CPU ms under load, 5120 px benchmark
# frames) and left the edges closer (95 %: 0.189 -> 0.177 px), but a good part's border band beside a fixture bar
# further off: fixture-hard seed 11's good 002 scored 1.6 -> 2.2 and set the threshold 1.75 -> 2.20 (2048 px).
# Recorded per bundle (``FieldReference.coarse_steps``) all the same.
COARSE_STEPS = 0
GAIN_LIMIT = 0.35  # a block's own gain this far from the typical one is not lighting
HIDDEN_GROW = 3  # px at the field's level around an occluder: the smoothing (SMOOTH_SIGMA) spreads its edge
VISIBLE_MIN = 0.25  # a block an occluder covers in part counts if it shows at least this fraction of its pixels
# The clutter band (engines.sensor.SensorModel.clutter_band) is not measured where the part is flat: gradients of the
# smoothed reference at most FLAT_SLOPE grey levels per level pixel, STRUCTURE_GROW level px from any steeper one (the
# grow of what is hidden, HIDDEN_GROW, eats into it: two pixels of margin stay around the part's edges and markers).
FLAT_SLOPE = 2.0
STRUCTURE_GROW = 5
NOISE_FLOOR = 0.25  # grey levels² per pixel (after smoothing): below this a residual is noise, whatever the median
ROBUST = 4.0  # blocks whose residual exceeds this many times the median are down-weighted


def parameters() -> dict[str, float]:
    """What a bundle records of the field's estimation, so a bundle is never run with other constants."""
    return {
        "block": BLOCK,
        "nodes": NODES,
        "steps": STEPS,
        "coupled": COUPLED,
        "smoothness": SMOOTHNESS,
        "ridge": RIDGE,
        "shared_levels": SHARED_LEVELS,
        "smooth_first": SMOOTH_FIRST,
        "coarse_steps": COARSE_STEPS,
        "smooth_sigma": SMOOTH_SIGMA,
        "robust": ROBUST,
        "noise_floor": NOISE_FLOOR,
        "gain_limit": GAIN_LIMIT,
        "max_px": MAX_PX,
        "bend_px": BEND_PX,
        "hidden_grow": HIDDEN_GROW,
        "visible_min": VISIBLE_MIN,
    }


def steps_for(factor: int) -> int:
    """The Gauss-Newton steps a new fit takes on a field's level ``factor`` times coarser than the frame."""
    return 1 if factor >= ONE_STEP_FACTOR else STEPS


def field_factor(height: int, width: int) -> int:
    """Downscale factor (a power of two) giving about FIELD_SIDE px on the long side."""
    side = max(height, width)
    return max(1, 2 ** round(math.log2(max(side / FIELD_SIDE, 1))))


def _bspline(t: np.ndarray) -> np.ndarray:
    """The uniform cubic B-spline kernel (support -2..2, partition of unity)."""
    a = np.abs(t)
    inner = 2 / 3 - a * a + a**3 / 2
    outer = (2 - a) ** 3 / 6
    return np.where(a < 1, inner, np.where(a < 2, outer, 0.0))


def _basis(coords: np.ndarray, length: int) -> np.ndarray:
    """[len(coords), NODES]: the spline basis at full-resolution coordinates along an axis of ``length`` px.

    Control point k sits at (k - 1) * h with h = (length - 1) / (NODES - 3): every pixel of the
    axis lies where the basis sums to one.
    """
    h = max(length - 1, 1) / (NODES - 3)
    nodes = (np.arange(NODES) - 1) * h
    return _bspline((np.asarray(coords, np.float64)[:, None] - nodes[None, :]) / h)


@functools.lru_cache(maxsize=8)
def _map_nodes(n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The full-resolution map's nodes along an axis of ``n`` px and the field's basis there (over ``length`` px).

    Node j sits at (j - 1) * MAP_STEP + (MAP_STEP - 1) / 2: one node beyond each edge, so the bilinear interpolation
    of ``Field.resample``'s cv2.resize is exact for the affine part up to the border. The same for every frame of a
    size, so made once (the basis cost 0.8 ms a frame at 5120 px); read-only, shared by the threads.
    """
    coords = (np.arange(-(-n // MAP_STEP) + 2) - 1) * MAP_STEP + (MAP_STEP - 1) / 2
    basis = _basis(coords, length)
    coords.flags.writeable = basis.flags.writeable = False
    return coords, basis


def _level_coords(n: int, factor: int) -> np.ndarray:
    """Full-resolution coordinates of the centres of a level's ``n`` pixels."""
    return (np.arange(n) + 0.5) * factor - 0.5


@dataclass(frozen=True)
class Field:
    """A smooth displacement field (frame px) added to the reference-to-frame pose: p -> A p + d(p)."""

    coef: np.ndarray  # [2, NODES, NODES] control points (x, y displacement), full-resolution px
    shape: tuple[int, int]  # full-resolution (height, width) the basis spans

    def at(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The field on the grid of full-resolution coordinates ``ys`` x ``xs``: (dx, dy), each [len(ys), len(xs)]."""
        bx, by = _basis(xs, self.shape[1]), _basis(ys, self.shape[0])
        return tuple(_product(by, c, bx).astype(np.float32) for c in self.coef)

    @property
    def magnitude(self) -> float:
        """The largest displacement on a coarse grid over the image (px), for reports."""
        xs = np.linspace(0, self.shape[1] - 1, 33)
        ys = np.linspace(0, self.shape[0] - 1, 33)
        dx, dy = self.at(xs, ys)
        return float(np.hypot(dx, dy).max())

    def interior_bend(self) -> float:
        """The 95th percentile of the field's length over the image without its outer 6 % (px)."""
        xs = np.linspace(0.06, 0.94, 17) * (self.shape[1] - 1)
        ys = np.linspace(0.06, 0.94, 17) * (self.shape[0] - 1)
        dx, dy = self.at(xs, ys)
        return float(np.percentile(np.hypot(dx, dy), 95))

    def resample(self, image: np.ndarray, matrix: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``image`` (the frame) resampled on the reference grid through the pose ``matrix`` and this field (into
        ``out``, the frame's shape and type, if given)."""
        h, w = image.shape[:2]
        step = MAP_STEP
        (ys, by), (xs, bx) = _map_nodes(h, self.shape[0]), _map_nodes(w, self.shape[1])
        nodes_y, nodes_x = len(ys), len(xs)
        dx, dy = (_product(by, c, bx).astype(np.float32) for c in self.coef)  # ``at`` on the nodes
        m = np.asarray(matrix, np.float64)
        map_x = (m[0, 0] * xs[None, :] + m[0, 1] * ys[:, None] + m[0, 2] + dx).astype(np.float32)
        map_y = (m[1, 0] * xs[None, :] + m[1, 1] * ys[:, None] + m[1, 2] + dy).astype(np.float32)
        if out is None:
            out = np.empty_like(image)
        elif out.shape != image.shape or out.dtype != image.dtype:
            raise ValueError(f"out is {out.shape} {out.dtype}, the frame {image.shape} {image.dtype}")
        # the strips' maps in two buffers for the whole frame: a fresh pair of 6 MB maps per strip (40 at 5120 px)
        # cost some 2 ms more, the same maps
        most = min(nodes_y, STRIP // step + 3) * step
        buffers = np.empty((2, most, nodes_x * step), np.float32)
        for y0 in range(0, h, STRIP):
            y1 = min(h, y0 + STRIP)
            # rows y0..y1 lie between nodes r0 and r1 (inclusive); resize them so node r0 lands on row r0*step
            r0 = y0 // step
            r1 = min(nodes_y - 1, (y1 - 1) // step + 2)
            size = (nodes_x * step, (r1 - r0 + 1) * step)
            strip_x, strip_y = buffers[0, : size[1]], buffers[1, : size[1]]
            cv2.resize(map_x[r0 : r1 + 1], size, dst=strip_x, interpolation=cv2.INTER_LINEAR)
            cv2.resize(map_y[r0 : r1 + 1], size, dst=strip_y, interpolation=cv2.INTER_LINEAR)
            top = y0 + step - r0 * step
            rows = slice(top, top + (y1 - y0))
            cols = slice(step, step + w)
            # straight into the output's rows: no strip-sized result to copy
            cv2.remap(
                image,
                strip_x[rows, cols],
                strip_y[rows, cols],
                cv2.INTER_LINEAR,
                dst=out[y0:y1],
                borderMode=cv2.BORDER_REPLICATE,
            )
        return out


@dataclass(frozen=True)
class FieldReference:
    """What the field estimation needs of the reference: its level image, mask and per-block constants."""

    factor: int
    level: np.ndarray  # float32 [h, w] the reference mean at the field's level (8-bit grey units)
    mask: np.ndarray  # uint8 [h, w] non-zero = measure here
    full_shape: tuple[int, int]
    ridge: float = RIDGE  # a bundle's own (recorded by ``parameters``): a bundle keeps the ridge it was fitted with
    shared_levels: bool = SHARED_LEVELS  # likewise: the registration's levels derived from this one (``frame_levels``)
    steps: int = STEPS  # likewise
    coupled: bool = COUPLED  # likewise
    smooth_first: bool = SMOOTH_FIRST  # likewise
    coarse_steps: int = COARSE_STEPS  # likewise
    block: int = BLOCK  # px at this level (BLOCK / 2 on the coarser level of ``coarse_steps``: the same blocks)

    def __post_init__(self) -> None:
        h, w = self.level.shape
        block = self.block
        hb, wb = -(-h // block), -(-w // block)
        pad = ((0, hb * block - h), (0, wb * block - w))
        ref = np.pad(_smooth(self.level, self._sigma), pad, mode="edge")
        weight = np.pad((self.mask > 0).astype(np.float32), pad)
        gx = cv2.Sobel(ref, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
        gy = cv2.Sobel(ref, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
        jac = np.stack([-gx, -gy, ref, np.ones_like(ref)]) * weight  # r ~ -gx dx - gy dy + a R + b
        blocks = _BlockSystems.measure(jac, weight, (hb, wb))
        consts = {
            "_blocks": (hb, wb),
            "_pad": pad,
            "_jac": jac,
            "_weight": weight,
            "_pixels": blocks.pixels,
            "_info": blocks.info,
            "_smooth_level": _smooth(self.level, self._sigma),
            "flat": _flat(gx[:h, :w], gy[:h, :w]),
            "_inverse": blocks.inverse,
            "_gain_part": blocks.gain_part,
            "_gain_inverse": blocks.gain_inverse,
            "_lighting_inverse": _lighting_inverse(jac, (hb, wb)),
            "_interior": _interior_blocks((hb, wb)),
            "_affine_basis": _affine_basis((hb, wb)),
            "_block_bx": _basis(_level_coords(wb, self.factor * block), self.full_shape[1]),
            "_block_by": _basis(_level_coords(hb, self.factor * block), self.full_shape[0]),
            "_bending": _bending(),
            # what a block with structure tells (the upper quartile: many blocks of a part are flat)
            "_scale": float(np.percentile(np.trace(blocks.info, axis1=1, axis2=2), 75)) if blocks.info.any() else 1.0,
            # grid node j of the level's field sits at level pixel (j + 0.5) * LEVEL_STEP - 0.5: cv2.resize's centres
            "_grid_bx": _basis(_level_coords(w // LEVEL_STEP, self.factor * LEVEL_STEP), self.full_shape[1]),
            "_grid_by": _basis(_level_coords(h // LEVEL_STEP, self.factor * LEVEL_STEP), self.full_shape[0]),
        }
        consts.update(self._map_grid())
        consts["_coarse"] = self._coarser() if self.coarse_steps else None
        consts.update(_block_systems(consts["_block_by"], consts["_block_bx"], blocks.info, consts["_scale"]))
        for name, value in consts.items():
            object.__setattr__(self, name, value)

    @property
    def _sigma(self) -> float:
        """The smoothing at this level: SMOOTH_SIGMA on the field's level, the same width of the part on a coarser."""
        return SMOOTH_SIGMA * self.block / BLOCK

    def _coarser(self) -> FieldReference:
        """The same reference on the level twice as coarse, for the first ``coarse_steps`` (its own steps: none)."""
        h, w = (side // 2 for side in self.level.shape)
        level = cv2.resize(self.level, (w, h), interpolation=cv2.INTER_AREA)
        # a coarse pixel counts where most of its four do, as ``from_full`` decides for the field's level
        mask = cv2.resize((self.mask > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        mask = ((mask > 0.5) * 255).astype(np.uint8)
        return replace(self, factor=2 * self.factor, level=level, mask=mask, coarse_steps=0, block=self.block // 2)

    def _map_grid(self) -> dict[str, np.ndarray]:
        """The grid ``_level_maps`` evaluates on: node j at level pixel (j - 1) * LEVEL_STEP + (LEVEL_STEP - 1) / 2,
        one beyond each edge, so that cv2.resize's bilinear interpolation is exact for the pose up to the border."""
        h, w = self.level.shape
        ys = (np.arange(-(-h // LEVEL_STEP) + 2) - 1) * LEVEL_STEP + (LEVEL_STEP - 1) / 2
        xs = (np.arange(-(-w // LEVEL_STEP) + 2) - 1) * LEVEL_STEP + (LEVEL_STEP - 1) / 2
        return {
            "_map_nodes": (ys, xs),
            # the field's basis at those nodes' full-resolution coordinates, in level px per unit of coef
            "_map_by": _basis((ys + 0.5) * self.factor - 0.5, self.full_shape[0]),
            "_map_bx": _basis((xs + 0.5) * self.factor - 0.5, self.full_shape[1]),
        }

    @classmethod
    def from_full(cls, mean: np.ndarray, region: np.ndarray, full_shape: tuple[int, int]) -> FieldReference:
        """Build from the full-resolution reference mean [H, W] (or [H, W, 3]) and the inspection region.

        The whole region is measured, border band included: the local gain and offset absorb
        vignetting, and blocks that a fixture bar or clutter leaves unexplained are weighted down.
        """
        factor = field_factor(*full_shape)
        level = to_level(mean, factor)
        small = cv2.resize(region.astype(np.float32), level.shape[::-1], interpolation=cv2.INTER_AREA)
        return cls(factor, level, ((small > 0.5) * 255).astype(np.uint8), full_shape, steps=steps_for(factor))

    def estimate(
        self,
        frame_level: np.ndarray,
        matrix: np.ndarray,
        hidden: np.ndarray | None = None,
        areas: list[tuple[slice, slice]] | None = None,
    ) -> Field:
        """The smooth field that, added to the pose ``matrix``, best aligns ``frame_level`` (this level).

        ``hidden``: bool [h, w] on this level in the reference frame, what the frame does not show of
        the part (an occluder, see engines.sensor), inside the boxes ``areas`` where given (the work stays
        within them: a band along every edge is four strips). Its pixels, grown by the smoothing's reach, do not
        count: a block it covers in part is measured on the rest (``_visible``), one it
        leaves less than VISIBLE_MIN of does not count at all. Dropping every block an occluder
        touches left the part's outer 64-128 px beside a fixture bar to the spline's extrapolation
        from the interior: markers there were 4-5 px off on bent parts, and scored as defects.
        """
        coef = np.zeros((2, NODES * NODES))  # full-resolution px
        frame = np.asarray(frame_level, np.float32)
        coarse = self._coarse
        if coarse is not None and self.coarse_steps:
            small = cv2.resize(frame, coarse.level.shape[::-1], interpolation=cv2.INTER_AREA)
            shrunk = None if hidden is None else _shrink(hidden, coarse.level.shape)
            coef = coarse._steps(small, matrix, shrunk, coef, min(self.coarse_steps, self.steps))
        steps = self.steps - (self.coarse_steps if coarse is not None else 0)
        coef = self._steps(frame, matrix, hidden, coef, steps, areas)
        return Field(coef.reshape(2, NODES, NODES), self.full_shape)

    def _steps(
        self,
        frame: np.ndarray,
        matrix: np.ndarray,
        hidden: np.ndarray | None,
        coef: np.ndarray,
        steps: int,
        areas: list[tuple[slice, slice]] | None = None,
    ) -> np.ndarray:
        """``steps`` Gauss-Newton steps on this level from the control points ``coef`` (full-resolution px);
        ``areas``: boxes of this level that hold every ``hidden`` pixel (None: their bounding box)."""
        from engines.registration import _scale_matrix

        if steps <= 0:
            return coef
        h, w = self.level.shape
        a = _scale_matrix(np.asarray(matrix, np.float64), (h, w), self.full_shape)
        coef = coef / self.factor  # level px
        # per control point, relative to what a typical block tells: bending energy, and a ridge that keeps
        # the field at zero where no block says anything (the pose already holds the rigid part)
        per_node = self._scale * (self._blocks[0] * self._blocks[1]) / NODES**2
        bending = per_node * (SMOOTHNESS * self._bending + self.ridge * np.eye(NODES * NODES))
        unseen: list[Patch] = []
        blocks = self._reference_blocks
        if hidden is not None and hidden.any():
            unseen, blocks = self._visible(hidden, areas)
        if self.smooth_first:
            frame = _smooth(frame, self._sigma)
        for step in range(steps):
            warped = self._warp_level(frame, a, coef)
            rhs, energy = self._block_moments(warped if self.smooth_first else _smooth(warped, self._sigma), unseen)
            theta = np.einsum("bij,bj->bi", blocks.inverse, rhs)  # each block's own shift, gain and offset
            explained = np.einsum("bi,bi->b", rhs, theta)
            weights = self._robust_weights(np.maximum(energy - explained, 0), theta[:, 2], blocks) * blocks.shown
            g = rhs[:, :2] - np.einsum("bij,bj->bi", blocks.gain_part, rhs[:, 2:])
            # the first step only: later ones start from the field and measure what it left, a little; held there
            # too, one block beside an occluder took a good part at 2048 px from 2.80 to 3.58 (spent seed 9015, 046)
            if step == 0:
                g = _held_to_affine(g, theta[:, :2], blocks.info, weights, self._affine_basis, BEND_PX / self.factor)
            coef += self._solve(weights, g, coef, bending, blocks.info)
            np.clip(coef, -MAX_PX / self.factor, MAX_PX / self.factor, out=coef)
        return coef * self.factor

    def _warp_level(self, frame: np.ndarray, a: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """``frame`` (this level) resampled on the reference's level through the pose ``a`` (level px) and the field.

        Without a field yet (the first step: at 5120 px the only one) the pose alone is one affine warp: the
        interpolated maps would hold the same coordinates to float32 rounding (the warped levels differ by under
        0.01 grey levels), and building them cost some 1.3 of the 3.8 ms at 1280 px.
        """
        if not coef.any():
            h, w = self.level.shape
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            return cv2.warpAffine(frame, a, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        map_x, map_y = self._level_maps(a, coef)
        return cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def _level_maps(self, a: np.ndarray, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each pixel of the level lies in the frame's level under the pose ``a`` (level px) and the field.

        Pose and field are evaluated on a LEVEL_STEP grid with one node beyond each edge and interpolated
        bilinearly (exact for the pose): no full-size coordinate grids are built and added to per step.
        """
        h, w = self.level.shape
        ys, xs = self._map_nodes
        maps = []
        for c, row in enumerate(a):
            node = row[0] * xs[None, :] + row[1] * ys[:, None] + row[2]
            node = node + _product(self._map_by, coef[c].reshape(NODES, NODES), self._map_bx)
            size = (len(xs) * LEVEL_STEP, len(ys) * LEVEL_STEP)
            full = cv2.resize(node.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
            maps.append(full[LEVEL_STEP : LEVEL_STEP + h, LEVEL_STEP : LEVEL_STEP + w])
        return maps[0], maps[1]

    def _block_moments(self, smoothed: np.ndarray, unseen: list[Patch]) -> tuple[np.ndarray, np.ndarray]:
        """Per block: the Jacobian's products with the smoothed residual [b, 4], and the residual's energy [b]; the
        residual weighted by the reference's weight and the ``unseen`` patches (``_visible``).

        In bands of MOMENT_BAND block rows, each taken through all its products while it is in cache: over whole
        levels (26 MB of Jacobian and 6.5 MB per product at 1280 px) the same arithmetic cost 6 ms a step in the
        pipeline against 3 with warm caches. A block's sums are its own rows' (an area resize), the same in any band.
        """
        resid = smoothed - self._smooth_level
        if any(any(p) for p in self._pad):
            resid = np.pad(resid, self._pad)
        hb, wb = self._blocks
        rows = resid.shape[0] // hb  # level px per block
        sums = np.empty((5, hb, wb), np.float32)  # the three products, the residual, its square
        product = np.empty((MOMENT_BAND * rows, resid.shape[1]), np.float32)
        jac = self._jac
        for top in range(0, hb, MOMENT_BAND):
            bottom = min(hb, top + MOMENT_BAND)
            band, dims = slice(top * rows, bottom * rows), (bottom - top, wb)
            r = resid[band]
            r *= self._weight[band]
            _apply(r, unseen, band)
            out = product[: r.shape[0]]
            # the fourth column of the Jacobian is the (0/1) weight the residual already carries
            for k in range(3):
                sums[k, top:bottom] = _block_sums(np.multiply(jac[k, band], r, out=out), dims)
            sums[3, top:bottom] = _block_sums(r, dims)
            sums[4, top:bottom] = _block_sums(np.multiply(r, r, out=out), dims)
        flat = sums.reshape(5, -1)
        return np.ascontiguousarray(flat[:4].T, np.float64), flat[4].astype(np.float64)

    def residual_energy(self, frame_level: np.ndarray, matrix: np.ndarray, field: Field | None) -> float:
        """What is left of the smoothed residual against the reference (sum of squares over the measured pixels of
        the interior, each block's own gain and offset taken out) after the pose ``matrix`` and, if given,
        ``field``: how much a field buys shows as the drop."""
        from engines.registration import _scale_matrix

        h, w = self.level.shape
        a = _scale_matrix(np.asarray(matrix, np.float64), (h, w), self.full_shape)
        xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
        map_x = (a[0, 0] * xs + a[0, 1] * ys + a[0, 2]).astype(np.float32)
        map_y = (a[1, 0] * xs + a[1, 1] * ys + a[1, 2]).astype(np.float32)
        if field is not None:
            coef = field.coef.reshape(2, -1) / self.factor
            map_x += self._on_level(coef[0].reshape(NODES, NODES), (w, h))
            map_y += self._on_level(coef[1].reshape(NODES, NODES), (w, h))
        warped = cv2.remap(
            frame_level.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        resid = np.pad(_smooth(warped, self._sigma) - self._smooth_level, self._pad) * self._weight
        # each block's own gain and offset taken out first: lighting is not what a field could buy
        rhs = np.stack([_block_sums(j * resid, self._blocks).reshape(-1) for j in self._jac[2:]], axis=1)
        energy = _block_sums(resid * resid, self._blocks).reshape(-1).astype(np.float64)
        explained = np.einsum("bi,bij,bj->b", rhs, self._lighting_inverse, rhs)
        return float(np.maximum(energy - explained, 0)[self._interior].sum())

    def _on_level(self, coef: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """One component of the field at every pixel of the level: on a LEVEL_STEP grid, then bilinear."""
        return cv2.resize(
            _product(self._grid_by, coef, self._grid_bx).astype(np.float32), size, interpolation=cv2.INTER_LINEAR
        )

    @property
    def _reference_blocks(self) -> _BlockSystems:
        """The blocks as the reference has them: every one measured on all its pixels."""
        shown = np.ones(len(self._pixels), bool)
        return _BlockSystems(self._pixels, self._info, self._inverse, self._gain_part, self._gain_inverse, shown)

    def _visible(
        self, hidden: np.ndarray, areas: list[tuple[slice, slice]] | None = None
    ) -> tuple[list[Patch], _BlockSystems]:
        """What the frame shows of the part with the ``hidden`` pixels (grown by HIDDEN_GROW on the field's level) left
        out: patches of the reference's weight (``Patch``), and the block systems; ``areas`` (this level's boxes that
        hold every hidden pixel; None: their bounding box) bound the work.

        Patches, not a weight of the level's size: a copy of the reference's weight cost some 1 ms a frame at 1280 px,
        and the weight and the patches are 0 / 1, so their product is the same in any order (as the Jacobian, which
        ``_block_moments`` takes from the reference and multiplies by the residual the patches zero).
        """
        # the same width of the part on the coarser level (2 px there): its smoothing reaches half as many pixels, and
        # 3 left the blocks beside a fixture bar out, to be extrapolated (a good part's band scored 1.6 -> 2.3)
        grow = math.ceil(HIDDEN_GROW * self.block / BLOCK)
        b = self.block
        # only the whole blocks the grown occluder reaches are looked at (a bar along one side: a strip of the level;
        # a band along every edge: four): elsewhere every pixel stays seen, and the weight and block sums there are
        # the reference's to the bit
        if areas is None:
            reaches = [self._reach(hidden, grow)]
        else:
            reaches = [self._reach(hidden, grow, area) for area in areas if hidden[area].any()]
        unseen = []
        for area in reaches:
            seen = np.ones((area[0].stop - area[0].start, area[1].stop - area[1].start), np.float32)
            shown = hidden[area]  # the part of the area inside the level (the rest is padding, always seen)
            grown = cv2.dilate(shown.astype(np.uint8), np.ones((2 * grow + 1,) * 2, np.uint8))
            seen[: shown.shape[0], : shown.shape[1]] = 1 - grown.astype(np.float32)
            unseen.append((area, seen))
        touched = np.zeros(self._blocks, bool)
        for area, _ in unseen:
            dims = ((area[0].stop - area[0].start) // b, (area[1].stop - area[1].start) // b)
            near = _block_sums(self._weight[area] - self._weighted(area, unseen), dims) > 0
            touched[area[0].start // b : area[0].stop // b, area[1].start // b : area[1].stop // b] |= near
        blocks = self._reference_blocks
        if not touched.any():
            return unseen, blocks
        blocks = _BlockSystems(**{k: np.copy(v) for k, v in vars(blocks).items()})
        # only the blocks the occluder touches change: measure those again on what they still show, within boxes
        # of blocks around them (a band along every edge would otherwise make one box of the whole level)
        todo = touched.copy()  # boxes may overlap at the corners: each block is measured once
        for rows, cols in _block_boxes(touched):
            box = (slice(rows.start * b, rows.stop * b), slice(cols.start * b, cols.stop * b))
            inside = todo[rows, cols].copy()
            todo[rows, cols] = False
            if not inside.any():
                continue
            # what the box still shows: the weight, 0 / 1 where the reference's is 1 (where it is 0, so is the Jacobian)
            weight = self._weighted(box, unseen)
            jac = self._jac[:, box[0], box[1]] * weight
            part = _BlockSystems.measure(jac, weight, inside.shape, inside)
            measured = np.zeros(self._blocks, bool)
            measured[rows, cols] = inside
            measured = measured.reshape(-1)
            for name in ("pixels", "info", "inverse", "gain_part", "gain_inverse"):
                getattr(blocks, name)[measured] = getattr(part, name)
            blocks.shown[measured] = part.pixels >= VISIBLE_MIN * np.maximum(self._pixels[measured], 1)
        return unseen, blocks

    def _weighted(self, box: tuple[slice, slice], unseen: list[Patch]) -> np.ndarray:
        """The reference's weight over ``box`` (padded level px) with the ``unseen`` patches applied (a new array)."""
        weight = self._weight[box].copy()
        _apply(weight, unseen, box[0], box[1].start)
        return weight

    def _reach(self, hidden: np.ndarray, grow: int, area: tuple[slice, slice] | None = None) -> tuple[slice, slice]:
        """The whole blocks (padded level px) that ``hidden`` (within ``area``; not empty there), grown by ``grow``
        px, reaches."""
        b = self.block
        start = (0, 0) if area is None else (area[0].start or 0, area[1].start or 0)
        extent = _extent(hidden if area is None else hidden[area])
        return tuple(
            slice(max(0, o + lo - grow) // b * b, min(n * b, -(-(o + hi + grow) // b) * b))
            for (lo, hi), o, n in zip(extent, start, self._blocks, strict=True)
        )

    def _robust_weights(self, energy: np.ndarray, gain: np.ndarray, blocks: _BlockSystems) -> np.ndarray:
        """Blocks that are not just a bent piece of the part lose weight.

        1 for blocks whose unexplained residual per pixel is typical (of the interior, or of the border
        band), falling as 1/excess beyond ROBUST x the median: what no local shift, gain and offset
        explain is not a bend (clutter,
        a foreign particle). And 0 where the block's own gain strays more than GAIN_LIMIT from
        the typical one: light changes the gain by some ten percent, vignetting by a few tens; a
        missing structure or a fixture bar over the part "explains" itself as a gain near -1.
        """
        used = blocks.pixels > 0
        per_pixel = np.where(used, energy / np.maximum(blocks.pixels, 1), 0)
        # typical per zone: the border band's residual (blur, glow, clutter) is larger everywhere along it,
        # and judged by the interior's its blocks would all be left out and the field guessed there
        typical = np.full(per_pixel.shape, NOISE_FLOOR)
        for zone in (self._interior, ~self._interior):
            if (used & zone).any():
                typical[zone] = max(float(np.median(per_pixel[used & zone])), NOISE_FLOOR)
        weight = np.minimum(1.0, ROBUST * typical / np.maximum(per_pixel, 1e-12))
        informative = used & (blocks.info[:, 0, 0] + blocks.info[:, 1, 1] > 0)
        stray = np.abs(gain - (float(np.median(gain[informative])) if informative.any() else 0.0))
        weight = np.where(stray > GAIN_LIMIT, 0.0, weight)
        return np.where(used, weight, 0.0)

    def _solve(
        self, weights: np.ndarray, g: np.ndarray, coef: np.ndarray, bending: np.ndarray, info: np.ndarray
    ) -> np.ndarray:
        """The control-point step of both components, with the blocks' information ``info``: in one system with
        its x-y coupling (``coupled``), or per component with the diagonal only (bundles before it).

        The system with every block at full weight and information is the reference's (built once);
        blocks weighted down, or measured on part of their pixels, change it only where their 4 x 4
        control points reach.
        """
        hb, wb = self._blocks
        changed = np.flatnonzero((weights != 1) | np.any(info != self._info, axis=(1, 2)))
        target = [
            _product(self._block_by.T, (weights * g[:, c]).reshape(hb, wb), self._block_bx.T).reshape(-1) - bending @ x
            for c, x in enumerate(coef)
        ]
        if not self.coupled:
            systems = (self._system(c, c, weights, info, changed) + bending for c in range(2))
            return np.stack([_conjugate_gradient(a, b) for a, b in zip(systems, target, strict=True)])
        k = len(bending)
        system = np.empty((2 * k, 2 * k))
        system[:k, :k] = self._system(0, 0, weights, info, changed) + bending
        system[k:, k:] = self._system(1, 1, weights, info, changed) + bending
        system[:k, k:] = self._system(0, 1, weights, info, changed)
        system[k:, :k] = system[:k, k:].T
        return _conjugate_gradient(system, np.concatenate(target)).reshape(coef.shape)

    def _system(self, c: int, d: int, weights: np.ndarray, info: np.ndarray, changed: np.ndarray) -> np.ndarray:
        """The (c, d) part of the spline fit's normal matrix: the reference's, with the ``changed`` blocks'
        weight and information put in where their control points reach."""
        system = self._systems[c, d].copy()
        delta = weights[changed] * info[changed, c, d] - self._info[changed, c, d]
        np.add.at(
            system.reshape(-1), self._touch[changed].reshape(-1), (delta[:, None] * self._outer[changed]).reshape(-1)
        )
        return system


@dataclass
class _BlockSystems:
    """Per block of the field's level: what it measures of its own shift, gain and offset."""

    pixels: np.ndarray  # [b] pixels measured
    info: np.ndarray  # [b, 2, 2] information about (dx, dy), gain and offset solved for
    inverse: np.ndarray  # [b, 4, 4] pseudo-inverse of the 4x4 normal matrix
    gain_part: np.ndarray  # [b, 2, 2] (see _schur)
    gain_inverse: np.ndarray  # [b, 2, 2]
    shown: np.ndarray  # [b] bool: the block counts

    @classmethod
    def measure(
        cls, jac: np.ndarray, weight: np.ndarray, blocks: tuple[int, int], only: np.ndarray | None = None
    ) -> _BlockSystems:
        """From the Jacobian [4, H, W] (zero where not measured; its fourth column the 0 / 1 ``weight``) and the
        measured pixels ``weight``; with ``only`` (bool per block), of those blocks only."""
        pairs = [(i, j) for i in range(4) for j in range(i, 4)]  # the normal matrix is symmetric
        # a column's product with the fourth, 0 / 1, is the column itself, to the bit (signed zeros included)
        sums = {(i, j): _block_sums(jac[i] if j == 3 else jac[i] * jac[j], blocks).reshape(-1) for i, j in pairs}
        pixels = _block_sums(weight, blocks).reshape(-1).astype(np.float64)
        keep = slice(None) if only is None else only.reshape(-1)
        normal = np.empty((len(pixels[keep]), 4, 4))
        for i, j in pairs:
            normal[:, i, j] = normal[:, j, i] = sums[i, j][keep]
        info, gain_part, gain_inverse = _schur(normal)
        # per block, the pseudo-inverse of the 4x4 normal matrix: what the block's own shift, gain and
        # offset explain of its residual is misalignment; what they cannot explain is something else
        scale = np.sqrt(np.maximum(np.einsum("bii->bi", normal), 1e-12))
        inverse = np.linalg.pinv(normal / (scale[:, :, None] * scale[:, None, :]), rcond=1e-6)
        inverse = inverse / (scale[:, :, None] * scale[:, None, :])
        return cls(pixels[keep], info, inverse, gain_part, gain_inverse, np.ones(len(normal), bool))


def _block_systems(by: np.ndarray, bx: np.ndarray, info: np.ndarray, scale: float) -> dict[str, object]:
    """The normal matrices of the spline fit with every block at full weight (x, y and their coupling; the
    reference's information is symmetric), and per block the 16 control
    points its basis reaches (flat indices into the system) with their outer products, for reweighting."""
    hb, wb = len(by), len(bx)
    k2 = NODES * NODES
    systems = {}
    for c, d in ((0, 0), (1, 1), (0, 1)):
        w = info[:, c, d].reshape(hb, wb)
        rows = np.einsum("ij,jl,jm->ilm", w, bx, bx)
        system = np.einsum("ik,im,ilp->klmp", by, by, rows).reshape(k2, k2)
        systems[c, d] = system + (1e-9 * scale * np.eye(k2) if c == d else 0)
    ky = np.argsort(-by, axis=1)[:, :4]  # the (at most) 4 nodes whose basis reaches each block row / column
    kx = np.argsort(-bx, axis=1)[:, :4]
    iy, ix = np.meshgrid(np.arange(hb), np.arange(wb), indexing="ij")
    nodes = (ky[iy.ravel()][:, :, None] * NODES + kx[ix.ravel()][:, None, :]).reshape(-1, 16)  # [blocks, 16]
    values = by[iy.ravel()[:, None], ky[iy.ravel()]][:, :, None] * bx[ix.ravel()[:, None], kx[ix.ravel()]][:, None, :]
    values = values.reshape(-1, 16)
    touch = (nodes[:, :, None] * k2 + nodes[:, None, :]).reshape(-1, 256)
    outer = (values[:, :, None] * values[:, None, :]).reshape(-1, 256)
    return {"_systems": systems, "_touch": touch, "_outer": outer}


def _conjugate_gradient(system: np.ndarray, target: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """Solve an SPD system by Jacobi-preconditioned conjugate gradients.

    To ``tol`` of the preconditioned residual: about 40 iterations instead of 65 for 1e-8, and
    control points that move by under 0.001 px (measured at 5120 px), far below what the blocks
    measure; each iteration costs some 15 us of Python.

    Matrix-vector products of a few hundred unknowns stay below the sizes at which BLAS starts
    its thread pool; a LAPACK solve of the same system did not, and under a busy inference thread
    pool its spinning threads cost a hundred times the arithmetic.
    """
    inv_diag = 1.0 / np.maximum(np.diag(system), 1e-30)
    x = np.zeros_like(target)
    r = target.copy()
    z = inv_diag * r
    p = z.copy()
    rz = float(r @ z)
    stop = tol * tol * float(target @ (inv_diag * target))
    for _ in range(4 * len(target)):
        if rz <= stop:
            break
        q = system @ p
        alpha = rz / float(p @ q)
        x += alpha * p
        r -= alpha * q
        z = inv_diag * r
        rz, previous = float(r @ z), rz
        p = z + (rz / previous) * p
    return x


def _product(left: np.ndarray, middle: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ middle @ right.T by einsum, not BLAS: products this small cost well under a millisecond,
    and BLAS's thread pool, when busy inference threads hold the cores, tens of milliseconds (measured)."""
    return np.einsum("il,jl->ij", np.einsum("ik,kl->il", left, middle), right)


def _extent(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first and one-past-the-last row and column of ``mask``'s set pixels (``mask`` not empty)."""
    rows, cols = (np.flatnonzero(mask.any(axis=axis)) for axis in (1, 0))
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def _flat(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """bool [h, w]: where the smoothed reference has no structure within STRUCTURE_GROW px (gradients of at most
    FLAT_SLOPE grey levels per level pixel): there a block's shift comes from whatever else is in view."""
    structure = (np.hypot(gx, gy) > FLAT_SLOPE).astype(np.uint8)
    return cv2.dilate(structure, np.ones((2 * STRUCTURE_GROW + 1,) * 2, np.uint8)) == 0


def _block_boxes(touched: np.ndarray) -> list[tuple[slice, slice]]:
    """Rectangles of blocks that together hold every ``touched`` block and few others: one box around the touched
    blocks nearest to each image edge (the sensor frame's clutter and occluders lie along the edges; one box
    around all of them would be the whole level). Touched blocks near one edge only: one box, their bounding box."""
    hb, wb = touched.shape
    rows, cols = np.ogrid[:hb, :wb]
    distance = np.stack(np.broadcast_arrays(rows, hb - 1 - rows, cols, wb - 1 - cols))
    nearest = np.argmin(distance, axis=0)  # ties go to the first edge: every block to exactly one
    boxes = []
    for edge in range(4):
        group = touched & (nearest == edge)
        if group.any():
            (r0, r1), (c0, c1) = _extent(group)
            boxes.append((slice(r0, r1), slice(c0, c1)))
    return boxes


def _affine_basis(blocks: tuple[int, int]) -> np.ndarray:
    """[b, 3]: 1, x and y of each block's centre (-0.5..0.5): an affine motion's component there is this times its
    three parameters."""
    hb, wb = blocks
    iy, ix = np.divmod(np.arange(hb * wb), wb)
    return np.stack([np.ones(hb * wb), (ix + 0.5) / wb - 0.5, (iy + 0.5) / hb - 0.5], axis=1)


def _held_to_affine(
    g: np.ndarray, own: np.ndarray, info: np.ndarray, weights: np.ndarray, basis: np.ndarray, radius: float
) -> np.ndarray:
    """The blocks' information-weighted shifts ``g`` [b, 2], each block's own shift ``own`` [b, 2] held to within
    ``radius`` (level px) of the affine motion fitted to all of them (by their information and ``weights``), along
    each eigen-direction of the block's information ``info`` [b, 2, 2] (``BEND_PX``)."""
    a, b, c = info[:, 0, 0], info[:, 0, 1], info[:, 1, 1]
    wa, wb, wc = a * weights, b * weights, c * weights
    normal = np.empty((6, 6))
    normal[:3, :3], normal[:3, 3:], normal[3:, 3:] = ((basis * w[:, None]).T @ basis for w in (wa, wb, wc))
    normal[3:, :3] = normal[:3, 3:].T
    if not np.trace(normal) > 0:
        return g
    rhs = np.concatenate([basis.T @ (wa * own[:, 0] + wb * own[:, 1]), basis.T @ (wb * own[:, 0] + wc * own[:, 1])])
    params = np.linalg.solve(normal + 1e-9 * np.trace(normal) * np.eye(6), rhs)
    affine = np.stack([basis @ params[:3], basis @ params[3:]], axis=1)
    # the 2 x 2 eigen-directions in closed form (np.linalg.eigh over the blocks cost twice the rest)
    angle = 0.5 * np.arctan2(2 * b, a - c)
    cos, sin = np.cos(angle), np.sin(angle)
    dev = own - affine
    along = np.stack([cos * dev[:, 0] + sin * dev[:, 1], cos * dev[:, 1] - sin * dev[:, 0]], axis=1)
    held = np.clip(along, -radius, radius)
    k = np.flatnonzero((held != along).any(axis=1))
    if not len(k):
        return g
    # info (affine + V held) = info affine + V diag(strength) held; the others keep g itself, to the bit
    mean, half = (a[k] + c[k]) / 2, np.hypot((a[k] - c[k]) / 2, b[k])
    first, second = (mean + half) * held[k, 0], (mean - half) * held[k, 1]
    out = g.copy()
    out[k] = np.einsum("bij,bj->bi", info[k], affine[k])
    out[k, 0] += cos[k] * first - sin[k] * second
    out[k, 1] += sin[k] * first + cos[k] * second
    return out


def _interior_blocks(blocks: tuple[int, int]) -> np.ndarray:
    """Blocks whose centre lies in the image without its outer 6 % (where the sensor frame's clutter lives)."""
    hb, wb = blocks
    cy = (np.arange(hb) + 0.5) / hb
    cx = (np.arange(wb) + 0.5) / wb
    inside_y = (cy > 0.06) & (cy < 0.94)
    inside_x = (cx > 0.06) & (cx < 0.94)
    return (inside_y[:, None] & inside_x[None, :]).reshape(-1)


def _block_sums(values: np.ndarray, blocks: tuple[int, int]) -> np.ndarray:
    """Sums over the blocks of a float32 array whose sides are whole blocks (area resize: fast)."""
    hb, wb = blocks
    block = values.shape[0] // hb
    return cv2.resize(values, (wb, hb), interpolation=cv2.INTER_AREA) * np.float32(block * block)


Patch = tuple[tuple[slice, slice], np.ndarray]  # (rows, cols) of the padded field level, and a 0 / 1 weight there


def _apply(values: np.ndarray, patches: list[Patch], rows: slice, col0: int = 0) -> None:
    """Multiply ``values`` (the padded level's ``rows``, its columns from ``col0``) by the patches that reach them."""
    for (p_rows, p_cols), seen in patches:
        top, bottom = max(rows.start, p_rows.start), min(rows.stop, p_rows.stop)
        left, right = max(col0, p_cols.start), min(col0 + values.shape[1], p_cols.stop)
        if top < bottom and left < right:
            values[top - rows.start : bottom - rows.start, left - col0 : right - col0] *= seen[
                top - p_rows.start : bottom - p_rows.start, left - p_cols.start : right - p_cols.start
            ]


def _shrink(hidden: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``hidden`` on a level twice as coarse: a coarse pixel is hidden where any of its four is."""
    h, w = shape
    # four strided views or-ed: a reshape and any() over the small axes cost some 8 ms at 1280 px
    return (hidden[0 : 2 * h : 2, 0 : 2 * w : 2] | hidden[1 : 2 * h : 2, 0 : 2 * w : 2]) | (
        hidden[0 : 2 * h : 2, 1 : 2 * w : 2] | hidden[1 : 2 * h : 2, 1 : 2 * w : 2]
    )


def _smooth(level: np.ndarray, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """Both sides are low-passed before they are compared: a linear model of a sharp edge holds over a
    fraction of a pixel, of a smoothed one over a pixel or two (the size of the bends to be found)."""
    return cv2.GaussianBlur(level.astype(np.float32, copy=False), (0, 0), sigma)


def _lighting_inverse(jac: np.ndarray, blocks: tuple[int, int]) -> np.ndarray:
    """Per block, the pseudo-inverse [b, 2, 2] of the gain/offset part of the normal matrix, for taking a block's
    own lighting out of its residual (``FieldReference.residual_energy``).

    Unlike ``_schur``'s inverse, a flat block (gain and offset the same unknown there) keeps its offset: with
    ``_schur``'s zero, a frame lit brighter than the reference left its whole brightness difference in every flat
    block of the part as residual no field can remove, and ``fit --alignment auto`` measured a bent line's field
    as buying under 1 % (fixture-hard seed 9004: 0.0088, rigid chosen, fine scale 21 against 8 with the field).
    """
    terms = (jac[2], jac[3])
    normal = np.empty((blocks[0] * blocks[1], 2, 2))
    for i in range(2):
        for j in range(i, 2):
            normal[:, i, j] = normal[:, j, i] = _block_sums(terms[i] * terms[j], blocks).reshape(-1)
    scale = np.sqrt(np.maximum(np.einsum("bii->bi", normal), 1e-12))  # as _BlockSystems: rcond on unit columns
    inverse = np.linalg.pinv(normal / (scale[:, :, None] * scale[:, None, :]), rcond=1e-6)
    return inverse / (scale[:, :, None] * scale[:, None, :])


def _schur(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: the 2x2 information about (dx, dy) once the local gain and offset are solved for, the
    2x2 map from the gain/offset part of the right-hand side to the displacement part, and the inverse
    of the gain/offset part of the normal matrix (zero where singular)."""
    ndd, ndg, ngg = normal[:, :2, :2], normal[:, :2, 2:], normal[:, 2:, 2:]
    det = ngg[:, 0, 0] * ngg[:, 1, 1] - ngg[:, 0, 1] * ngg[:, 1, 0]
    ok = det > 1e-6 * np.maximum(ngg[:, 0, 0] * ngg[:, 1, 1], 1e-12)
    inv = np.zeros_like(ngg)
    inv[ok] = np.linalg.inv(ngg[ok])
    gain_part = ndg @ inv
    info = ndd - gain_part @ np.transpose(ndg, (0, 2, 1))
    info[~ok] = 0
    return info, gain_part, inv


def _bending() -> np.ndarray:
    """[NODES², NODES²]: the bending energy (second differences along x, y and across) of a control grid."""
    eye = np.eye(NODES)
    d2 = np.diff(eye, 2, axis=0)
    d1 = np.diff(eye, 1, axis=0)
    ops = [np.kron(d2, eye), np.kron(eye, d2), math.sqrt(2) * np.kron(d1, d1)]
    return sum(op.T @ op for op in ops)


def to_level(image: np.ndarray, factor: int) -> np.ndarray:
    """The field's level of a frame: area-averaged, luminance for colour, float32 in 8-bit grey units."""
    from engines.registration import downscale

    return downscale(image, factor)
