"""Evaluation report: summary JSON/Markdown, per-image table, ROC/PR/histogram plots and heatmap overlays.

matplotlib (the ``report`` extra) is imported inside the plotting functions (Agg backend) so that
importing this module costs nothing and never touches a display; ``require_plotting`` checks it
is there before a command starts any work. The report appears atomically: everything is written
into a temporary sibling directory that is renamed over ``report_dir`` only once complete, so a
failure never leaves a half-written report behind.
"""

from __future__ import annotations

import csv
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
PLOTS = (("roc.png", "ROC curve"), ("pr.png", "Precision-recall curve"), ("histogram.png", "Score distribution"))


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


def write_report(
    report_dir: Path,
    summary: Mapping[str, Any],
    labels: Iterable[Any],
    scores: Iterable[float],
    threshold: float,
    overlays: Iterable[Overlay | tuple] = (),
    baseline: Mapping[str, Any] | None = None,
    per_image: Sequence[Mapping[str, Any]] | None = None,
    predictions: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Write the report into ``report_dir`` (replacing any previous one, all or nothing).

    Files: ``summary.json``, ``baseline.json`` (when ``baseline`` is given), ``summary.md`` (every
    figure of the summary, the plots embedded), ``per_image.csv`` (``metrics.per_image`` rows, when
    given), ``predictions.jsonl`` (the ``inspectd predict`` records, when given), ``roc.png``,
    ``pr.png``, ``histogram.png`` and ``worst_00.png``... one per overlay, in order.
    ``overlays`` items may be plain tuples in ``Overlay`` field order.
    """
    report_dir = Path(report_dir)
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.tmp-", dir=report_dir.parent))
    try:
        _write_all(tmp, summary, labels, scores, threshold, overlays, baseline, per_image, predictions)
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
    per_image: Sequence[Mapping[str, Any]] | None,
    predictions: Sequence[Mapping[str, Any]] | None,
) -> None:
    _write_json(out / "summary.json", summary)
    if baseline is not None:
        _write_json(out / "baseline.json", baseline)
    if per_image is not None:
        write_per_image_csv(out / "per_image.csv", per_image)
    if predictions is not None:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in predictions)
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    marks = _alternative_thresholds(summary)
    plot_roc(out / "roc.png", y, s, threshold)
    plot_pr(out / "pr.png", y, s, threshold)
    plot_histogram(out / "histogram.png", y, s, threshold, marks)
    captions = []
    for i, item in enumerate(overlays):
        ov = Overlay(*item)
        plot_overlay(out / f"worst_{i:02d}.png", ov, threshold)
        captions.append((f"worst_{i:02d}.png", overlay_title(ov, threshold).replace("\n", " · ")))
    files = sorted(p.name for p in out.iterdir())
    (out / "summary.md").write_text(summary_markdown(summary, baseline, captions, files), encoding="utf-8")


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


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_per_image_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.PER_IMAGE_COLUMNS`` per image; empty cells where a value does not exist (no score, no mask)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(metrics.PER_IMAGE_COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in metrics.PER_IMAGE_COLUMNS])


# --------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def _delta(key: str, v: Any, b: Any) -> str:
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (v, b))
    # Thresholds of two different detectors are in different units: a difference means nothing.
    if not numeric or "threshold" in key:
        return ""
    return f"{v - b:+d}" if isinstance(v, int) and isinstance(b, int) else f"{v - b:+.4f}"


def _scalar_table(cur: Mapping[str, Any], base: Mapping[str, Any] | None, base_name: str = "baseline") -> list[str]:
    if base is None:
        rows = ["| metric | value |", "|---|---|"]
        rows += [f"| {k} | {_fmt(v)} |" for k, v in cur.items()]
    else:
        rows = [f"| metric | value | {base_name} | delta |", "|---|---|---|---|"]
        for k, v in cur.items():
            b = base.get(k)
            rows.append(f"| {k} | {_fmt(v)} | {_fmt(b)} | {_delta(k, v, b)} |")
    return [*rows, ""]


def _nested_table(cur: Mapping[str, Mapping[str, Any]], first: str = "") -> list[str]:
    cols = list(dict.fromkeys(c for row in cur.values() for c in row))
    rows = [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in cur.items():
        rows.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return [*rows, ""]


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def report_notes(summary: Mapping[str, Any]) -> list[str]:
    """What a reader must know before trusting the figures: a good-only set, missing masks, failed frames."""
    notes = []
    n_good, n_defect = summary.get("n_good", 0), summary.get("n_defect", 0)
    image = summary.get("image") or {}
    if n_defect == 0 and n_good:
        notes.append(
            f"Good parts only: recall, precision, AUROC and the F1-optimal and recall-target thresholds need defect "
            f"images. What this set measures is the false-reject rate ({_fmt(image.get('false_reject_rate'))}: "
            f"{image.get('fp', 0)} of {n_good} good parts rejected) and the score distribution below."
        )
    masks = summary.get("masks") or {}
    missing = masks.get("defect_images", 0) - masks.get("with_mask", 0)
    if missing > 0:
        which = (
            "No defect image has a"
            if missing == masks.get("defect_images")
            else f"{missing} of {n_defect} defect images have no"
        )
        notes.append(
            f"{which} ground-truth mask (`ground_truth/<kind>/<name>_mask.png`): the image-level figures and "
            "per-kind recall use the image labels; pixel metrics (AUROC, AUPRO), recall per defect size and "
            "`located` need masks"
            + (" and cover only the images that have one." if missing < masks.get("defect_images", 0) else ".")
        )
    unscored = sum((summary.get("scores") or {}).get(c, {}).get("unscored", 0) for c in ("good", "defect"))
    if unscored:
        notes.append(
            f"{unscored} image(s) could not be scored (registration failed or unreadable frame): they are rejects, "
            "ranked above every score, and have no score in the tables."
        )
    return notes


THRESHOLD_ROWS = (
    ("calibrated", "set on good images only"),
    ("f1_optimal", "chosen on these labels"),
    ("recall_target", "chosen on these labels"),
)
THRESHOLD_NAMES = {"calibrated": "calibrated", "f1_optimal": "F1-optimal", "recall_target": "recall-target"}


def _threshold_section(summary: Mapping[str, Any]) -> list[str]:
    choices = summary.get("thresholds")
    if not isinstance(choices, Mapping):
        return []
    policy = (summary.get("model") or {}).get("threshold_policy")
    labelled_policy = policy in ("f1", "recall")
    cols = ("threshold", "precision", "recall", "f1", "false_reject_rate", "rejected_goods", "found_defects")
    lines = ["## Thresholds", ""]
    lines += ["| choice | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in THRESHOLD_ROWS:
        row = choices.get(key) or {}
        if key == "calibrated" and labelled_policy:
            label = f"the bundle's, policy {policy}: chosen on labelled defects"
        if key == "recall_target":
            label = f"target {_fmt(row.get('target'))}, {label}"
        lines.append(f"| {key} ({label}) | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    for paragraph in _threshold_advice(choices, summary, labelled_policy):
        lines += ["", paragraph]
    return [*lines, ""]


def _threshold_advice(choices: Mapping[str, Any], summary: Mapping[str, Any], labelled_policy: bool) -> list[str]:
    cal = choices.get("calibrated") or {}
    lines = [
        "The calibrated row is what the line does: the verdicts as predicted. The other two apply the rule "
        "score > threshold to the same scores."
    ]
    if (choices.get("f1_optimal") or {}).get("threshold") is None:
        lines.append(
            "Only the calibrated threshold can be judged on this set: the F1-optimal and recall-target thresholds "
            "need labelled defect images."
        )
        return lines
    if labelled_policy:
        policy = (summary.get("model") or {}).get("threshold_policy")
        lines.append(
            f"**Which to use:** the bundle's threshold ({_fmt(cal.get('threshold'))}) was itself chosen on labelled "
            f"defects (policy {policy}), not on good images alone: if they were these images, its figures here are "
            "optimistic, like those of the other two rows, which were chosen on these labelled defects and are "
            "measured on the same images. For a fair estimate, recalibrate on good images the fit did not see "
            "(`inspectd calibrate MODEL --good GOOD_DIR`) and evaluate again; keep a threshold chosen on labels only "
            "if it holds on labelled images that were not used to choose it."
        )
    else:
        lines.append(
            f"**Which to use:** keep the calibrated threshold ({_fmt(cal.get('threshold'))}) on the line. It was set "
            "from good images held out of the fit, before any defect was seen, so its figures here are a fair "
            "estimate of what the line will do with new parts. The F1-optimal and recall-target thresholds were "
            "chosen on these labelled defects and are measured on the same images, so their figures are "
            "optimistic: they fit this sample, chance included. If the calibrated recall is not acceptable, they "
            "show what a lower threshold could gain and at which false-reject rate; confirm that on labelled "
            "images not used to choose it before switching "
            "(`inspectd calibrate MODEL --good GOOD_DIR --dataset OTHER_DATASET --policy f1`, or `--policy recall`)."
        )
    n_good = summary.get("n_good", 0)
    for key, _ in THRESHOLD_ROWS[1:]:
        row = choices.get(key) or {}
        frr = row.get("false_reject_rate")
        if frr is not None and n_good and frr >= max(0.05, 2 * (cal.get("false_reject_rate") or 0)):
            everything = " (every good part)" if frr >= 1 else ""
            lines.append(
                f"**Note:** the {THRESHOLD_NAMES[key]} threshold would reject {frr:.0%} of good parts "
                f"({row.get('rejected_goods')} of {n_good}){everything}."
            )
    return lines


def _score_section(summary: Mapping[str, Any]) -> list[str]:
    lines = ["## Score distribution", "", "![Score distribution](histogram.png)", ""]
    if isinstance(summary.get("scores"), Mapping):
        lines += _nested_table(summary["scores"], "class")
    threshold = summary.get("threshold")
    good = (summary.get("scores") or {}).get("good") or {}
    if threshold and good.get("max") is not None:
        lines += [
            f"The highest good score is {_fmt(good['max'])}, {good['max'] / threshold:.0%} of the calibrated "
            f"threshold {_fmt(float(threshold))}.",
            "",
        ]
    return lines


def _pixel_section(summary: Mapping[str, Any]) -> list[str]:
    pixel = summary.get("pixel")
    if not isinstance(pixel, Mapping):
        return []
    return ["## Pixel level", "", *_scalar_table(pixel, None)]


def _per_kind_section(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> list[str]:
    per_kind = summary.get("per_kind")
    if not per_kind:
        return []
    rows = {k: dict(v) for k, v in per_kind.items()}
    base_kinds = (baseline or {}).get("per_kind") or {}
    if baseline is not None:
        for k, row in rows.items():
            row["baseline recall"] = (base_kinds.get(k) or {}).get("recall")
    lines = ["## Per defect kind", "", *_nested_table(rows, "kind")]
    lines += [
        "recall: defect images rejected; regions: ground-truth regions (from masks); located: fraction of them "
        "a detected region overlaps.",
        "",
    ]
    return lines


def _baseline_section(baseline: Mapping[str, Any] | None) -> list[str]:
    if baseline is None:
        return []
    about = {k: v for k, v in baseline.items() if not isinstance(v, Mapping | list)}
    lines = ["## Downscaled baseline", ""]
    lines += [
        f"The same detector fitted and run on images shrunk to {baseline.get('downscale')} px, one global score per "
        "image (the mean of its anomaly map). Its threshold is the F1-optimal one on this test set, which the line "
        "could never know in advance: its figures are an upper bound. Shown beside the model's figures above.",
        "",
    ]
    lines += _scalar_table(about, None)
    return lines


def summary_markdown(
    summary: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    overlays: Sequence[tuple[str, str]] = (),
    files: Sequence[str] = (),
) -> str:
    """A Markdown rendering of every figure of a ``metrics.summarise`` dict (plus what ``evaluate`` adds).

    ``baseline`` (summary-shaped: ``image``, ``per_kind``...) adds a column beside the model's
    figures; ``overlays`` are ``(file, caption)`` pairs embedded under the worst cases; ``files``
    are the report's files, linked at the end. All links are relative to the report directory.
    """
    lines = ["# Evaluation report", ""]
    model = summary.get("model") or {}
    if model:
        lines += [f"Model `{model.get('bundle_id')}`; the tables below list every figure of `summary.json`.", ""]
    for note in report_notes(summary):
        lines += [f"> {note}", ""]
    overview = {k: v for k, v in summary.items() if not isinstance(v, Mapping | list)}
    lines += ["## Overview", "", *_scalar_table(overview, None)]
    if isinstance(summary.get("masks"), Mapping):
        lines += ["Ground-truth masks (`masks`):", "", *_scalar_table(summary["masks"], None)]
    if isinstance(summary.get("image"), Mapping):
        base_img = baseline.get("image") if baseline is not None else None
        name = "baseline"
        if baseline is not None:
            name = f"baseline ({baseline.get('downscale')} px, threshold chosen on this set)"
        lines += ["## Image level (at the calibrated threshold)", ""]
        lines += _scalar_table(summary["image"], base_img, name)
    lines += _threshold_section(summary)
    lines += _score_section(summary)
    lines += ["## Curves", "", "![ROC curve](roc.png) ![Precision-recall curve](pr.png)", ""]
    lines += _pixel_section(summary)
    lines += _per_kind_section(summary, baseline)
    if summary.get("per_size"):
        lines += ["## Per defect size (max side, px)", "", *_nested_table(summary["per_size"], "size")]
        lines += ["recall: ground-truth regions (from masks) a detected region overlaps.", ""]
    lines += _baseline_section(baseline)
    for key, title in (("timings_ms_median", "Median time per image (ms)"), ("model", "Model")):
        if isinstance(summary.get(key), Mapping):
            lines += [f"## {title}", "", *_scalar_table(_flat(summary[key]), None)]
    lines += _worst_section(summary, overlays)
    if files:
        lines += ["## Files", "", *(f"- [{f}]({f})" for f in files if not f.endswith(".png")), ""]
    return "\n".join(lines)


def _worst_section(summary: Mapping[str, Any], overlays: Sequence[tuple[str, str]]) -> list[str]:
    worst = summary.get("worst") or []
    if not worst and not overlays:
        return []
    lines = ["## Worst cases", ""]
    if worst:
        cols = list(dict.fromkeys(c for w in worst for c in w))
        lines += ["| # | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {i:02d} | " + " | ".join(_fmt(w.get(c)) for c in cols) + " |" for i, w in enumerate(worst)]
        lines.append("")
    for file, caption in overlays:
        lines += [f"### {file[:-4]}: {caption}", "", f"![{caption}]({file})", ""]
    return lines


def _alternative_thresholds(summary: Mapping[str, Any]) -> dict[str, float]:
    choices = summary.get("thresholds") if isinstance(summary, Mapping) else None
    out = {}
    for key, label in (("f1_optimal", "F1-optimal"), ("recall_target", "recall target")):
        t = ((choices or {}).get(key) or {}).get("threshold")
        if t is not None:
            out[label] = float(t)
    return out


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
