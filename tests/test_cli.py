"""The `inspectd` CLI end to end on a tiny dataset: fit, predict, evaluate, calibrate, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.fit_pipeline import MIN_GOOD
from calibration.thresholds import good_threshold
from daemon.cli import main
from engines.bundle import CALIBRATION, GRAPH_FP32, REFERENCE, Bundle, sha256_file
from engines.decode import read_image
from tests.helpers import make_dataset, write_png

SIZE = 384
RECORD_KEYS = {"image", "verdict", "reason", "score", "threshold", "defects"}


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Run ``inspectd argv...`` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MVTec-layout dataset."""
    return make_dataset(tmp_path_factory.mktemp("cli_data") / "part", size=SIZE, seed=1)


@pytest.fixture(scope="module")
def model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle fitted through `inspectd fit`."""
    out = tmp_path_factory.mktemp("cli_models") / "model"
    assert main(["fit", str(data), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def predictions(data: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """`inspectd predict` over the whole test folder."""
    out = tmp_path_factory.mktemp("cli_pred") / "pred.jsonl"
    assert main(["predict", str(model), str(data / "test"), "--out", str(out), "--backend", "onnxruntime"]) == 0
    return read_jsonl(out)


def test_fit_writes_a_loadable_bundle(model, data):
    """`inspectd fit` writes a bundle that verifies and describes the dataset's images."""
    bundle = Bundle.load(model)
    assert bundle.geometry.describe() == f"{SIZE}x{SIZE} mono uint8"
    assert bundle.manifest["training"]["n_images"] == len(list((data / "train" / "good").iterdir()))


def test_predict_writes_one_documented_record_per_image(predictions, data):
    """predict writes one JSON object per test image with image/verdict/score/threshold/defects[bbox,area,score]."""
    images = sorted(str(p) for p in (data / "test").rglob("*.png"))
    assert sorted(r["image"] for r in predictions) == images
    for record in predictions:
        assert set(record) >= RECORD_KEYS, record
        assert record["verdict"] in ("pass", "reject")
        assert isinstance(record["score"], float) and isinstance(record["threshold"], float)
        for defect in record["defects"]:
            assert set(defect) == {"bbox", "area", "score"}
            x0, y0, x1, y1 = defect["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE and defect["area"] >= 1
            assert defect["score"] > record["threshold"]


def test_predict_finds_and_locates_defects_and_passes_goods(predictions, data):
    """Good images pass; each defect image is rejected with its strongest box overlapping the ground truth."""
    for record in predictions:
        path = Path(record["image"])
        kind = path.parent.name
        if kind == "good":
            assert (record["verdict"], record["reason"], record["defects"]) == ("pass", "ok", []), record
            continue
        assert (record["verdict"], record["reason"]) == ("reject", "defect"), record
        mask = read_image(data / "ground_truth" / kind / f"{path.stem}_mask.png") > 0
        x0, y0, x1, y1 = record["defects"][0]["bbox"]
        assert mask[y0:y1, x0:x1].any(), f"{path}: box {record['defects'][0]['bbox']} misses the defect"


def test_predict_turns_unregistrable_frames_into_rejects(model, tmp_path, capsys):
    """Frames of pure noise or a blank field are "reject" with a non-defect reason and no score, not a crash."""
    rng = np.random.default_rng(3)
    noise = write_png(tmp_path / "in" / "noise.png", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    blank = write_png(tmp_path / "in" / "blank.png", np.full((SIZE, SIZE), 140, np.uint8))
    out = tmp_path / "pred.jsonl"
    rc, stdout, _ = cli(capsys, "predict", model, noise, blank, "--out", out, "--backend", "onnxruntime")
    assert rc == 0 and "2 rejected" in stdout
    records = read_jsonl(out)
    assert len(records) == 2
    for record in records:
        assert record["verdict"] == "reject" and record["reason"] == "registration", record
        assert record["score"] is None and record["defects"] == [] and record["detail"]


def test_evaluate_writes_the_report(model, data, tmp_path, capsys):
    """evaluate writes summary.json and the ROC, PR and histogram plots; the tiny set is separated perfectly."""
    report = tmp_path / "report"
    rc, stdout, _ = cli(capsys, "evaluate", model, data, "--report", report, "--backend", "onnxruntime")
    assert rc == 0 and str(report) in stdout
    for name in ("summary.json", "roc.png", "pr.png", "histogram.png"):
        assert (report / name).stat().st_size > 0, name
    for name in ("roc.png", "pr.png", "histogram.png"):
        assert cv2.imread(str(report / name)) is not None, f"{name} is not a readable PNG"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["image"]["recall"] == 1.0 and summary["image"]["false_reject_rate"] == 0.0
    assert summary["model"]["bundle_id"] == Bundle.load(model).bundle_id
    assert [p.name for p in tmp_path.iterdir()] == ["report"], "no temporary report directory left behind"


def test_calibrate_rewrites_the_threshold_and_keeps_hashes_valid(model, data, predictions, tmp_path, capsys):
    """calibrate --good sets the good-only threshold from the given goods, and the bundle still verifies."""
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    before = Bundle.load(copy)
    graph_hash = sha256_file(copy / GRAPH_FP32)
    goods = data / "test" / "good"
    rc, stdout, _ = cli(capsys, "calibrate", copy, "--good", goods, "--margin", "0.2", "--backend", "onnxruntime")
    assert rc == 0 and "policy good-frr" in stdout and str(copy) in stdout
    after = Bundle.load(copy)  # verifies every hash
    scores = np.array([r["score"] for r in predictions if Path(r["image"]).parent.name == "good"])
    want = good_threshold(scores, 0.005, 0.2)
    assert after.calibration["threshold"] == want["threshold"] != before.calibration["threshold"]
    assert after.calibration["good_source"] == str(goods)
    assert after.calibration["fine_scale"] == before.calibration["fine_scale"], "graph scales are kept"
    assert sha256_file(copy / GRAPH_FP32) == graph_hash == after.manifest["files"][GRAPH_FP32]
    assert after.manifest["files"][CALIBRATION] != before.manifest["files"][CALIBRATION]


# -- bad input: exit code 2, one line naming the file and what was expected, nothing left behind ----------
def copy_train(data: Path, root: Path, n: int) -> list[Path]:
    """A dataset at ``root`` whose train/good holds copies of the first ``n`` training images."""
    good = root / "train" / "good"
    good.mkdir(parents=True)
    return [Path(shutil.copy(p, good / p.name)) for p in sorted((data / "train" / "good").iterdir())[:n]]


def corrupt(images: list[Path]) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    images[3].write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return images[3], "not a readable PNG/TIFF/BMP/JPEG image"


def truncate(images: list[Path]) -> tuple[Path, str]:
    data = images[6].read_bytes()
    images[6].write_bytes(data[: len(data) // 2])
    return images[6], "corrupt or truncated"


def resize(images: list[Path]) -> tuple[Path, str]:
    write_png(images[2], np.zeros((SIZE, SIZE + 10), np.uint8))
    return images[2], f"expected {SIZE}x{SIZE} mono uint8"


def empty(images: list[Path]) -> tuple[Path, str]:
    for p in images:
        p.unlink()
    return images[0].parent, "no images (expected PNG"


def too_few(images: list[Path]) -> tuple[Path, str]:
    for p in images[MIN_GOOD - 1 :]:
        p.unlink()
    return images[0].parent, f"needs at least {MIN_GOOD}"


def unrelated(images: list[Path]) -> tuple[Path, str]:
    write_png(images[5], np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    return images[5], "registration failed"


FIT_CASES: dict[str, Callable[[list[Path]], tuple[Path, str]]] = {
    "corrupt image": corrupt,
    "unregistrable image": unrelated,
    "truncated image": truncate,
    "image of another size": resize,
    "empty dataset": empty,
    "too few good images": too_few,
}


def assert_user_error(rc: int, err: str, command: str, path: Path, fragment: str) -> None:
    """Exit code 2 and exactly one stderr line naming ``path`` and saying what was expected."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"inspectd {command}: error: ") and str(path) in lines[0] and fragment in lines[0], err


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_bad_dataset(case, data, tmp_path, capsys):
    """fit on a damaged dataset exits 2 with one line naming the culprit, and leaves no bundle behind."""
    images = copy_train(data, tmp_path / "ds", MIN_GOOD + 2)
    culprit, fragment = FIT_CASES[case](images)
    out = tmp_path / "models" / "model"
    rc, _, err = cli(capsys, "fit", tmp_path / "ds", "--out", out)
    assert_user_error(rc, err, "fit", culprit, fragment)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_fit_roi_of_the_wrong_size(data, tmp_path, capsys):
    """fit with an ROI mask of another size exits 2 naming the mask and the expected size."""
    copy_train(data, tmp_path / "ds", MIN_GOOD + 2)
    roi = write_png(tmp_path / "roi.png", np.full((SIZE // 2, SIZE), 255, np.uint8))
    out = tmp_path / "models" / "model"
    rc, _, err = cli(capsys, "fit", tmp_path / "ds", "--out", out, "--roi", roi)
    assert_user_error(rc, err, "fit", roi, f"expected {SIZE}x{SIZE}")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def flip_reference(bundle: Path) -> Path:
    path = bundle / REFERENCE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def edit_calibration(bundle: Path) -> Path:
    path = bundle / CALIBRATION
    cal = json.loads(path.read_text())
    cal["threshold"] = cal["threshold"] * 2
    path.write_text(json.dumps(cal, indent=2) + "\n")
    return path


@pytest.mark.parametrize("tamper", [flip_reference, edit_calibration], ids=["reference bytes", "calibration edit"])
def test_predict_with_a_tampered_bundle(tamper, model, data, tmp_path, capsys):
    """predict with a modified bundle file exits 2 naming that file, and writes no output."""
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    culprit = tamper(copy)
    out = tmp_path / "res" / "out.jsonl"
    rc, _, err = cli(capsys, "predict", copy, data / "test" / "good", "--out", out, "--backend", "onnxruntime")
    assert_user_error(rc, err, "predict", culprit, "does not match the manifest")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_predict_on_a_corrupt_image_leaves_no_partial_output(model, data, tmp_path, capsys):
    """A corrupt image among good ones makes predict exit 2 naming it, with no partial JSONL left."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((data / "test" / "good").iterdir()):
        shutil.copy(p, folder / p.name)
    bad = folder / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    out = tmp_path / "res" / "out.jsonl"
    rc, _, err = cli(capsys, "predict", model, folder, "--out", out, "--backend", "onnxruntime")
    assert_user_error(rc, err, "predict", bad, "corrupt or truncated")
    assert not out.exists() and list(out.parent.iterdir()) == [], "neither the JSONL nor its temp file remain"


def test_predict_on_a_missing_path(model, tmp_path, capsys):
    """predict on a path that does not exist exits 2 naming it."""
    missing = tmp_path / "nope.png"
    rc, _, err = cli(capsys, "predict", model, missing, "--out", tmp_path / "o.jsonl")
    assert_user_error(rc, err, "predict", missing, "no such image or folder")
    assert not (tmp_path / "o.jsonl").exists()


def test_calibrate_needs_two_goods(model, tmp_path, capsys):
    """calibrate with fewer than two good images exits 2 naming the folder, leaving the bundle unchanged."""
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    before = (copy / CALIBRATION).read_bytes()
    goods = tmp_path / "goods"
    goods.mkdir()
    rc, _, err = cli(capsys, "calibrate", copy, "--good", goods)
    assert_user_error(rc, err, "calibrate", goods, "at least 2")
    assert (copy / CALIBRATION).read_bytes() == before


# -- the installed console script and import hygiene ------------------------------------------------------
def console_script() -> str:
    """The `inspectd` entry point installed beside the running interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "inspectd"
    found = str(beside) if beside.exists() else shutil.which("inspectd")
    if not found:
        pytest.skip("the inspectd console script is not installed")
    return found


def test_console_script_predicts_and_reports_errors(model, data, tmp_path):
    """The installed `inspectd` script predicts one image, and turns a missing dataset into one stderr line."""
    image = sorted((data / "test" / "dot").iterdir())[0]
    out = tmp_path / "one.jsonl"
    run = subprocess.run(
        [console_script(), "predict", str(model), str(image), "--out", str(out), "--backend", "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    (record,) = read_jsonl(out)
    assert record["image"] == str(image) and record["verdict"] == "reject"
    bad = subprocess.run(
        [console_script(), "fit", str(tmp_path / "absent"), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"inspectd fit: error: {tmp_path / 'absent'}: not a directory (expected a dataset folder)"
    ]


def test_online_modules_import_neither_torch_nor_matplotlib():
    """Importing engines.inspector, every engines.* and daemon.* module loads no torch, matplotlib or calibration."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import engines, daemon\n"
        "import engines.inspector\n"
        "for pkg in (engines, daemon):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'matplotlib', 'calibration'))\n"
        "print(','.join(bad))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_fit_registration_limits_from_the_command_line(data, tmp_path, capsys):
    """A good image shifted past the default limit is refused naming --max-shift/--max-rotation; raising them fits."""
    images = copy_train(data, tmp_path / "ds", MIN_GOOD + 2)
    moved = cv2.warpAffine(read_image(images[4]), np.float32([[1, 0, 20], [0, 1, -6]]), (SIZE, SIZE))
    write_png(images[4], moved)
    out = tmp_path / "models" / "model"
    rc, _, err = cli(capsys, "fit", tmp_path / "ds", "--out", out)
    default = 0.04 * SIZE
    assert_user_error(rc, err, "fit", images[4], "pose outside limits")
    assert f"--max-shift {default:g} px and --max-rotation 3 deg" in err
    rc, _, err = cli(capsys, "fit", tmp_path / "ds", "--out", out, "--max-shift", 30, "--max-rotation", 2.5)
    assert rc == 0, err
    limits = Bundle.load(out).manifest["registration"]
    assert (limits["max_shift_px"], limits["max_rotation_deg"]) == (30, 2.5)


@pytest.mark.parametrize(("flag", "value"), [("--max-shift", "0"), ("--max-rotation", "-1"), ("--max-rotation", "200")])
def test_fit_refuses_impossible_registration_limits(flag, value, data, tmp_path, capsys):
    """A non-positive shift or a rotation outside (0, 180] degrees is a one-line error before any work."""
    copy_train(data, tmp_path / "ds", MIN_GOOD)
    rc, _, err = cli(capsys, "fit", tmp_path / "ds", "--out", tmp_path / "model", flag, value)
    assert_user_error(rc, err, "fit", flag, "expected")
    assert not (tmp_path / "model").exists()


def test_an_error_of_the_machine_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """An OSError (here: the output's parent is a file; on a line, a full disk) is one line naming the path, exit 1,
    and no half-written dataset; before, it was a traceback."""
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "line"
    assert main(["synth", str(out), "--size", "128", "--train", "4", "--test-good", "1", "--per-kind", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("inspectd synth: error:") and "afile" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", ["serve", "predict", "evaluate"])
def test_frame_commands_run_openblas_on_one_thread(command, monkeypatch, capsys):
    """Before the command's module (and numpy) loads, OPENBLAS_NUM_THREADS=1 is set: an OpenBLAS worker spins
    on the core the frame path needs (daemon/cli.py)."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_a_users_openblas_setting_is_kept_and_fit_is_left_alone(monkeypatch, capsys):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "OPENBLAS_NUM_THREADS" not in os.environ
