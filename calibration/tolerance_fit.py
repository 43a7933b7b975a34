"""Learned local normalisation: where held-out good parts score high, the same score means less.

Input: per held-out good image, its fine and coarse scores max-pooled to 8 px blocks of the
reference, and its pose. Output (``LocalTolerance``):

- the fine score's gain in two frames (see ``engines.tolerance``): ``part_gain`` from what the
  part does at each place, ``ring_gain`` from what the camera does along each line parallel to
  an image edge (in the sensor frame, pooled along the line, since clutter that appears at one
  place along an edge can appear anywhere along it);
- the coarse spread's factor per reference block (a 32 px neighbourhood, and along the edge lines
  within the border zone).

Each level is brought down to the typical (median) level of the inspection region; quieter
blocks are left alone. Cross-fitting (``cross_fitted_maps``) scores each held-out
image with a tolerance learned from the other folds only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from engines.tiling import cell_grid
from engines.tolerance import BLOCK, frame_fine_gain, reference_to_sensor, sensor_to_reference, spread_cells
from engines.types import Geometry

FINE_REF_FLOOR = 1.0  # grey levels: below this, a block's fine level is noise and needs no normalising
BORDER_ZONE = 0.06  # fraction of the image side where tolerance also spreads along the edge
RING_QUANTILE = 0.9  # what one in ten places along an edge line shows, every place on it may show
NEIGHBOURHOOD_PX = 32  # a block's level is the maximum over this radius of neighbouring blocks
PART_TRIM_FROM = 16  # images: from here on a place's level leaves its highest observation out (fit_pipeline.TRIM_FROM)
# The part's level is learned on 16 px cells, as before the gain map went to BLOCK px blocks: only the sensor ring
# needs the finer grid (chips just beyond the clutter's reach), and the ring pools whole lines, while a part's
# cell is one place seen by 30 images. Everything on 8 px (part, ring, coarse) took a 5120 px line's held-out goods
# from 1.46 to 2.30; which map did it was not separated, so the part keeps the cells it was measured on.
PART_CELL = 16
_PART_POOL = PART_CELL // BLOCK
_HOOD = np.ones((2 * -(-NEIGHBOURHOOD_PX // PART_CELL) + 1,) * 2, np.uint8)  # on PART_CELL cells
_BLOCK_HOOD = np.ones((2 * -(-NEIGHBOURHOOD_PX // BLOCK) + 1,) * 2, np.uint8)  # on BLOCK px blocks (coarse factor)
# The ring's lines are BLOCK px apart while the border zone (BORDER_ZONE of the side) holds fewer than twice this
# many of them, else 16 px apart: the band and the clutter's reach scale with the image, the chips' size does not
# need more (16 lines of 8 px at 2048 px, 20 of 16 px at 5120 px). 8 px lines at 5120 px, measured alone: the band's
# chips there lie beyond the clutter's reach at full gain anyway, and the outermost 8 px line, quieter than the
# 16 px line that held it, let one good part's frame-edge peak raise the fine scale (README, 5120 px chips).
RING_LINES = 16


@dataclass(frozen=True)
class LocalTolerance:
    """The learned normalisation maps (block grid of the reference, ``ring_gain`` in the sensor frame)."""

    part_gain: np.ndarray  # <= 1, multiplies the fine score (reference frame)
    ring_gain: np.ndarray  # <= 1, multiplies the fine score (sensor frame, border zone)
    factor: np.ndarray  # >= 1, multiplies the coarse spread (reference frame)

    def normalised(self, blocks: np.ndarray, poses: np.ndarray) -> np.ndarray:
        """Block maps [n, C, Hb, Wb] (fine; coarse when C = 2) of images with ``poses``, normalised as graphs do."""
        pairs = zip(blocks, poses, strict=True)
        fine = np.stack([b[0] * frame_fine_gain(self.part_gain, self.ring_gain, m) for b, m in pairs])
        channels = [fine] if blocks.shape[1] == 1 else [fine, blocks[:, 1] / self.factor]
        return np.stack(channels, axis=1).astype(np.float32)

    def normalise_at(self, windows: list[np.ndarray], where: list[tuple[int, int, int, int]], pose: np.ndarray) -> list:
        """Windows [C, h, w] of one image's block map (rows r0:r1, columns c0:c1 each), normalised as ``normalised``."""
        fine_gain = frame_fine_gain(self.part_gain, self.ring_gain, pose)
        out = []
        for window, (r0, r1, c0, c1) in zip(windows, where, strict=True):
            channels = [window[0] * fine_gain[r0:r1, c0:c1]]
            if len(window) > 1:
                channels.append(window[1] / self.factor[r0:r1, c0:c1])
            out.append(np.stack(channels))
        return out

    def summary(self, inside: np.ndarray, border: int) -> dict:
        return {
            "block_px": BLOCK,
            "border_blocks": border,
            "blocks_normalised": round(float(((self.part_gain < 1) | (self.factor > 1))[inside].mean()), 4),
            "fine_gain_min": round(float(self.part_gain.min()), 4),
            "ring_gain_min": round(float(self.ring_gain.min()), 4),
            "ring_blocks_normalised": round(float((self.ring_gain < 1).mean()), 4),
            "coarse_factor_max": round(float(self.factor.max()), 3),
        }


def fit_local_tolerance(
    blocks: np.ndarray, poses: np.ndarray, inside: np.ndarray, border: int, fine_ring: bool = True
) -> LocalTolerance:
    """Learn the normalisation from held-out block maxima ``blocks`` [n, C, Hb, Wb] of images with ``poses``.

    ``fine_ring``: the ring's lines as fine as the image allows (``_ring_level``); False keeps them 16 px wide,
    for the shape scores: their self-test found far fewer probes with 8 px lines on the benign lines.

    Channel 0 is a fine score (gains), channel 1, where there is one, a coarse score (factor;
    without it the factor is 1): the template has both, the learned map only the first.
    """
    part_gain, ring_gain = fine_tolerance(blocks[:, 0], poses, inside, border, fine_ring)
    if blocks.shape[1] == 1:
        return LocalTolerance(part_gain, ring_gain, np.ones_like(part_gain))
    return LocalTolerance(part_gain, ring_gain, coarse_factor(blocks[:, 1], inside, border, poses))


def cross_fitted_maps(blocks: np.ndarray, poses: np.ndarray, inside: np.ndarray, border: int, folds: int) -> np.ndarray:
    """``blocks`` [n, C, Hb, Wb] normalised, each image (fold ``i % folds``) by the other folds' tolerance only."""
    return cross_fitted(blocks, poses, inside, border, folds)[0]


def cross_fitted(
    blocks: np.ndarray,
    poses: np.ndarray,
    inside: np.ndarray,
    border: int,
    folds: int,
    fine_ring: bool = True,
) -> tuple[np.ndarray, list[LocalTolerance]]:
    """``blocks`` normalised, each image (fold ``i % folds``) by the other folds' tolerance only; and those tolerances.

    The tolerances (one per fold) let the caller normalise other maps of the same images alike
    (the fit's self-test: its probes' blocks, ``LocalTolerance.normalise_at``).
    """
    n = len(blocks)
    maps = np.zeros_like(blocks, dtype=np.float32)
    tolerances = []
    for fold in range(folds):
        held = np.arange(fold, n, folds)
        others = np.setdiff1d(np.arange(n), held)
        tolerances.append(fit_local_tolerance(blocks[others], poses[others], inside, border, fine_ring))
        maps[held] = tolerances[-1].normalised(blocks[held], poses[held])
    return maps, tolerances


def fine_tolerance(
    fine: np.ndarray, poses: np.ndarray, inside: np.ndarray, border: int, fine_ring: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Part and ring gains of the fine score.

    The ring level of a line is a high quantile, along the line, of the sensor blocks' maxima
    over images. Where that level is above the typical one, the line is noisy: observations that
    fell on a noisy line (in their own image's pose) do not count for the part's level, or
    clutter that a tilted part carried across would make that place of the part tolerant for
    every frame. From ``PART_TRIM_FROM`` images on, a place's level is its second-highest
    observation: what one good part happened to carry there (a benign mark, debris) must not make
    that place tolerant for every future part, as the statistics leave each pixel's extremes out;
    what good parts do there systematically shows in more than one.
    """
    part_all = _part_level(_pool(fine.max(axis=0), _PART_POOL), fine.shape[1:])
    ref = max(float(np.median(part_all[inside])) if inside.any() else 1.0, FINE_REF_FLOOR)
    sensor = np.max([reference_to_sensor(f, m) for f, m in zip(fine, poses, strict=True)], axis=0)
    ring = _ring_level(sensor, border, fine_ring)
    noisy = (ring > ref).astype(np.float32)
    clean = [np.where(sensor_to_reference(noisy, m, np.max) > 0, 0, f) for f, m in zip(fine, poses, strict=True)]
    part = _part_level(_high(np.stack([_pool(c, _PART_POOL) for c in clean])), fine.shape[1:])
    part_gain = np.where(inside, ref / np.maximum(part, ref), 1).astype(np.float32)
    ring_gain = (ref / np.maximum(ring, ref)).astype(np.float32)
    return part_gain, ring_gain


def _pool(blocks: np.ndarray, k: int) -> np.ndarray:
    """Maximum over k x k blocks of a block map (partial cells at the bottom and right)."""
    if k == 1:
        return blocks
    hb, wb = blocks.shape[-2:]
    pad = [(0, 0)] * (blocks.ndim - 2) + [(0, -hb % k), (0, -wb % k)]
    padded = np.pad(blocks, pad, constant_values=-np.inf)
    shape = (*blocks.shape[:-2], padded.shape[-2] // k, k, padded.shape[-1] // k, k)
    return padded.reshape(shape).max(axis=(-3, -1))


def _part_level(cells: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A level on PART_CELL cells: the neighbourhood's maximum, back on the block grid ``shape``."""
    return spread_cells(cv2.dilate(cells.astype(np.float32), _HOOD), _PART_POOL, shape)


def _ring_level(sensor: np.ndarray, border: int, fine: bool = True) -> np.ndarray:
    """The lines' level (``_line_level``) on lines as fine as RING_LINES across the border zone allows (``fine``)."""
    k = 1 if fine and border < 2 * RING_LINES else 2
    return spread_cells(_line_level(_pool(sensor, k), -(-border // k)), k, sensor.shape)


def _high(levels: np.ndarray) -> np.ndarray:
    """Per block, the highest of the images' levels [n, Hb, Wb], or the second-highest from PART_TRIM_FROM images on."""
    if len(levels) < PART_TRIM_FROM:
        return levels.max(axis=0)
    return np.partition(levels, len(levels) - 2, axis=0)[-2]


def _line_level(level: np.ndarray, border: int) -> np.ndarray:
    """Within ``border`` blocks of an edge, the RING_QUANTILE of each line parallel to it; 0 elsewhere."""
    lines = _edge_lines(level, border, lambda a, axis: np.quantile(a, RING_QUANTILE, axis=axis))
    return np.zeros_like(level) if lines is None else np.where(lines[1], lines[0], 0).astype(np.float32)


def _edge_lines(level: np.ndarray, border: int, reduce: Callable) -> tuple[np.ndarray, np.ndarray] | None:
    """Per block within ``border`` blocks of an edge, ``reduce`` over its line parallel to that edge.

    A line is taken between the side zones; corner blocks take the larger of their two lines.
    Returns (line values [Hb, Wb], mask of the border zone), or None where the zone would cover
    the whole map.
    """
    hb, wb = level.shape
    if border <= 0 or 2 * border >= min(hb, wb):
        return None
    row_line = reduce(level[:, border : wb - border], axis=1)[:, None]  # per row, along the top/bottom edges
    col_line = reduce(level[border : hb - border, :], axis=0)[None, :]  # per column, along the left/right edges
    rows, cols = np.ogrid[:hb, :wb]
    near_tb = (rows < border) | (rows >= hb - border)
    near_lr = (cols < border) | (cols >= wb - border)
    edge = np.where(near_tb & near_lr, np.maximum(row_line, col_line), np.where(near_tb, row_line, col_line))
    return np.broadcast_to(edge, level.shape), near_tb | near_lr


def coarse_factor(coarse: np.ndarray, inside: np.ndarray, border: int, poses: np.ndarray | None = None) -> np.ndarray:
    """Factor (>= 1) on the block spread: each block's neighbourhood level down to the median level.

    With ``poses``, a block of the border zone also takes the level of every sensor ring line
    (``posed_coarse_ring``) that one of these poses lays over it.
    """
    level = _neighbourhood_max(coarse.max(axis=0), border)
    ref = max(float(np.median(level[inside])) if inside.any() else 1.0, 1e-3)
    if poses is not None:
        level = np.maximum(level, posed_coarse_ring(coarse, poses, border))
    return np.where(inside, np.maximum(level / ref, 1), 1).astype(np.float32)


def posed_coarse_ring(coarse: np.ndarray, poses: np.ndarray, border: int) -> np.ndarray:
    """The coarse score's sensor ring, seen from the reference under every one of ``poses`` (the most tolerant).

    The ring's lines are BLOCK px apart and take the maximum along the line, as the reference
    frame's lines of ``_neighbourhood_max`` do.

    Clutter, a fixture edge and vignetting stay with the camera, so what the coarse score does
    near an image edge belongs to lines of the *sensor* (as the fine score's ring). The coarse
    spread is baked into the graph's statistics, not carried per frame, so a place of the part
    takes the highest ring level that any good part's pose lays over it. Without this, the
    reference frame's lines see the clutter only where each image's own pose put it: at 5120 px
    a rotation of 1.5 deg moves the part near a corner about 65 px across the edge, 8 ring lines, and a held-out part
    at the largest pose meets clutter where no other part did.
    """
    sensor = np.max([reference_to_sensor(c, m) for c, m in zip(coarse, poses, strict=True)], axis=0)
    lines = _edge_lines(sensor, border, np.max)  # the maximum along the line, as the reference's lines take
    if lines is None:
        return np.zeros_like(sensor)
    ring = np.where(lines[1], lines[0], 0).astype(np.float32)
    hb, wb = coarse.shape[-2:]
    every = np.concatenate([poses, pose_range_corners(poses, (hb * BLOCK, wb * BLOCK))])
    return np.max([sensor_to_reference(ring, m, np.max) for m in every], axis=0)


def pose_range_corners(poses: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The eight corners of the range of rotations and shifts (of the image centre) that ``poses`` span, each range
    widened on both sides by its width / (n - 1), the unbiased estimate of where a uniform range ends.

    The coarse factor is baked into the statistics, so it must already hold for the poses the line will bring, not
    only the n it showed. Rotation and shift vary independently on a line: 30 good parts rarely combine the largest
    of both, which carries the part's corner furthest towards an edge (on one line 21 px in the training images, 44
    px in 200 test images: its border structures met the clutter of sensor lines none of the 30 had laid over them).
    """
    n = len(poses)
    centre = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2])
    linear = poses[:, :, :2]
    angle = np.arctan2(linear[:, 1, 0], linear[:, 0, 0])
    scale = float(np.mean(np.sqrt(np.abs(np.linalg.det(linear)))))
    shift = np.einsum("nij,j->ni", linear, centre) + poses[:, :, 2] - centre
    params = np.column_stack([angle, shift])
    low, high = params.min(axis=0), params.max(axis=0)
    widen = (high - low) / max(n - 1, 1)
    corners = []
    for a, sx, sy in itertools.product(*zip(low - widen, high + widen, strict=True)):
        rotation = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        corners.append(np.column_stack([rotation, centre + np.array([sx, sy]) - rotation @ centre]))
    return np.asarray(corners, poses.dtype)


def _neighbourhood_max(level: np.ndarray, border: int) -> np.ndarray:
    """Neighbourhood maximum inside; within ``border`` blocks of an edge, the maximum along that edge's line.

    A block ``d`` blocks from the top edge takes the maximum of row ``d`` between the side zones
    (and likewise for the other edges); corner blocks take the larger of their two lines.
    """
    out = cv2.dilate(level, _BLOCK_HOOD)
    lines = _edge_lines(level, border, np.max)
    return out if lines is None else np.where(lines[1], lines[0], out).astype(level.dtype)


def border_blocks(geometry: Geometry) -> int:
    """Width of the border zone, in blocks: BORDER_ZONE of the shorter image side."""
    return int(np.ceil(BORDER_ZONE * min(geometry.height, geometry.width) / BLOCK))


def block_shape(geometry: Geometry) -> tuple[int, int]:
    return cell_grid(geometry.height, geometry.width, BLOCK)


def block_inside(weight: np.ndarray) -> np.ndarray:
    """Blocks that hold at least one inspected pixel."""
    h, w = weight.shape
    hb, wb = cell_grid(h, w, BLOCK)
    padded = np.zeros((hb * BLOCK, wb * BLOCK), np.uint8)
    padded[:h, :w] = weight
    return padded.reshape(hb, BLOCK, wb, BLOCK).max(axis=(1, 3)) > 0
