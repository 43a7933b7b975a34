"""Evaluation report: summary JSON/Markdown, ROC/PR/histogram plots and heatmap overlays.

matplotlib is imported inside the plotting functions (Agg backend) so that importing this
module costs nothing and never touches a display. The report appears atomically: everything is
written into a temporary sibling directory that is renamed over ``report_dir`` only once
complete, so a failure never leaves a half-written report behind.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from calibration import metrics

MAX_SIDE = 1024  # overlay PNGs are downscaled so their longer side is at most this
MIN_BOX_PX = 8  # drawn boxes are at least this many display pixels, so a 5x5 px defect stays visible
NORMAL_HIDE = 0.5  # anomaly scores below this (half the edge of normal) are not coloured in overlays


class Overlay(NamedTuple):
    """One case to draw: title, image (H, W[, 3]), anomaly map (any resolution covering the image),
    predicted boxes (x0, y0, x1, y1) in image pixels, and optionally the GT mask at image size."""

    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    boxes: Sequence[Sequence[float]]
    mask: np.ndarray | None = None


def write_report(
    report_dir: Path,
    summary: Mapping[str, Any],
    labels: Iterable[Any],
    scores: Iterable[float],
    threshold: float,
    overlays: Iterable[Overlay | tuple] = (),
    baseline: Mapping[str, Any] | None = None,
) -> None:
    """Write the report into ``report_dir`` (replacing any previous one, all or nothing).

    Files: ``summary.json``, ``baseline.json`` (when ``baseline`` is given), ``summary.md``,
    ``roc.png``, ``pr.png``, ``histogram.png`` and ``worst_00.png``... one per overlay, in order.
    ``overlays`` items may be plain 4- or 5-tuples in ``Overlay`` field order.
    """
    report_dir = Path(report_dir)
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.tmp-", dir=report_dir.parent))
    try:
        _write_all(tmp, summary, labels, scores, threshold, overlays, baseline)
        _swap_in(tmp, report_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_all(
    out: Path,
    summary: Mapping[str, Any],
    labels: Iterable[Any],
    scores: Iterable[float],
    threshold: float,
    overlays: Iterable[Overlay | tuple],
    baseline: Mapping[str, Any] | None,
) -> None:
    _write_json(out / "summary.json", summary)
    if baseline is not None:
        _write_json(out / "baseline.json", baseline)
    (out / "summary.md").write_text(summary_markdown(summary, baseline), encoding="utf-8")
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    plot_roc(out / "roc.png", y, s, threshold)
    plot_pr(out / "pr.png", y, s, threshold)
    plot_histogram(out / "histogram.png", y, s, threshold)
    for i, item in enumerate(overlays):
        plot_overlay(out / f"worst_{i:02d}.png", Overlay(*item), threshold)


def _swap_in(tmp: Path, report_dir: Path) -> None:
    """Rename ``tmp`` to ``report_dir``; an existing report is moved aside first and removed after.

    POSIX rename cannot replace a non-empty directory, hence the detour. Between the two renames
    ``report_dir`` briefly does not exist, but it is never half-written.
    """
    old = None
    if report_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.old-", dir=report_dir.parent))
        old.rmdir()
        report_dir.rename(old)
    try:
        tmp.rename(report_dir)
    except BaseException:
        if old is not None:
            old.rename(report_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    # allow_nan=False: a NaN slipping into a summary should fail loudly here, not break readers.
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def _delta(v: Any, b: Any) -> str:
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (v, b))
    return f"{v - b:+.4f}" if numeric else ""


def _scalar_table(title: str, cur: Mapping[str, Any], base: Mapping[str, Any] | None) -> list[str]:
    rows = [f"## {title}", ""]
    if base is None:
        rows += ["| metric | value |", "|---|---|"]
        rows += [f"| {k} | {_fmt(v)} |" for k, v in cur.items()]
    else:
        rows += ["| metric | value | baseline | delta |", "|---|---|---|---|"]
        for k, v in cur.items():
            b = base.get(k)
            rows.append(f"| {k} | {_fmt(v)} | {_fmt(b)} | {_delta(v, b)} |")
    return [*rows, ""]


def _nested_table(title: str, cur: Mapping[str, Mapping[str, Any]]) -> list[str]:
    cols = list(dict.fromkeys(c for row in cur.values() for c in row))
    rows = [f"## {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in cur.items():
        rows.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return [*rows, ""]


def summary_markdown(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """A short Markdown rendering of a ``metrics.summarise`` dict (baseline column when given)."""
    lines = ["# Evaluation report", ""]
    overview = {k: v for k, v in summary.items() if not isinstance(v, Mapping | list)}
    base_over = None if baseline is None else {k: baseline.get(k) for k in overview}
    lines += _scalar_table("Overview", overview, base_over)
    if isinstance(summary.get("image"), Mapping):
        base_img = baseline.get("image") if baseline is not None else None
        lines += _scalar_table("Image level", summary["image"], base_img)
    for key, title in (("per_kind", "Per defect kind"), ("per_size", "Per defect size (max side, px)")):
        if summary.get(key):
            lines += _nested_table(title, summary[key])
    if summary.get("worst"):
        lines += ["## Worst cases", "", "| # | image | kind | why | score |", "|---|---|---|---|---|"]
        for i, w in enumerate(summary["worst"]):
            lines.append(f"| {i:02d} | {w.get('image')} | {w.get('kind')} | {w.get('why')} | {_fmt(w.get('score'))} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    """pyplot on the Agg backend, imported only when a plot is actually drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _undefined(ax: Any, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)


def plot_roc(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """ROC curve with its AUROC and the operating point of ``threshold`` (score > t rejects)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
    except ValueError as exc:
        _undefined(ax, f"ROC undefined: {exc}")
    else:
        ax.plot(fpr, tpr, label=f"AUROC {metrics.auc(fpr, tpr):.4f}")
        op = metrics.confusion(labels, scores > threshold)
        ax.plot([op["false_reject_rate"]], [op["recall"]], "o", label=f"threshold {threshold:.4g}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.legend(loc="lower right")
    ax.set(xlabel="false-reject rate (goods)", ylabel="recall (defects)", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("ROC")
    _save(fig, path)


def plot_pr(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """Precision-recall curve with the operating point of ``threshold``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        precision, recall, _ = metrics.pr_curve(labels, scores)
    except ValueError as exc:
        _undefined(ax, f"PR undefined: {exc}")
    else:
        ax.step(recall, precision, where="post", label="precision-recall")
        op = metrics.confusion(labels, scores > threshold)
        ax.plot([op["recall"]], [op["precision"]], "o", label=f"threshold {threshold:.4g}")
        ax.legend(loc="lower left")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("Precision-recall")
    _save(fig, path)


def plot_histogram(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """Score histograms of goods and defects on shared bins, with the threshold as a line.

    The y axis is logarithmic when one class is 5x larger than the other (the usual case: many
    goods, few defects), otherwise the small class would be a flat line.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = np.isfinite(scores)
    good, bad = scores[finite & (labels == 0)], scores[finite & (labels == 1)]
    if finite.any():
        edges = np.histogram_bin_edges(np.r_[scores[finite], threshold], bins=min(100, max(10, finite.sum())))
        ax.hist(good, bins=edges, alpha=0.6, label=f"good (n={good.size})", color="tab:green")
        ax.hist(bad, bins=edges, alpha=0.6, label=f"defect (n={bad.size})", color="tab:red")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    small, large = sorted((good.size, bad.size))
    if small > 0 and large >= 5 * small:
        ax.set_yscale("log")
    ax.set(xlabel="image score", ylabel="images")
    ax.legend()
    ax.set_title("Score distribution")
    fig.tight_layout()
    _save(fig, path)


def _grey01(image: np.ndarray) -> np.ndarray:
    """Float grey image in [0, 1]; 16-bit images are stretched to their 0.5-99.5 percentile range."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.shape[2] == 3 else img[..., 0]
    g = img.astype(np.float32)
    if img.dtype == np.uint8:
        return g / 255.0
    lo, hi = np.percentile(g, (0.5, 99.5))
    return np.clip((g - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (w, h): area averaging when shrinking (no aliasing), linear when enlarging."""
    shrink = size[0] < a.shape[1]
    return cv2.resize(a.astype(np.float32), size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _display_box(box: Sequence[float], scale: float) -> tuple[float, float, float, float]:
    """(x, y, w, h) of a box in display pixels, grown around its centre to at least MIN_BOX_PX."""
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    w, h = max(x1 - x0, MIN_BOX_PX), max(y1 - y0, MIN_BOX_PX)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return cx - w / 2, cy - h / 2, w, h


def plot_overlay(path: Path, ov: Overlay, threshold: float | None = None) -> None:
    """Grey image, anomaly map as a translucent colour map, predicted boxes and the GT contour."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    h, w = ov.image.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = _resize(_grey01(ov.image), size)
    amap = _resize(np.nan_to_num(np.asarray(ov.anomaly_map, dtype=np.float32)), size)
    fig = plt.figure(figsize=(size[0] / 100, size[1] / 100 + 0.3), dpi=100)
    ax = fig.add_axes((0, 0, 1, size[1] / (size[1] + 30)))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    # 1.0 is the edge of normal in score units: keep normal maps cool instead of auto-stretching
    # noise, and leave clearly normal pixels (< NORMAL_HIDE) uncoloured so the part stays readable.
    shown = np.ma.masked_less(amap, NORMAL_HIDE)
    ax.imshow(shown, cmap="jet", alpha=0.45, vmin=0.0, vmax=max(float(amap.max()), 1.0))
    for box in ov.boxes:
        x, y, bw, bh = _display_box(box, scale)
        ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor="red", linewidth=1.5))
    if ov.mask is not None:
        _draw_contours(ax, ov.mask, scale)
    ax.set_xlim(-0.5, size[0] - 0.5)
    ax.set_ylim(size[1] - 0.5, -0.5)
    ax.set_axis_off()
    title = ov.name if threshold is None else f"{ov.name}  (threshold {threshold:.4g})"
    fig.text(0.01, 1 - 0.15 / (size[1] / 100 + 0.3), title, fontsize=8, va="center")
    _save(fig, path)


def _draw_contours(ax: Any, mask: np.ndarray, scale: float) -> None:
    # Contours come from the full-resolution mask and are then scaled, so defects smaller than a
    # display pixel still get a (tiny) outline instead of vanishing in a downscaled mask.
    contours, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        pts = np.vstack([c[:, 0, :], c[:1, 0, :]]).astype(np.float64) * scale
        ax.plot(pts[:, 0], pts[:, 1], color="lime", linewidth=1.0)
