"""Any camera: fit, predict and serve at sensor sizes that are not square and not multiples of 16 or 32.

The matrix is awkward sizes x 8/16 bit x mono/colour, crossed as a Latin square (each size one
pixel type, each pixel type on at least one odd size) so every combination of grid remainders
and pixel layouts is exercised without fitting every pair; 1440x1080 runs at half scale (720x540,
still no multiple of 32 in height) to keep the default run short. Each size is synthesised
(``inspectd synth --width --height``) and fitted once with an ROI mask of its size and 128 px
tile cores (several tiles even at 300 px), then: the bundle's grids follow ``cell_grid``, the ROI
is what is inspected, good parts pass and the defect is located, the tiled map equals the
untiled map, and a real daemon decides raw and TIFF frames exactly as ``predict`` does. The
commands (``fit``, ``predict``, ``calibrate``, ``evaluate --downscale``, ``build-engine`` on the
EMULATED TensorRT, the benchmark scripts) run once on an odd size, and sizes below the minimum
are one-line errors. Full-size sensors (up to 5472x3648) are measured by
``benchmarks/sensor_sizes.py`` (the ``slow`` test at the end).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from calibration.datasets import load_dataset
from calibration.synth import SynthConfig, write_dataset
from calibration.template_fit import FitConfig, fit_template
from daemon.cli import main as cli_main
from engines import registration as reg
from engines.bundle import Bundle
from engines.decode import read_image
from engines.graphs import ALIGN, LEVELS, TemplateGraphSpec, build_template_graph
from engines.inspector import Inspector, resident_inputs
from engines.onnxruntime_backend import OnnxRuntimeBackend
from engines.tiling import TilePlan, cell_grid
from engines.tolerance import BLOCK, frame_fine_gain
from engines.types import MIN_SIDE
from tests.helpers import load_benchmark
from tests.test_tiling import run_map

# (width, height, dtype, channels): each size one pixel type, every pixel type on an odd size
SIZES = [
    (300, 300, "uint8", 1),
    (477, 333, "uint16", 3),
    (612, 512, "uint16", 1),
    (1000, 750, "uint8", 3),
    (720, 540, "uint16", 3),  # 1440x1080 at half scale
]
CORE = 128


@dataclasses.dataclass
class Line:
    """One size's synthetic line, its ROI and the bundle fitted with it."""

    width: int
    height: int
    data: Path
    roi: np.ndarray  # uint8 [H, W], 255 = inspect
    bundle: Path
    meta: dict

    def test_images(self, kind: str) -> list[Path]:
        return sorted((self.data / "test" / kind).glob("*.png"))

    def defect_box(self, path: Path) -> list[int]:
        entry = next(i for i in self.meta["images"] if self.data / i["path"] == path)
        return entry["defects"][0]["bbox"]


def roi_mask(width: int, height: int, keep_clear: list[int]) -> np.ndarray:
    """Everything but a quarter-size corner rectangle, in the corner farthest from the box ``keep_clear``."""
    mask = np.full((height, width), 255, np.uint8)
    cx, cy = (keep_clear[0] + keep_clear[2]) / 2, (keep_clear[1] + keep_clear[3]) / 2
    ys = slice(0, height // 4) if cy > height / 2 else slice(height - height // 4, height)
    xs = slice(0, width // 4) if cx > width / 2 else slice(width - width // 4, width)
    mask[ys, xs] = 0
    return mask


def make_line(root: Path, width: int, height: int, dtype: str, channels: int) -> Line:
    bits = 16 if dtype == "uint16" else 8
    config = SynthConfig(
        width=width, height=height, bit_depth=bits, channels=channels, seed=5, train=8, test_good=2, per_kind=1
    )
    config = dataclasses.replace(config, kinds=("dot",), workers=1)
    meta = write_dataset(root / "data", config, progress=False)
    dot = next(i for i in meta["images"] if i["kind"] == "dot")
    roi = roi_mask(width, height, dot["defects"][0]["bbox"])
    cv2.imwrite(str(root / "roi.png"), roi)
    train = load_dataset(root / "data").train_good
    # colour lines also fit the shape scores (--shape-scores), so both graphs meet every odd size's grids
    config = FitConfig(core=CORE, folds=4, shape_scores=channels == 3)
    fit_template(train, root / "bundle", root / "roi.png", config, progress=False)
    return Line(width, height, root / "data", roi, root / "bundle", meta)


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}-c{s[3]}")
def line(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Line:
    width, height, dtype, channels = request.param
    return make_line(tmp_path_factory.mktemp(f"line{width}x{height}"), width, height, dtype, channels)


def test_bundle_geometry_grids_and_roi(line: Line) -> None:
    """The bundle describes the images; every coarser map follows cell_grid; the weight is the ROI minus the margin."""
    bundle = Bundle.load(line.bundle)
    first = read_image(next((line.data / "train" / "good").iterdir()))
    assert (bundle.geometry.height, bundle.geometry.width) == (line.height, line.width)
    assert bundle.geometry.channels == (1 if first.ndim == 2 else 3) and bundle.geometry.dtype == str(first.dtype)
    ref = bundle.reference()
    for level in LEVELS:
        assert ref[f"inv_sigma{level}"].shape[1:] == cell_grid(line.height, line.width, 2**level)
    scores = 3 if bundle.manifest["fit_config"]["shape_scores"] else 1  # fine (and blob and line)
    gains = (scores, *cell_grid(line.height, line.width, BLOCK))
    assert ref["fine_gain"].shape == ref["fine_ring_gain"].shape == gains
    margin = bundle.manifest["fit_config"]["margin_px"]
    inner = np.zeros_like(line.roi, bool)
    inner[margin:-margin, margin:-margin] = True
    np.testing.assert_array_equal(ref["weight"] > 0, (line.roi > 0) & inner)


def test_the_reference_frame_is_a_good_frame_of_the_sensor(line: Line) -> None:
    """The daemon warms its threads up with the bundle's mean part: a frame of the sensor's shape and type, in
    its units (16-bit for a 16-bit sensor), that registers and passes: it takes every step of a real frame."""
    with Inspector.load(line.bundle, "onnxruntime") as inspector:
        frame = inspector.reference_frame()
        result = inspector.inspect(frame)
    good = read_image(next((line.data / "train" / "good").iterdir()))
    assert frame.shape == good.shape and frame.dtype == good.dtype
    assert abs(float(frame.mean()) - float(good.mean())) < 0.1 * float(good.mean())  # the same units
    assert (result.verdict, result.reason) == ("pass", "ok")
    assert result.timings_ms["registration"] > 0 and result.anomaly_map.shape == (line.height, line.width)


def _frame_peak(result) -> tuple[int, int]:
    """Where the map peaks, in the frame's own pixels (x, y)."""
    y, x = np.unravel_index(int(np.argmax(result.anomaly_map)), result.anomaly_map.shape)
    return tuple(np.rint(result.pose_matrix @ np.array([x, y, 1.0])).astype(int))


def test_predict_locates_the_defect_and_inspects_only_the_roi(line: Line) -> None:
    """Good parts register and are scored; the dot's map peak lies on it; a blob outside the ROI changes
    nothing at all, the same blob inside it is rejected where it is."""
    with Inspector.load(line.bundle, "onnxruntime") as inspector:
        for path in line.test_images("good"):
            result = inspector.inspect_path(path)
            assert result.reason in ("ok", "defect") and np.isfinite(result.score), (path, result.detail)
            assert result.anomaly_map.shape == (line.height, line.width)
        (dot,) = line.test_images("dot")
        result = inspector.inspect_path(dot)
        x, y = _frame_peak(result)
        x0, y0, x1, y1 = line.defect_box(dot)
        assert x0 - 4 <= x < x1 + 4 and y0 - 4 <= y < y1 + 4, ((x, y), (x0, y0, x1, y1), result.score)
        good = read_image(line.test_images("good")[0])
        plain = inspector.inspect(good)
        bright = np.iinfo(good.dtype).max
        outside = np.argwhere(line.roi == 0)
        outside = (outside.min(axis=0) + outside.max(axis=0)) // 2  # the middle of the excluded corner
        inside = np.argwhere(cv2.erode(line.roi, np.ones((61, 61), np.uint8)) > 0)
        blobs = {}
        for name, (cy, cx) in (("outside", outside), ("inside", inside[len(inside) // 3])):
            image = good.copy()
            cv2.circle(image, (int(cx), int(cy)), 6, (bright,) * 3 if image.ndim == 3 else bright, -1)
            blobs[name] = (inspector.inspect(image), (int(cx), int(cy)))
    outside_result, _ = blobs["outside"]
    assert outside_result.score == plain.score and outside_result.verdict == plain.verdict
    inside_result, (cx, cy) = blobs["inside"]
    assert inside_result.verdict == "reject"
    boxes = [d.bbox for d in inside_result.defects]
    assert any(x0 - 2 <= cx < x1 + 2 and y0 - 2 <= cy < y1 + 2 for x0, y0, x1, y1 in boxes), (boxes, (cx, cy))


def test_tiled_map_equals_untiled_map(line: Line, tmp_path: Path) -> None:
    """The bundle's tiled map (the Inspector's own) equals one tile covering the whole frame, to 1e-4."""
    bundle = Bundle.load(line.bundle)
    image = read_image(line.test_images("dot")[0])
    with Inspector.load(line.bundle, "onnxruntime") as inspector:
        prepared = inspector.prepare(image)
        tiled = inspector.infer(prepared)
        registration, ref = inspector._registration, inspector._ref
        aligned = reg.align(image, registration)  # the one preparation (pose, lighting, field, occluders)
        pose, coef, frame = aligned.pose, aligned.coef, aligned.registered
    if bundle.geometry.dtype == "uint16":
        frame = frame.astype(np.float32) * np.float32(1 / 257)
    pairs = zip(ref["fine_gain"], ref["fine_ring_gain"], strict=True)  # one gain map per score
    gain = np.stack([frame_fine_gain(part, ring, pose.matrix) for part, ring in pairs])
    cal = bundle.calibration
    maps = {}
    for name, plan in (
        ("tiled", inspector.plan),
        ("untiled", TilePlan.covering(line.height, line.width, inspector.plan.halo, ALIGN)),
    ):
        spec = TemplateGraphSpec(
            bundle.geometry.channels,
            plan.core,
            input_dtype="float32" if bundle.geometry.dtype == "uint16" else "uint8",
            fine_scale=cal["fine_scale"],
            coarse_scale=cal["coarse_scale"],
            gains=len(gain),
            blob_scale=cal.get("blob_scale"),
            line_scale=cal.get("line_scale"),
        )
        onnx.save(build_template_graph(spec), tmp_path / f"{name}.onnx")
        with OnnxRuntimeBackend(tmp_path / f"{name}.onnx", threads=2) as backend:
            backend.activate(resident_inputs(plan, ref))
            maps[name] = run_map(backend, plan, frame, coef, gain, 4)
    assert inspector.plan.n_tiles > 4 and maps["tiled"].shape == (line.height, line.width)
    np.testing.assert_allclose(maps["tiled"], tiled, atol=1e-5)  # the helper is the Inspector's path
    np.testing.assert_allclose(maps["tiled"], maps["untiled"], atol=1e-4)
    assert float(maps["untiled"].max()) > 1, "the compared map holds the defect, not only noise"


def test_serve_decides_raw_and_tiff_frames_like_predict(line: Line, tmp_path: Path) -> None:
    """A real daemon on the bundle answers raw and TIFF frames of this size exactly as predict does,
    keeps each frame and its map in the audit trail and shows the latest reject on the status page."""
    from daemon.server import Server, load_engine
    from tests.test_daemon_support import Client, header, make_config

    paths = [*line.test_images("good"), *line.test_images("dot")]
    images = [read_image(p) for p in paths]
    with Inspector.load(line.bundle, "onnxruntime") as offline:
        expected = [offline.inspect(img) for img in images]
    # deadlines far away: the verdicts, not this machine's speed, are under test
    cfg = make_config(cycle_ms=600_000, queue_depth=8, audit_dir=str(tmp_path / "audit"), audit_pass_sample=1.0)
    cfg = dataclasses.replace(cfg, model=str(line.bundle), backend="onnxruntime")
    server = Server(cfg, loader=load_engine)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    assert server.ready.wait(60)
    try:
        with Client(server) as client:
            for i, img in enumerate(images):
                fields = dict(width=img.shape[1], height=img.shape[0], channels=1 if img.ndim == 2 else 3)
                fields["dtype"] = str(img.dtype)
                client.send(i, img, **fields)
                tiff = cv2.imencode(".tiff", img)[1].tobytes()
                client.send_parts(json.dumps(header(100 + i, encoding="tiff", **fields)).encode(), tiff)
                time.sleep(0.02)
            got = {d["frame_id"]: d for d in client.decisions(2 * len(images), timeout_s=30)}
        thumbnail = _wait_for_reject_thumbnail(server) if any(r.verdict == "reject" for r in expected) else None
        records = _wait_for_audit(tmp_path / "audit", 2 * len(images))
    finally:
        server.request_stop()
        thread.join(20)
    assert sorted(got) == [*range(len(images)), *range(100, 100 + len(images))]
    for i, want in enumerate(expected):
        for frame_id in (i, 100 + i):
            assert got[frame_id]["reason"] == want.reason, got[frame_id]
            assert got[frame_id]["score"] == pytest.approx(want.score, abs=1e-3)
    assert thumbnail is None or cv2.imdecode(np.frombuffer(thumbnail, np.uint8), cv2.IMREAD_COLOR) is not None
    for record in records:
        frame = read_image(record / "image.png")
        assert frame.shape == images[0].shape and frame.dtype == images[0].dtype
        assert read_image(record / "anomaly.png").shape == (line.height, line.width)


def _wait_for_audit(root: Path, count: int, timeout_s: float = 20) -> list[Path]:
    """The audit records (the audit sink writes on its own thread, after the decision is published)."""
    end = time.monotonic() + timeout_s
    while True:
        records = [p.parent for p in root.glob("*/anomaly.png") if not p.parent.name.startswith(".tmp-")]
        if len(records) >= count or time.monotonic() > end:
            assert len(records) == count, (len(records), count)
            return records
        time.sleep(0.05)


def _wait_for_reject_thumbnail(server, timeout_s: float = 20) -> bytes:
    """/reject.jpg from the status page (rendered on the status thread once a reject is published)."""
    import urllib.error
    import urllib.request

    end = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{server.endpoints['http']}/reject.jpg", timeout=5) as response:
                return response.read()
        except urllib.error.HTTPError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_ensemble_fit_at_an_odd_size(tmp_path: Path) -> None:
    """The ensemble (template + learned, few training steps) fits and predicts at 477x333 colour 16 bit."""
    pytest.importorskip("torch")
    from calibration.ensemble_fit import fit_ensemble
    from calibration.learned_fit import LearnConfig

    config = SynthConfig(width=477, height=333, bit_depth=16, channels=3, seed=5, train=8, test_good=1, per_kind=1)
    write_dataset(tmp_path / "data", dataclasses.replace(config, kinds=("dot",), workers=1), progress=False)
    # a few steps on small crops: the sizes are under test, not the network's skill
    learn = LearnConfig(steps=4, batch=2, patch=96, checkpoint_every=4, checkpoint=tmp_path / "nets.ckpt")
    train = load_dataset(tmp_path / "data").train_good
    config = FitConfig(core=256, folds=4, shape_scores=True)
    fit_ensemble(train, tmp_path / "model", config=config, learn=learn, progress=False)
    bundle = Bundle.load(tmp_path / "model")
    assert bundle.detector == "ensemble" and bundle.geometry.describe() == "477x333 colour uint16"
    assert bundle.reference()["fine_gain"].shape == (4, *cell_grid(333, 477, BLOCK))  # fine, blob, line; learned
    with Inspector.load(tmp_path / "model", "onnxruntime") as inspector:
        for path in sorted((tmp_path / "data" / "test").rglob("*.png")):
            result = inspector.inspect_path(path)
            assert result.reason in ("ok", "defect") and result.anomaly_map.shape == (333, 477), result.detail


# -- the commands, once, on an odd size ------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 700x500 colour 8-bit synthetic line (8 good images to fit)."""
    root = tmp_path_factory.mktemp("odd")
    config = SynthConfig(width=700, height=500, channels=3, seed=9, train=8, test_good=2, per_kind=1)
    write_dataset(root / "data", dataclasses.replace(config, kinds=("dot", "stain"), workers=1), progress=False)
    cv2.imwrite(str(root / "roi.png"), roi_mask(700, 500, [0, 0, 1, 1]))
    return root


def cli(*argv: object) -> int:
    return cli_main([str(a) for a in argv])


def test_commands_at_an_odd_size(odd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """fit (ROI), predict, calibrate, evaluate --downscale and build-engine (EMULATED TensorRT) at 700x500."""
    from tests.emulation import install

    data, model = odd / "data", odd / "model"
    assert cli("fit", data, "--out", model, "--roi", odd / "roi.png", "--core", 256, "--folds", 4) == 0
    assert cli("predict", model, data / "test", "--out", odd / "p.jsonl", "--backend", "onnxruntime") == 0
    records = [json.loads(line) for line in (odd / "p.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["defects"] == [] for r in records if "/good/" in r["image"])
    assert cli("calibrate", model, "--good", data / "test" / "good", "--backend", "onnxruntime") == 0
    report = odd / "report"
    assert cli("evaluate", model, data, "--report", report, "--downscale", 400, "--backend", "onnxruntime") == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["baseline"]["downscale"] == 400 and summary["pixel"]["auroc"] is not None
    install(monkeypatch, major=10)
    assert cli("build-engine", model, "--out", odd / "engine.plan", "--max-batch", 2, "--workspace-mb", 64) == 0
    assert (odd / "engine.plan").stat().st_size > 0
    capsys.readouterr()


def test_below_the_minimum_side_is_a_one_line_error(odd: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Images shorter than MIN_SIDE on a side, and --downscale that would shrink below it, exit 2 with one line."""
    small = tmp_path / "small" / "train" / "good"
    small.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(small / f"{i}.png"), rng.integers(0, 256, (MIN_SIDE - 1, 400), dtype=np.uint8))
    capsys.readouterr()
    assert cli("fit", tmp_path / "small", "--out", tmp_path / "model") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"expected at least {MIN_SIDE} px on each side" in err[0] and "400x127" in err[0]
    assert not (tmp_path / "model").exists()
    report = tmp_path / "report"
    assert cli("evaluate", odd / "model", odd / "data", "--report", report, "--downscale", 150) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--downscale 150" in err[0] and "150x107" in err[0] and "at least 180" in err[0]
    assert not report.exists()


def test_benchmark_scripts_take_any_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """predict_speed.py and daemon_latency.py synthesise, fit and measure a 333x200 line (no timings checked)."""
    speed = load_benchmark("predict_speed")
    assert speed.main(["--width", "333", "--height", "200", "--runs", "1", "--limit", "2"]) == 0
    assert "predict on 333x200 mono uint8" in capsys.readouterr().out
    latency = load_benchmark("daemon_latency")
    argv = ["--width", "333", "--height", "200", "--workdir", tmp_path, "--backend", "onnxruntime"]
    argv += ["--bare", "2", "--frames", "3", "--soak", "6"]
    assert latency.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "333x200 uint8" in out and "soak verdict" in out


@pytest.mark.slow
def test_sensor_size_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/sensor_sizes.py: 30 good images fitted, predicted at 1440x1080 ... 5472x3648 (no timing checked)."""
    assert load_benchmark("sensor_sizes").main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for size in ("1440x1080", "2448x2048", "4096x3000", "5472x3648"):
        assert f"{size}: " in out and f"{size}: good:reject" not in out
