"""Evaluation report: summary JSON/Markdown, per-image table, and the figures (``calibration.figures``).

The report appears atomically: everything is written into a temporary sibling directory that is
renamed over ``report_dir`` only once complete, so a failure never leaves a half-written report behind.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration import metrics
from calibration.figures import (
    Overlay,
    overlay_title,
    plot_histogram,
    plot_overlay,
    plot_pr,
    plot_roc,
)
from engines.bundle import staged_directory

PLOTS = (("roc.png", "ROC curve"), ("pr.png", "Precision-recall curve"), ("histogram.png", "Score distribution"))


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
    with staged_directory(report_dir) as tmp:
        _write_all(tmp, summary, labels, scores, threshold, overlays, baseline, per_image, predictions)


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
