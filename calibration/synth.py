"""Synthetic MVTec-AD-layout datasets of aligned, "seed-like" industrial parts.

One golden part (the *design*) is drawn once per dataset at full resolution; every
image is that design under a random pose, illumination drift, a much more variable
border band (vignetting, blur, a moving fixture edge, clutter), and sensor noise.
Test images of a defect kind carry exactly one defect, drawn in image coordinates
after pose and lighting, so its mask is in the image's own pixels.

Everything derives from the seed: the design from ``rng([seed, 99])`` and each image
from ``rng([seed, split_id, index])``, so images are reproducible one by one and can
be rendered in any order by any number of worker processes.

Defect sizes are absolute pixels (a 5x5 dot is 5x5 at any image size), so small
defects become a vanishing fraction of large images, which is the point: a detector
that downscales and averages cannot see them.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from calibration import synth_variation as variation
from calibration.synth_variation import Variation
from engines.errors import UserError
from engines.sensor import edge_view
from engines.types import MIN_SIDE

KINDS = ("dot", "scratch", "stain", "missing", "extra", "smear")
# Kinds made only when asked for (--kinds), so default datasets stay as they were; stream ids follow ALL_KINDS.
EXTRA_KINDS = ("chip",)
ALL_KINDS = KINDS + EXTRA_KINDS
FIXTURES = ("design", "random")

REF_SIZE = 5120  # structure sizes below are quoted at this image side and scale with the shorter side
FIX_BITS = 4  # fractional bits for cv2 drawing: sub-pixel, anti-aliased geometry
FIX = 1 << FIX_BITS
MATERIAL = 3.0  # grey levels: a pixel changed by more than this is part of a defect
BODY_INSET = 0.02  # the part body starts this fraction of the shorter side from each edge
KEEPOUT = 0.6  # fraction of the band (from the edge) where the fixture and clutter live
# Level 1 for speed; run-length matching only, because noisy pixels defeat LZ77 string search
# anyway (half the write time of plain level 1 on noisy 16-bit images, and smaller files).
PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
DESIGN_STREAM = 99  # rng stream id of the design; splits use small ids below it

# (grey level at 8 bits, BGR tint) of each kind of surface.
Tone = tuple[float, tuple[float, float, float]]
BACKGROUND: Tone = (40, (1.10, 1.00, 0.90))
BODY: Tone = (150, (0.85, 1.00, 1.12))
HOLE: Tone = (30, (1.00, 1.00, 1.00))
PAD: Tone = (210, (0.55, 0.92, 1.15))
TRACE: Tone = (185, (0.60, 0.85, 1.15))
RING_DARK: Tone = (100, (1.05, 1.00, 0.95))
RING_BRIGHT: Tone = (195, (1.00, 1.00, 1.00))
MARKER: Tone = (200, (1.00, 1.00, 1.00))
TEXT: Tone = (225, (1.05, 1.05, 1.00))
FIXTURE = 15.0
EXTRA_TONES = (HOLE, RING_DARK, RING_BRIGHT, PAD, TEXT)
LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic dataset (``workers`` only sets the speed)."""

    size: int = 1024  # square shorthand: the side of ``width`` and ``height`` not given
    seed: int = 0
    train: int = 30
    test_good: int = 40
    per_kind: int = 10
    kinds: tuple[str, ...] = KINDS
    bit_depth: int = 8
    channels: int = 1
    max_shift_px: float | None = None  # None: size/512, i.e. ±10 px at 5120
    max_rotation_deg: float = 0.5
    warp_px: float = 0.0
    light: float = 1.0
    noise: float = 2.0
    border_band: float = 0.04
    # Sensor-frame nuisances of the border band. The defaults are the original generator's; the
    # options make lines like other plants': one fixture bar per image on a random side ("random"),
    # band vignetting and extra blur drawn from given ranges, a smooth bend of the part.
    fixture: str = "design"  # "design": bars on the design's edges; "random": one bar, random side per image
    fixture_depth: tuple[float, float] = (0.15, 0.45)  # bar depth, fraction of the border band
    band_vignette: tuple[float, float] = (0.1, 0.8)  # vignetting strength at the image edge, per image and edge
    band_blur_px: tuple[float, float] | None = None  # band blur sigma in px (None: 0.3..1.0 x max(1, band/20))
    bend_px: float = 0.0  # std (px) of a 9x9 grid of displacements, cubic-interpolated: a smooth bend
    # Benign variation of good parts (``calibration.synth_variation``): None draws the original
    # identical parts; a Variation draws marks and grain on every image, from their own rng stream.
    benign: Variation | None = None
    plant: int = 0  # training images that get a real defect (for auditing the good images), drawn from KINDS
    plant_kinds: tuple[str, ...] = KINDS
    workers: int = 0
    width: int | None = None  # None: ``size``
    height: int | None = None  # None: ``size``

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of every image in pixels."""
        return (self.height or self.size, self.width or self.size)

    @property
    def side(self) -> int:
        """The shorter image side: structure sizes, the border band and defect size caps scale with it."""
        return min(self.shape)

    @property
    def shift_px(self) -> float:
        """The pose shift bound actually used."""
        return max(self.shape) / 512 if self.max_shift_px is None else float(self.max_shift_px)

    def describe(self) -> str:
        h, w = self.shape
        return f"{w}px" if w == h else f"{w}x{h} px"


def validate(config: SynthConfig) -> None:
    """Raise ``UserError`` naming the first setting that cannot produce a dataset."""
    checks = [
        (config.size >= MIN_SIDE, f"--size: expected at least {MIN_SIDE}, got {config.size}"),
        ((config.width or MIN_SIDE) >= MIN_SIDE, f"--width: expected at least {MIN_SIDE}, got {config.width}"),
        ((config.height or MIN_SIDE) >= MIN_SIDE, f"--height: expected at least {MIN_SIDE}, got {config.height}"),
        (min(config.train, config.test_good, config.per_kind) >= 0, "--train/--test-good/--per-kind: >= 0"),
        (config.bit_depth in (8, 16), f"--bit-depth: expected 8 or 16, got {config.bit_depth}"),
        (config.channels in (1, 3), f"--channels: expected 1 or 3, got {config.channels}"),
        (set(config.kinds) <= set(ALL_KINDS), f"--kinds: expected some of {','.join(ALL_KINDS)}"),
        (len(set(config.kinds)) == len(config.kinds), "--kinds: a kind is listed twice"),
        (config.shift_px >= 0 and config.max_rotation_deg >= 0, "--max-shift/--max-rotation: >= 0"),
        (config.warp_px >= 0 and config.light >= 0 and config.noise >= 0, "--warp/--light/--noise: >= 0"),
        (0 <= config.border_band <= 0.2, f"--border-band: expected 0..0.2, got {config.border_band}"),
        (config.fixture in FIXTURES, f"--fixture: expected one of {','.join(FIXTURES)}, got {config.fixture}"),
        (_range_ok(config.fixture_depth, 0, 1), f"--fixture-depth: expected LO,HI in 0..1, got {config.fixture_depth}"),
        (_range_ok(config.band_vignette, 0, 1), f"--band-vignette: expected LO,HI in 0..1, got {config.band_vignette}"),
        (
            config.band_blur_px is None or _range_ok(config.band_blur_px, 0, 50),
            f"--band-blur: expected LO,HI in 0..50 px, got {config.band_blur_px}",
        ),
        (config.bend_px >= 0, f"--bend: expected >= 0, got {config.bend_px}"),
        (
            "chip" not in config.kinds or chip_room(round(config.border_band * config.side)) >= 4,
            "--kinds chip: the border band is too narrow for chips (make --size or --border-band larger)",
        ),
        (config.workers >= 0, f"--workers: expected >= 0, got {config.workers}"),
        (
            0 <= config.plant <= config.train,
            f"--plant: expected 0..{config.train} (the training images), got {config.plant}",
        ),
        (
            bool(config.plant_kinds) and set(config.plant_kinds) <= set(KINDS),
            f"--plant-kinds: expected some of {','.join(KINDS)}",
        ),
        *((False, problem) for problem in (variation.problems(config.benign) if config.benign else [])),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _range_ok(pair: tuple[float, float], lo: float, hi: float) -> bool:
    return len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi


# --------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Structure:
    """A removable piece of the design ("dot": centre+radius, "rect": 4 corners, "seg": 2 ends+width)."""

    kind: str
    pts: np.ndarray  # design coordinates, pixel centres at integers
    width: float  # dot: radius; seg: line width; rect: unused


class _Painter:
    """Anti-aliased, sub-pixel drawing on a uint8 canvas, grey or tinted BGR.

    The design is laid out in fractions of the image: ``at(u, v)`` is the point ``u`` of the
    width across and ``v`` of the height down, so a non-square image spreads the layout over
    its whole field; sizes (radii, widths, pitches) scale with the shorter side ``s``.
    """

    def __init__(self, shape: tuple[int, int], channels: int) -> None:
        self.channels = channels
        self.h, self.w = shape
        self.s = min(shape)
        self.img = np.zeros(shape if channels == 1 else (*shape, 3), np.uint8)
        self.structures: list[Structure] = []

    def at(self, u: float, v: float) -> tuple[float, float]:
        """Design coordinates (x, y) of the point ``u`` across the width and ``v`` down the height."""
        return u * self.w, v * self.h

    def colour(self, tone: Tone) -> float | tuple[float, float, float]:
        grey, tint = tone
        if self.channels == 1:
            return float(grey)
        return tuple(float(min(255.0, grey * t)) for t in tint)  # type: ignore[return-value]

    def fill(self, tone: Tone) -> None:
        self.img[...] = self.colour(tone)

    def poly(self, pts: np.ndarray, tone: Tone, keep: bool = False) -> None:
        cv2.fillPoly(self.img, [_fixed(pts)], self.colour(tone), cv2.LINE_AA, FIX_BITS)
        if keep:
            self.structures.append(Structure("rect", np.asarray(pts, np.float64), 0.0))

    def disc(self, centre: tuple[float, float], radius: float, tone: Tone, keep: bool = False) -> None:
        c = _fixed(np.array([centre]))[0]
        cv2.circle(
            self.img,
            (int(c[0]), int(c[1])),
            round(radius * FIX),
            self.colour(tone),
            -1,
            cv2.LINE_AA,
            FIX_BITS,
        )
        if keep:
            self.structures.append(Structure("dot", np.array([centre], np.float64), radius))

    def ring(self, centre: tuple[float, float], radius: float, width: float, tone: Tone) -> None:
        # Drawn as two discs so widths below one pixel still come out anti-aliased.
        self.disc(centre, radius + width / 2, tone)
        self.disc(centre, radius - width / 2, BODY)

    def segment(self, p0: np.ndarray, p1: np.ndarray, width: float, tone: Tone, keep: bool = False) -> None:
        """A line of any (sub-pixel) width with round ends, drawn as a polygon plus two discs."""
        self.poly(_thick_line(p0, p1, width), tone)
        for p in (p0, p1):
            self.disc((float(p[0]), float(p[1])), width / 2, tone)
        if keep:
            self.structures.append(Structure("seg", np.array([p0, p1], np.float64), width))


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts, np.float64) * FIX).astype(np.int32)


def _thick_line(p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9) * width / 2
    return np.array([p0 + n, p1 + n, p1 - n, p0 - n])


def _rect(x0: float, y0: float, x1: float, y1: float, chamfer: float = 0.0) -> np.ndarray:
    """Corners of a rectangle; a positive chamfer cuts its top-right corner at 45 degrees."""
    if chamfer <= 0:
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return np.array([[x0, y0], [x1 - chamfer, y0], [x1, y0 + chamfer], [x1, y1], [x0, y1]])


def _body_outline(top_left: tuple[float, float], bottom_right: tuple[float, float], s: int) -> np.ndarray:
    """Part outline: rounded top-left and bottom-right corners, chamfered top-right and bottom-left."""
    (x0, y0), (x1, y1) = top_left, bottom_right
    radius, chamfer = 0.06 * s, 0.05 * s

    def arc(cx: float, cy: float, start: float) -> list[tuple[float, float]]:
        angles = np.radians(np.linspace(start, start + 90, 24))
        return [(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in angles]

    pts = [*arc(x0 + radius, y0 + radius, 180), (x1 - chamfer, y0), (x1, y0 + chamfer)]
    pts += [*arc(x1 - radius, y1 - radius, 0), (x0 + chamfer, y1), (x0, y1 - chamfer)]
    return np.array(pts)


@dataclass
class Design:
    """The golden part: float32 image (8-bit grey units), body mask and removable structures."""

    image: np.ndarray
    body: np.ndarray
    structures: list[Structure]
    bar_edges: tuple[int, ...]  # edges (0 top, 1 bottom, 2 left, 3 right) that carry a fixture bar

    @cached_property
    def groups(self) -> dict[str, list[Structure]]:
        """Removable structures by kind ("dot", "rect", "seg")."""
        out: dict[str, list[Structure]] = {"dot": [], "rect": [], "seg": []}
        for st in self.structures:
            out[st.kind].append(st)
        return out


def render_design(config: SynthConfig) -> Design:
    """Draw the golden part once, at full resolution, with an optics blur."""
    rng = np.random.default_rng([config.seed, DESIGN_STREAM])
    painter = _Painter(config.shape, config.channels)
    painter.fill(BACKGROUND)
    s = painter.s
    outline = _body_outline(painter.at(BODY_INSET, BODY_INSET), painter.at(1 - BODY_INSET, 1 - BODY_INSET), s)
    painter.poly(outline, BODY)
    for draw in (_draw_holes, _draw_markers, _draw_rings, _draw_pads, _draw_buses, _draw_dot_grid):
        draw(painter, rng)
    _draw_text(painter, rng)
    _draw_fine(painter, rng)
    image = cv2.GaussianBlur(painter.img.astype(np.float32), (0, 0), 0.8)
    body = np.zeros(config.shape, np.uint8)
    cv2.fillPoly(body, [_fixed(outline)], 1, cv2.LINE_8, FIX_BITS)
    edges = [(0,), (2,), (0, 2), (1, 3), (3,)][int(rng.integers(5))]
    return Design(image, body, painter.structures, edges)


def _w(ref_px: float, size: int, min_px: float) -> float:
    """A width given at 5120 px, scaled to this size but never below ``min_px`` absolute pixels."""
    return max(min_px, ref_px * size / REF_SIZE)


def _draw_holes(p: _Painter, rng: np.random.Generator) -> None:
    s = p.s
    for u, v in ((0.1, 0.1), (0.9, 0.1), (0.1, 0.9), (0.9, 0.9)):
        c = p.at(u, v)
        p.ring(c, 0.044 * s, _w(40, s, 2), RING_BRIGHT)
        p.disc(c, 0.028 * s, HOLE)


def _draw_markers(p: _Painter, rng: np.random.Generator) -> None:
    """Small dots along the part edge, inside the border band (so band defects can remove them).

    Their distance from the edge scales with the shorter side, like the band's width.
    """
    r = _w(8, p.s, 1.5)
    near, far_x, far_y = 0.032 * p.s, p.w - 0.032 * p.s, p.h - 0.032 * p.s
    for t in np.arange(0.2, 0.81, 0.04):
        x, y = p.at(t, t)
        for c in ((x, near), (x, far_y), (near, y), (far_x, y)):
            p.disc(c, r, MARKER, keep=True)


def _draw_rings(p: _Painter, rng: np.random.Generator) -> None:
    """Concentric rings around a central hole, outermost first so inner ones stay visible."""
    s = p.s
    c = p.at(0.5, 0.5)
    for radius, width, tone in (
        (0.125, _w(16, s, 2), TRACE),
        (0.10, 4.0, RING_BRIGHT),
        (0.085, _w(8, s, 2), RING_DARK),
        (0.065, _w(24, s, 2), RING_BRIGHT),
    ):
        p.ring(c, radius * s, width, tone)
    p.disc(c, 0.045 * s, HOLE)
    n = 48
    for t in np.arange(n) * 2 * math.pi / n:
        p.disc((c[0] + 0.145 * s * math.cos(t), c[1] + 0.145 * s * math.sin(t)), _w(6, s, 1.5), MARKER, keep=True)


def _draw_pads(p: _Painter, rng: np.random.Generator) -> None:
    """A 4x9 pad array on the left; the right column connects to the rings with traces."""
    s = p.s
    cols, rows = 4, 9
    cw, ch = 0.22 * p.w / cols, 0.6 * p.h / rows
    widths = [_w(w, s, 1.0) for w in (2, 3, 4, 6, 8)]
    ring_x, ring_y = p.at(0.5, 0.5)
    for j in range(rows):
        for i in range(cols):
            w, h = rng.uniform(0.4, 0.7) * cw, rng.uniform(0.35, 0.65) * ch
            cx, cy = 0.14 * p.w + (i + 0.5) * cw, 0.2 * p.h + (j + 0.5) * ch
            chamfer = 0.3 * min(w, h) if rng.random() < 0.3 else 0.0
            p.poly(_rect(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, chamfer), PAD, keep=True)
            if i == cols - 1:
                angle = math.radians(150 + 60 * j / (rows - 1))
                end = np.array([ring_x + 0.135 * s * math.cos(angle), ring_y + 0.135 * s * math.sin(angle)])
                knee = np.array([0.37 * p.w + 0.004 * p.w * j, cy])
                width = widths[int(rng.integers(len(widths)))]
                p.segment(np.array([cx + w / 2, cy]), knee, width, TRACE, keep=True)
                p.segment(knee, end, width, TRACE, keep=True)


def _draw_buses(p: _Painter, rng: np.random.Generator) -> None:
    """Parallel horizontal traces of decreasing width across the top."""
    s = p.s
    y = 0.155 * p.h
    for ref in (8, 6, 4, 3, 2):
        width = _w(ref, s, 1.0)
        x0, x1 = rng.uniform(0.15, 0.2) * p.w, rng.uniform(0.8, 0.85) * p.w
        p.segment(np.array([x0, y]), np.array([x1, y]), width, TRACE, keep=True)
        y += max(0.007 * s, 4 * width)


def _draw_dot_grid(p: _Painter, rng: np.random.Generator) -> None:
    s = p.s
    r = _w(9, s, 2.0)
    pitch = max(4 * r, 0.012 * s)
    for y in np.arange(0.2 * p.h, 0.52 * p.h, pitch):
        for x in np.arange(0.64 * p.w, 0.86 * p.w, pitch):
            if rng.random() > 0.05:  # a few gaps make the grid part of the design, not a texture
                p.disc((float(x), float(y)), r, MARKER, keep=True)


def _draw_text(p: _Painter, rng: np.random.Generator) -> None:
    """Text-like 5x7 cell glyphs; each glyph is one removable structure."""
    cell = _w(6, p.s, 2.0)
    for y in np.arange(0.6 * p.h, 0.8 * p.h - 7 * cell, 9 * cell):
        for x in np.arange(0.64 * p.w, 0.87 * p.w - 5 * cell, 6 * cell):
            bits = rng.random((7, 5)) < 0.45
            for r, c in zip(*np.nonzero(bits), strict=True):
                x0, y0 = x + c * cell, y + r * cell
                p.poly(_rect(x0, y0, x0 + cell, y0 + cell), TEXT)
            if bits.any():
                p.structures.append(Structure("rect", _rect(x, y, x + 5 * cell, y + 7 * cell), 0.0))


def _draw_fine(p: _Painter, rng: np.random.Generator) -> None:
    """2-4 px lines and 3 px dots at every image size, so fine structure never vanishes."""
    w, h = p.w, p.h
    x, y0, y1 = 0.36 * w, 0.84 * h, 0.9 * h
    while x < 0.64 * w:
        width = float(rng.choice([2.0, 3.0, 4.0]))
        length = (y1 - y0) * rng.uniform(0.5, 1.0)
        p.segment(np.array([x, y0]), np.array([x, y0 + length]), width, TRACE, keep=True)
        x += 3 * width + 2
    for x in np.arange(0.36 * w, 0.64 * w, 8.0):
        p.disc((float(x), 0.915 * h), 1.5, MARKER)
    p.poly(_rect(0.13 * w, 0.84 * h, 0.3 * w, 0.92 * h, 0.02 * p.s), PAD)
    p.poly(_rect(0.15 * w, 0.86 * h, 0.28 * w, 0.9 * h), RING_DARK)


# --------------------------------------------------------------------------- frames


@dataclass
class Frame:
    """One image being rendered: float32 pixels (8-bit grey units) and what defects need to know."""

    config: SynthConfig
    design: Design
    img: np.ndarray
    gain: np.ndarray  # full-resolution illumination gain (global drift x band vignetting)
    cgain: np.ndarray  # per-channel gain (white balance drift), shape (C,)
    offset: float
    matrix: np.ndarray  # 2x3 design -> image
    disp: tuple[np.ndarray, np.ndarray] | None  # non-rigid displacement (design px), image grid
    band: int
    keepout: int
    glow: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))  # per edge, grey levels
    mask: np.ndarray | None = None
    bars: list[dict[str, float]] = field(default_factory=list)  # fixture bars drawn (edge, depth_px, tilt_px)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.config.shape

    @property
    def extent(self) -> np.ndarray:
        """(width, height): the image size in the (x, y) order of points."""
        return np.array(self.config.shape[::-1])

    @property
    def side(self) -> int:
        """The shorter side, which defect size caps scale with."""
        return self.config.side

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        """Design coordinates -> image coordinates, including the (first-order) non-rigid warp."""
        pts = np.asarray(pts, np.float64)
        out = pts @ self.matrix[:, :2].T + self.matrix[:, 2]
        if self.disp is not None:
            ix = np.clip(np.round(out).astype(int), 0, self.extent - 1)
            d = np.stack([self.disp[0][ix[:, 1], ix[:, 0]], self.disp[1][ix[:, 1], ix[:, 0]]], axis=1)
            out -= d @ self.matrix[:, :2].T
        return out

    def on_body(self, pts: np.ndarray) -> bool:
        inv = cv2.invertAffineTransform(self.matrix)
        d = np.round(np.asarray(pts, np.float64) @ inv[:, :2].T + inv[:, 2]).astype(int)
        if (d < 0).any() or (d >= self.extent).any():
            return False
        return bool(self.design.body[d[:, 1], d[:, 0]].all())

    def surface(self, tone: Tone, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """What a surface of ``tone`` looks like under this frame's lighting, in a region."""
        grey, tint = tone
        gain = self.gain[y0:y1, x0:x1]
        lift = self.offset + _glow_at(self.glow, self.band, self.shape, (y0, y1, x0, x1))
        if self.config.channels == 1:
            return grey * gain + lift
        colour = np.minimum(255.0, grey * np.array(tint, np.float32)) * self.cgain
        return gain[..., None] * colour.astype(np.float32) + lift[..., None]


def _sample_pose(config: SynthConfig, rng: np.random.Generator) -> dict[str, float]:
    extent = np.array(config.shape[::-1])  # (width, height)
    dx, dy = rng.uniform(-1, 1, 2) * config.shift_px
    angle = rng.uniform(-1, 1) * config.max_rotation_deg
    cx, cy = extent / 2 + rng.uniform(-0.05, 0.05, 2) * extent
    return {"dx": float(dx), "dy": float(dy), "angle_deg": float(angle), "cx": float(cx), "cy": float(cy)}


def _pose_matrix(pose: dict[str, float]) -> np.ndarray:
    m = cv2.getRotationMatrix2D((pose["cx"], pose["cy"]), pose["angle_deg"], 1.0)
    m[:, 2] += (pose["dx"], pose["dy"])
    return m


def _warp(design: np.ndarray, matrix: np.ndarray, config: SynthConfig, rng: np.random.Generator) -> tuple:
    """Pose the design (sub-pixel bilinear), plus smooth random displacement fields if asked for.

    ``warp_px``: a 6x6 grid of displacements; ``bend_px``: a 9x9 grid with standard deviation
    ``bend_px``; both interpolated (bicubic) over the image and added, in design pixels.
    """
    h, w = design.shape[:2]
    grids = []
    if config.warp_px > 0:
        grids.append(rng.standard_normal((2, 6, 6)) * config.warp_px * 0.6)
    if config.bend_px > 0:
        grids.append(rng.standard_normal((2, 9, 9)) * config.bend_px)
    if not grids:
        img = cv2.warpAffine(design, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return img, None
    dx, dy = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    for grid in grids:
        dx += cv2.resize(grid[0].astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        dy += cv2.resize(grid[1].astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    inv = cv2.invertAffineTransform(matrix).astype(np.float32)
    xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    map_x = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2] + dx
    map_y = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2] + dy
    img = cv2.remap(design, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return img, (dx, dy)


def _gain_field(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Global gain drift x smooth linear/quadratic gradient x mild vignetting, at full resolution."""
    light = config.light
    u = np.linspace(-1, 1, 33)
    x, y = np.meshgrid(u, u)
    coef = rng.uniform(-1, 1, 5) * (1, 1, 0.5, 0.5, 0.5)
    grad = coef[0] * x + coef[1] * y + coef[2] * x * x + coef[3] * y * y + coef[4] * x * y
    grad *= rng.uniform(0, 0.03) * light / max(float(np.abs(grad).max()), 1e-9)
    vignette = 0.06 * (1 + rng.uniform(-0.2, 0.2) * light) * (x * x + y * y) / 2
    gain = (1 + rng.uniform(-0.04, 0.04) * light) * (1 + grad) * (1 - vignette)
    h, w = config.shape
    return cv2.resize(gain.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def _column(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Broadcast a per-row vector against a (rows, cols[, C]) slab."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1)).astype(np.float32)


def _band_blur(img: np.ndarray, band: int, sigma_px: tuple[float, float] | None, rng: np.random.Generator) -> None:
    """Extra defocus towards each edge, with a strength that changes per image and per edge.

    ``sigma_px``: the range of the blur's sigma in pixels; None: 0.3..1.0 x max(1, band / 20).
    """
    for edge in range(4):
        sigma = rng.uniform(0.3, 1.0) * max(1.0, band / 20) if sigma_px is None else rng.uniform(*sigma_px)
        view = edge_view(img, edge)
        slab = np.ascontiguousarray(view[: band + math.ceil(3 * sigma) + 1])
        blurred = cv2.GaussianBlur(slab, (0, 0), sigma)[:band]
        w = _column(1 - np.arange(band) / band, blurred)
        view[:band] = slab[:band] * (1 - w) + blurred * w


def _band_profile(d: np.ndarray, band: int) -> np.ndarray:
    """How strongly band effects act at distance ``d`` from an edge: 1 at the edge, 0 from ``band`` on."""
    return (np.clip(1 - np.asarray(d, np.float32) / band, 0, 1) ** 2).astype(np.float32)


def _band_vignette(gain: np.ndarray, band: int, strength_range: tuple[float, float], rng: np.random.Generator) -> None:
    """Vignetting near each edge (``strength_range``: darkening at the edge); redrawn for every image and edge."""
    for edge in range(4):
        strength = rng.uniform(*strength_range)
        view = edge_view(gain, edge)
        view[:band] *= _column(1 - strength * _band_profile(np.arange(band), band), view[:band])


def _band_glow(img: np.ndarray, band: int, glow: np.ndarray) -> None:
    """Stray light off the fixture: an additive lift towards each edge, with a per-image amplitude."""
    for edge, amplitude in enumerate(glow):
        view = edge_view(img, edge)
        view[:band] += _column(amplitude * _band_profile(np.arange(band), band), view[:band])


def _glow_at(glow: np.ndarray, band: int, shape: tuple[int, int], win: tuple[int, int, int, int]) -> np.ndarray:
    """The additive band glow in a window, broadcastable to (h, w): the same field as ``_band_glow``."""
    if band <= 0:
        return np.zeros((1, 1), np.float32)
    h, w = shape
    ys = np.arange(win[0], win[1])[:, None]
    xs = np.arange(win[2], win[3])[None, :]
    out = glow[0] * _band_profile(ys, band) + glow[1] * _band_profile(h - 1 - ys, band)
    return out + glow[2] * _band_profile(xs, band) + glow[3] * _band_profile(w - 1 - xs, band)


def _fixture(
    img: np.ndarray, config: SynthConfig, design: Design, band: int, offset: float, rng: np.random.Generator
) -> list[dict[str, float]]:
    """A dark fixture bar along one edge or more whose inner edge moves (and tilts) per image; returns the bars.

    ``config.fixture`` "design": on the design's fixed edges; "random": one bar on an edge drawn per image.
    The bars stay with the camera (sensor frame), whatever the part's pose.
    """
    edges = design.bar_edges if config.fixture == "design" else (int(rng.integers(4)),)
    bars = []
    for edge in edges:
        view = edge_view(img, edge)
        length = view.shape[1]  # pixels along the edge
        depth = band * rng.uniform(*config.fixture_depth)
        tilt = band * rng.uniform(-0.05, 0.05)
        rows = min(band, math.ceil(depth + abs(tilt)) + 2)
        edge_line = depth + tilt * (np.arange(length) / length - 0.5)
        alpha = np.clip(edge_line[None, :] - np.arange(rows)[:, None] + 0.5, 0, 1).astype(np.float32)
        if img.ndim == 3:
            alpha = alpha[..., None]
        view[:rows] = view[:rows] * (1 - alpha) + (FIXTURE + offset) * alpha
        bars.append({"edge": edge, "depth_px": round(depth, 2), "tilt_px": round(tilt, 2)})
    return bars


def _clutter(img: np.ndarray, band: int, rng: np.random.Generator) -> None:
    """Structured clutter (debris, reflections, cable edges) in the outer part of the band, new per image."""
    limit = KEEPOUT * band
    for edge in range(4):
        view = edge_view(img, edge)
        length = view.shape[1]  # pixels along the edge
        layers = [np.zeros((band, length), np.uint8) for _ in range(2)]  # bright, dark
        for _ in range(int(rng.poisson(5 + length / 300))):
            _clutter_item(layers[int(rng.integers(2))], band, rng)
        delta = (layers[0].astype(np.float32) - layers[1]) * (90 / 255)
        delta *= np.clip((limit - np.arange(band)) / (0.15 * band + 1e-9), 0, 1)[:, None].astype(np.float32)
        delta = cv2.GaussianBlur(delta, (0, 0), 0.7)
        view[:band] += delta[..., None] if img.ndim == 3 else delta


def _clutter_item(canvas: np.ndarray, band: int, rng: np.random.Generator) -> None:
    s = canvas.shape[1]
    c = np.array([rng.uniform(0, s), rng.uniform(0, 0.45 * band)])
    value = float(rng.uniform(40, 255))
    shape = int(rng.integers(3))
    if shape == 0:
        axes = (round(rng.uniform(0.05, 0.35) * band * FIX), round(rng.uniform(0.03, 0.2) * band * FIX))
        centre = tuple(int(v) for v in _fixed(c[None])[0])
        cv2.ellipse(canvas, centre, axes, rng.uniform(0, 180), 0, 360, value, -1, cv2.LINE_AA, FIX_BITS)
    elif shape == 1:
        t = rng.uniform(0, math.pi)
        d = np.array([math.cos(t), math.sin(t)]) * rng.uniform(0.1, 0.8) * band
        width = max(1.0, rng.uniform(0.01, 0.06) * band)
        cv2.fillPoly(canvas, [_fixed(_thick_line(c - d, c + d, width))], value, cv2.LINE_AA, FIX_BITS)
    else:
        n = int(rng.integers(5, 9))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.05, 0.25) * band * rng.uniform(0.5, 1.0, n)
        pts = c + np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        cv2.fillPoly(canvas, [_fixed(pts)], value, cv2.LINE_AA, FIX_BITS)


def _add_noise(img: np.ndarray, noise: float, rng: np.random.Generator) -> None:
    """Gaussian read noise of ``noise`` grey levels plus a little shot noise (σ grows with signal)."""
    if noise <= 0:
        return
    n = rng.standard_normal(img.shape, dtype=np.float32)
    sigma = np.maximum(img, 0)
    sigma *= 0.4 / 255
    sigma += 0.8
    np.sqrt(sigma, out=sigma)
    sigma *= noise
    n *= sigma
    del sigma
    img += n


def _quantise(img: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 16:
        img *= 257.0  # full 16-bit range; the float pixels keep the finer noise below one 8-bit level
        np.clip(img, 0, 65535, out=img)
        img += 0.5
        return img.astype(np.uint16)
    np.clip(img, 0, 255, out=img)
    img += 0.5
    return img.astype(np.uint8)


def render_frame(
    config: SynthConfig, design: Design, split_id: int, index: int, kind: str, plant: str | None = None
) -> tuple:
    """Render one image; returns (pixels, mask or None, defects, pose, fixture bars drawn, benign variation or None).

    ``plant``: a good (training) image that nevertheless carries one defect of this kind, drawn
    from its own rng stream.
    """
    rng = np.random.default_rng([config.seed, split_id, index])
    band = round(config.border_band * config.side)
    pose = _sample_pose(config, rng)
    matrix = _pose_matrix(pose)
    img, disp = _warp(design.image, matrix, config, rng)
    benign = None
    if config.benign is not None:  # on the part's surface, before the lighting: its own stream
        body = cv2.warpAffine(design.body, matrix, img.shape[1::-1], flags=cv2.INTER_NEAREST)
        benign_rng = np.random.default_rng([config.seed, split_id, index, variation.BENIGN_STREAM])
        benign = variation.apply(img, body.astype(np.float32), config.benign, benign_rng)
    gain = _gain_field(config, rng)
    cgain = (1 + rng.uniform(-0.01, 0.01, config.channels) * config.light).astype(np.float32)
    offset = float(rng.uniform(-4, 4) * config.light)
    glow = rng.uniform(0, 60, 4).astype(np.float32)
    bars: list[dict[str, float]] = []
    if band > 0:
        _band_blur(img, band, config.band_blur_px, rng)
        _band_vignette(gain, band, config.band_vignette, rng)
    img *= gain[..., None] * cgain if img.ndim == 3 else gain
    img += offset
    if band > 0:
        _band_glow(img, band, glow)
        bars = _fixture(img, config, design, band, offset, rng)
        _clutter(img, band, rng)
    keepout = math.ceil(KEEPOUT * band) + 2
    frame = Frame(config, design, img, gain, cgain, offset, matrix, disp, band, keepout, glow, bars=bars)
    defects = [] if kind == "good" else [_add_defect(frame, kind, rng)]
    if plant is not None:
        defects.append(
            _add_defect(frame, plant, np.random.default_rng([config.seed, split_id, index, variation.PLANT_STREAM]))
        )
    del gain, disp
    _add_noise(img, config.noise, rng)
    return _quantise(img, config.bit_depth), frame.mask, defects, pose, bars, benign


# --------------------------------------------------------------------------- defects


def _span(lo: float, hi: float, side: int) -> tuple[float, float]:
    """A size range in absolute pixels, with its upper end capped at 1/8 of the shorter side for small images."""
    cap = side / 8
    hi = min(hi, cap)
    return min(lo, hi / 2), hi


def _signed(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi) * rng.choice([-1.0, 1.0]))


def _direction(frame: Frame, rng: np.random.Generator, colour_only: bool) -> np.ndarray:
    """Per-channel weights of a defect's contrast: grey, or (colour-only) a chroma shift of zero luma."""
    channels = frame.config.channels
    if channels == 1:
        return np.ones(1, np.float32)
    if not colour_only:
        return np.ones(3, np.float32)
    v = rng.standard_normal(3).astype(np.float32)
    v -= LUMA_BGR * (v @ LUMA_BGR) / (LUMA_BGR @ LUMA_BGR)
    return v / np.abs(v).max()


def _place(frame: Frame, rng: np.random.Generator, half: np.ndarray, band: bool) -> tuple[np.ndarray, bool]:
    """A centre on the part for a shape of half-extent ``half`` (x, y), in the band or the interior.

    Defects keep out of the outer band (fixture bar, clutter) so that every one is
    visible; "in the band" means the defect's box reaches into the border band.
    """
    s, ko, bw = frame.extent, frame.keepout, frame.band
    half = np.ceil(np.asarray(half, np.float64)) + 1
    inner = np.maximum(half, bw)  # interior defects stay clear of the whole band
    for attempt in range(400):
        if band and bw > ko and attempt < 200:
            centre = _band_centre(rng, s, ko, bw, half)
        else:
            lo = inner if attempt < 300 else half + ko  # relax: small parts, wide bands
            centre = rng.uniform(lo, s - 1 - lo)
        if np.any(centre - half < ko) or np.any(centre + half > s - 1 - ko):
            continue
        corners = centre + half * np.array([[0, 0], [-1, -1], [1, -1], [-1, 1], [1, 1]])
        if frame.on_body(corners):
            near = min((centre - half).min(), (s - 1 - centre - half).min())
            return centre, bool(near < bw)
    raise RuntimeError(f"cannot place a defect of half-size {half.tolist()} on a {s[0]}x{s[1]} px part")


def _band_centre(rng: np.random.Generator, s: np.ndarray, ko: int, bw: int, half: np.ndarray) -> np.ndarray:
    """A centre in the band along a random edge; ``s`` is the image's (width, height)."""
    edge = int(rng.integers(4))
    axis = 1 if edge < 2 else 0  # coordinate perpendicular to the edge
    centre = rng.uniform(half + ko, s - 1 - half - ko)
    dist = rng.uniform(ko, bw) + half[axis]
    centre[axis] = dist if edge in (0, 2) else s[axis] - 1 - dist
    return centre


def _add_defect(frame: Frame, kind: str, rng: np.random.Generator) -> dict[str, Any]:
    band = bool(rng.random() < 0.25)
    return DEFECTS[kind](frame, rng, band)


def _window(centre: np.ndarray, half: np.ndarray, margin: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) around ``centre`` (x, y), clipped to an image of ``shape`` (height, width)."""
    x0, y0 = np.floor(centre - half).astype(int) - margin
    x1, y1 = np.ceil(centre + half).astype(int) + margin + 1
    return max(0, y0), min(shape[0], y1), max(0, x0), min(shape[1], x1)


def _commit(
    frame: Frame,
    win: tuple[int, int, int, int],
    new: np.ndarray,
    kind: str,
    in_band: bool,
    params: dict[str, Any],
    geometric: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a defect's pixels, derive its footprint (geometric, or |diff| > MATERIAL) and its mask."""
    y0, y1, x0, x1 = win
    old = frame.img[y0:y1, x0:x1]
    diff = new - old
    if diff.ndim == 3:  # the channel that changed most decides, with its sign
        pick = np.abs(diff).argmax(axis=2)
        diff = np.take_along_axis(diff, pick[..., None], axis=2)[..., 0]
    footprint = geometric if geometric is not None else np.abs(diff) > MATERIAL
    if not footprint.any():
        raise _Retry
    frame.img[y0:y1, x0:x1] = new
    mask = np.zeros(frame.shape, np.uint8)
    mask[y0:y1, x0:x1] = footprint.astype(np.uint8) * 255
    frame.mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))  # tolerate the soft edge and sub-pixel rounding
    ys, xs = np.nonzero(footprint)
    bbox = [int(xs.min() + x0), int(ys.min() + y0), int(xs.max() + x0 + 1), int(ys.max() + y0 + 1)]
    peak = float(diff[footprint][np.abs(diff[footprint]).argmax()])
    return {
        "kind": kind,
        "bbox": bbox,
        "size_px": max(bbox[2] - bbox[0], bbox[3] - bbox[1]),
        "contrast": round(peak, 2),
        "in_band": in_band,
        "params": params,
    }


class _Retry(Exception):
    """A defect landed where it changes nothing (e.g. on a surface of its own colour): draw another."""


def _supersampled(hw: tuple[int, int], origin: np.ndarray, draw: Callable[..., None]) -> np.ndarray:
    """Coverage in [0, 1] of a shape drawn 4x supersampled; ``draw(canvas, to_canvas)`` fixes coordinates."""
    ss = 4
    canvas = np.zeros((hw[0] * ss, hw[1] * ss), np.uint8)

    def to_canvas(pts: np.ndarray) -> np.ndarray:
        # image coordinates (pixel centres at integers) -> supersampled cv2 coordinates
        return _fixed((np.asarray(pts, np.float64) - origin + 0.5) * ss - 0.5)

    draw(canvas, to_canvas, ss)
    return cv2.resize(canvas, (hw[1], hw[0]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _additive(frame: Frame, win: tuple, profile: np.ndarray, contrast: float, direction: np.ndarray) -> np.ndarray:
    y0, y1, x0, x1 = win
    old = frame.img[y0:y1, x0:x1]
    if old.ndim == 3:
        return old + profile[..., None] * (contrast * direction)
    return old + profile * contrast


def _retrying(fn: Callable[[Frame, np.random.Generator, bool], dict]) -> Callable:
    def wrapper(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
        for _ in range(50):
            try:
                return fn(frame, rng, band)
            except _Retry:
                continue
        raise RuntimeError(f"{fn.__name__}: no visible placement found")

    wrapper.__name__ = fn.__name__
    return wrapper


@_retrying
def _dot(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """A soft-edged dark or bright ellipse of 5..12 px per side."""
    w, h = (int(v) for v in rng.integers(5, 13, 2))
    centre, in_band = _place(frame, rng, np.array([w, h]) / 2, band)
    contrast = _signed(rng, 35, 80)
    colour_only = frame.config.channels == 3 and rng.random() < 0.25
    direction = _direction(frame, rng, colour_only)
    return draw_dot(frame, centre, (w, h), contrast, direction, in_band)


def draw_dot(
    frame: Frame,
    centre: np.ndarray,
    wh: tuple[int, int],
    contrast: float,
    direction: np.ndarray,
    in_band: bool = False,
) -> dict:
    """Draw a ``w`` x ``h`` px dot near ``centre``; its footprint is exactly ``w`` x ``h`` pixels.

    Odd sizes are centred on a pixel centre and even sizes on a pixel corner, so the
    half-covered boundary pixels never round the footprint up or down by one.
    """
    w, h = wh
    centre = np.floor(centre) + np.array([0 if w % 2 else 0.5, 0 if h % 2 else 0.5])
    win = _window(centre, np.array([w, h]) / 2, 3, frame.shape)
    origin = np.array([win[2], win[0]], np.float64)

    def draw(canvas: np.ndarray, to_canvas: Callable, ss: int) -> None:
        c = to_canvas(centre[None])[0]
        axes = (round(w / 2 * ss * FIX), round(h / 2 * ss * FIX))
        cv2.ellipse(canvas, (int(c[0]), int(c[1])), axes, 0, 0, 360, 255, -1, cv2.LINE_AA, FIX_BITS)

    cover = _supersampled((win[1] - win[0], win[3] - win[2]), origin, draw)
    profile = cv2.GaussianBlur(cover, (0, 0), 0.5)  # the soft edge stays within the 1 px mask dilation
    new = _additive(frame, win, profile, contrast, direction)
    colour_only = bool(len(direction) == 3 and abs(float(direction @ LUMA_BGR)) < 1e-3)
    params = {"w": w, "h": h, "nominal_contrast": round(contrast, 2), "colour_only": colour_only}
    return _commit(frame, win, new, "dot", in_band, params, geometric=cover >= 0.5)


@_retrying
def _scratch(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """A thin, slightly curved line, 1..3 px wide and 40..400 px long."""
    length = rng.uniform(*_span(40, 400, frame.side))
    width = rng.uniform(1, 3)
    t = rng.uniform(0, math.pi)
    d, n = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    bend = rng.uniform(-0.15, 0.15) * length
    u = np.linspace(-0.5, 0.5, 33)[:, None]
    local = u * length * d + (1 - 4 * u * u) * bend * n  # a quadratic arc through both ends
    half = np.abs(local).max(axis=0) + width
    centre, in_band = _place(frame, rng, half, band)
    pts = local + centre
    win = _window(centre, half, 3, frame.shape)
    origin = np.array([win[2], win[0]], np.float64)

    def draw(canvas: np.ndarray, to_canvas: Callable, ss: int) -> None:
        cv2.polylines(canvas, [to_canvas(pts)], False, 255, max(1, round(width * ss)), cv2.LINE_AA, FIX_BITS)

    cover = _supersampled((win[1] - win[0], win[3] - win[2]), origin, draw)
    contrast = _signed(rng, 25, 60)
    new = _additive(frame, win, cv2.GaussianBlur(cover, (0, 0), 0.5), contrast, _direction(frame, rng, False))
    params = {"length": round(length, 1), "width": round(width, 2), "nominal_contrast": round(contrast, 2)}
    return _commit(frame, win, new, "scratch", in_band, params, geometric=cover >= 0.4)


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)


@_retrying
def _stain(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """A smooth irregular low-contrast blob (10..20 grey), 60..300 px across."""
    across = rng.uniform(*_span(60, 300, frame.side))
    half = np.array([across, across]) / 2
    centre, in_band = _place(frame, rng, half, band)
    win = _window(centre, half, 2, frame.shape)
    hw = (win[1] - win[0], win[3] - win[2])
    ys, xs = np.mgrid[win[0] : win[1], win[2] : win[3]].astype(np.float32)
    r = np.hypot(xs - centre[0], ys - centre[1]) / (across / 2)
    field = 1 - r * r + 0.35 * _smooth_noise(rng, hw, 6)  # irregular outline, mostly inside the circle
    shape = np.clip((field - 0.25) / 0.3, 0, 1)
    profile = cv2.GaussianBlur(shape * shape * (3 - 2 * shape), (0, 0), max(0.5, across / 25))
    profile *= (r < 1).astype(np.float32)  # keep it inside its box
    if profile.max() <= 0:
        raise _Retry
    profile /= profile.max()
    contrast = _signed(rng, 10, 20)
    colour_only = frame.config.channels == 3 and rng.random() < 0.25
    new = _additive(frame, win, profile, contrast, _direction(frame, rng, colour_only))
    params = {"across": round(across, 1), "nominal_contrast": round(contrast, 2), "colour_only": colour_only}
    return _commit(frame, win, new, "stain", in_band, params)


@_retrying
def _smear(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """An elongated smooth streak (15..30 grey), up to 500x100 px, in any orientation."""
    length = rng.uniform(*_span(150, 500, frame.side))
    width = length * rng.uniform(0.12, 0.2)
    t = rng.uniform(0, math.pi)
    d = np.array([math.cos(t), math.sin(t)])
    half = np.abs(d) * length / 2 + np.abs(d[::-1]) * width / 2
    centre, in_band = _place(frame, rng, half, band)
    win = _window(centre, half, 2, frame.shape)
    ys, xs = np.mgrid[win[0] : win[1], win[2] : win[3]].astype(np.float32)
    u = (xs - centre[0]) * d[0] + (ys - centre[1]) * d[1]
    v = -(xs - centre[0]) * d[1] + (ys - centre[1]) * d[0]
    ends = np.clip((length / 2 - np.abs(u)) / (0.25 * length), 0, 1)
    streak = 1 + 0.25 * np.sin(u * (2 * math.pi / max(20.0, length / 3)) + rng.uniform(0, 6.3))
    profile = (ends * ends * (3 - 2 * ends)) * np.exp(-0.5 * (v / (width / 4)) ** 2) * streak
    profile = (profile / profile.max()).astype(np.float32)
    contrast = _signed(rng, 15, 30)
    colour_only = frame.config.channels == 3 and rng.random() < 0.25
    new = _additive(frame, win, profile, contrast, _direction(frame, rng, colour_only))
    params = {
        "length": round(length, 1),
        "width": round(width, 1),
        "angle_deg": round(math.degrees(t), 1),
        "nominal_contrast": round(contrast, 2),
        "colour_only": colour_only,
    }
    return _commit(frame, win, new, "smear", in_band, params)


@_retrying
def _extra(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """A foreign particle, 8..60 px, with the intensity of some structure of the part."""
    radius = rng.uniform(*_span(8, 60, frame.side)) / 2
    n = int(rng.integers(6, 12))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = radius * rng.uniform(0.55, 1.0, n)
    local = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    half = np.abs(local).max(axis=0)
    centre, in_band = _place(frame, rng, half, band)
    win = _window(centre, half, 3, frame.shape)
    origin = np.array([win[2], win[0]], np.float64)

    def draw(canvas: np.ndarray, to_canvas: Callable, ss: int) -> None:
        cv2.fillPoly(canvas, [to_canvas(local + centre)], 255, cv2.LINE_AA, FIX_BITS)

    cover = _supersampled((win[1] - win[0], win[3] - win[2]), origin, draw)
    old = frame.img[win[0] : win[1], win[2] : win[3]]
    # Structure-like grey, but clearly different from what is under it, so the particle is visible.
    local_mean, gain = float(old.mean()), float(frame.gain[int(centre[1]), int(centre[0])])
    tones = [tone for tone in EXTRA_TONES if abs(tone[0] * gain + frame.offset - local_mean) > 30]
    tone = tones[int(rng.integers(len(tones)))] if tones else HOLE
    target = frame.surface(tone, *win)
    alpha = cover.copy()  # area coverage is the anti-aliased edge; more blur would leak past the mask
    if old.ndim == 3:
        alpha = alpha[..., None]
    new = old * (1 - alpha) + target * alpha
    params = {"diameter": round(2 * radius, 1), "grey": tone[0]}
    # Thin spikes of the outline cover no pixel by half yet change it a lot: count those too.
    change = np.abs(new - old)
    strong = (change.max(axis=2) if change.ndim == 3 else change) > 4 * MATERIAL
    return _commit(frame, win, new, "extra", in_band, params, geometric=(cover >= 0.5) | strong)


@_retrying
def _missing(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """A piece of structure (a dot, pad, glyph or trace segment) painted over as bare part surface."""
    piece, grow, what = _pick_structure(frame, rng, band)
    lo, hi = piece.min(axis=0), piece.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 + grow
    near = min((centre - half).min(), (frame.extent - 1 - centre - half).min())
    win = _window(centre, half, 3, frame.shape)
    origin = np.array([win[2], win[0]], np.float64)

    def draw(canvas: np.ndarray, to_canvas: Callable, ss: int) -> None:
        if len(piece) == 1:  # a dot: piece is its centre, grow its radius
            c = to_canvas(piece)[0]
            cv2.circle(canvas, (int(c[0]), int(c[1])), round(grow * ss * FIX), 255, -1, cv2.LINE_AA, FIX_BITS)
        else:
            cv2.fillPoly(canvas, [to_canvas(piece)], 255, cv2.LINE_AA, FIX_BITS)
            cv2.polylines(canvas, [to_canvas(piece)], True, 255, max(1, round(2 * grow * ss)), cv2.LINE_AA, FIX_BITS)

    cover = _supersampled((win[1] - win[0], win[3] - win[2]), origin, draw)
    alpha = cv2.GaussianBlur(cover, (0, 0), 0.6)
    old = frame.img[win[0] : win[1], win[2] : win[3]]
    if old.ndim == 3:
        alpha = alpha[..., None]
    new = old * (1 - alpha) + frame.surface(BODY, *win) * alpha
    return _commit(frame, win, new, "missing", bool(near < frame.band), {"structure": what})


def _pick_structure(frame: Frame, rng: np.random.Generator, band: bool) -> tuple[np.ndarray, float, str]:
    """Image-space outline of a removable piece (and how far to grow it), in the band if asked.

    Picks a structure type first (dot, rect, trace) so that the many glyphs and grid
    dots do not crowd out pads and traces.
    """
    s, ko, bw = frame.extent, frame.keepout, frame.band
    slack = 2.5 + frame.config.warp_px * 0.2  # cover anti-aliasing, blur and the warp approximation
    groups = [g for g in frame.design.groups.values() if g]
    fallback = None
    for attempt in range(3000):
        group = groups[int(rng.integers(len(groups)))]
        st = group[int(rng.integers(len(group)))]
        piece, grow = _structure_piece(frame, st, rng, slack)
        lo, hi = piece.min(axis=0) - grow, piece.max(axis=0) + grow
        if (lo < ko).any() or (hi > s - 1 - ko).any() or (hi - lo).max() > frame.side / 8:
            continue
        if (min(lo.min(), (s - 1 - hi).min()) < bw) == band:
            return piece, grow, st.kind
        fallback = fallback or (piece, grow, st.kind)
        if attempt > 1500 and fallback:
            break
    if fallback is None:
        raise RuntimeError("the design has no removable structure at this size")
    return fallback


def _structure_piece(frame: Frame, st: Structure, rng: np.random.Generator, slack: float) -> tuple:
    """Image-space outline of a structure (a trace: a random 20..120 px piece of it) and its growth."""
    if st.kind == "dot":
        return frame.to_image(st.pts), st.width + slack
    if st.kind == "rect":
        return frame.to_image(st.pts), slack
    p0, p1 = st.pts
    length = max(float(np.hypot(*(p1 - p0))), 1e-9)
    cut = min(length, rng.uniform(20, 120))
    a = p0 + (p1 - p0) * (rng.uniform(0, length - cut) / length)
    b = a + (p1 - p0) * (cut / length)
    return frame.to_image(_thick_line(a, b, st.width)), slack


@_retrying
def _chip(frame: Frame, rng: np.random.Generator, band: bool) -> dict:
    """A small chipped or spotted patch, 4..14 px, always inside the border band where the part is visible.

    Placed between the clutter zone (and any fixture bar on that edge) and the band's inner
    edge, on the part body: the band is where vignetting, blur and the fixture make a detector
    tolerant, so this kind measures what that tolerance costs.
    """
    across = rng.uniform(4, min(14, chip_room(frame.band)))
    n = int(rng.integers(5, 9))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = across / 2 * rng.uniform(0.6, 1.0, n)
    local = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    half = np.abs(local).max(axis=0)
    centre = _chip_centre(frame, rng, half)
    win = _window(centre, half, 3, frame.shape)
    origin = np.array([win[2], win[0]], np.float64)

    def draw(canvas: np.ndarray, to_canvas: Callable, ss: int) -> None:
        cv2.fillPoly(canvas, [to_canvas(local + centre)], 255, cv2.LINE_AA, FIX_BITS)

    cover = _supersampled((win[1] - win[0], win[3] - win[2]), origin, draw)
    contrast = _signed(rng, 30, 70)
    new = _additive(frame, win, cv2.GaussianBlur(cover, (0, 0), 0.5), contrast, _direction(frame, rng, False))
    params = {"across": round(across, 1), "nominal_contrast": round(contrast, 2)}
    return _commit(frame, win, new, "chip", True, params, geometric=cover >= 0.5)


def chip_room(band: int) -> int:
    """px between the clutter zone and the inner edge of a ``band`` px border band: where chips go."""
    return band - (math.ceil(KEEPOUT * band) + 2) - 2


def _chip_centre(frame: Frame, rng: np.random.Generator, half: np.ndarray) -> np.ndarray:
    """A centre whose shape lies inside the band, clear of the clutter zone and the fixture bars, on the body."""
    s, bw = frame.extent, frame.band
    half = np.ceil(half) + 1
    for _ in range(400):
        edge = int(rng.integers(4))
        bar = max([b["depth_px"] + abs(b["tilt_px"]) / 2 + 3 for b in frame.bars if b["edge"] == edge], default=0)
        near = max(frame.keepout, math.ceil(bar))
        axis = 1 if edge < 2 else 0  # coordinate perpendicular to the edge
        span = (near + half[axis], bw - 1 - half[axis])
        if span[0] > span[1]:
            continue
        centre = rng.uniform(half + near, s - 1 - half - near)
        dist = rng.uniform(*span)
        centre[axis] = dist if edge in (0, 2) else s[axis] - 1 - dist
        corners = centre + half * np.array([[0, 0], [-1, -1], [1, -1], [-1, 1], [1, 1]])
        if frame.on_body(corners):
            return centre
    raise RuntimeError(f"cannot place a chip in the {bw} px border band of a {s[0]}x{s[1]} px part")


DEFECTS: dict[str, Callable[[Frame, np.random.Generator, bool], dict]] = {
    "dot": _dot,
    "scratch": _scratch,
    "stain": _stain,
    "missing": _missing,
    "extra": _extra,
    "smear": _smear,
    "chip": _chip,
}


# --------------------------------------------------------------------------- dataset

_DESIGN: Design | None = None  # the part being rendered, in this process (set once per worker)


@dataclass(frozen=True)
class _Job:
    root: str
    split: str  # "train" | "test"
    kind: str  # "good" or a defect kind
    split_id: int  # rng stream: 0 train, 1 test/good, 2+ index in ALL_KINDS
    index: int
    plant: str | None = None  # a training image that carries a defect of this kind (``--plant``)

    @property
    def path(self) -> str:
        return f"{self.split}/{self.kind}/{self.index:03d}.png"

    @property
    def mask_path(self) -> str:
        if self.plant is not None:  # not a test kind's folder: nothing reads these as test ground truth
            return f"ground_truth/planted/{self.split}_{self.index:03d}_mask.png"
        return f"ground_truth/{self.kind}/{self.index:03d}_mask.png"


def _jobs(root: Path, config: SynthConfig) -> list[_Job]:
    plants = variation.planted(config.seed, config.train, config.plant, config.plant_kinds)
    jobs = [_Job(str(root), "train", "good", 0, i, plants.get(i)) for i in range(config.train)]
    jobs += [_Job(str(root), "test", "good", 1, i) for i in range(config.test_good)]
    for kind in config.kinds:
        # Stream ids follow ALL_KINDS, so a kind's images do not depend on which other kinds were asked for.
        jobs += [_Job(str(root), "test", kind, 2 + ALL_KINDS.index(kind), i) for i in range(config.per_kind)]
    return jobs


def _render_job(job: _Job, config: SynthConfig) -> dict[str, Any]:
    assert _DESIGN is not None
    pixels, mask, defects, pose, bars, benign = render_frame(
        config, _DESIGN, job.split_id, job.index, job.kind, job.plant
    )
    root = Path(job.root)
    _imwrite(root / job.path, pixels)
    entry: dict[str, Any] = {"path": job.path, "split": job.split, "kind": job.kind}
    if mask is not None:
        _imwrite(root / job.mask_path, mask)
        entry["mask"] = job.mask_path
    entry["defects"] = defects
    if job.plant is not None:
        entry["planted"] = job.plant
    entry["pose"] = {k: round(v, 4) for k, v in pose.items()}
    if config.fixture != "design":  # design bars are a property of the line; random ones of each image
        entry["fixture"] = bars
    if benign is not None:
        entry["benign"] = benign
    return entry


def _imwrite(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img, PNG):
        raise OSError(f"{path}: could not write PNG (is the disk full or the folder not writable?)")


def _worker(args: tuple[_Job, SynthConfig]) -> dict[str, Any]:
    return _render_job(*args)


def _set_design(design: Design) -> None:
    global _DESIGN
    _DESIGN = design


def _render_all(jobs: list[_Job], config: SynthConfig, progress: bool) -> list[dict[str, Any]]:
    """Render every job, in ``config.workers`` processes when there are several.

    Workers are spawned, not forked: forking a process that already runs threads (ONNX Runtime,
    ZeroMQ, OpenCV's pool, a test runner's) can deadlock the children. Each worker receives the
    design once, through the pool initializer.
    """
    from tqdm import tqdm

    workers = min(config.workers or os.cpu_count() or 1, max(1, len(jobs)))
    entries: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                entries[job.path] = _render_job(job, config)
                bar.update()
        else:
            with mp.get_context("spawn").Pool(workers, initializer=_set_design, initargs=(_DESIGN,)) as pool:
                for entry in pool.imap_unordered(_worker, [(job, config) for job in jobs]):
                    entries[entry["path"]] = entry
                    bar.update()
    return [entries[job.path] for job in jobs]


def _config_dict(config: SynthConfig) -> dict[str, Any]:
    # ``workers`` changes only the speed; leaving it out keeps meta.json identical across machines.
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k != "workers"}
    out["max_shift_px"] = config.shift_px
    out["height"], out["width"] = config.shape
    return json.loads(json.dumps(out))  # nested tuples (the benign variation) as the lists meta.json will hold


def _check_out(out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() or out.is_symlink():
        raise UserError(f"OUT: {out} exists and is not an empty directory; choose a new path")


def write_dataset(out: Path, config: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Write a dataset to ``out`` atomically (built in a sibling temporary directory, then renamed)."""
    global _DESIGN
    validate(config)
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        jobs = _jobs(tmp, config)
        for job in jobs:
            (tmp / job.path).parent.mkdir(parents=True, exist_ok=True)
            if job.kind != "good" or job.plant is not None:
                (tmp / job.mask_path).parent.mkdir(parents=True, exist_ok=True)
        _DESIGN = render_design(config)
        images = _render_all(jobs, config, progress)
        band = round(config.border_band * config.side)
        meta = {
            "config": _config_dict(config),
            "band_px": band,
            "keepout_px": math.ceil(KEEPOUT * band) + 2,
            "mask_dilation_px": 1,
            "images": images,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _check_out(out)
        try:
            os.rename(tmp, out)  # replaces an empty directory too
        except OSError as exc:
            raise UserError(f"OUT: {out} could not be created ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _DESIGN = None
    return meta


# --------------------------------------------------------------------------- CLI


def _kinds_arg(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {','.join(unknown)}; expected some of {','.join(ALL_KINDS)}")
    return kinds


def _range_arg(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"expected LO <= HI, got {text!r}")
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``inspectd synth``; defaults are those of ``SynthConfig``."""
    d = SynthConfig()
    parser.add_argument("out", type=Path, help="output directory (must not exist, or be empty)")
    parser.add_argument("--size", type=int, default=d.size, help="square image side in pixels (shorthand)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: --size)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: --size)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--train", type=int, default=d.train, help="train/good images")
    parser.add_argument("--test-good", type=int, default=d.test_good, help="test/good images")
    parser.add_argument("--per-kind", type=int, default=d.per_kind, help="test images per defect kind")
    parser.add_argument(
        "--kinds",
        type=_kinds_arg,
        default=d.kinds,
        help=f"comma list of {','.join(ALL_KINDS)} (default: all but {','.join(EXTRA_KINDS)})",
    )
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=d.bit_depth)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=d.channels)
    parser.add_argument("--max-shift", type=float, default=None, help="pose shift bound in px (default long side/512)")
    parser.add_argument("--max-rotation", type=float, default=d.max_rotation_deg, help="degrees")
    parser.add_argument("--warp", type=float, default=d.warp_px, help="non-rigid warp amplitude in px")
    parser.add_argument("--light", type=float, default=d.light, help="scale of illumination drift")
    parser.add_argument("--noise", type=float, default=d.noise, help="sensor noise sigma, 8-bit grey levels")
    parser.add_argument("--border-band", type=float, default=d.border_band, help="band width, fraction of short side")
    band = parser.add_argument_group("sensor-frame nuisances of the border band, and the part's bend")
    band.add_argument(
        "--fixture",
        choices=FIXTURES,
        default=d.fixture,
        help="design: bars on the design's fixed edges (default); random: one bar per image on a random side",
    )
    band.add_argument(
        "--fixture-depth", type=_range_arg, default=d.fixture_depth, help="LO,HI: bar depth, fraction of the band"
    )
    band.add_argument(
        "--band-vignette", type=_range_arg, default=d.band_vignette, help="LO,HI: darkening at the edge (0..1)"
    )
    band.add_argument("--band-blur", type=_range_arg, default=None, help="LO,HI: band blur sigma in px")
    band.add_argument("--bend", type=float, default=d.bend_px, help="std of a 9x9 grid of displacements, px")
    parser.add_argument("--workers", type=int, default=d.workers, help="processes (0: one per CPU)")
    v = Variation()
    benign = parser.add_argument_group("benign variation of good parts (calibration.synth_variation)")
    benign.add_argument(
        "--benign", action="store_true", help="draw short thin marks and a per-part grain on every part (all splits)"
    )
    benign.add_argument("--mark-rate", type=float, help=f"with --benign: fraction of parts with marks ({v.mark_rate})")
    benign.add_argument("--marks-per-part", type=_pair_arg(int), help=f"with --benign: LO,HI {_pair(v.marks_per_part)}")
    benign.add_argument(
        "--mark-length",
        type=_pair_arg(float),
        help=f"with --benign: LO,HI fraction of the part side {_pair(v.mark_length)}",
    )
    benign.add_argument(
        "--mark-contrast", type=_pair_arg(float), help=f"with --benign: LO,HI grey levels {_pair(v.mark_contrast)}"
    )
    benign.add_argument(
        "--grain", type=_pair_arg(float), help=f"with --benign: LO,HI grain std per part {_pair(v.grain)}"
    )
    parser.add_argument(
        "--plant", type=int, default=d.plant, help="training images that carry a real defect (to test fit's audit)"
    )
    parser.add_argument("--plant-kinds", type=_kinds_arg, default=d.plant_kinds, help="kinds planted (default all)")


_VARIATION_OPTIONS = {
    "mark_rate": "--mark-rate",
    "marks_per_part": "--marks-per-part",
    "mark_length": "--mark-length",
    "mark_contrast": "--mark-contrast",
    "grain": "--grain",
}


def _pair(values: tuple) -> str:
    return "(default " + ",".join(str(x) for x in values) + ")"


def _pair_arg(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            lo, hi = (kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
        return lo, hi

    return parse


def _variation(args: argparse.Namespace) -> Variation | None:
    given = {field: getattr(args, field, None) for field in _VARIATION_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    if not getattr(args, "benign", False):
        if given:
            raise UserError(f"{_VARIATION_OPTIONS[next(iter(given))]}: only with --benign")
        return None
    return replace(Variation(), **given)


def main(args: argparse.Namespace) -> int:
    """Write the dataset and print a one-line summary."""
    config = SynthConfig(
        size=args.size,
        width=getattr(args, "width", None),
        height=getattr(args, "height", None),
        seed=args.seed,
        train=args.train,
        test_good=args.test_good,
        per_kind=args.per_kind,
        kinds=tuple(args.kinds),
        bit_depth=args.bit_depth,
        channels=args.channels,
        max_shift_px=args.max_shift,
        max_rotation_deg=args.max_rotation,
        warp_px=args.warp,
        light=args.light,
        noise=args.noise,
        border_band=getattr(args, "border_band", SynthConfig.border_band),
        fixture=args.fixture,
        fixture_depth=args.fixture_depth,
        band_vignette=args.band_vignette,
        band_blur_px=args.band_blur,
        bend_px=args.bend,
        benign=_variation(args),
        plant=getattr(args, "plant", 0),
        plant_kinds=tuple(getattr(args, "plant_kinds", KINDS)),
        workers=args.workers,
    )
    start = time.perf_counter()
    meta = write_dataset(args.out, config, progress=True)
    n_defect = sum(1 for image in meta["images"] if image["defects"] and image["split"] == "test")
    print(
        f"wrote {len(meta['images'])} images ({config.train} train, {config.test_good} test good, "
        f"{n_defect} defective) of {config.describe()} to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
