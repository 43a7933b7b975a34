"""The fine score's local gain for one frame: what the part does where, and what the camera does near its edges.

Good parts vary in two frames of reference. Structure edges and markers move with the part
(the reference frame, after registration); vignetting, stray light, a fixture bar and clutter
along the image border stay with the camera (the sensor frame). The fit therefore learns two
gain maps on the 8 px block grid (``BLOCK``) of the reference:

- ``part_gain``: where held-out good parts scored high at a place of the part;
- ``ring_gain``: in the *sensor* frame, how tolerant each line parallel to an image edge must be.

Per frame the ring map is carried into the reference frame with the frame's own pose, so a
defect 150 px from the image edge is judged by what good parts show 150 px from the image
edge, wherever the fixture put the part. The frame's gain is the smaller of the two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cv2
import numpy as np

from engines.graphs import FINE_GAIN_LEVEL

BLOCK = 2**FINE_GAIN_LEVEL  # px: the block grid of the gain maps (the graph's fine gain input)
STEP = BLOCK // 2  # px: the grid a block map is carried on between frames; a block counts every cell it touches
SUB = BLOCK // STEP


def _grid_matrix(matrix: np.ndarray, step: int) -> np.ndarray:
    """A reference-to-frame pixel transform re-expressed on a grid of ``step`` px cells."""
    to_px = np.array([[step, 0, (step - 1) / 2], [0, step, (step - 1) / 2], [0, 0, 1]], np.float64)
    m3 = np.vstack([np.asarray(matrix, np.float64), [0, 0, 1]])
    return (np.linalg.inv(to_px) @ m3 @ to_px)[:2]


def _carry(blocks: np.ndarray, matrix: np.ndarray, inverse: bool, pool: Callable | None, k: int = 1) -> np.ndarray:
    """Carry a block map between frames (a map of ``k`` x ``k``-block cells: BLOCK * k px).

    With ``pool`` (np.min or np.max) the map travels on the STEP px grid and each block takes the
    pool of every cell its footprint overlaps, for conservative decisions: a cell centre that
    lands between two cells takes both (floor and ceiling of its place, per axis), so a pixel
    at a block's edge is never judged by a stricter gain than that of the place it lands on.
    Without, each block takes the value at its centre: right for block maxima, whose place
    inside the block is unknown. Beyond the map's edge the outermost values continue: the part
    of a shifted frame that the camera did not see is judged like the edge the camera did see.
    """
    hb, wb = blocks.shape
    source = blocks.astype(np.float32)
    if pool is None:
        return _warp(source, _source_matrix(matrix, BLOCK * k, inverse), (wb, hb))
    fine = spread_cells(source, SUB, (hb * SUB, wb * SUB))
    grid = _source_matrix(matrix, STEP * k, inverse)
    both = np.minimum if pool is np.min else np.maximum
    # pairwise over the corners, then over every cell of each block: the pool of all 4 x SUB^2 samples, without
    # stacking them (a stack of full-size copies cost more than the warps at 5120 px)
    moved = functools.reduce(both, (_warp(fine, grid + corner, (wb * SUB, hb * SUB)) for corner in _CORNERS))
    return functools.reduce(both, (moved[i::SUB, j::SUB] for i in range(SUB) for j in range(SUB)))


# Offsets (in cells) to a sampled place that reach the floor and the ceiling of its cell
# coordinate by nearest-cell rounding; a place exactly on a cell centre stays on that cell.
_EDGE = 0.5 - 1e-3
_CORNERS = [np.array([[0, 0, dx], [0, 0, dy]]) for dx in (-_EDGE, _EDGE) for dy in (-_EDGE, _EDGE)]


def _source_matrix(matrix: np.ndarray, step: int, inverse: bool) -> np.ndarray:
    """The grid transform from destination cells to the source cells they sample."""
    grid = _grid_matrix(matrix, step)
    return grid if inverse else cv2.invertAffineTransform(grid)


def _warp(source: np.ndarray, to_source: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    flags = cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(source, to_source, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)


def sensor_to_reference(blocks: np.ndarray, matrix: np.ndarray, pool: Callable | None = np.min) -> np.ndarray:
    """A sensor-frame block map seen from the reference frame of a frame with pose ``matrix`` (reference -> frame)."""
    return _carry(blocks, matrix, True, pool)


def reference_to_sensor(blocks: np.ndarray, matrix: np.ndarray, pool: Callable | None = None) -> np.ndarray:
    """A reference-frame block map seen from the sensor of a frame with pose ``matrix``."""
    return _carry(blocks, matrix, False, pool)


def spread_cells(cells: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """A map of ``k`` x ``k``-block cells on the block grid ``shape`` (the last cells may be partial)."""
    return np.repeat(np.repeat(cells, k, axis=0), k, axis=1)[: shape[0], : shape[1]]


def frame_fine_gain(part_gain: np.ndarray, ring_gain: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The fine gain per reference block for one frame: the smaller of the part's and the (posed) ring's.

    A ring learned on lines two blocks wide (large images, ``calibration.tolerance_fit.RING_LINES``) is
    carried on its own cells: the same gains as before blocks were halved, at the cost they had then (a
    quarter of the cells; carrying is most of this function's time, 30 ms a 5120 px frame on 8 px blocks).
    """
    pairs = ring_gain[::2, ::2]
    if np.array_equal(spread_cells(pairs, 2, ring_gain.shape), ring_gain):
        ring = spread_cells(_carry(pairs, matrix, True, np.min, k=2), 2, ring_gain.shape)
    else:
        ring = sensor_to_reference(ring_gain, matrix, np.min)
    return np.minimum(part_gain.astype(np.float32), ring)
