"""Audit of the good images a fit was given: which score far above the others, where, and what they cost the line.

The threshold is calibrated on held-out good scores and is never below the worst of them, so
one good image that scores far above the rest sets it: a part with a real defect that slipped
into the good set (the first thing a user wants to find), or a kind of variation that only a
few parts show. Every fit therefore audits its held-out scores:

- *far above the others*: the modified z-score of the log score, (log s - median) / (1.4826 MAD),
  above ``Z_FLAG`` (robust statistics: the outliers themselves move neither the median nor the
  MAD, and the log makes the test scale-free), and at least ``MIN_RATIO`` times the median
  score, so a set of very similar scores (a tiny MAD) does not flag the ordinary top one;
- *where*: the peak of each flagged image's held-out map (16 px blocks), in reference pixels and
  in the image's own pixels (through its pose);
- *what they cost*: the threshold with them (the calibrated one) and without them (the same
  rule on the other held-out scores), and the false-reject rate the line would have at the
  lower threshold if parts like them keep coming at the rate the fit saw.

``write_fit_report`` puts this next to the bundle (``MODEL.fit-report/``): ``summary.md``,
``summary.json``, ``flagged.txt`` (one image per line, for ``fit --exclude-from``) and an
overlay per flagged image drawn with OpenCV (the whole image with its held-out map and the
peak, and the peak's neighbourhood at full resolution).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.thresholds import MIN_RATIO, Z_FLAG, good_threshold, log_median_and_mad, outlier_scores
from engines.bundle import staged_directory
from engines.decode import read_image
from engines.tolerance import BLOCK

OVERLAY_SIDE = 768  # px of the whole-image panel
CROP = 160  # px of the full-resolution neighbourhood around the peak (shown at 3x)


@dataclass(frozen=True)
class Flagged:
    """A good image whose held-out score is far above the others."""

    name: str  # the image's path as given to the fit
    score: float
    z: float  # modified z-score of its log score
    ratio: float  # score / median good score
    peak_reference: tuple[int, int]  # (x, y) reference px, centre of the peak block
    peak_image: tuple[int, int]  # (x, y) px of the image itself


@dataclass(frozen=True)
class Audit:
    """The audit of one fit's held-out good scores (``audit_goods``)."""

    n_images: int
    median_score: float
    mad_log: float
    flagged: list[Flagged]
    threshold: float  # calibrated, with every image
    threshold_without: float  # the same rule on the held-out scores of the images not flagged
    frr_if_they_recur: float  # share of good parts above threshold_without if parts like the flagged keep coming

    def summary(self) -> dict:
        out = asdict(self)
        out["rule"] = f"modified z of log score > {Z_FLAG} and score > {MIN_RATIO} x median"
        return out

    def lines(self) -> list[str]:
        """What ``fit`` prints: one line per flagged image and one on what they cost."""
        return audit_lines(self.summary())


def audit_lines(summary: dict) -> list[str]:
    """Human-readable lines of an audit summary (``Audit.summary()``, as calibration.json keeps it)."""
    flagged, n = summary["flagged"], summary["n_images"]
    if not flagged:
        return [f"audit: no good image scores far above the others (median {summary['median_score']:.3g})"]
    out = [
        f"audit: {len(flagged)} of {n} good images score far above the others (median {summary['median_score']:.3g}):"
    ]
    for f in flagged:
        ref, img = f["peak_reference"], f["peak_image"]
        out.append(
            f"  {f['name']}: score {f['score']:.3g} ({f['ratio']:.1f} x median, z {f['z']:.1f}), peak at "
            f"reference ({ref[0]}, {ref[1]}), image ({img[0]}, {img[1]})"
        )
    out.append(
        f"  they set the threshold: {summary['threshold']:.3g} with them, about {summary['threshold_without']:.3g} "
        f"without; if parts like them keep coming ({len(flagged)} of {n}), a fit without them rejects about "
        f"{100 * summary['frr_if_they_recur']:.1f} % of good parts; if they are defective, refit with "
        f"--exclude-from {summary.get('report', 'MODEL.fit-report')}/flagged.txt"
    )
    return out


def audit_goods(
    names: list[str],
    held_out_map: np.ndarray,
    poses: np.ndarray,
    calibration: dict,
    shape: tuple[int, int],
) -> Audit:
    """Audit held-out good maps [n, Hb, Wb] (as scored, per 16 px block) of images ``names`` with ``poses``.

    ``calibration`` is the fit's (``good_threshold``'s keys); ``shape`` the image (height, width).
    """
    scores = held_out_map.max(axis=(1, 2)).astype(np.float64)
    z, ratio, outlying = outlier_scores(scores)
    median, mad = log_median_and_mad(scores)
    outliers = np.flatnonzero(outlying)
    outliers = outliers[np.argsort(-scores[outliers])]
    flagged = [
        Flagged(
            names[i],
            round(float(scores[i]), 4),
            round(float(z[i]), 2),
            round(float(ratio[i]), 2),
            *peak(held_out_map[i], poses[i], shape),
        )
        for i in outliers
    ]
    threshold = float(calibration["threshold"])
    rest = np.delete(scores, outliers)
    without = threshold
    if len(outliers) and len(rest) >= 2:
        # the floor the fit set (bundles from before it was recorded: 0.1, theirs), not the margin it came to
        floor = float(calibration.get("margin_floor", 0.1))
        without = good_threshold(rest, float(calibration["target_frr"]), floor)["threshold"]
        without = min(without, threshold)
    recur = float((scores > without).mean()) if len(outliers) else 0.0
    return Audit(len(scores), round(math.exp(median), 4), round(mad, 4), flagged, threshold, without, recur)


def peak(blocks: np.ndarray, pose: np.ndarray, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Centre of the highest block in reference px, and that point in the image (``pose``: reference -> image)."""
    by, bx = np.unravel_index(int(np.argmax(blocks)), blocks.shape)
    x = min(bx * BLOCK + BLOCK // 2, shape[1] - 1)
    y = min(by * BLOCK + BLOCK // 2, shape[0] - 1)
    ix, iy = np.asarray(pose, np.float64) @ np.array([x, y, 1.0])
    h, w = shape
    return (int(x), int(y)), (int(np.clip(round(ix), 0, w - 1)), int(np.clip(round(iy), 0, h - 1)))


# -- the fit report ---------------------------------------------------------------------------------
def report_path(bundle: Path) -> Path:
    """Where a bundle's fit report goes: a sibling directory ``<bundle>.fit-report``."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.name + ".fit-report")


def write_fit_report(
    out: Path,
    audit: Audit,
    images: list[Path],
    held_out_map: np.ndarray,
    poses: np.ndarray,
    extra: dict | None = None,
) -> Path:
    """Write the report directory ``out`` atomically (a temporary sibling renamed into place, replacing any old one)."""
    out = Path(out)
    with staged_directory(out, mode=0o755) as tmp:  # readable by the line's people, not only the fit's user
        summary = {**audit.summary(), **(extra or {})}
        summary["good_scores"] = {
            str(p): round(float(s), 4) for p, s in zip(images, held_out_map.max(axis=(1, 2)), strict=True)
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "flagged.txt").write_text("".join(f"{f.name}\n" for f in audit.flagged), encoding="utf-8")
        (tmp / "summary.md").write_text(_markdown(audit, summary), encoding="utf-8")
        index = {str(p): i for i, p in enumerate(images)}
        for rank, f in enumerate(audit.flagged):
            i = index[f.name]
            image = read_image(Path(f.name))
            overlay = draw_overlay(image, held_out_map[i], poses[i], f, audit.threshold)
            if not cv2.imwrite(str(tmp / f"flagged_{rank:02d}.png"), overlay):
                raise OSError(f"{tmp}: could not write an overlay PNG")
    return out


def _markdown(audit: Audit, summary: dict) -> str:
    lines = ["# Fit report: audit of the good images", ""]
    lines += [line.strip() for line in audit_lines(summary)]
    lines += ["", f"Rule: {summary['rule']}; MAD of log scores {audit.mad_log:.3g}.", ""]
    if audit.flagged:
        lines += [
            "| image | score | x median | z | peak (reference x, y) | peak (image x, y) | overlay |",
            "|---|---|---|---|---|---|---|",
        ]
        for rank, f in enumerate(audit.flagged):
            lines.append(
                f"| {f.name} | {f.score:.3g} | {f.ratio:.2f} | {f.z:.1f} | {f.peak_reference} | {f.peak_image} "
                f"| flagged_{rank:02d}.png |"
            )
        lines.append("")
    if summary.get("self_test"):
        lines += ["## What this fit finds", "", *(f"    {line}" for line in summary["self_test"]), ""]
    scores = sorted(summary["good_scores"].items(), key=lambda kv: -kv[1])
    lines += ["Held-out good scores, highest first:", ""]
    lines += [f"- {name}: {score:.3g}" for name, score in scores]
    return "\n".join(lines) + "\n"


def draw_overlay(image: np.ndarray, blocks: np.ndarray, pose: np.ndarray, f: Flagged, threshold: float) -> np.ndarray:
    """BGR uint8: the image with its held-out map (in its own pixels) and the peak, beside the peak at 3x."""
    grey = _grey8(image)
    h, w = grey.shape
    ref_map = cv2.resize(
        blocks.astype(np.float32), (blocks.shape[1] * BLOCK, blocks.shape[0] * BLOCK), interpolation=cv2.INTER_NEAREST
    )[:h, :w]
    frame_map = cv2.warpAffine(ref_map, np.asarray(pose, np.float64), (w, h), flags=cv2.INTER_NEAREST)
    scale = OVERLAY_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.cvtColor(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    heat = cv2.resize(frame_map / max(threshold, 1e-6), size, interpolation=cv2.INTER_AREA)
    colour = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = np.clip(heat - 0.3, 0, 0.6)[..., None]  # below 30 % of the threshold: the image alone
    panel = (small * (1 - alpha) + colour * alpha).astype(np.uint8)
    px, py = (round(v * scale) for v in f.peak_image)
    cv2.circle(panel, (px, py), 14, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.circle(panel, (px, py), 16, (0, 0, 0), 1, cv2.LINE_AA)
    x0, y0 = (int(np.clip(v - CROP // 2, 0, max(0, s - CROP))) for v, s in zip(f.peak_image, (w, h), strict=True))
    crop = grey[y0 : y0 + CROP, x0 : x0 + CROP]
    crop = cv2.cvtColor(
        cv2.resize(crop, (crop.shape[1] * 3, crop.shape[0] * 3), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR
    )
    canvas = np.full((max(panel.shape[0], crop.shape[0]) + 28, panel.shape[1] + crop.shape[1] + 8, 3), 32, np.uint8)
    canvas[28 : 28 + panel.shape[0], : panel.shape[1]] = panel
    canvas[28 : 28 + crop.shape[0], panel.shape[1] + 8 :] = crop
    title = f"{Path(f.name).name}: score {f.score:.3g} ({f.ratio:.1f} x median), threshold {threshold:.3g}"
    cv2.putText(canvas, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def _grey8(image: np.ndarray) -> np.ndarray:
    img = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint16:
        img = (img / 257).astype(np.uint8)
    return np.ascontiguousarray(img)
