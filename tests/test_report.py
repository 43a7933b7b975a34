"""Tests for calibration.report: files written, PNGs valid, tiny defects visible, atomic on failure."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration import figures, metrics, report
from calibration.figures import overlay_title

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs() -> tuple[dict, np.ndarray, np.ndarray, list[figures.Overlay]]:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 6)
    scores = np.r_[rng.normal(0.5, 0.2, 40), rng.normal(1.8, 0.5, 6)]
    records, truth = [], {}
    for i, (y, s) in enumerate(zip(labels, scores, strict=True)):
        name = f"img{i}.png"
        verdict = "reject" if s > 1.0 else "pass"
        records.append({"image": name, "verdict": verdict, "score": float(s), "threshold": 1.0, "defects": []})
        truth[name] = {"kind": "scratch" if y else "good", "mask": None}
    summary = metrics.summarise(records, truth)
    image = (rng.random((300, 400)) * 255).astype(np.uint8)
    mask = np.zeros((300, 400), bool)
    mask[100:120, 200:260] = True
    amap = rng.random((75, 100)).astype(np.float32) * 2  # a downsampled map
    overlays = [
        figures.Overlay("img0.png", image, amap, [(200, 100, 260, 120)], mask),
        ("img1.png", np.dstack([image] * 3), amap, []),  # a plain 4-tuple, colour image
    ]
    return summary, labels, scores, overlays


def _expected_files(n_overlays: int) -> set[str]:
    base = {"summary.json", "summary.md", "roc.png", "pr.png", "histogram.png"}
    return base | {f"worst_{i:02d}.png" for i in range(n_overlays)}


def test_write_report_writes_all_files(tmp_path: Path) -> None:
    """Every expected file exists, PNGs decode, and the JSON round-trips the summary."""
    summary, labels, scores, overlays = _inputs()
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, overlays)
    assert {p.name for p in out.iterdir()} == _expected_files(2)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert cv2.imread(str(png)) is not None, png.name
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text()
    assert "| auroc |" in md and "scratch" in md
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary siblings left


def test_write_report_with_baseline_adds_deltas(tmp_path: Path) -> None:
    """A baseline is saved next to the summary and the Markdown shows value, baseline and delta."""
    summary, labels, scores, _ = _inputs()
    baseline = json.loads(json.dumps(summary))
    baseline["image"]["auroc"] = 0.5
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, [], baseline=baseline)
    assert json.loads((out / "baseline.json").read_text())["image"]["auroc"] == 0.5
    row = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| auroc |"))
    assert f"{summary['image']['auroc'] - 0.5:+.4f}" in row


def test_write_report_replaces_previous_report(tmp_path: Path) -> None:
    """A second report replaces the first entirely (stale overlays do not survive)."""
    summary, labels, scores, overlays = _inputs()
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, overlays)
    report.write_report(out, summary, labels, scores, 1.0, overlays[:1])
    assert {p.name for p in out.iterdir()} == _expected_files(1)
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_plot_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a plot fails, no report directory and no temporary directory remain."""
    summary, labels, scores, overlays = _inputs()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plot_histogram", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write_report(tmp_path / "report", summary, labels, scores, 1.0, overlays)
    assert list(tmp_path.iterdir()) == []


def test_plot_failure_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed rewrite leaves the previous complete report untouched."""
    summary, labels, scores, overlays = _inputs()
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, overlays)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("overlay failed")

    monkeypatch.setattr(report, "plot_overlay", boom)
    with pytest.raises(RuntimeError):
        report.write_report(out, {"other": 1}, labels, scores, 1.0, overlays)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def _png_point(fig: object, ax: object, x: float, y: float) -> tuple[int, int]:
    """(column, row) in the saved PNG of data point (x, y) of ``ax`` (the figure is saved at its own size)."""
    fig.canvas.draw()
    dx, dy = ax.transData.transform((x, y))
    return round(dx), round(fig.bbox.height - dy)


def _colour(png: np.ndarray, name: str) -> np.ndarray:
    b, g, r = (png[..., i].astype(int) for i in range(3))
    if name == "red":
        return (r > 180) & (g < 80) & (b < 80)
    return (g > 180) & (r < 120) & (b < 120)  # lime


def test_overlay_downscales_and_keeps_tiny_box_visible(tmp_path: Path) -> None:
    """A 5120 px image is shown at <= 1024 px, and a 5x5 px defect box is still clearly drawn at its place."""
    image = np.full((2560, 5120), 128, np.uint8)
    amap = np.zeros((320, 640), np.float32)  # zero map: the colour layer has no red in it
    ov = figures.Overlay("big.png", image, amap, [(3000, 1200, 3005, 1205)])
    fig, axes = figures.overlay_figure(ov, 1.0)
    path = tmp_path / "worst_00.png"
    fig.savefig(path, dpi=100)
    png = cv2.imread(str(path))
    width, height = axes.full.get_window_extent().size
    assert round(width) <= 1024 and round(height) <= 512
    red = _colour(png, "red")
    col, row = _png_point(fig, axes.full, 3002.5 * 0.2 - 0.5, 1202.5 * 0.2 - 0.5)
    assert red[row - 10 : row + 11, col - 10 : col + 11].sum() >= 20, "box too small to see in the full view"


def test_overlay_ground_truth_shows_on_a_5120_px_image(tmp_path: Path) -> None:
    """A 5x5 px ground-truth defect on a 5120 px image is outlined visibly (not a one-pixel speck), where it is,
    and the zoomed panel shows it at full resolution."""
    image = np.full((2560, 5120), 128, np.uint8)
    mask = np.zeros(image.shape, bool)
    mask[1200:1205, 3000:3005] = True
    amap = np.zeros((320, 640), np.float32)
    path = tmp_path / "worst_00.png"
    figures.plot_overlay(path, figures.Overlay("dot.png", image, amap, [], mask), 1.0)
    lime = _colour(cv2.imread(str(path)), "lime")
    assert lime.sum() >= 150, f"ground truth outline covers only {lime.sum()} px"
    fig, axes = figures.overlay_figure(figures.Overlay("dot.png", image, amap, [], mask), 1.0)
    col, row = _png_point(fig, axes.full, 3002.5 * 0.2 - 0.5, 1202.5 * 0.2 - 0.5)
    assert lime[row - 16 : row + 17, col - 16 : col + 17].sum() >= 60, "no visible outline at the defect"
    x0, y0, x1, y1 = axes.zoom_box
    assert x0 <= 3000 < 3005 <= x1 and y0 <= 1200 < 1205 <= y1 and x1 - x0 <= 200


def _escape_case() -> figures.Overlay:
    image = np.full((300, 400), 120, np.uint8)
    mask = np.zeros((300, 400), bool)
    mask[100:106, 250:256] = True
    amap = np.zeros((300, 400), np.float32)
    amap[100:106, 250:256] = 0.54
    return figures.Overlay("dot/003.png", image, amap, [], mask, "dot", 0.54, "pass", "ok")


def test_overlay_title_says_what_the_case_is() -> None:
    """False reject, escape, correct reject (located or not), correct pass, with score against threshold."""
    esc = _escape_case()
    assert overlay_title(esc, 3.0) == (
        "ESCAPE: dot/003.png\nkind dot · score 0.54 vs threshold 3 · pass (ok) · 0 detected regions · "
        "ground truth not located"
    )
    hit = esc._replace(boxes=[(249, 99, 257, 107)], score=4.2, verdict="reject", reason="defect")
    assert overlay_title(hit, 3.0).startswith("CORRECT REJECT: dot/003.png\nkind dot · score 4.2 vs threshold 3")
    assert overlay_title(hit, 3.0).endswith("1 detected region · ground truth located")
    elsewhere = hit._replace(boxes=[(10, 10, 20, 20)])
    assert overlay_title(elsewhere, 3.0).startswith("CORRECT REJECT, DEFECT NOT LOCATED")
    good = esc._replace(kind="good", mask=None, score=3.5, verdict="reject", reason="defect", boxes=[(1, 1, 4, 4)])
    assert overlay_title(good, 3.0).startswith("FALSE REJECT: dot/003.png\nkind good · score 3.5 vs threshold 3")
    unscored = good._replace(score=None, reason="registration", boxes=[])
    assert "score not scored vs threshold 3 · reject (registration)" in overlay_title(unscored, 3.0)
    assert figures.overlay_title(good._replace(verdict="pass", reason="ok"), 3.0).startswith("CORRECT PASS")


def test_overlay_page_has_title_colour_bar_legend_and_zoom() -> None:
    """The page carries its title, a colour bar in score units with the threshold marked, a legend, and a zoom
    on the missed defect."""
    fig, axes = figures.overlay_figure(_escape_case(), 3.0)
    try:
        texts = [t.get_text() for t in fig.texts]
        assert "ESCAPE: dot/003.png" in texts
        assert any("score 0.54 vs threshold 3" in t for t in texts)
        assert axes.colorbar.get_xlim() == (0.0, 6.0)  # one scale for every overlay: twice the threshold
        assert any(list(line.get_xdata()) == [3.0, 3.0] for line in axes.colorbar.lines), "threshold not marked"
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert any(label.startswith("detected region") for label in labels)
        assert any(label.startswith("ground truth") for label in labels)
        x0, y0, x1, y1 = axes.zoom_box
        assert x0 <= 250 < 256 <= x1 and y0 <= 100 < 106 <= y1
    finally:
        figures._pyplot().close(fig)


def _full_summary() -> tuple[dict, dict, list[dict], list[dict], np.ndarray, np.ndarray]:
    """A summary with every section ``evaluate`` writes (masks for some defects, pixel, timings, model),
    a summary-shaped baseline, the predict records and the per-image rows."""
    rng = np.random.default_rng(5)
    records, truth = [], {}
    for i in range(30):
        kind = "good" if i < 20 else ("scratch" if i < 25 else "dent")
        score = float(rng.normal(0.6, 0.2)) if kind == "good" else float(rng.normal(1.6, 0.6))
        mask = None
        boxes: list[list[int]] = []
        if kind != "good" and i % 2:
            mask = np.zeros((64, 64), bool)
            mask[10:20, 30:34] = True
            boxes = [[29, 9, 35, 21]] if score > 1.0 else []
        verdict = "reject" if score > 1.0 else "pass"
        name = f"/data/test/{kind}/{i:03d}.png"
        defects = [{"bbox": b, "area": 24, "score": score} for b in boxes]
        reason = "defect" if boxes else "ok"
        records.append(
            {
                "image": name,
                "verdict": verdict,
                "reason": reason,
                "score": round(score, 4),
                "threshold": 1.0,
                "defects": defects,
            }
        )
        truth[name] = {"kind": kind, "mask": mask}
    summary = metrics.summarise(records, truth)
    summary["pixel"] = {"auroc": 0.98765, "aupro": 0.91234, "note": "over the 5 defect images with a mask"}
    summary["timings_ms_median"] = {"decode": 12.5, "registration": 30.25}
    geometry = {"height": 64, "width": 64, "channels": 1, "dtype": "uint8"}
    summary["model"] = {
        "bundle_id": "abc123",
        "detector": "template",
        "threshold_policy": "good-frr",
        "geometry": geometry,
    }
    labels = np.array([0 if truth[r["image"]]["kind"] == "good" else 1 for r in records])
    scores = np.array([r["score"] for r in records])
    at_half = [{**r, "threshold": 0.5, "verdict": "reject" if r["score"] > 0.5 else "pass"} for r in records]
    base = metrics.summarise(at_half, {k: {**v, "mask": None} for k, v in truth.items()})
    per_kind = {k: {"n": v["n"], "recall": v["recall"]} for k, v in base["per_kind"].items()}
    baseline = {"downscale": 32, "score": "global mean", "threshold": 0.5, "image": base["image"], "per_kind": per_kind}
    summary["baseline"] = baseline
    return summary, baseline, records, metrics.per_image(records, truth), labels, scores


def _leaves(data: object, path: tuple = ()) -> list[tuple[tuple, object]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(data, list):
        return [leaf for i, v in enumerate(data) for leaf in _leaves(v, (*path, i))]
    return [(path, data)]


def test_markdown_shows_every_figure_of_summary_json(tmp_path: Path) -> None:
    """Every value in summary.json (pixel metrics, thresholds, distribution, baseline...) appears in summary.md,
    under its key's name."""
    summary, baseline, records, rows, labels, scores = _full_summary()
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, [], baseline, rows, records)
    md = (out / "summary.md").read_text()
    written = json.loads((out / "summary.json").read_text())
    missing = []
    for path, value in _leaves(written):
        key = next(str(k) for k in reversed(path) if isinstance(k, str))
        text = value if isinstance(value, str) else report._fmt(value)
        if key not in md or text not in md:
            missing.append(f"{'.'.join(map(str, path))} = {text}")
    assert not missing, missing
    assert "| auroc | 0.9877 |" in md and "| aupro | 0.9123 |" in md


def test_markdown_embeds_every_plot_by_relative_link(tmp_path: Path) -> None:
    """Each PNG of the report is shown in summary.md by a relative link, and every link resolves."""
    summary, labels, scores, overlays = _inputs()
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, overlays)
    md = (out / "summary.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(embedded) == sorted(p.name for p in out.glob("*.png"))
    linked = re.findall(r"\]\(([^)]+)\)", md)
    assert all((out / target).is_file() and not Path(target).is_absolute() for target in linked)


def test_markdown_threshold_table_and_which_to_use(tmp_path: Path) -> None:
    """Calibrated, F1-optimal and recall-target thresholds each with precision, recall and false-reject rate,
    a sentence on which to use, and a warning when one would reject many good parts."""
    summary, baseline, *_ = _full_summary()
    md = report.summary_markdown(summary, baseline)
    table = [
        line for line in md.splitlines() if line.startswith(("| calibrated (", "| f1_optimal (", "| recall_target ("))
    ]
    assert len(table) == 3
    header = next(line for line in md.splitlines() if line.startswith("| choice |"))
    for col in ("threshold", "precision", "recall", "false_reject_rate"):
        assert f" {col} |" in header
    for line, key in zip(table, ("calibrated", "f1_optimal", "recall_target"), strict=True):
        row = summary["thresholds"][key]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:6] == [
            report._fmt(row[c]) for c in ("threshold", "precision", "recall", "f1", "false_reject_rate")
        ]
    assert "set from good images" in md and "optimistic" in md
    frr = summary["thresholds"]["recall_target"]["false_reject_rate"]
    assert frr >= 0.2  # the data make the recall target reject many goods: the report must say so
    assert f"would reject {frr:.0%} of good parts" in md


def test_markdown_baseline_beside_the_models_figures(tmp_path: Path) -> None:
    """The downscaled baseline fills its own column in the image-level and per-kind tables."""
    summary, baseline, *_ = _full_summary()
    md = report.summary_markdown(summary, baseline)
    for key in ("auroc", "f1", "recall", "false_reject_rate"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {key} |"))
        assert report._fmt(baseline["image"][key]) in row.split("|")[3], row
    kind_row = next(line for line in md.splitlines() if line.startswith("| scratch |"))
    assert kind_row.rstrip(" |").endswith(report._fmt(baseline["per_kind"]["scratch"]["recall"]))


def test_per_image_csv_has_a_row_per_image(tmp_path: Path) -> None:
    """per_image.csv: image, kind, score, threshold, verdict, defects and located (empty without a mask)."""
    summary, baseline, records, rows, labels, scores = _full_summary()
    out = tmp_path / "report"
    report.write_report(out, summary, labels, scores, 1.0, [], baseline, rows, records)
    with open(out / "per_image.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [r["image"] for r in table] == [r["image"] for r in records]
    assert tuple(table[0]) == metrics.PER_IMAGE_COLUMNS
    for row, truth_row in zip(table, rows, strict=True):
        assert row["located"] == {None: "", True: "yes", False: "no"}[truth_row["located"]]
        assert float(row["score"]) == pytest.approx(truth_row["score"], abs=1e-4)
    recall = np.mean([r["verdict"] == "reject" for r in table if r["kind"] != "good"])
    assert recall == pytest.approx(summary["image"]["recall"])
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == records


def test_markdown_says_what_a_maskless_or_good_only_set_can_measure() -> None:
    """Without masks: image-level figures and a note that pixel metrics need masks. Good parts only: the
    false-reject rate and the score distribution."""
    records = [
        {"image": f"{k}{i}.png", "verdict": "reject" if s > 1 else "pass", "score": s, "threshold": 1.0, "defects": []}
        for i, (k, s) in enumerate([("good", 0.3), ("good", 1.2), ("dent", 2.0), ("dent", 0.5)])
    ]
    truth = {r["image"]: {"kind": r["image"][:4], "mask": None} for r in records}
    md = report.summary_markdown(metrics.summarise(records, truth))
    assert "No defect image has a ground-truth mask" in md and "pixel metrics (AUROC, AUPRO)" in md
    assert "| dent | 2 | 0.5000 |" in md  # per-kind recall from the image labels
    goods = records[:2]
    md = report.summary_markdown(metrics.summarise(goods, {r["image"]: truth[r["image"]] for r in goods}))
    assert "Good parts only" in md and "false-reject rate (0.5000: 1 of 2 good parts rejected)" in md
    assert "| good | 2 | 0.3000 |" in md  # the distribution's row: n, min...


def test_report_handles_single_class(tmp_path: Path) -> None:
    """With goods only, the curves are drawn as "undefined" instead of failing the report."""
    labels, scores = np.zeros(5, int), np.linspace(0, 1, 5)
    report.write_report(tmp_path / "r", {"n_images": 5}, labels, scores, 0.5)
    assert (tmp_path / "r" / "roc.png").read_bytes()[:8] == PNG_MAGIC


def test_import_does_not_load_matplotlib() -> None:
    """Importing the report module must not import matplotlib (it is only needed to draw)."""
    code = "import sys, calibration.report; assert 'matplotlib' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_markdown_advice_when_the_bundles_threshold_was_chosen_on_labels() -> None:
    """A bundle recalibrated with --policy f1 is not called "set on good images only", nor advised to be kept as is."""
    summary, baseline, *_ = _full_summary()
    summary["model"]["threshold_policy"] = "f1"
    md = report.summary_markdown(summary, baseline)
    assert "| calibrated (the bundle's, policy f1: chosen on labelled defects) |" in md
    assert "was itself chosen on labelled defects (policy f1)" in md and "keep the calibrated threshold" not in md
