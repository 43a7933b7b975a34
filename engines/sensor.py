"""The sensor frame's clutter: what the camera shows of itself at the image edges, found per frame and left out.

A fixture bar, a clamp or a cable that reaches into the field of view stays with the camera
while the part moves under it. Where it covers the part there is nothing to inspect, and its
edge, sharp and dark against the part, is the largest "anomaly" a good image can show. Good
parts differ in how deep it reaches and on which side, so no fixed statistic of good images
covers the next part; the frame itself shows where it is.

Per frame (``SensorModel.occluders``), on the fine registration level, in the sensor frame:
the part as the reference expects it there (its mean, posed and lit like the frame) is
compared with the frame. An *occluder* is where the frame is much darker than the part would
be (``DARK`` of the expected grey, at least ``MIN_DARK`` levels), attached to an image edge,
wide along it at every depth it reaches (``STREAK``: a dark streak across the band is not one)
and long along it (``MIN_RUN`` of the edge): no defect is that. Its depth from the edge is
capped by what the good images showed (``max_depth``, learned by ``learn_max_depth``, with
``DEPTH_SLACK``); a fit whose good images show none learns 0 and nothing is ever left out.
The occluded pixels, grown by the edge's blur and a fine-level pixel, and those of a user's
sensor-frame ignore mask (``inspectd fit --sensor-mask``), are replaced in the registered
frame by the reference mean under the frame's lighting: they score nothing, fine or coarse,
in any detector, and the fit's statistics never see the fixture.

Clutter (debris, reflections, cable edges), vignetting and blur also stay with the camera; the
clutter scores through the learned tolerance of the border band (calibration.tolerance_fit's ring),
it is not left out. What none of it may do is pull the non-rigid field (engines.nonrigid), which
measures the part's local shifts block by block with one gain and offset per block: in a flat
stretch of the band, clutter or the steep brightness ramp of vignetting is the only structure,
and a block beside the part's outermost markers "moved" them by 2-4 px, so they scored as
defects. So the fit learns, per edge, how deep the good images show what the posed part does not
explain (``learn_clutter_depth``), and in that band (``SensorModel.clutter_band``) the field does
not measure where the part is flat; the part's own edges and markers there it still measures
(hiding the whole band left the part's outer edge to the field's extrapolation, 3 px off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from engines.registration import lighting_fields

DARK = 0.4  # an occluder is darker than the part would be there by this fraction of the expected grey...
MIN_DARK = 12.0  # ...and by at least this many grey levels (8-bit units)
MIN_RUN = 0.35  # fraction of an edge's length an occluder covers at least
STREAK = 0.02  # fraction of an edge's length: dark narrower than this along the edge is a streak, not an occluder
FILL = 0.6  # of the rows between the edge and an occluder's depth, at least this fraction are dark
MARGIN_PX = 2  # full-resolution px grown around an occluder (its blurred edge) besides one fine-level pixel
DEPTH_SLACK = 0.25  # an occluder may reach this fraction deeper than the deepest one the good images showed
ZONE = 0.06  # fraction of the shorter side within which occluders are looked for while learning
# Clutter's depth per edge (``learn_clutter_depth``): a fine-level pixel of the good images is unexplained where it
# differs from the posed, lit part by more than CLUTTER_LEVEL grey levels beyond what the line's own gain and offset
# (vignetting, glow; both from the line's flat pixels) and a misalignment of CLUTTER_SHIFT fine-level px at the
# part's edges explain; a line parallel to an edge is clutter where more than CLUTTER_FRACTION of its pixels over
# all good images are. On fixture-hard seed 9007 (2048 px, fine level 4x): 2.6-8.5 % of the samples on the lines
# within 36 px of each edge, 0.8-5.4 % at 36-44 px, 0.3-0.5 % at 44-48, at most 0.03 % from 48 px on (synth's clutter
# reaches 49 px; the part's markers beyond, 2-3 px off after the rigid pose, are what CLUTTER_SHIFT explains): 48 px
# learned on every edge, 120 at 5120 px. No slack beyond it (an occluder gets DEPTH_SLACK): the part's outermost
# edge and markers lie just beyond the clutter (docs/measurements.md, "The clutter band").
CLUTTER_LEVEL = 8.0
CLUTTER_SHIFT = 2.0
CLUTTER_FRACTION = 0.002
GAIN_RANGE = 0.4  # a line's gain against the expected part stays within 1 +- this (vignetting, lighting)


def parameters() -> dict[str, float]:
    """What a bundle records of the occluder detection, so a bundle is never run with other constants."""
    return {
        "dark": DARK,
        "min_dark": MIN_DARK,
        "min_run": MIN_RUN,
        "streak": STREAK,
        "fill": FILL,
        "margin_px": MARGIN_PX,
    }


def edge_view(img: np.ndarray, edge: int) -> np.ndarray:
    """A view whose row index is the distance from ``edge`` (0 top, 1 bottom, 2 left, 3 right)."""
    if edge == 0:
        return img
    if edge == 1:
        return img[::-1]
    if edge == 2:
        return img.swapaxes(0, 1)
    return img[:, ::-1].swapaxes(0, 1)


def occluder_depths(frame: np.ndarray, expected: np.ndarray, limit: int) -> list[np.ndarray]:
    """Per edge, for each position along it, how many rows (this level's px) an occluder covers (0: none).

    ``frame`` and ``expected`` are the frame and the posed, lit reference on one level, in the
    sensor frame; ``limit`` caps the depth (rows).
    """
    depths = []
    for edge in range(4):
        # only the rows an occluder may reach are compared (the same elementwise test as on the whole level)
        seen, lit = edge_view(frame, edge)[: max(limit, 0)], edge_view(expected, edge)[: max(limit, 0)]
        rows = (lit - seen) > np.maximum(MIN_DARK, DARK * lit)
        if rows.size == 0:
            depths.append(np.zeros(edge_view(frame, edge).shape[1], np.int32))
            continue
        rows = _attached_and_wide(rows)
        # deepest dark row whose rows from the edge are mostly dark (clutter on the bar leaves gaps)
        filled = np.cumsum(rows, axis=0) >= FILL * np.arange(1, len(rows) + 1)[:, None]
        candidate = rows & filled
        depth = np.where(candidate.any(axis=0), len(rows) - np.argmax(candidate[::-1], axis=0), 0)
        depths.append(_long_runs(depth.astype(np.int32)))
    return depths


def _attached_and_wide(rows: np.ndarray) -> np.ndarray:
    """The dark pixels of an edge's rows (row = distance from the edge) that are wide along the edge (STREAK) and
    connected to the edge through such pixels.

    Dark streaks cross the band (a cable's shadow, debris, a scratch in the cover glass): each column one
    crosses is dark from the bar's edge on, and the deepest-run rule below took them as more bar, 40-100 px
    deeper than the bar in places and, with the outermost dark rows, a bar on an edge that had none (spent seed
    9016 at 5120 px, ``docs/measurements.md``). A bar, a clamp or a tilted plate is wide along the edge at every
    depth it reaches; a streak is not, and a dark line parallel to the edge beyond the bar does not touch it.
    """
    width = max(3, int(STREAK * rows.shape[1])) | 1
    wide = cv2.morphologyEx(np.ascontiguousarray(rows, np.uint8), cv2.MORPH_OPEN, np.ones((1, width), np.uint8))
    _, labels = cv2.connectedComponents(wide, connectivity=8)
    attached = np.unique(labels[0])
    return np.isin(labels, attached[attached > 0])


def _long_runs(depth: np.ndarray) -> np.ndarray:
    """Keep the positions of runs (gaps of a few percent closed) that cover MIN_RUN of the edge."""
    n = len(depth)
    covered = (depth > 0).astype(np.uint8)[None, :]
    gap = max(3, int(0.03 * n)) | 1
    closed = cv2.morphologyEx(covered, cv2.MORPH_CLOSE, np.ones((1, gap), np.uint8))[0] > 0
    keep = np.zeros(n, bool)
    # the runs' starts and ends: where the padded 0 / 1 sequence steps up, then down
    bounds = np.flatnonzero(np.diff(np.concatenate(([0], closed.view(np.int8), [0]))))
    for start, stop in zip(bounds[0::2], bounds[1::2], strict=True):
        if stop - start >= MIN_RUN * n:
            keep[start:stop] = True
    # a conservative depth inside a kept run: the deepest over a small neighbourhood (bridges the gaps)
    spread = cv2.dilate(depth.astype(np.float32)[None, :], np.ones((1, gap), np.uint8))[0]
    return np.where(keep, spread, 0).astype(np.int32)


@dataclass(frozen=True)
class SensorModel:
    """Occluders learned from the good images (a depth limit), and the user's sensor-frame ignore mask."""

    max_depth: float  # full-resolution px an occluder may reach from the edge; 0: the good images showed none
    mean: np.ndarray  # [C, H, W] the reference mean (8-bit grey units) that replaces what is left out
    user_mask: np.ndarray | None = None  # bool [H, W], sensor frame, True = ignore (``--sensor-mask``)
    # full-resolution px per edge (top, bottom, left, right) within which the good images showed clutter: there the
    # non-rigid field does not measure where the part is flat (``clutter_band``); zeros: bundles from before it,
    # or rigid ones
    clutter_depth: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def active(self) -> bool:
        return self.leaves_out or any(d > 0 for d in self.clutter_depth)

    @property
    def leaves_out(self) -> bool:
        """Whether frames can have pixels left out (occluders, the user's mask): the clutter band leaves none out."""
        return self.max_depth > 0 or self.user_mask is not None

    def clutter_band(self) -> FrameClutter | None:
        """The band along each edge where the good images showed clutter (sensor frame), None where there is none.
        The non-rigid field does not measure there where the part is flat (``engines.registration.align``)."""
        h, w = self.mean.shape[1:]
        depths = {
            edge: np.full(w if edge < 2 else h, math.ceil(depth), np.int32)
            for edge, depth in enumerate(self.clutter_depth)
            if depth > 0
        }
        return FrameClutter(depths) if depths else None

    def search_rows(self, factor: int) -> int:
        """Rows from each edge of a level ``factor`` times smaller that ``frame_clutter`` compares (0: none)."""
        return math.ceil(self.max_depth / factor) if self.max_depth > 0 else 0

    def frame_clutter(self, frame: np.ndarray, expected: np.ndarray, factor: int) -> FrameClutter:
        """What to leave out of this frame: its occluders (``frame``/``expected`` on a level ``factor`` times
        smaller) and the user's mask, in the sensor frame."""
        depths: dict[int, np.ndarray] = {}
        if self.max_depth > 0:
            h, w = self.mean.shape[1:]
            cap = math.ceil(self.max_depth) + MARGIN_PX
            for edge, depth in enumerate(occluder_depths(frame, expected, self.search_rows(factor))):
                if depth.any():
                    length = w if edge < 2 else h
                    full = np.repeat(np.minimum((depth + 1) * factor + MARGIN_PX, cap), factor)[:length]
                    depths[edge] = np.pad(full, (0, length - len(full)), mode="edge").astype(np.int32)
        return FrameClutter(depths, self.user_mask)


@dataclass(frozen=True)
class FrameClutter:
    """What one frame shows of the sensor frame's clutter, in the sensor frame (full-resolution pixels)."""

    depths: dict[int, np.ndarray]  # edge (0 top, 1 bottom, 2 left, 3 right) -> occluder depth at each place along it
    user_mask: np.ndarray | None = None  # bool [H, W]

    def __bool__(self) -> bool:
        return bool(self.depths) or (self.user_mask is not None and bool(self.user_mask.any()))

    def boxes(self, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """Sensor-frame boxes (y0, y1, x0, x1) that hold everything to leave out."""
        h, w = shape
        out = []
        for edge, depth in self.depths.items():
            # beyond the image too: a part moved away from that edge shows the camera's border there (replicated)
            d = int(depth.max())
            boxes = [(-h, d, -w, 2 * w), (h - d, 2 * h, -w, 2 * w), (-h, 2 * h, -w, d), (-h, 2 * h, w - d, 2 * w)]
            out.append(boxes[edge])
        if self.user_mask is not None and self.user_mask.any():
            ys, xs = np.nonzero(self.user_mask.any(axis=1))[0], np.nonzero(self.user_mask.any(axis=0))[0]
            out.append((int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1))
        return out

    def covers(self, qy: np.ndarray, qx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Whether sensor-frame points (full-resolution coordinates) are left out."""
        return self._covers_rounded(np.rint(qy), np.rint(qx), shape)

    def _covers_rounded(self, ry: np.ndarray, rx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``covers`` of points already rounded to sensor pixels (float arrays of whole numbers).

        Compared as floats (whole numbers: the same comparisons as on integers); only the coordinate along an edge
        becomes an index: a 5120 px frame's occluder is some 0.5 M pixels at full resolution, and each conversion of
        both coordinates to integers a pass over them.
        """
        h, w = shape
        hit = np.zeros(ry.shape, bool)
        for edge, depth in self.depths.items():
            along = np.clip(rx if edge < 2 else ry, 0, len(depth) - 1).astype(np.intp)
            into = (ry, h - 1 - ry, rx, w - 1 - rx)[edge]
            hit |= into < depth[along]
        if self.user_mask is not None:
            ry, rx = ry.astype(np.int64), rx.astype(np.int64)
            inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
            hit[inside] |= self.user_mask[ry[inside], rx[inside]]
        return hit

    def in_reference(
        self, matrix: np.ndarray, shape: tuple[int, int], step: int = 1, grow: float = 0.0
    ) -> list[tuple[slice, slice, np.ndarray]]:
        """Where the reference frame of a frame with pose ``matrix`` (reference -> frame) shows what is left out.

        Returns (rows, cols, mask) pieces on a grid of every ``step``-th full-resolution pixel (a
        level ``step`` times smaller, pixel centres as ``cv2.resize`` has them), each covering one
        box of ``boxes`` seen from the reference; ``grow`` px are added all round (a field's shift).
        """
        inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
        regions = self._regions(matrix, shape)
        pieces = []
        for box in self.boxes(shape):
            rows, cols = _reference_box(inverse, box, shape, step, grow)
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            mask = self._box_mask(matrix, shape, step, (rows, cols), regions)
            if grow > 0 and mask.any():
                k = 2 * math.ceil(grow / step) + 1
                mask = cv2.dilate(mask.view(np.uint8), np.ones((k, k), np.uint8)) > 0
            pieces.append((rows, cols, mask))
        return pieces

    def band_in_reference(self, matrix: np.ndarray, shape: tuple[int, int], step: int) -> Pieces:
        """``in_reference`` (no grow) of bands of one depth along edges (no user mask), each piece its own edge's band
        only: one half-plane, one comparison per pixel (``covers`` tests every edge at every pixel: 2.8 ms for the
        four bands of a 5120 px frame on the field's level, against some 0.5)."""
        h, w = shape
        inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
        pieces = []
        for (edge, depth), box in zip(self.depths.items(), self.boxes(shape), strict=True):
            rows, cols = _reference_box(inverse, box, shape, step, 0.0)
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            py = (np.arange(rows.start, rows.stop) + 0.5) * step - 0.5
            px = (np.arange(cols.start, cols.stop) + 0.5) * step - 0.5
            row = matrix[1] if edge < 2 else matrix[0]  # the sensor coordinate across this edge
            q = np.rint(row[0] * px[None, :] + row[1] * py[:, None] + row[2])
            into = (q, h - 1 - q, q, w - 1 - q)[edge]
            pieces.append((rows, cols, into < int(depth.max())))
        return pieces

    def _box_mask(
        self,
        matrix: np.ndarray,
        shape: tuple[int, int],
        step: int,
        box: tuple[slice, slice],
        regions: list[list[HalfPlane]],
    ) -> np.ndarray:
        """``covers`` on the level pixels of ``box``, evaluated only where a region can reach: a box around a
        rotated edge band is mostly empty, and the pixels are the same, so the mask is too."""
        rows, cols = box
        mask = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
        for r, c in _spans(regions, rows, cols, step):
            py = (np.arange(r.start, r.stop) + 0.5) * step - 0.5
            px = (np.arange(c.start, c.stop) + 0.5) * step - 0.5
            # the same sums in the same order as ``covers``' callers form them, rounded in place
            qx = np.add(matrix[0, 0] * px[None, :], matrix[0, 1] * py[:, None])
            qy = np.add(matrix[1, 0] * px[None, :], matrix[1, 1] * py[:, None])
            qx += matrix[0, 2]
            qy += matrix[1, 2]
            spot = (slice(r.start - rows.start, r.stop - rows.start), slice(c.start - cols.start, c.stop - cols.start))
            mask[spot] = self._covers_rounded(np.rint(qy, out=qy), np.rint(qx, out=qx), shape)
        return mask

    def _regions(self, matrix: np.ndarray, shape: tuple[int, int]) -> list[list[HalfPlane]]:
        """Per thing left out (an edge's occluder, the user's mask), half-planes of the reference frame outside
        which ``covers`` is False; ``SLACK`` px wider than the rounding to sensor pixels needs."""
        h, w = shape
        qx, qy = tuple(float(v) for v in matrix[0]), tuple(float(v) for v in matrix[1])

        def below(q: tuple[float, float, float], limit: float) -> HalfPlane:  # q(x, y) < limit
            return q[0], q[1], q[2] - limit - SLACK

        def above(q: tuple[float, float, float], limit: float) -> HalfPlane:  # q(x, y) > limit
            return -q[0], -q[1], limit - SLACK - q[2]

        regions = []
        for edge, depth in self.depths.items():
            d = float(depth.max())
            regions.append([(below(qy, d), above(qy, h - 1 - d), below(qx, d), above(qx, w - 1 - d))[edge]])
        if self.user_mask is not None and self.user_mask.any():
            ys, xs = np.nonzero(self.user_mask.any(axis=1))[0], np.nonzero(self.user_mask.any(axis=0))[0]
            y0, y1, x0, x1 = float(ys[0]), float(ys[-1]), float(xs[0]), float(xs[-1])
            regions.append([above(qy, y0), below(qy, y1), above(qx, x0), below(qx, x1)])
        return regions


def _reference_box(
    inverse: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int], step: int, grow: float
) -> tuple[slice, slice]:
    """The level pixels (every ``step``-th) of the reference that a sensor box (y0, y1, x0, x1) reaches under the
    pose whose ``inverse`` (frame -> reference) is given, ``grow`` px and a pixel more all round."""
    h, w = shape
    y0, y1, x0, x1 = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64) @ inverse.T
    lo = np.floor(corners.min(axis=0) - grow - 1)
    hi = np.ceil(corners.max(axis=0) + grow + 1)
    rows = slice(max(0, int(lo[1]) // step), min(-(-h // step), int(hi[1]) // step + 1))
    cols = slice(max(0, int(lo[0]) // step), min(-(-w // step), int(hi[0]) // step + 1))
    return rows, cols


HalfPlane = tuple[float, float, float]  # (a, b, c): the points (x, y) with a * x + b * y + c < 0
SLACK = 2.0  # px a half-plane is widened by: rounding to the nearest sensor pixel moves a point by half a pixel
# Level pixels per strip along a box's long side (``in_reference``'s spans, ``leave_out``'s rectangles): what is left
# out is the same for any length (tests/test_sensor_same_as_before.py); a 1.5 deg pose adds ~7 rows a strip at 256.
# At 64 (before) the per-strip numpy calls cost more than the pixels: 5120 px frames of the alignment benchmark,
# leave_out 4.4 -> 2.9 CPU ms and the full-resolution in_reference 3.1 -> 2.1 at 256 (512: 2.8 and 2.0).
BLOCK = 256


def _spans(regions: list[list[HalfPlane]], rows: slice, cols: slice, step: int) -> list[tuple[slice, slice]]:
    """Sub-rectangles of the box (rows, cols) of level pixels outside which no region reaches: strips of
    ``BLOCK`` along its long side, each cut across to where some region's half-planes can hold in it."""
    by_cols = cols.stop - cols.start >= rows.stop - rows.start
    run, across = (cols, rows) if by_cols else (rows, cols)
    spans = []
    for start in range(run.start, run.stop, BLOCK):
        stop = min(start + BLOCK, run.stop)
        ends = ((start + 0.5) * step - 0.5, (stop - 0.5) * step - 0.5)  # the strip's first and last pixel centres
        first = (across.start + 0.5) * step - 0.5
        last = (across.stop - 0.5) * step - 0.5
        lo, hi = _reach(regions, ends, by_cols, first, last)
        if lo > hi:
            continue
        # a level pixel more on each side than the centres need: float rounding must never cut a pixel off
        i0 = max(across.start, math.floor((lo + 0.5) / step - 0.5) - 1)
        i1 = min(across.stop, math.ceil((hi + 0.5) / step - 0.5) + 2)
        if i0 < i1:
            strip, cut = slice(start, stop), slice(i0, i1)
            spans.append((cut, strip) if by_cols else (strip, cut))
    return spans


def _reach(
    regions: list[list[HalfPlane]], ends: tuple[float, float], by_cols: bool, first: float, last: float
) -> tuple[float, float]:
    """The coordinates across a strip (within [first, last]) where some region can hold for a point whose
    coordinate along the strip lies between ``ends``; (inf, -inf) where none can."""
    lo, hi = math.inf, -math.inf
    for planes in regions:
        r_lo, r_hi = first, last
        for a, b, c in planes:
            along, cross = (a, b) if by_cols else (b, a)
            bound = -(c + min(along * ends[0], along * ends[1]))  # cross * t < bound for some point of the strip
            if cross > 0:
                r_hi = min(r_hi, bound / cross)
            elif cross < 0:
                r_lo = max(r_lo, bound / cross)
            elif bound <= 0:
                r_lo, r_hi = math.inf, -math.inf
        if r_lo <= r_hi:
            lo, hi = min(lo, r_lo), max(hi, r_hi)
    return lo, hi


def learn_max_depth(frames: list[tuple[np.ndarray, np.ndarray]], factor: int, shape: tuple[int, int]) -> float:
    """The depth limit (full-resolution px) from the good images: the deepest occluder any showed, plus slack.

    ``frames``: (fine level, expected part on it) of each good image. 0 when none showed one.
    Each occluder counts with its 90th-percentile depth along the edge, not its deepest place: at a
    corner it runs into the neighbouring edge's occluder, as deep as the search goes.
    """
    limit = math.ceil(ZONE * min(shape) / factor)
    deepest = 0.0
    for frame, expected in frames:
        for depth in occluder_depths(frame, expected, limit):
            if depth.any():  # its typical depth along the edge: at a corner it meets the other edge's occluder
                deepest = max(deepest, float(np.percentile(depth[depth > 0], 90)))
    return 0.0 if deepest == 0 else float((deepest + 1) * factor * (1 + DEPTH_SLACK))


def learn_clutter_depth(
    frames: list[tuple[np.ndarray, np.ndarray]], factor: int, shape: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Per edge, how deep (full-resolution px) the good images show what the posed part does not explain.

    ``frames``: (fine level, expected part on it) of each good image, as ``learn_max_depth`` takes
    them. Per line parallel to an edge (within ZONE of the shorter side, without the corner zones)
    and per image, what the line's own gain and offset (vignetting, glow: smooth along an edge) leave
    of the residual is unexplained where it exceeds CLUTTER_LEVEL beyond CLUTTER_SHIFT times the
    expected part's slope (a marker or edge a bend moved; ``_unexplained``). The depth is one past
    the deepest line on which more than CLUTTER_FRACTION of the samples of all images are
    unexplained: 0 where none is.
    """
    limit = math.ceil(ZONE * min(shape) / factor)
    counts = np.zeros((4, limit))
    samples = np.zeros(4)
    for frame, expected in frames:
        frame, expected, slope = _grey_and_slope(frame, expected)
        for edge in range(4):
            views = (edge_view(a, edge) for a in (frame, expected, slope))
            unexplained = _unexplained(*views, limit)
            counts[edge, : len(unexplained)] += unexplained.sum(axis=1)
            samples[edge] += unexplained.shape[1]
    depth = []
    for edge in range(4):
        clutter = np.flatnonzero(counts[edge] > CLUTTER_FRACTION * max(samples[edge], 1))
        depth.append(float((int(clutter[-1]) + 1) * factor) if len(clutter) else 0.0)
    return depth[0], depth[1], depth[2], depth[3]


def _grey_and_slope(frame: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame and expected part as float grey (colour levels compared as grey), and the expected part's steepest
    slope nearby (grey levels per px): a shifted edge's residual peaks beside its steepest pixel."""
    frame, expected = np.asarray(frame, np.float32), np.asarray(expected, np.float32)
    if frame.ndim == 3:
        frame, expected = frame.mean(axis=2), expected.mean(axis=2)
    gx = cv2.Sobel(expected, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(expected, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    return frame, expected, cv2.dilate(np.hypot(gx, gy), np.ones((3, 3), np.uint8))


def _unexplained(frame: np.ndarray, expected: np.ndarray, slope: np.ndarray, limit: int) -> np.ndarray:
    """bool [rows, along]: of an edge's views (row = distance from the edge), in the first ``limit`` rows without
    the corner zones (``limit`` wide: the other edges' lines cross there), where the frame differs from the
    expected part by more than the line's own gain and offset (vignetting and glow are smooth along an edge) and a
    small shift at its edges explain."""
    rows = slice(0, limit)
    along = slice(limit, max(limit, frame.shape[1] - limit))
    f, e, sl = frame[rows, along], expected[rows, along], slope[rows, along]
    # a line's gain from its flat pixels only (a shift changes nothing there), where their level varies along it well
    # beyond the noise, and no further from 1 than vignetting and lighting take it: a few clutter pixels on a
    # uniform line would set any gain
    still = CLUTTER_SHIFT * sl < CLUTTER_LEVEL / 2
    flat = still.astype(np.float32)
    n = np.maximum(flat.sum(axis=1, keepdims=True), 1)
    e_mean = (flat * e).sum(axis=1, keepdims=True) / n
    spread = (flat * (e - e_mean) ** 2).sum(axis=1, keepdims=True)
    varied = spread > CLUTTER_LEVEL**2 * n
    gain = (flat * (e - e_mean) * f).sum(axis=1, keepdims=True) / np.maximum(spread, 1e-6)
    gain = np.where(varied, np.clip(gain, 1 - GAIN_RANGE, 1 + GAIN_RANGE), 1.0)
    residual = f - gain * e
    # the offset: the median over the flat pixels (robust to the clutter itself; a long edge of the part along the
    # line, a little off, would be the median of all of them); 0 on a line without any
    offset = np.ma.median(np.ma.masked_array(residual, ~still), axis=1)
    residual -= np.ma.filled(offset, 0.0)[:, None].astype(np.float32)
    return np.abs(residual) - CLUTTER_SHIFT * gain * sl > CLUTTER_LEVEL


Pieces = list[tuple[slice, slice, np.ndarray]]


def leave_out(registered: np.ndarray, pieces: Pieces, mean: np.ndarray, coef: np.ndarray, unit: float) -> int:
    """Replace the registered frame's pixels under the pieces' masks (reference frame, full resolution) by
    ``mean`` lit like the frame; returns how many were replaced."""
    count = 0
    for rows, cols, mask in pieces:
        # rectangles rather than gathered pixel lists: slices and broadcast lighting, no full-size index arrays
        for r, c in _occupied(mask):
            _replace(registered, rows.start + r.start, cols.start + c.start, mask[r, c], mean, coef, unit)
        count += int(np.count_nonzero(mask))
    return count


def _occupied(mask: np.ndarray) -> list[tuple[slice, slice]]:
    """Rectangles of ``mask`` that hold all its True pixels: strips of ``BLOCK`` along its long side, each cut
    across to its True pixels' extent."""
    by_cols = mask.shape[1] >= mask.shape[0]
    out = []
    for start in range(0, mask.shape[1 if by_cols else 0], BLOCK):
        strip = slice(start, start + BLOCK)
        hit = np.flatnonzero(mask[:, strip].any(axis=1) if by_cols else mask[strip].any(axis=0))
        if len(hit):
            cut = slice(int(hit[0]), int(hit[-1]) + 1)
            out.append((cut, strip) if by_cols else (strip, cut))
    return out


def _replace(
    registered: np.ndarray, y0: int, x0: int, mask: np.ndarray, mean: np.ndarray, coef: np.ndarray, unit: float
) -> None:
    """Replace the pixels under ``mask`` (its corner at full-resolution pixel (y0, x0)) by ``mean`` lit like
    the frame: elementwise the same arithmetic as on gathered pixels, so the same values."""
    h, w = mask.shape
    ys, xs = np.arange(y0, y0 + h, dtype=np.float64)[:, None], np.arange(x0, x0 + w, dtype=np.float64)[None, :]
    gain, offset = lighting_fields(coef, xs, ys, registered.shape[:2])
    values = gain[None] * mean[:, y0 : y0 + h, x0 : x0 + w].astype(np.float32) + offset[None]  # [C, h, w], 8-bit units
    if unit != 1:  # x / 1 is x: 8-bit frames skip the division
        values /= np.float32(unit)
    # in place: each a pass over the rectangle without a new array of its size
    np.clip(np.rint(values, out=values), 0, np.iinfo(registered.dtype).max, out=values)
    values = values.astype(registered.dtype)
    window = registered[y0 : y0 + h, x0 : x0 + w]
    if registered.ndim == 2:
        np.copyto(window, values[0], where=mask)
    else:
        np.copyto(window, np.moveaxis(values, 0, -1), where=mask[..., None])
