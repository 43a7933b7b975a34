"""Connected regions of an anomaly map above the pixel threshold: the defects of one image."""

from __future__ import annotations

import cv2
import numpy as np

from engines.types import Defect


def find_regions(anomaly: np.ndarray, threshold: float, min_area: int = 1, limit: int = 256) -> list[Defect]:
    """Defects = 8-connected regions with anomaly > threshold and at least ``min_area`` pixels.

    Bboxes are in map pixels (x1/y1 exclusive); the strongest ``limit`` regions are kept.
    Good parts take the fast path: one comparison and no labelling.
    """
    above = anomaly > threshold
    if not above.any():
        return []
    # Label only the bounding window of the pixels above threshold: defects are small.
    rows = np.flatnonzero(above.any(axis=1))
    cols = np.flatnonzero(above.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    window = above[y0:y1, x0:x1].view(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(window, connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    defects = []
    sub = anomaly[y0:y1, x0:x1]
    for i in keep:
        x, y, w, h, area = stats[i]
        patch = sub[y : y + h, x : x + w]
        score = float(patch[labels[y : y + h, x : x + w] == i].max())
        defects.append(Defect((int(x0 + x), int(y0 + y), int(x0 + x + w), int(y0 + y + h)), int(area), score))
    defects.sort(key=lambda d: d.score, reverse=True)
    return defects[:limit]
