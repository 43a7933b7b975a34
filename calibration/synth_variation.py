"""Benign variation of good parts for synthetic lines: short thin marks and a grain that differ from part to part.

Real good parts are not identical copies. Handling leaves a few short thin marks (mostly dark)
anywhere on the part, and the surface grain differs from part to part. Neither is a defect, and
a detector that rejects them is of no use on such a line. ``synth --benign`` draws both on every
image of every split (train, test good, and the defective test images, whose defects stay as
they are):

- in a fraction ``mark_rate`` of the parts, ``marks_per_part`` marks, each a slightly curved
  line ``mark_width`` px wide, ``mark_length`` (a fraction of the part's side: at most 2 %, so
  shorter than the shortest scratch) long, of ``mark_contrast`` grey levels (at most half of the
  weakest scratch's 25), at a random place and angle on the part body;
- a grain: smoothed Gaussian noise on the part body whose standard deviation (``grain``, grey
  levels) and pattern are drawn anew for each part.

Everything here draws from the image's own benign stream (``synth`` passes
``rng([seed, split, index, BENIGN_STREAM])``), so turning the mode on changes nothing else of
an image: pose, lighting, noise and defects are those of the same image without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

BENIGN_STREAM = 101  # rng stream (4th seed word) of an image's benign variation
PLANT_STREAM = 102  # rng stream of a planted defect in a training image, and of which images get one
_SS = 4  # supersampling of the drawn marks
_FIX_BITS = 4


@dataclass(frozen=True)
class Variation:
    """The benign-variation settings (``synth --benign`` and its knobs); recorded in meta.json by ``synth``."""

    mark_rate: float = 0.8  # fraction of parts that carry marks
    marks_per_part: tuple[int, int] = (1, 4)  # inclusive range of marks on a marked part
    mark_length: tuple[float, float] = (0.005, 0.02)  # fraction of the part's (shorter) side
    mark_width: tuple[float, float] = (0.8, 2.0)  # px
    mark_contrast: tuple[float, float] = (6.0, 30.0)  # grey levels (8-bit), at most half of a scratch's (25..60)
    dark_rate: float = 0.8  # fraction of marks darker than the surface
    grain: tuple[float, float] = (0.5, 2.5)  # grain standard deviation per part, grey levels
    grain_px: tuple[float, float] = (0.6, 1.2)  # grain smoothing sigma per part, px


def problems(v: Variation) -> list[str]:
    """What is wrong with the settings, as ``synth`` option names (empty: fine)."""
    out = []
    if not 0 <= v.mark_rate <= 1:
        out.append(f"--mark-rate: expected 0..1, got {v.mark_rate}")
    if not 0 <= v.marks_per_part[0] <= v.marks_per_part[1] <= 50:
        out.append(f"--marks-per-part: expected LO,HI in 0..50, got {v.marks_per_part}")
    if not 0 < v.mark_length[0] <= v.mark_length[1] <= 0.2:
        out.append(f"--mark-length: expected LO,HI in (0, 0.2] (fraction of the part's side), got {v.mark_length}")
    if not 0 <= v.mark_contrast[0] <= v.mark_contrast[1] <= 255:
        out.append(f"--mark-contrast: expected LO,HI grey levels in 0..255, got {v.mark_contrast}")
    if not 0 <= v.grain[0] <= v.grain[1] <= 64:
        out.append(f"--grain: expected LO,HI grey levels in 0..64, got {v.grain}")
    return out


def apply(img: np.ndarray, body: np.ndarray, v: Variation, rng: np.random.Generator) -> dict[str, Any]:
    """Draw grain and marks on ``img`` (float32 grey units, [H, W] or [H, W, C]) where ``body`` [H, W] is set.

    Returns what was drawn: ``{"grain": std, "marks": [{centre, length, width, angle_deg, contrast}]}``.
    """
    grain = _grain(img, body, v, rng)
    marks = []
    if rng.random() < v.mark_rate:
        side = _part_side(body)
        for _ in range(int(rng.integers(v.marks_per_part[0], v.marks_per_part[1] + 1))):
            mark = _mark(img, body, side, v, rng)
            if mark is not None:
                marks.append(mark)
    return {"grain": round(grain, 3), "marks": marks}


def _part_side(body: np.ndarray) -> float:
    """The part's shorter side in px (its body's bounding box)."""
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    if not len(rows) or not len(cols):
        return float(min(body.shape))
    return float(min(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def _grain(img: np.ndarray, body: np.ndarray, v: Variation, rng: np.random.Generator) -> float:
    std = float(rng.uniform(*v.grain))
    sigma = float(rng.uniform(*v.grain_px))
    if std <= 0:
        return 0.0
    field = rng.standard_normal(body.shape, dtype=np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigma)
    field *= np.float32(std / max(float(field.std()), 1e-6))
    field *= body
    img += field[..., None] if img.ndim == 3 else field
    return std


def _mark(img: np.ndarray, body: np.ndarray, side: float, v: Variation, rng: np.random.Generator) -> dict | None:
    """One short, thin, slightly curved mark at a random place on the body; None if no place was found."""
    h, w = body.shape
    length = float(rng.uniform(*v.mark_length)) * side
    width = float(rng.uniform(*v.mark_width))
    t = float(rng.uniform(0, math.pi))
    contrast = float(rng.uniform(*v.mark_contrast)) * (-1.0 if rng.random() < v.dark_rate else 1.0)
    d, n = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    bend = float(rng.uniform(-0.15, 0.15)) * length
    u = np.linspace(-0.5, 0.5, 17)[:, None]
    local = u * length * d + (1 - 4 * u * u) * bend * n
    half = np.abs(local).max(axis=0) + width + 2
    for _ in range(100):
        centre = rng.uniform(half, np.array([w - 1, h - 1]) - half)
        ends = np.round(local[[0, -1, len(local) // 2]] + centre).astype(int)
        if body[ends[:, 1], ends[:, 0]].all():
            break
    else:
        return None
    x0, y0 = np.floor(centre - half).astype(int)
    x1, y1 = np.ceil(centre + half).astype(int) + 1
    canvas = np.zeros(((y1 - y0) * _SS, (x1 - x0) * _SS), np.uint8)
    pts = np.round(((local + centre - (x0, y0) + 0.5) * _SS - 0.5) * (1 << _FIX_BITS)).astype(np.int32)
    cv2.polylines(canvas, [pts], False, 255, max(1, round(width * _SS)), cv2.LINE_AA, _FIX_BITS)
    cover = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    profile = cv2.GaussianBlur(cover, (0, 0), 0.5) * body[y0:y1, x0:x1]
    patch = img[y0:y1, x0:x1]
    patch += (profile[..., None] if img.ndim == 3 else profile) * np.float32(contrast)
    return {
        "centre": [round(float(c), 1) for c in centre],
        "length": round(length, 1),
        "width": round(width, 2),
        "angle_deg": round(math.degrees(t), 1),
        "contrast": round(contrast, 2),
    }


def planted(seed: int, train: int, count: int, kinds: tuple[str, ...]) -> dict[int, str]:
    """Which training images get a planted defect, and of which kind: ``count`` of ``train``, from the plant stream."""
    if count <= 0 or not kinds:
        return {}
    rng = np.random.default_rng([seed, PLANT_STREAM])
    chosen = sorted(int(i) for i in rng.choice(train, size=min(count, train), replace=False))
    return {i: kinds[int(rng.integers(len(kinds)))] for i in chosen}
