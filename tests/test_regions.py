"""Regions: connected areas above the pixel threshold become defects with exact boxes, areas and scores."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from engines.regions import find_regions
from engines.types import Defect


def full_image_regions(amap: np.ndarray, threshold: float, min_area: int) -> set[tuple]:
    """Independent answer: label the whole map at once (no window), 8-connected."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((amap > threshold).astype(np.uint8), connectivity=8)
    out = set()
    for i in range(1, count):
        x, y, w, h, area = stats[i]
        if area >= min_area:
            out.add(((int(x), int(y), int(x + w), int(y + h)), int(area), float(amap[labels == i].max())))
    return out


def test_a_clean_map_has_no_regions():
    """A map entirely at or below the threshold yields no defects (including values equal to it)."""
    amap = np.full((64, 80), 0.5, np.float32)
    amap[10, 10] = 1.0
    assert find_regions(amap, 1.0) == []


def test_boxes_areas_and_scores_are_exact():
    """Two blobs give their exclusive-end boxes, pixel counts and peak scores, strongest first."""
    amap = np.zeros((100, 120), np.float32)
    amap[10:15, 20:30] = 2.0  # 5 x 10
    amap[12, 25] = 3.0
    amap[60:80, 90:91] = 5.0  # a 20 px vertical line
    defects = find_regions(amap, 1.0)
    assert defects == [Defect((90, 60, 91, 80), 20, 5.0), Defect((20, 10, 30, 15), 50, 3.0)]


def test_regions_touching_the_last_row_and_column():
    """Regions at the map's far corners keep boxes ending at the map size (window offsets are right)."""
    amap = np.zeros((50, 70), np.float32)
    amap[45:, 66:] = 4.0
    amap[0:2, 0:3] = 2.0
    got = {d.bbox for d in find_regions(amap, 1.0)}
    assert got == {(66, 45, 70, 50), (0, 0, 3, 2)}


def test_diagonal_pixels_are_one_region():
    """Regions are 8-connected: a diagonal chain of pixels is a single defect."""
    amap = np.zeros((20, 20), np.float32)
    for i in range(5):
        amap[3 + i, 4 + i] = 2.0
    (defect,) = find_regions(amap, 1.0)
    assert defect.bbox == (4, 3, 9, 8) and defect.area == 5


def test_min_area_and_limit():
    """min_area drops small regions; limit keeps only the strongest ones."""
    amap = np.zeros((60, 60), np.float32)
    amap[5, 5] = 9.0  # 1 px
    amap[20:23, 20:23] = 3.0  # 9 px
    amap[40:44, 40:44] = 4.0  # 16 px
    assert [d.area for d in find_regions(amap, 1.0, min_area=2)] == [16, 9]
    assert [d.score for d in find_regions(amap, 1.0, limit=2)] == [9.0, 4.0]


@pytest.mark.parametrize("seed", range(5))
def test_matches_whole_map_labelling_on_random_maps(seed):
    """On random blobby maps the windowed labelling equals labelling the whole map."""
    rng = np.random.default_rng(seed)
    amap = cv2.GaussianBlur(rng.random((257, 301)).astype(np.float32), (0, 0), 2.0)
    threshold = float(np.quantile(amap, 0.97))
    got = {(d.bbox, d.area, d.score) for d in find_regions(amap, threshold, min_area=3, limit=10_000)}
    assert len(got) > 3
    assert got == full_image_regions(amap, threshold, 3)


def test_defect_json_fields():
    """Defect.to_dict gives integer bbox/area and a rounded score (the predict JSON)."""
    (defect,) = find_regions(np.pad(np.full((2, 3), 1.234567, np.float32), 4), 1.0)
    assert defect.to_dict() == {"bbox": [4, 4, 7, 6], "area": 6, "score": 1.2346}


def bounding_window_regions(anomaly: np.ndarray, threshold: float, min_area: int = 1, limit: int = 256) -> list:
    """The previous implementation, the reference for order and ties: label the bounding window of all pixels above."""
    above = anomaly > threshold
    if not above.any():
        return []
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above[y0:y1, x0:x1].view(np.uint8), connectivity=8)
    defects, sub = [], anomaly[y0:y1, x0:x1]
    for i in range(1, count):
        x, y, w, h, area = stats[i]
        if area >= min_area:
            score = float(sub[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].max())
            defects.append(Defect((int(x0 + x), int(y0 + y), int(x0 + x + w), int(y0 + y + h)), int(area), score))
    defects.sort(key=lambda d: d.score, reverse=True)
    return defects[:limit]


@pytest.mark.parametrize("seed", range(6))
def test_windows_give_the_bounding_window_result(seed):
    """Scattered clusters, tied scores (quantised maps), NaN pixels: the same defects, the same scores kept at a limit.

    Among regions of equal score the order is their first pixel's, row by row (the bounding window
    took OpenCV's labelling order, which scans two rows at a time from the window's corner).
    """
    rng = np.random.default_rng(100 + seed)
    amap = cv2.GaussianBlur(rng.random((300, 340)).astype(np.float32), (0, 0), 1.5)
    amap = np.round(amap * 40) / 40  # many regions share a score
    amap[rng.integers(0, 300, 20), rng.integers(0, 340, 20)] = np.nan
    threshold = float(np.nanquantile(amap, 0.95))
    everything = find_regions(amap, threshold, 2, 10_000)
    assert len(everything) >= 20
    assert set(everything) == set(bounding_window_regions(amap, threshold, 2, 10_000))
    assert find_regions(amap, threshold, 2, 10_000, row_max=amap.max(axis=1)) == everything
    assert [d.score for d in everything] == sorted((d.score for d in everything), reverse=True)
    first = _first_pixel(amap > threshold)
    ties = [(a, b) for a, b in itertools.pairwise(everything) if a.score == b.score]
    assert ties, "the test needs tied scores"
    assert all(first[(a.bbox, a.area)] < first[(b.bbox, b.area)] for a, b in ties)
    top = find_regions(amap, threshold, 2, 5)
    assert top == everything[:5]
    assert [d.score for d in top] == [d.score for d in bounding_window_regions(amap, threshold, 2, 5)]


def _first_pixel(above: np.ndarray) -> dict[tuple, tuple[int, int]]:
    """(row, column) of each region's first pixel in row-major order, by (bbox, area), from labelling the whole map."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above.view(np.uint8), connectivity=8)
    firsts = {}
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        row = labels[y, x : x + w] == i
        firsts[((x, y, x + w, y + h), area)] = (y, x + int(np.argmax(row)))
    return firsts


def test_only_windows_with_pixels_above_are_labelled(monkeypatch):
    """Two defects in opposite corners of a large map: two small windows are labelled, not the map between them."""
    labelled = []
    label = cv2.connectedComponentsWithStats

    def counting(image, *args, **kwargs):
        labelled.append(image.size)
        return label(image, *args, **kwargs)

    monkeypatch.setattr(cv2, "connectedComponentsWithStats", counting)
    amap = np.zeros((2000, 3000), np.float32)
    amap[10:16, 20:25] = 3.0
    amap[1980:1990, 2950:2990] = 2.0
    defects = find_regions(amap, 1.0)
    assert [d.bbox for d in defects] == [(20, 10, 25, 16), (2950, 1980, 2990, 1990)]
    assert sum(labelled) == 6 * 5 + 10 * 40, labelled
