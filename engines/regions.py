"""Connected regions of an anomaly map above the pixel threshold: the defects of one image."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from engines.types import Defect


def find_regions(
    anomaly: np.ndarray,
    threshold: float,
    min_area: int = 1,
    limit: int = 256,
    row_max: np.ndarray | None = None,
) -> list[Defect]:
    """Defects = 8-connected regions with anomaly > threshold and at least ``min_area`` pixels.

    Bboxes are in map pixels (x1/y1 exclusive); the strongest ``limit`` regions are kept, ties in
    the order of their first pixel (row by row). Good parts take the fast path: one pass over the
    map for its row maxima (``row_max``, if the caller has them) and no labelling. Only windows
    holding pixels above the threshold are labelled: each band of consecutive rows that have
    some, cut into the runs of consecutive columns that have some in the band. A row or column
    with none separates 8-connected regions, so every region lies whole in one window.
    """
    if row_max is None:
        row_max = anomaly.max(axis=1)
    # A NaN row maximum hides nothing: such a row is searched like any other (NaN is never above).
    rows = np.flatnonzero((row_max > threshold) | np.isnan(row_max))
    found: list[tuple[float, int, int, Defect]] = []
    for y0, y1 in _runs(rows):
        band = anomaly[y0:y1]
        above = band > threshold
        for x0, x1 in _runs(np.flatnonzero(above.any(axis=0))):
            found += _label(band[:, x0:x1], above[:, x0:x1], min_area, y0, x0)
    found.sort(key=lambda f: (-f[0], f[1], f[2]))
    return [f[3] for f in found[:limit]]


def _runs(indices: np.ndarray) -> Iterator[tuple[int, int]]:
    """Runs of consecutive values in sorted ``indices`` as (first, last + 1)."""
    if not len(indices):
        return
    breaks = np.flatnonzero(np.diff(indices) > 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(indices) - 1]])
    for s, e in zip(starts, ends, strict=True):
        yield int(indices[s]), int(indices[e]) + 1


def _label(
    values: np.ndarray, above: np.ndarray, min_area: int, y0: int, x0: int
) -> list[tuple[float, int, int, Defect]]:
    """Regions of one window whose top-left map pixel is (y0, x0): (score, first row, first column, defect)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(above).view(np.uint8), 8)
    out = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        mask = labels[y : y + h, x : x + w] == i
        score = float(values[y : y + h, x : x + w][mask].max())
        first_x = x + int(np.argmax(mask[0]))  # the region's first pixel in its top row
        out.append((score, y0 + y, x0 + first_x, Defect((x0 + x, y0 + y, x0 + x + w, y0 + y + h), area, score)))
    return out
