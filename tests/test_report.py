"""Tests for calibration.report: files written, PNGs valid, tiny defects visible, atomic on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration import metrics, report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs() -> tuple[dict, np.ndarray, np.ndarray, list[report.Overlay]]:
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
        report.Overlay("img0.png", image, amap, [(200, 100, 260, 120)], mask),
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


def test_overlay_downscales_and_keeps_tiny_box_visible(tmp_path: Path) -> None:
    """A 5120 px image becomes a <= 1024 px PNG in which a 5x5 px defect box is still clearly drawn."""
    image = np.full((2560, 5120), 128, np.uint8)
    amap = np.zeros((320, 640), np.float32)  # zero map: the colour layer has no red in it
    path = tmp_path / "worst_00.png"
    report.plot_overlay(path, report.Overlay("big.png", image, amap, [(3000, 1200, 3005, 1205)]))
    png = cv2.imread(str(path))
    assert max(png.shape[:2]) <= 1024 + 40  # allow the title strip
    b, g, r = (png[..., i].astype(int) for i in range(3))
    red = (r > 180) & (g < 80) & (b < 80)
    ys, xs = np.nonzero(red)
    assert red.sum() >= 20, "box too small to see"
    # The box is where the defect is: 3002/5120 of the width; 1202/2560 of the image height, which
    # sits below a title strip of up to 40 px.
    assert abs(xs.mean() / png.shape[1] - 3002 / 5120) < 0.02
    image_h = png.shape[1] * 2560 / 5120
    assert abs((ys.mean() - (png.shape[0] - image_h)) / image_h - 1202 / 2560) < 0.03


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
