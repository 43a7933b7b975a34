"""The fit's self-test: synthetic defects planted on held-out good images, scored as the line will score them.

Good images alone set the threshold; they cannot say what the threshold lets through. So each
held-out good image also gets a probed copy: small defects of known size and contrast drawn
into the registered frame (in 8-bit grey units, before the lighting correction, as a camera
would see them), scored by the same fold's graph and normalised by the same fold's tolerance
as the image itself. A probe is found when the map's maximum over the blocks it touches reaches
the calibrated threshold. The result is a recall table per kind and contrast (the fit report
shows it) and, for ``--shape-scores auto``, the evidence that decides whether the blob and line
scores pay for their time: they do when they find clearly more probes at the threshold they
themselves set on the same good images.

Probes are the product's specification, not any line's defects: the smallest dot the product
is meant to find (5 px across) and a thin line (2 px wide, 5 % of the shorter image side long),
each at contrasts 6, 12, 24 and 48 grey levels, dark and bright alternately, one of each per
image, at random places inside the inspection region clear of the border zone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

from engines.tolerance import BLOCK

if TYPE_CHECKING:  # fit_pipeline imports this module for its report
    from calibration.fit_pipeline import Training

KINDS = ("dot", "line")
CONTRASTS = (6.0, 12.0, 24.0, 48.0)  # grey levels (8-bit units)
DOT_PX = 5.0  # diameter: the smallest defect the product is specified for
LINE_FRACTION = 0.05  # of the shorter image side
LINE_WIDTH = 2
SHIFT = 4  # cv2 fixed-point bits: sub-pixel probe geometry
SEED = 20261130  # probes are placed the same way on every fit of the same images


@dataclass(frozen=True, eq=False)
class Probe:
    """One planted defect: what it is and the blocks of the map (rows, columns; end exclusive) it touches."""

    kind: str
    contrast: float
    blocks: tuple[int, int, int, int]
    origin: tuple[int, int]  # (top, left) of ``delta`` in the frame
    delta: np.ndarray  # float32 [side, side]: signed grey levels (8-bit units) to add there


def plan_probes(weight: np.ndarray, border_px: int, n_images: int) -> list[list[Probe]]:
    """Per image, every (kind, contrast) once.

    Places are cells of a grid over the inspection region without the border zone, drawn
    without replacement per image, so probes of one image never share a block. Returns [] per
    image when the region has too few cells (a tiny image): then there is no self-test.
    """
    cells = _free_cells(weight, border_px)
    rng = np.random.default_rng(SEED)
    plans: list[list[Probe]] = []
    cases = [(k, c) for k in KINDS for c in CONTRASTS]
    for image in range(n_images):
        if len(cells) < len(cases):
            plans.append([])
            continue
        chosen = rng.choice(len(cells), len(cases), replace=False)
        plans.append(
            [
                _probe(weight.shape, cells[i], kind, c, (-1) ** (image + j), rng)
                for j, (i, (kind, c)) in enumerate(zip(chosen, cases, strict=True))
            ]
        )
    return plans


def _line_length(shape: tuple[int, int]) -> float:
    return max(DOT_PX, LINE_FRACTION * min(shape))


def _free_cells(weight: np.ndarray, border_px: int) -> list[tuple[int, int, int]]:
    """(top, left, side) of square cells inside the region and the border zone, each room for one probe and a gap."""
    h, w = weight.shape
    side = math.ceil(_line_length((h, w)) + LINE_WIDTH + 2 * BLOCK + 4)
    cells = []
    for top in range(border_px, h - border_px - side + 1, side):
        for left in range(border_px, w - border_px - side + 1, side):
            if weight[top : top + side, left : left + side].all():
                cells.append((top, left, side))
    return cells


def _probe(
    shape: tuple[int, int], cell: tuple[int, int, int], kind: str, contrast: float, sign: int, rng: np.random.Generator
) -> Probe:
    top, left, side = cell
    half = _line_length(shape) / 2 if kind == "line" else DOT_PX / 2
    canvas = np.zeros((side, side), np.uint8)
    one = 1 << SHIFT
    # the cell's middle: the cell holds the probe plus a block on each side (``_free_cells``), so
    # probes of neighbouring cells never share a block
    centre = np.full(2, side / 2)
    if kind == "dot":
        point = tuple(round(v * one) for v in centre - 0.5)
        cv2.circle(canvas, point, round(half * one), 255, -1, cv2.LINE_AA, SHIFT)
    else:
        angle = rng.uniform(0, math.pi)
        d = np.array([math.cos(angle), math.sin(angle)]) * half
        a, b = (tuple(round(v * one) for v in p - 0.5) for p in (centre - d, centre + d))
        cv2.line(canvas, a, b, 255, LINE_WIDTH, cv2.LINE_AA, SHIFT)
    cover = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.5)
    ys, xs = np.nonzero(cover > 0.05)
    ys, xs = ys + top, xs + left
    blocks = (int(ys.min()) // BLOCK, int(ys.max()) // BLOCK + 1, int(xs.min()) // BLOCK, int(xs.max()) // BLOCK + 1)
    return Probe(kind, contrast, blocks, (top, left), cover * np.float32(sign * contrast))


def planted(frame: np.ndarray, probes: list[Probe], unit: float) -> np.ndarray:
    """A copy of the registered ``frame`` (raw dtype) with ``probes`` drawn in: ``unit`` raw -> 8-bit grey units."""
    out = np.array(frame)
    limit = np.iinfo(frame.dtype).max if np.issubdtype(frame.dtype, np.integer) else np.inf
    for probe in probes:
        (top, left), side = probe.origin, probe.delta.shape[0]
        window = out[top : top + side, left : left + side]
        delta = probe.delta / np.float32(unit)
        value = window.astype(np.float32) + (delta[..., None] if window.ndim == 3 else delta)
        window[...] = np.clip(np.rint(value), 0, limit).astype(frame.dtype)
    return out


def probed_training(training: Training, indices: Sequence[int], plans: list[list[Probe]]) -> Training:
    """The training set reduced to ``indices``, each frame with its image's probes drawn in."""
    frames = np.stack([planted(training.registered[i], plans[i], training.unit) for i in indices])
    return replace(
        training,
        registered=frames,
        coefs=training.coefs[list(indices)],
        poses=training.poses[list(indices)],
        pyramids=[],
    )


def recall(scores: np.ndarray, plans: list[list[Probe]], threshold: float) -> dict:
    """Per kind and contrast, the fraction of probes whose ``scores`` [n, probes per image] reach ``threshold``.

    A probe's score is the map's maximum over the blocks it touches in its image's probed copy.
    """
    found: dict[tuple[str, float], list[bool]] = {(k, c): [] for k in KINDS for c in CONTRASTS}
    for image, plan in zip(scores, plans, strict=True):
        for score, probe in zip(image, plan, strict=True):
            found[probe.kind, probe.contrast].append(bool(score >= threshold))
    counts = [len(v) for v in found.values()]
    if not min(counts):
        return {"probes": 0}
    table = {kind: {f"{c:g}": round(float(np.mean(found[kind, c])), 3) for c in CONTRASTS} for kind in KINDS}
    mean = float(np.mean([np.mean(v) for v in found.values()]))
    return {"probes": sum(counts), "recall": table, "mean_recall": round(mean, 4)}


def describe(calibration: dict) -> list[str]:
    """The self-test in a few lines for people (fit's output and the fit report); [] when there is none.

    ``calibration``: a template's calibration, or an ensemble's (whose template part holds it).
    """
    calibration = calibration.get("template", calibration)
    test = calibration.get("self_test", {}).get("kept", {})
    if not test.get("probes"):
        return []
    contrasts = "/".join(f"{c:g}" for c in CONTRASTS)
    lines = [f"self-test: defects planted on held-out good images, found at the threshold ({contrasts} grey levels):"]
    for kind, size in (
        ("dot", f"{DOT_PX:g} px dots"),
        ("line", f"{LINE_WIDTH} px lines, {LINE_FRACTION:.0%} of the side"),
    ):
        row = ", ".join(f"{test['recall'][kind][f'{c:g}']:.0%}" for c in CONTRASTS)
        lines.append(f"  {size}: {row}")
    auto = calibration.get("shape_scores_auto")
    if auto:
        lines.append(
            f"shape scores {auto['chose']} (auto: mean recall {auto['mean_recall_without']:.2f} without them, "
            f"{auto['mean_recall_with']:.2f} with; kept from a gain of {auto['gain_min']:.2f})"
        )
    return lines
