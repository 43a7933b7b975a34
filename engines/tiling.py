"""Tile plans: cut a full-resolution image into fixed-size overlapping tiles and stitch the results.

A plan is pure and immutable: it holds geometry only, so one plan serves every
thread and every frame in flight. Each tile is a *core* (the pixels whose output
it owns) plus a *halo* on every side (context the graph needs, sized to its
receptive field). Graphs return only the core, so stitching is a copy, with no
blending and no seams. Images are padded by edge replication; with core origins
aligned to the graph's coarsest stride, the tiled output equals the output of one
big tile covering the image.

Every coarser map of an image (the graph's pyramid levels, the 8 px gain blocks) lives on a
grid of cells laid from the image's top-left corner; ``cell_grid`` is the one rule for its
shape, so maps of different cell sizes always line up with each other and with the tiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np


def cell_grid(height: int, width: int, cell: int) -> tuple[int, int]:
    """(rows, columns) of the grid of ``cell`` px cells over a ``height`` x ``width`` image.

    A cell exists where it holds at least one image pixel: a side that is not a multiple of
    ``cell`` ends in one partial cell (its outside part is edge-replicated, as tiles pad frames),
    never in a cell wholly outside the image. Core origins are multiples of every cell size in
    use, so a tile's cells are the same cells at every size.
    """
    if height < 1 or width < 1 or cell < 1:
        raise ValueError(f"grid of {cell} px cells over {height}x{width}: sizes must be positive")
    return -(-height // cell), -(-width // cell)


def block_max(planes: np.ndarray, cell: int) -> np.ndarray:
    """The maximum over each ``cell`` x ``cell`` block of the last two axes (each a multiple of ``cell``).

    The same values as ``reshape(..., h // cell, cell, w // cell, cell).max(axis=(-3, -1))``, about
    ten times faster: numpy reduces a reshaped axis of a few elements slowly, element by element,
    whereas ``np.maximum`` of whole rows (then of whole columns of the row maxima) runs vectorised.
    """
    *lead, h, w = planes.shape
    if h % cell or w % cell:
        raise ValueError(f"{h}x{w} is not a whole number of {cell} px blocks")
    rows = planes.reshape(*lead, h // cell, cell, w)
    out = rows[..., 0, :].copy()
    for k in range(1, cell):
        np.maximum(out, rows[..., k, :], out=out)
    columns = out.reshape(*lead, h // cell, w // cell, cell)
    pooled = columns[..., 0].copy()
    for k in range(1, cell):
        np.maximum(pooled, columns[..., k], out=pooled)
    return pooled


@dataclass(frozen=True)
class TilePlan:
    """Geometry of one tiling: image size, core size, halo and origin alignment."""

    height: int
    width: int
    core: int
    halo: int
    align: int = 1

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.align < 1:
            raise ValueError(f"align must be positive, got {self.align}")
        if self.core < 1 or self.halo < 0:
            raise ValueError(f"core must be positive and halo non-negative, got {self.core}, {self.halo}")
        if self.core % self.align or self.halo % self.align:
            raise ValueError(f"core {self.core} and halo {self.halo} must be multiples of {self.align}")

    @classmethod
    def covering(cls, height: int, width: int, halo: int, align: int) -> TilePlan:
        """A single tile covering the whole image (the untiled reference)."""
        core = -(-max(height, width) // align) * align
        return cls(height, width, core, halo, align)

    @property
    def tile(self) -> int:
        """Side of one input tile: core plus halo on both sides."""
        return self.core + 2 * self.halo

    @property
    def rows(self) -> int:
        return -(-self.height // self.core)

    @property
    def cols(self) -> int:
        return -(-self.width // self.core)

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left corner (y, x) of tile ``index``'s core in image pixels."""
        if not 0 <= index < self.n_tiles:
            raise IndexError(f"tile {index} outside 0..{self.n_tiles}")
        row, col = divmod(index, self.cols)
        return row * self.core, col * self.core

    def batches(self, batch: int) -> Iterator[range]:
        """Consecutive tile ranges of at most ``batch`` tiles covering the plan."""
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        for start in range(0, self.n_tiles, batch):
            yield range(start, min(start + batch, self.n_tiles))

    def pad(self, image: np.ndarray) -> np.ndarray:
        """Edge-replicate ``image`` ([H, W] or [H, W, C]) so every tile is a plain slice."""
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, plan is {self.width}x{self.height}")
        bottom = self.rows * self.core - self.height + self.halo
        right = self.cols * self.core - self.width + self.halo
        return cv2.copyMakeBorder(image, self.halo, bottom, self.halo, right, cv2.BORDER_REPLICATE)

    def padded_shape(self) -> tuple[int, int]:
        """Rows and columns of a padded image: every tile a plain slice of it."""
        return self.rows * self.core + 2 * self.halo, self.cols * self.core + 2 * self.halo

    def interior(self, padded: np.ndarray) -> np.ndarray:
        """The image's own pixels inside a padded image, as a view (write the image there, then ``replicate``)."""
        return padded[self.halo : self.halo + self.height, self.halo : self.halo + self.width]

    def replicate(self, padded: np.ndarray) -> np.ndarray:
        """Fill the border of a padded image whose interior is written by replicating its edge pixels, in place:
        the same pixels as ``pad`` of the interior, without copying the interior (a 26 MB pass at 5120 px)."""
        top, left = self.halo, self.halo
        bottom, right = top + self.height, left + self.width
        padded[top:bottom, :left] = padded[top:bottom, left : left + 1]
        padded[top:bottom, right:] = padded[top:bottom, right - 1 : right]
        padded[:top] = padded[top : top + 1]
        padded[bottom:] = padded[bottom - 1 : bottom]
        return padded

    def extract(self, padded: np.ndarray, tiles: range, out: np.ndarray | None = None) -> np.ndarray:
        """Copy tiles from a padded image into a [n, C, tile, tile] batch (``out`` reused if given)."""
        planes = padded if padded.ndim == 3 else padded[:, :, None]
        shape = (len(tiles), planes.shape[2], self.tile, self.tile)
        if out is None:
            out = np.empty(shape, planes.dtype)
        elif out.shape[0] < shape[0] or out.shape[1:] != shape[1:] or out.dtype != planes.dtype:
            raise ValueError(f"tile buffer {out.shape} {out.dtype} cannot hold {shape} {planes.dtype}")
        for slot, index in enumerate(tiles):
            y, x = self.origin(index)
            window = planes[y : y + self.tile, x : x + self.tile]
            out[slot] = window.transpose(2, 0, 1)
        return out[: len(tiles)]

    def window(self, padded: np.ndarray, index: int) -> np.ndarray:
        """Tile ``index`` of a padded image as a [1, C, tile, tile] view (no copy: whoever runs it copies it)."""
        planes = padded if padded.ndim == 3 else padded[:, :, None]
        y, x = self.origin(index)
        return planes[y : y + self.tile, x : x + self.tile].transpose(2, 0, 1)[None]

    def stitch(self, cores: np.ndarray, tiles: range, out: np.ndarray) -> None:
        """Write [n, core, core] (or [n, 1, core, core]) outputs into their places in ``out`` [H, W]."""
        if cores.ndim == 4:
            cores = cores[:, 0]
        for slot, index in enumerate(tiles):
            y, x = self.origin(index)
            h = min(self.core, self.height - y)
            w = min(self.core, self.width - x)
            out[y : y + h, x : x + w] = cores[slot, :h, :w]

    def tile_all(self, image: np.ndarray) -> np.ndarray:
        """Every tile of ``image`` as one [n_tiles, C, tile, tile] array (for resident constants)."""
        return self.extract(self.pad(image), range(self.n_tiles))
