"""`inspectd evaluate` end to end on a tiny dataset: image labels without masks, good parts only, a missing
optional dependency, a report anyone can re-score, and the downscaled baseline beside the model's figures."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from calibration import metrics
from calibration.datasets import load_test_folder
from daemon.cli import main
from engines.decode import read_image
from engines.inspector import Inspector
from tests.helpers import make_dataset

SIZE = 384


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten good images to fit; three good, two dots and two stains (with masks) to test."""
    root = tmp_path_factory.mktemp("eval_data") / "part"
    return make_dataset(root, size=SIZE, n_train=10, n_good=3, n_per_kind=2, seed=4)


@pytest.fixture(scope="module")
def model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_models") / "model"
    assert main(["fit", str(data), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def full_report(model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str, str]:
    """One evaluation of the whole dataset with the downscaled baseline: (report dir, summary, summary.md, stdout)."""
    report = tmp_path_factory.mktemp("eval_full") / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            ["evaluate", *map(str, (model, data, "--report", report)), "--backend", "onnxruntime", "--downscale", "128"]
        )
    assert rc == 0
    summary = json.loads((report / "summary.json").read_text())
    return report, summary, (report / "summary.md").read_text(), stdout.getvalue()


def _copy(data: Path, dst: Path, kinds: tuple[str, ...] | None = None, masks: bool = True) -> Path:
    """A copy of the dataset with only some test kinds, and with or without its ground-truth masks."""
    shutil.copytree(data / "train", dst / "train")
    for kind_dir in (data / "test").iterdir():
        if kinds is None or kind_dir.name in kinds:
            shutil.copytree(kind_dir, dst / "test" / kind_dir.name)
    if masks:
        shutil.copytree(data / "ground_truth", dst / "ground_truth")
    return dst


def _evaluate(capsys, model: Path, dataset: Path, report: Path, *extra: object) -> tuple[dict, str, str]:
    rc, stdout, stderr = cli(capsys, "evaluate", model, dataset, "--report", report, "--backend", "onnxruntime", *extra)
    assert rc == 0, stderr
    return json.loads((report / "summary.json").read_text()), (report / "summary.md").read_text(), stdout


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_without_masks_gives_image_level_figures(model, data, tmp_path, capsys):
    """Image labels only: image-level metrics and per-kind recall, and a note that pixel metrics need masks."""
    dataset = _copy(data, tmp_path / "labels_only", masks=False)
    summary, md, stdout = _evaluate(capsys, model, dataset, tmp_path / "report")
    assert (summary["image"]["recall"], summary["image"]["false_reject_rate"], summary["image"]["auroc"]) == (1, 0, 1)
    assert {k: (v["n"], v["recall"]) for k, v in summary["per_kind"].items()} == {"dot": (2, 1.0), "stain": (2, 1.0)}
    assert summary["masks"] == {"defect_images": 4, "with_mask": 0}
    assert summary["pixel"]["auroc"] is None and "need ground-truth masks" in summary["pixel"]["note"]
    assert all(v["n"] == 0 for v in summary["per_size"].values())
    assert "No defect image has a ground-truth mask" in md and "need ground-truth masks" in stdout
    assert {row["located"] for row in _csv(tmp_path / "report" / "per_image.csv")} == {""}


def test_evaluate_with_some_masks_scores_pixels_on_those_only(model, data, tmp_path, capsys):
    """A defect image without a mask is left out of the pixel metrics (its defect pixels are unknown), not
    counted as good pixels; the others still give pixel AUROC and located."""
    dataset = _copy(data, tmp_path / "some_masks")
    (dataset / "ground_truth" / "stain" / "000_mask.png").unlink()
    summary, md, _ = _evaluate(capsys, model, dataset, tmp_path / "report")
    assert summary["masks"] == {"defect_images": 4, "with_mask": 3}
    assert summary["pixel"]["auroc"] > 0.9 and "1 defect images without a mask are left out" in summary["pixel"]["note"]
    assert summary["per_kind"]["stain"]["regions"] == 1
    rows = {
        Path(r["image"]).parent.name + "/" + Path(r["image"]).name: r
        for r in _csv(tmp_path / "report" / "per_image.csv")
    }
    assert rows["stain/000.png"]["located"] == "" and rows["stain/001.png"]["located"] == "yes"
    assert "1 of 4 defect images have no ground-truth mask" in md


def test_evaluate_good_parts_only(model, data, tmp_path, capsys):
    """A test set of good parts: the false-reject rate and the score distribution, no crash."""
    dataset = _copy(data, tmp_path / "goods", kinds=("good",), masks=False)
    summary, md, stdout = _evaluate(capsys, model, dataset, tmp_path / "report")
    assert (summary["n_good"], summary["n_defect"], summary["image"]["false_reject_rate"]) == (3, 0, 0.0)
    good = summary["scores"]["good"]
    assert good["n"] == 3 and good["max"] < summary["threshold"]
    assert summary["image"]["auroc"] is None and summary["thresholds"]["f1_optimal"]["threshold"] is None
    assert "false-reject rate 0.000 (0 of 3 good rejected)" in stdout and "highest score" in stdout
    assert summary["image"]["recall"] is None and "recall" not in stdout  # nothing to find is not "recall 1.0"
    assert "Good parts only" in md and "![Score distribution](histogram.png)" in md
    assert (tmp_path / "report" / "histogram.png").stat().st_size > 0


def test_evaluate_names_a_missing_report_extra_before_any_work(model, data, tmp_path, capsys, monkeypatch):
    """Without matplotlib, evaluate stops at once (exit 2) naming the extra and its install command."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the missing extra was named")

    monkeypatch.setattr(Inspector, "load", no_work)
    rc, _, stderr = cli(capsys, "evaluate", model, data, "--report", tmp_path / "report")
    assert rc == 2 and "matplotlib" in stderr and "pip install 'inspectd[report]'" in stderr
    assert list(tmp_path.iterdir()) == []


def test_readme_documents_the_report_extra():
    """The README says how to install what `evaluate` needs for its plots."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "pip install -e '.[report]'" in readme and "inspectd[report]" in readme


def test_evaluate_report_can_be_rescored(full_report, data):
    """predictions.jsonl holds the `inspectd predict` records, and per_image.csv one row per image: from them
    anyone re-derives the image-level figures without running predict again."""
    report, summary, _, _ = full_report
    records = [json.loads(line) for line in (report / "predictions.jsonl").read_text().splitlines()]
    assert {"image", "verdict", "reason", "score", "threshold", "defects", "timings_ms"} <= set(records[0])
    truth = {}
    for sample in load_test_folder(data).test:
        mask = None if sample.mask is None else read_image(sample.mask) > 0
        truth[str(sample.path)] = {"kind": sample.kind, "mask": mask}
    assert metrics.summarise(records, truth)["image"] == summary["image"]
    rows = _csv(report / "per_image.csv")
    assert tuple(rows[0]) == metrics.PER_IMAGE_COLUMNS and len(rows) == len(records) == 7
    defects = [r for r in rows if r["kind"] != "good"]
    assert {(r["outcome"], r["verdict"], r["located"]) for r in defects} == {("correct reject", "reject", "yes")}
    assert all(int(r["defects"]) >= 1 and r["gt_regions"] == "1" for r in defects)
    goods = [r for r in rows if r["kind"] == "good"]
    assert {(r["outcome"], r["defects"], r["located"]) for r in goods} == {("correct pass", "0", "")}
    assert all(float(r["score"]) < float(r["threshold"]) for r in goods)


def test_evaluate_downscale_baseline_beside_the_models_figures(full_report):
    """--downscale fills the baseline's column in summary.md (it was all "–")."""
    _, summary, md, stdout = full_report
    base = summary["baseline"]
    assert base["downscale"] == 128 and base["image"]["auroc"] is not None
    for key in ("auroc", "f1", "recall", "false_reject_rate"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {key} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] not in ("", "–") and cells[2] == f"{base['image'][key]:.4f}", row
    kind_row = next(line for line in md.splitlines() if line.startswith("| dot |"))
    assert kind_row.split("|")[-2].strip() == f"{base['per_kind']['dot']['recall']:.4f}"
    assert "baseline (downscaled to 128 px" in stdout


def test_evaluate_refuses_a_tiny_downscale_before_any_work(model, data, tmp_path, capsys):
    """--downscale below 32 px is a one-line error, before the model is loaded."""
    rc, _, stderr = cli(capsys, "evaluate", model, data, "--report", tmp_path / "report", "--downscale", "8")
    assert rc == 2 and "--downscale 8" in stderr and not (tmp_path / "report").exists()
