"""Figures of the evaluation report: ROC, PR and score histogram plots, and heatmap overlays a person can read.

matplotlib (the ``report`` extra) is imported inside the plotting functions (Agg backend) so that
importing this module costs nothing and never touches a display; ``require_plotting`` checks it
is there before a command starts any work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from calibration import metrics
from engines.errors import UserError

MAX_SIDE = 1024  # the full view of an overlay is downscaled so its longer side is at most this
ZOOM_SIDE = 512  # display px of the zoomed panel beside the full view (at most the full view's side)
ZOOM_MIN_PX = 96  # the zoomed crop covers at least this many image pixels, so a 5 px dot sits in context
MIN_BOX_PX = 8  # drawn boxes are at least this many display pixels, so a 5x5 px defect stays visible
ZOOM_MARK_PX = 40  # the zoomed area is marked on the full view by a square at least this many display pixels
MIN_MARK_PX = 14  # a ground-truth region smaller than this on screen is ringed at this diameter instead
GT_LINE_PX = 3.0  # ground-truth outline width in display pixels, whatever the image size
BOX_LINE_PX = 2.0
NORMAL_HIDE = 0.5  # anomaly scores below this (half the edge of normal) are not coloured in overlays
INSTALL_REPORT = "pip install 'inspectd[report]' (in a checkout: pip install -e '.[report]')"


def require_plotting() -> None:
    """Refuse to start when matplotlib (the ``report`` extra) is missing, naming the install command."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            f"matplotlib is not installed; the report's plots need the 'report' extra: {INSTALL_REPORT}"
        ) from None


class Overlay(NamedTuple):
    """One case to draw: title, image (H, W[, 3]), anomaly map (any resolution covering the image),
    predicted boxes (x0, y0, x1, y1) in image pixels, optionally the GT mask at image size, and
    what is known of the decision: the truth's kind ("good" or a defect kind), the image score
    (None when the frame could not be scored), the verdict and its reason."""

    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    boxes: Sequence[Sequence[float]]
    mask: np.ndarray | None = None
    kind: str | None = None
    score: float | None = None
    verdict: str | None = None
    reason: str | None = None


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
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)


def plot_roc(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """ROC curve with its AUROC and the operating point of ``threshold`` (score > t rejects)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
    except ValueError as exc:
        _undefined(ax, f"ROC undefined:\n{exc}")
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
        _undefined(ax, f"PR undefined:\n{exc}")
    else:
        ax.step(recall, precision, where="post", label="precision-recall")
        op = metrics.confusion(labels, scores > threshold)
        ax.plot([op["recall"]], [op["precision"]], "o", label=f"threshold {threshold:.4g}")
        ax.legend(loc="lower left")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("Precision-recall")
    _save(fig, path)


def plot_histogram(
    path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float, marks: Mapping[str, float] | None = None
) -> None:
    """Score histograms of goods and defects on shared bins, with the threshold (and ``marks``) as lines.

    The y axis is logarithmic when one class is 5x larger than the other (the usual case: many
    goods, few defects), otherwise the small class would be a flat line.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    marks = dict(marks or {})
    finite = np.isfinite(scores)
    good, bad = scores[finite & (labels == 0)], scores[finite & (labels == 1)]
    if finite.any():
        span = np.r_[scores[finite], threshold, list(marks.values())]
        bins = min(100, max(10, int(finite.sum())))
        # Scores span decades (goods near 1, a smear at 40): on a linear axis the goods would be one bar.
        wide = span.min() > 0 and span.max() / span.min() > 20
        edges = np.geomspace(span.min(), span.max(), bins + 1) if wide else np.histogram_bin_edges(span, bins=bins)
        if wide:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.hist(good, bins=edges, alpha=0.6, label=f"good (n={good.size})", color="tab:green")
        ax.hist(bad, bins=edges, alpha=0.6, label=f"defect (n={bad.size})", color="tab:red")
    ax.axvline(threshold, color="black", linestyle="--", label=f"calibrated threshold {threshold:.4g}")
    for (name, t), style in zip(marks.items(), (":", "-."), strict=False):
        ax.axvline(t, color="tab:blue", linestyle=style, label=f"{name} threshold {t:.4g}")
    small, large = sorted((good.size, bad.size))
    if small > 0 and large >= 5 * small:
        ax.set_yscale("log")
    ax.set(xlabel="image score (1.0 = edge of normal)", ylabel="images")
    ax.legend(fontsize=8)
    ax.set_title("Score distribution")
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- overlays


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


def _display_box(box: Sequence[float], scale: float, offset: tuple[float, float] = (0, 0)) -> tuple:
    """(x, y, w, h) of a box in display pixels, grown around its centre to at least MIN_BOX_PX."""
    x0, y0, x1, y1 = ((float(v) - offset[i % 2]) * scale for i, v in enumerate(box))
    w, h = max(x1 - x0, MIN_BOX_PX), max(y1 - y0, MIN_BOX_PX)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return cx - w / 2, cy - h / 2, w, h


def overlay_title(ov: Overlay, threshold: float | None) -> str:
    """Two lines: what the case is (false reject, escape, correct reject, correct pass) and its name;
    then the kind, score against threshold, the verdict and its reason, detected regions, and
    whether a detected region overlaps the ground truth."""
    located = None
    if ov.mask is not None and np.asarray(ov.mask).any():
        located = any(g.found for g in metrics.match_defects(ov.boxes, np.asarray(ov.mask) > 0))
    what = metrics.outcome(ov.kind, ov.verdict or "", located) if ov.kind and ov.verdict else (ov.verdict or "")
    first = f"{what.upper()}: {ov.name}" if what else ov.name
    facts = []
    if ov.kind:
        facts.append(f"kind {ov.kind}")
    score = "not scored" if ov.score is None or not math.isfinite(ov.score) else f"{ov.score:.3g}"
    if ov.score is not None or ov.verdict:
        facts.append(f"score {score} vs threshold {threshold:.3g}" if threshold is not None else f"score {score}")
    elif threshold is not None:
        facts.append(f"threshold {threshold:.3g}")
    if ov.verdict:
        facts.append(f"{ov.verdict} ({ov.reason})" if ov.reason else ov.verdict)
    facts.append(f"{len(ov.boxes)} detected region{'s' if len(ov.boxes) != 1 else ''}")
    if located is not None:
        facts.append("ground truth located" if located else "ground truth not located")
    return first + "\n" + " · ".join(facts)


class OverlayAxes(NamedTuple):
    """The axes of an overlay figure, for tests and callers that add to it."""

    full: Any
    zoom: Any
    colorbar: Any
    zoom_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) image pixels shown in the zoomed panel


def _focus(ov: Overlay, h: int, w: int) -> tuple[int, int, int, int]:
    """Image pixels (x0, y0, x1, y1) worth a closer look: a missed ground-truth region, else the
    strongest detected region, else a found ground-truth region, else the map's peak."""
    regions = metrics.match_defects(ov.boxes, np.asarray(ov.mask) > 0) if ov.mask is not None else []
    missed = [g.bbox for g in regions if not g.found]
    if missed:
        return missed[0]
    if len(ov.boxes):
        return tuple(round(float(v)) for v in ov.boxes[0])
    if regions:
        return regions[0].bbox
    amap = np.nan_to_num(np.asarray(ov.anomaly_map, dtype=np.float32))
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    fy, fx = h / max(amap.shape[0], 1), w / max(amap.shape[1], 1)
    return int(x * fx), int(y * fy), int((x + 1) * fx), int((y + 1) * fy)


def _zoom_box(focus: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
    """A square around ``focus`` with context (2.5x its size, at least ZOOM_MIN_PX), kept inside the image."""
    x0, y0, x1, y1 = focus
    side = int(min(max(ZOOM_MIN_PX, 2.5 * max(x1 - x0, y1 - y0)), h, w))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    zx = min(max(cx - side // 2, 0), w - side)
    zy = min(max(cy - side // 2, 0), h - side)
    return zx, zy, zx + side, zy + side


def _map_crop(amap: np.ndarray, box: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
    """The part of ``amap`` (any resolution covering an h x w image) under image box ``box``."""
    fy, fx = amap.shape[0] / h, amap.shape[1] / w
    x0, y0, x1, y1 = box
    ys = slice(int(y0 * fy), max(math.ceil(y1 * fy), int(y0 * fy) + 1))
    xs = slice(int(x0 * fx), max(math.ceil(x1 * fx), int(x0 * fx) + 1))
    return amap[ys, xs]


def _px_axes(fig: Any, x: float, y: float, w: float, h: float) -> Any:
    """Axes at (x, y) display pixels from the figure's top-left corner, w x h pixels."""
    fw, fh = fig.get_size_inches() * fig.dpi
    return fig.add_axes((x / fw, 1 - (y + h) / fh, w / fw, h / fh))


def overlay_figure(ov: Overlay, threshold: float | None = None) -> tuple[Any, OverlayAxes]:
    """The overlay page: a title saying what the case is; the full view and, beside it, a zoomed
    crop around the case's defect or peak, each with the anomaly map as a translucent colour layer,
    detected regions in red and the ground truth outlined in lime at a constant display width;
    under the zoom a colour bar with the threshold marked, and a legend."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    h, w = ov.image.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    zoom_side = max(256, min(ZOOM_SIDE, max(size)))
    title_h, gap, zoom_title, bar_gap, bar_h, legend_h = 56, 16, 22, 34, 14, 150
    right = size[0] + gap
    fig_w = right + zoom_side + gap
    fig_h = title_h + max(size[1], zoom_title + zoom_side + bar_gap + bar_h + legend_h)
    fig = plt.figure(figsize=(fig_w / 100, fig_h / 100), dpi=100)

    amap = np.nan_to_num(np.asarray(ov.anomaly_map, dtype=np.float32))
    # One colour scale for every overlay of a report: the threshold sits in the middle of it.
    vmax = max(2.0 * threshold, 1.0) if threshold is not None else max(float(amap.max()), 1.0)
    cmap = plt.get_cmap("turbo")
    grey = _grey01(ov.image)
    full = _px_axes(fig, 0, title_h, *size)
    layer = _draw_view(full, grey, amap, (0, 0, w, h), size, ov, cmap, vmax)

    box = _zoom_box(_focus(ov, h, w), h, w)
    zoom = _px_axes(fig, right, title_h + zoom_title, zoom_side, zoom_side)
    _draw_view(zoom, grey, amap, box, (zoom_side, zoom_side), ov, cmap, vmax)
    zoom.set_title(f"zoom x{zoom_side / (box[2] - box[0]):.2g}: x {box[0]}-{box[2]}, y {box[1]}-{box[3]}", fontsize=9)
    # The zoomed area's marker is kept larger than the ground-truth ring, so it never hides it.
    side = max((box[2] - box[0]) * scale, ZOOM_MARK_PX)
    bx, by = (box[0] + box[2]) / 2 * scale - 0.5 - side / 2, (box[1] + box[3]) / 2 * scale - 0.5 - side / 2
    full.add_patch(Rectangle((bx, by), side, side, fill=False, edgecolor="white", linestyle="--", linewidth=1.2))

    bar_top = title_h + zoom_title + zoom_side + bar_gap
    cax = _px_axes(fig, right, bar_top, zoom_side, bar_h)
    bar = fig.colorbar(layer, cax=cax, orientation="horizontal", extend="max")
    bar.set_label("anomaly score (1.0 = edge of normal; below 0.5 not coloured)", fontsize=8)
    cax.tick_params(labelsize=8)
    if threshold is not None:
        cax.axvline(threshold, color="black", linewidth=3.0)
        cax.axvline(threshold, color="white", linewidth=1.2)
        where = {"xycoords": ("data", "axes fraction"), "xytext": (0, 3), "textcoords": "offset points"}
        cax.annotate(f"threshold {threshold:.3g}", (threshold, 1.0), ha="center", va="bottom", fontsize=9, **where)

    title = overlay_title(ov, threshold).split("\n")
    bad = title[0].startswith(("FALSE REJECT", "ESCAPE", "CORRECT REJECT, DEFECT NOT"))
    colour = "darkred" if bad else "black"
    fig.text(8 / fig_w, 1 - 16 / fig_h, title[0], fontsize=12, weight="bold", va="center", color=colour)
    fig.text(8 / fig_w, 1 - 40 / fig_h, title[1], fontsize=10, va="center")
    handles = [Patch(facecolor="none", edgecolor="red", linewidth=BOX_LINE_PX, label="detected region (> threshold)")]
    if ov.mask is not None:
        handles.append(Line2D([], [], color="lime", linewidth=GT_LINE_PX, label="ground truth (small ones ringed)"))
    handles.append(Line2D([], [], color="0.3", linestyle="--", label="zoomed area (white, left)"))
    anchor = (right / fig_w, 1 - (bar_top + bar_h + 36) / fig_h)
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor, fontsize=9, title="legend", title_fontsize=9)
    return fig, OverlayAxes(full, zoom, cax, box)


def _draw_view(
    ax: Any,
    grey: np.ndarray,
    amap: np.ndarray,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    ov: Overlay,
    cmap: Any,
    vmax: float,
) -> Any:
    """Draw the image box ``box`` at display ``size``: grey, map layer, boxes, ground truth. Returns the map layer."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = box
    h, w = grey.shape[:2]
    scale = size[0] / (x1 - x0)
    ax.imshow(_resize(grey[y0:y1, x0:x1], size), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    # 1.0 is the edge of normal in score units: one colour scale for every overlay of a report, and
    # clearly normal pixels (< NORMAL_HIDE) uncoloured so the part stays readable.
    shown = np.ma.masked_less(_resize(_map_crop(amap, box, h, w), size), NORMAL_HIDE)
    layer = ax.imshow(shown, cmap=cmap, alpha=0.5, vmin=0.0, vmax=vmax, interpolation="nearest")
    for b in ov.boxes:
        x, y, bw, bh = _display_box(b, scale, (x0, y0))
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), bw, bh, fill=False, edgecolor="red", linewidth=BOX_LINE_PX * 0.72))
    if ov.mask is not None:
        _draw_ground_truth(ax, np.asarray(ov.mask)[y0:y1, x0:x1], scale)
    ax.set_xlim(-0.5, size[0] - 0.5)
    ax.set_ylim(size[1] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    return layer


def _draw_ground_truth(ax: Any, mask: np.ndarray, scale: float) -> None:
    """Outline each ground-truth region at GT_LINE_PX display pixels; ring those too small to see.

    Contours come from the full-resolution mask and are then scaled, so a defect smaller than a
    display pixel is still placed exactly; a ring of MIN_MARK_PX marks it.
    """
    from matplotlib.patches import Circle

    lw = GT_LINE_PX * 0.72  # points at 100 dpi
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        if max(bw, bh) * scale < MIN_MARK_PX:
            centre = ((x + bw / 2) * scale - 0.5, (y + bh / 2) * scale - 0.5)
            ax.add_patch(Circle(centre, MIN_MARK_PX / 2 + GT_LINE_PX, fill=False, edgecolor="lime", linewidth=lw))
            continue
        pts = (np.vstack([c[:, 0, :], c[:1, 0, :]]).astype(np.float64) + 0.5) * scale - 0.5
        ax.plot(pts[:, 0], pts[:, 1], color="lime", linewidth=lw)


def plot_overlay(path: Path, ov: Overlay, threshold: float | None = None) -> None:
    """Write ``overlay_figure`` as a PNG."""
    fig, _ = overlay_figure(Overlay(*ov), threshold)
    _save(fig, path)
