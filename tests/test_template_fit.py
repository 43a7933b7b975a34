"""Template fit on a tiny synthetic dataset: the bundle loads, goods pass, defects are found where they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import calibration.fit_pipeline as fp
from calibration import parallel
from calibration.datasets import Dataset, load_dataset
from calibration.fit_pipeline import MIN_GOOD, FitConfig, inspection_region
from calibration.template_fit import fit_template
from engines.bundle import Bundle
from engines.decode import read_image
from engines.errors import ImageError, UserError
from engines.graphs import ALIGN, HALO, LEVELS
from engines.inspector import Inspector
from engines.tiling import cell_grid
from engines.types import Geometry
from tests.helpers import convert_dataset, emulated_trt_vs_fp32, fp16_vs_fp32, load_benchmark, make_dataset, write_png

SIZE = 384


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The tiny MVTec-layout dataset (10 train goods, 4 test goods, 3 dots, 3 stains)."""
    return load_dataset(make_dataset(tmp_path_factory.mktemp("data") / "part", size=SIZE))


@pytest.fixture(scope="module")
def bundle_dir(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle fitted once for the module."""
    return fit_template(dataset.train_good, tmp_path_factory.mktemp("models") / "model", progress=False)


@pytest.fixture(scope="module")
def results(bundle_dir: Path, dataset: Dataset) -> dict:
    """Inspection results of every test image (ONNX Runtime, FP32 graph)."""
    with Inspector.load(bundle_dir, "onnxruntime") as inspector:
        return {s.path: inspector.inspect_path(s.path) for s in dataset.test}


def test_bundle_loads_with_the_fitted_geometry_and_calibration(bundle_dir, dataset):
    """The bundle verifies, describes the images it was fitted on and carries a sane calibration."""
    bundle = Bundle.load(bundle_dir)
    assert bundle.geometry == Geometry(SIZE, SIZE, 1, "uint8")
    assert bundle.manifest["tiling"] == {"core": SIZE, "halo": HALO, "align": ALIGN, "levels": list(LEVELS)}
    assert bundle.manifest["training"]["n_images"] == len(dataset.train_good)
    cal = bundle.calibration
    assert len(cal["good_scores"]) == len(dataset.train_good), "every good image is scored once, held out"
    assert cal["threshold"] >= max(cal["good_scores"]) * 1.1 - 1e-4
    assert cal["fine_scale"] > 0 and cal["coarse_scale"] > 0


def test_reference_statistics_are_consistent(bundle_dir):
    """reference.npz holds mean, band (lo <= mu <= hi), region weight and per-level spreads of the right shapes."""
    ref = Bundle.load(bundle_dir).reference()
    mu, lo, hi, weight = (ref[k].astype(np.float32) for k in ("mu", "lo", "hi", "weight"))
    assert mu.shape == lo.shape == hi.shape == (1, SIZE, SIZE) and weight.shape == (SIZE, SIZE)
    assert (lo <= mu).all() and (mu <= hi).all()
    assert weight[0].sum() == 0 and weight[:, -1].sum() == 0 and weight[SIZE // 2, SIZE // 2] == 1
    for level in LEVELS:
        inv = ref[f"inv_sigma{level}"]
        assert inv.shape == (1, *cell_grid(SIZE, SIZE, 2**level))
        assert np.isfinite(inv.astype(np.float32)).all() and (inv >= 0).all()


def test_goods_pass_and_defects_are_rejected_where_they_are(results, dataset):
    """Every good test image passes; every defect image is rejected with a box overlapping its ground truth."""
    for sample in dataset.test:
        result = results[sample.path]
        if sample.is_good:
            assert (result.verdict, result.reason, result.defects) == ("pass", "ok", []), sample.path
            assert result.score <= result.threshold
            continue
        assert (result.verdict, result.reason) == ("reject", "defect"), sample.path
        mask = read_image(sample.mask) > 0
        top = result.defects[0]
        x0, y0, x1, y1 = top.bbox
        assert mask[y0:y1, x0:x1].any(), f"{sample.path}: strongest box {top.bbox} misses the defect"
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.mean() < x1 and y0 <= ys.mean() < y1, "the box contains the defect's centre"
        assert (x1 - x0) * (y1 - y0) < 40 * mask.sum(), "the box is local, not the whole part"


def test_fp16_graph_of_the_bundle_agrees_with_fp32(bundle_dir, dataset):
    """On real frames, the bundle's FP16 graph gives the FP32 map within 1e-2 relative to max(|map|, 1)."""
    worst = fp16_vs_fp32(bundle_dir, [dataset.test[0].path, dataset.test[-1].path])
    print(f"bundle FP16 vs FP32: max relative error {worst:.2e}")
    assert worst <= 1e-2


def test_colour_frames_are_converted_for_a_mono_model(bundle_dir, dataset):
    """A BGR copy of a good image is inspected like the mono original."""
    good = read_image(dataset.test_good[0].path)
    with Inspector.load(bundle_dir, "onnxruntime") as inspector:
        mono = inspector.inspect(good)
        colour = inspector.inspect(cv2.cvtColor(good, cv2.COLOR_GRAY2BGR))
    assert colour.verdict == mono.verdict == "pass"
    assert colour.score == pytest.approx(mono.score, abs=1e-3)


@pytest.mark.parametrize("kind", ["noise", "blank", "black"])
def test_unregistrable_frames_become_registration_rejects(bundle_dir, kind):
    """Noise, a blank grey frame or a black frame are rejected for registration, with no score, never a crash."""
    rng = np.random.default_rng(0)
    frame = {
        "noise": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
        "blank": np.full((SIZE, SIZE), 128, np.uint8),
        "black": np.zeros((SIZE, SIZE), np.uint8),
    }[kind]
    with Inspector.load(bundle_dir, "onnxruntime") as inspector:
        result = inspector.inspect(frame)
    assert (result.verdict, result.reason) == ("reject", "registration")
    assert result.to_dict()["score"] is None and result.detail


def test_wrong_size_frame_is_a_bad_frame_reject(bundle_dir):
    """A frame of another size becomes a "bad_frame" reject naming the expected geometry."""
    with Inspector.load(bundle_dir, "onnxruntime") as inspector:
        result = inspector.inspect(np.zeros((SIZE, SIZE + 8), np.uint8), "cam0")
    assert (result.verdict, result.reason) == ("reject", "bad_frame")
    assert "expected 384x384 mono uint8" in result.detail


@pytest.mark.parametrize(
    ("layout", "geometry"), [("colour", (320, 320, 3, "uint8")), ("mono16", (320, 320, 1, "uint16"))]
)
def test_colour_and_16_bit_datasets(tmp_path, layout, geometry):
    """Colour and 16-bit datasets (MIN_GOOD images) fit the float32/colour graph paths; goods pass, defects fail."""
    mono = make_dataset(tmp_path / "mono", size=320, n_train=MIN_GOOD, n_good=2, n_per_kind=1, seed=3)
    ds = load_dataset(convert_dataset(mono, tmp_path / layout, layout))
    bundle = fit_template(ds.train_good, tmp_path / "model", progress=False)
    assert Bundle.load(bundle).geometry == Geometry(*geometry)
    with Inspector.load(bundle, "onnxruntime") as inspector:
        for sample in ds.test:
            result = inspector.inspect_path(sample.path)
            assert result.verdict == ("pass" if sample.is_good else "reject"), (sample.path, result.score)
            if not sample.is_good:
                x0, y0, x1, y1 = result.defects[0].bbox
                assert (read_image(sample.mask)[y0:y1, x0:x1] > 0).any()


def small_copy(dataset: Dataset, root: Path, n: int) -> list[Path]:
    """Copies of the first ``n`` training images under ``root``."""
    root.mkdir(parents=True)
    return [Path(shutil.copy(p, root / p.name)) for p in dataset.train_good[:n]]


def test_too_few_good_images(dataset, tmp_path):
    """Fewer than MIN_GOOD images is a UserError naming the folder and the minimum; no bundle appears."""
    images = small_copy(dataset, tmp_path / "few", MIN_GOOD - 1)
    with pytest.raises(UserError, match=f"at least {MIN_GOOD}") as info:
        fit_template(images, tmp_path / "model", progress=False)
    assert str(tmp_path / "few") in str(info.value)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("folds", [1, 0])
def test_fewer_than_two_folds_is_refused(dataset, tmp_path, folds):
    """A k-fold calibration with k < 2 has no held-out images: a UserError naming --folds; no bundle appears."""
    images = small_copy(dataset, tmp_path / "imgs", MIN_GOOD)
    with pytest.raises(UserError, match=f"--folds {folds}: expected at least 2"):
        fit_template(images, tmp_path / "model", config=FitConfig(folds=folds), progress=False)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("position", [0, 5])
def test_corrupt_image_names_the_file(dataset, tmp_path, position):
    """A truncated image (first or later) is an ImageError naming it; no bundle or temp dir appears."""
    images = small_copy(dataset, tmp_path / "imgs", MIN_GOOD + 1)
    data = images[position].read_bytes()
    images[position].write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError) as info:
        fit_template(images, tmp_path / "out" / "model", progress=False)
    assert str(images[position]) in str(info.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_image_of_another_size_names_the_file(dataset, tmp_path):
    """An image whose size differs from the first is a UserError naming it and the expected size."""
    images = small_copy(dataset, tmp_path / "imgs", MIN_GOOD + 1)
    write_png(images[4], cv2.resize(read_image(images[4]), (SIZE - 32, SIZE)))
    with pytest.raises(UserError, match="expected 384x384") as info:
        fit_template(images, tmp_path / "model", progress=False)
    assert str(images[4]) in str(info.value)
    assert not (tmp_path / "model").exists()


def test_roi_mask_of_the_wrong_size(tmp_path):
    """An ROI mask whose size differs from the images is a UserError naming the mask."""
    roi = write_png(tmp_path / "roi.png", np.full((100, 120), 255, np.uint8))
    with pytest.raises(UserError, match="expected 384x384") as info:
        inspection_region(Geometry(SIZE, SIZE, 1, "uint8"), roi, 4)
    assert str(roi) in str(info.value)


def test_roi_mask_restricts_the_region(tmp_path):
    """The inspection region is the ROI's non-zero pixels minus the border margin."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[100:200, 50:300] = 255
    weight = inspection_region(Geometry(SIZE, SIZE, 1, "uint8"), write_png(tmp_path / "roi.png", mask), 6)
    np.testing.assert_array_equal(weight, (mask > 0).astype(np.uint8))
    full = inspection_region(Geometry(SIZE, SIZE, 1, "uint8"), None, 6)
    assert full[:6].sum() == full[:, -6:].sum() == 0 and full[6:-6, 6:-6].all()


def test_core_must_be_aligned(dataset, tmp_path):
    """A tile core that is not a multiple of the coarsest block is refused before any work."""
    with pytest.raises(UserError, match=f"multiple of {ALIGN}"):
        fit_template(dataset.train_good, tmp_path / "model", config=FitConfig(core=100), progress=False)


def test_the_map_and_the_verdicts_do_not_depend_on_the_tile_core(bundle_dir, dataset, results, tmp_path):
    """The tile core is a speed knob (TEMPLATE_CORE): the same line fitted with 128 px cores (nine tiles against
    the module bundle's one) gives the same statistics, threshold, verdicts and defects, and maps within 1e-3."""
    small = fit_template(dataset.train_good, tmp_path / "model", config=FitConfig(core=128), progress=False)
    one, nine = Bundle.load(bundle_dir), Bundle.load(small)
    assert (one.manifest["tiling"]["core"], nine.manifest["tiling"]["core"]) == (SIZE, 128)
    assert nine.calibration["threshold"] == pytest.approx(one.calibration["threshold"], rel=1e-4)
    for key in ("mu", "lo", "hi", "weight"):
        assert np.array_equal(one.reference()[key], nine.reference()[key]), key
    with Inspector.load(small, "onnxruntime") as inspector:
        assert inspector.plan.n_tiles == 9
        for sample in dataset.test:
            before, after = results[sample.path], inspector.inspect_path(sample.path)
            assert (after.verdict, after.reason) == (before.verdict, before.reason), sample.path
            assert [d.bbox for d in after.defects] == [d.bbox for d in before.defects], sample.path
            assert np.abs(after.anomaly_map - before.anomaly_map).max() <= 1e-3, sample.path


def _training_of(frames: np.ndarray) -> fp.Training:
    """A _Training over already registered mono frames with an identity lighting model."""
    n, h, w = frames.shape
    weight = np.ones((h, w), np.uint8)
    coefs = np.tile(np.eye(1, fp.reg.PHOTO_TERMS, dtype=np.float32), (n, 1))
    pyramids = [fp.block_means(f[None].astype(np.float32)) for f in frames]
    poses = np.tile(np.eye(2, 3), (n, 1, 1))
    return fp.Training(Geometry(h, w, 1, "uint8"), 1.0, weight, frames, coefs, poses, pyramids)


@pytest.mark.parametrize("trim, widened", [(0, True), (1, False)])
def test_one_images_debris_does_not_widen_the_band_when_trimmed(trim, widened):
    """Debris carried by a single good image widens the band only without trimming; trimmed, it is left out."""
    rng = np.random.default_rng(5)
    frames = np.clip(100 + rng.normal(0, 2, (fp.TRIM_FROM, 64, 64)), 0, 255).astype(np.uint8)
    frames[3, 20:26, 20:26] = 250
    stats = fp.statistics(_training_of(frames), range(len(frames)), FitConfig(band_trim=trim))
    hi = stats["hi"].astype(np.float32)[0]
    assert bool(hi[20:26, 20:26].max() >= 250) is widened
    assert abs(float(stats["mu"].astype(np.float32)[0, 22, 22]) - 100) < (20 if widened else 3)


def test_running_extremes_match_a_sort():
    """The per-pixel running extremes hold the k lowest and k highest values, in order."""
    values = np.random.default_rng(1).normal(size=(9, 5, 5)).astype(np.float32)
    lows = [np.full((5, 5), np.inf, np.float32) for _ in range(2)]
    highs = [np.full((5, 5), -np.inf, np.float32) for _ in range(2)]
    for v in values:
        fp._keep_extremes(lows, v, np.minimum, np.maximum)
        fp._keep_extremes(highs, v, np.maximum, np.minimum)
    ordered = np.sort(values, axis=0)
    np.testing.assert_array_equal(np.stack(lows), ordered[:2])
    np.testing.assert_array_equal(np.stack(highs), ordered[::-1][:2])


def test_too_few_images_to_trim_is_a_clear_error():
    """Trimming that would leave fewer than two values per pixel is refused with a message."""
    frames = np.full((3, 32, 32), 100, np.uint8)
    with pytest.raises(UserError, match="trimming"):
        fp.statistics(_training_of(frames), range(3), FitConfig(band_trim=1))


def test_trimming_starts_at_enough_images():
    """By default a few images are used whole; from TRIM_FROM images on, each pixel's extremes are dropped."""
    frames = np.full((fp.TRIM_FROM, 32, 32), 100, np.uint8)
    frames[0, 5, 5] = 200
    few = fp.statistics(_training_of(frames), range(fp.TRIM_FROM - 1), FitConfig())
    enough = fp.statistics(_training_of(frames), range(fp.TRIM_FROM), FitConfig())
    assert float(few["hi"][0, 5, 5]) >= 200 > float(enough["hi"][0, 5, 5])


def test_emulated_tensorrt_engine_agrees_with_fp32(bundle_dir, dataset, monkeypatch, tmp_path):
    """The FP16 graph as an EMULATED TensorRT 10/11 plan gives the FP32 map within 1e-2 and the same verdicts."""
    from tests.emulation import install

    samples = [s.path for s in dataset.test]
    for major in (10, 11):
        install(monkeypatch, major=major)
        worst, same = emulated_trt_vs_fp32(bundle_dir, samples, tmp_path / f"trt{major}.plan")
        assert worst <= 1e-2 and same, (major, worst)


def test_gpu_benchmark_runs_a_fitted_bundle_on_emulated_tensorrt(bundle_dir, monkeypatch, capsys):
    """`benchmarks/gpu.py --bundle` feeds the bundle's graphs as the Inspector does (EMULATED TensorRT; no speed)."""
    from tests.emulation import install

    install(monkeypatch, major=10)
    module = load_benchmark("gpu", "gpu_benchmark")
    assert module.main(["--bundle", str(bundle_dir), "--batches", "1", "--frames", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert "not available" not in rows["tensorrt"] and "not available" not in rows["onnxruntime-cpu"], lines


def test_graph_reading_other_gain_maps_than_the_bundle_has_is_refused(bundle_dir, tmp_path):
    """An Inspector refuses a graph that reads two gain maps (an ensemble's) with a one-detector bundle."""
    import onnx

    from engines.bundle import Bundle
    from engines.errors import BundleError
    from engines.graphs import TemplateGraphSpec, build_template_graph
    from engines.onnxruntime_backend import OnnxRuntimeBackend

    bundle = Bundle.load(bundle_dir)
    graph = tmp_path / "two_gains.onnx"
    onnx.save(build_template_graph(TemplateGraphSpec(1, bundle.manifest["tiling"]["core"], gains=2)), graph)
    with pytest.raises(BundleError, match="reads 2 gain maps, the bundle has 1"):
        Inspector(bundle, OnnxRuntimeBackend(graph))


def test_fit_registers_every_good_image_of_a_line_with_large_poses_bends_and_a_moving_fixture(tmp_path):
    """A line with ±1.5 deg, ±24 px, a bend, strong lighting and one fixture bar on a random side per image:
    every good image registers, and the poses found agree with the generator's (relative to image 0) within
    1.5 px at the corners (a bend of 0.8 px per grid node has a rigid part of its own, different per image)."""
    from calibration.synth import SynthConfig, _pose_matrix, write_dataset

    config = SynthConfig(
        size=1024, seed=5, train=10, test_good=0, per_kind=0, max_shift_px=16, max_rotation_deg=1.5, bend_px=0.8,
        light=2.5, fixture="random", fixture_depth=(0.25, 0.55), band_vignette=(0.12, 0.3), band_blur_px=(1.2, 2.2),
        workers=1,
    )  # fmt: skip
    meta = write_dataset(tmp_path / "line", config, progress=False)
    images = sorted((tmp_path / "line" / "train" / "good").iterdir())
    training, _, _ = fp.prepare_training(images, None, FitConfig(), tmp_path, False, "template")
    truth = [_pose_matrix(entry["pose"]) for entry in meta["images"]]

    def relative(m: np.ndarray, m0: np.ndarray) -> np.ndarray:
        return (np.vstack([m, [0, 0, 1]]) @ np.linalg.inv(np.vstack([m0, [0, 0, 1]])))[:2]

    corners = np.array([[0, 0, 1], [1023, 0, 1], [0, 1023, 1], [1023, 1023, 1]], float)
    for i in range(1, len(images)):
        found, want = relative(training.poses[i], training.poses[0]), relative(truth[i], truth[0])
        assert np.abs(corners @ found.T - corners @ want.T).max() < 1.5, images[i].name


@pytest.fixture(scope="module")
def nonrigid_dir(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle fitted with the smooth displacement field after the pose."""
    out = tmp_path_factory.mktemp("models") / "nonrigid"
    return fit_template(dataset.train_good, out, config=FitConfig(alignment="nonrigid"), progress=False)


@pytest.mark.parametrize("model", ["bundle_dir", "nonrigid_dir"])
def test_prepare_resamples_straight_into_the_padded_frame(model, request, dataset):
    """The frame is resampled into the padded frame's interior and the border replicated in place (rigid and through
    the field): the same padded frame as resampling into a frame of its own and padding a copy of it."""
    from engines import registration as reg

    with Inspector.load(request.getfixturevalue(model), "onnxruntime") as inspector:
        for sample in dataset.test[:4]:
            image = read_image(sample.path)
            expected = inspector.plan.pad(reg.align(image, inspector._registration).registered)
            assert np.array_equal(inspector.prepare(image).padded, expected)


def test_nonrigid_bundle_records_the_field_and_still_finds_every_defect(nonrigid_dir, bundle_dir, dataset):
    """--alignment nonrigid: the manifest records the field's parameters, the reference its level image;
    every defect is still rejected, scoring at least half what it scores aligned rigidly (the field
    does not explain defects away)."""
    from engines import nonrigid

    bundle = Bundle.load(nonrigid_dir)
    field = bundle.manifest["registration"]["field"]
    assert {k: v for k, v in field.items() if k != "factor"} == nonrigid.parameters()
    assert bundle.manifest["fit_config"]["alignment"] == "nonrigid"
    assert "reg_field" in bundle.reference()
    with Inspector.load(nonrigid_dir, "onnxruntime") as bent, Inspector.load(bundle_dir, "onnxruntime") as rigid:
        for sample in (s for s in dataset.test if not s.is_good):
            result, baseline = bent.inspect_path(sample.path), rigid.inspect_path(sample.path)
            assert result.verdict == "reject" and result.score >= 0.5 * baseline.score, sample.path
            assert "bend_px" in bent.prepare(read_image(sample.path)).pose.to_dict()


def test_rigid_bundles_have_no_field(bundle_dir):
    """The default fit (and every bundle from before the option) aligns rigidly: no field in the manifest."""
    assert "field" not in Bundle.load(bundle_dir).manifest["registration"]


def test_a_bundle_with_other_field_parameters_is_refused(nonrigid_dir):
    """A bundle whose field was estimated with other constants is refused with a message to refit."""
    from dataclasses import replace

    from engines.errors import BundleError
    from engines.inspector import registration_reference

    bundle = Bundle.load(nonrigid_dir)
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["registration"]["field"]["nodes"] += 1
    with pytest.raises(BundleError, match="refit"):
        registration_reference(replace(bundle, manifest=manifest), bundle.reference())


def test_a_bundle_keeps_the_ridge_it_was_fitted_with(nonrigid_dir):
    """New fits record the field's ridge; a bundle fitted before it was raised (1e-3) loads and runs with its own."""
    from dataclasses import replace

    from engines import nonrigid
    from engines.inspector import registration_reference

    bundle = Bundle.load(nonrigid_dir)
    assert registration_reference(bundle, bundle.reference()).field.ridge == nonrigid.RIDGE
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["registration"]["field"]["ridge"] = 1e-3
    assert registration_reference(replace(bundle, manifest=manifest), bundle.reference()).field.ridge == 1e-3


def test_a_bundle_fitted_before_shared_levels_and_coupled_steps_runs_as_it_did(nonrigid_dir):
    """New fits record that the registration's levels come from the field's and that the field's steps are coupled
    (two of them); a bundle without those records keeps reading each level from the frame and solving x and y apart,
    in the steps it records (its statistics were computed so)."""
    from dataclasses import replace

    from engines import nonrigid
    from engines.inspector import registration_reference

    bundle = Bundle.load(nonrigid_dir)
    recorded = bundle.manifest["registration"]["field"]
    steps = nonrigid.steps_for(recorded["factor"])
    assert recorded["shared_levels"] is True and recorded["coupled"] is True and recorded["steps"] == steps
    field = registration_reference(bundle, bundle.reference()).field
    assert field.shared_levels and field.coupled and field.steps == steps
    manifest = json.loads(json.dumps(bundle.manifest))
    del manifest["registration"]["field"]["shared_levels"], manifest["registration"]["field"]["coupled"]
    manifest["registration"]["field"]["steps"] = 3
    field = registration_reference(replace(bundle, manifest=manifest), bundle.reference()).field
    assert not field.shared_levels and not field.coupled and field.steps == 3


def test_a_bundle_keeps_the_steps_it_recorded_whatever_a_new_fit_would_take(nonrigid_dir, monkeypatch):
    """A bundle runs the field's steps its manifest records (two, for every bundle fitted before ``steps_for``), not
    the steps a new fit on its level would take now: with new fits taking one step at every level, it still takes
    its two."""
    from engines import nonrigid
    from engines.inspector import registration_reference

    bundle = Bundle.load(nonrigid_dir)
    assert bundle.manifest["registration"]["field"]["steps"] == 2
    monkeypatch.setattr(nonrigid, "ONE_STEP_FACTOR", 1)
    assert nonrigid.steps_for(bundle.manifest["registration"]["field"]["factor"]) == 1
    assert registration_reference(bundle, bundle.reference()).field.steps == 2


def test_a_bundle_fitted_before_smoothing_first_runs_as_it_did(nonrigid_dir):
    """New fits record that the field's level is smoothed once, before the steps resample it, and how many steps run on
    the level twice as coarse (none by default); a bundle without those records smooths each step's resampled level
    and runs every step on the field's level (its statistics were computed so), one with them runs as recorded."""
    from dataclasses import replace

    from engines import nonrigid
    from engines.inspector import registration_reference

    bundle = Bundle.load(nonrigid_dir)
    recorded = bundle.manifest["registration"]["field"]
    assert recorded["smooth_first"] is True and recorded["coarse_steps"] == nonrigid.COARSE_STEPS == 0
    field = registration_reference(bundle, bundle.reference()).field
    assert field.smooth_first and field.coarse_steps == 0 and field._coarse is None
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["registration"]["field"]["coarse_steps"] = 1
    field = registration_reference(replace(bundle, manifest=manifest), bundle.reference()).field
    assert field.coarse_steps == 1 and field._coarse is not None
    del manifest["registration"]["field"]["smooth_first"], manifest["registration"]["field"]["coarse_steps"]
    field = registration_reference(replace(bundle, manifest=manifest), bundle.reference()).field
    assert not field.smooth_first and field.coarse_steps == 0 and field._coarse is None


def test_a_sensor_mask_leaves_what_it_covers_out_of_every_frame(dataset, bundle_dir, tmp_path):
    """--sensor-mask: a dot under the (sensor-frame) mask no longer rejects its frame; elsewhere it still would.

    The control: the same dot is rejected by the bundle fitted without the mask.
    """
    dot = next(s for s in dataset.test if s.kind == "dot")
    covered = cv2.dilate((read_image(dot.mask) > 0).astype(np.uint8) * 255, np.ones((15, 15), np.uint8))
    mask_path = write_png(tmp_path / "sensor.png", covered)
    out = fit_template(
        dataset.train_good, tmp_path / "masked", config=FitConfig(sensor_mask=str(mask_path)), progress=False
    )
    assert Bundle.load(out).manifest["registration"]["sensor"]["user_mask"] is True
    with Inspector.load(out, "onnxruntime") as masked, Inspector.load(bundle_dir, "onnxruntime") as plain:
        assert plain.inspect_path(dot.path).verdict == "reject"
        assert masked.inspect_path(dot.path).verdict == "pass"
        other = next(s for s in dataset.test if s.kind == "dot" and s.path != dot.path)
        assert masked.inspect_path(other.path).verdict == "reject"


def test_a_sensor_mask_of_the_wrong_size_is_a_one_line_error(dataset, tmp_path):
    mask_path = write_png(tmp_path / "small.png", np.full((10, 12), 255, np.uint8))
    with pytest.raises(UserError) as info:
        fit_template(dataset.train_good, tmp_path / "m", config=FitConfig(sensor_mask=str(mask_path)), progress=False)
    assert "12x10" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("fixture", [True, False])
def test_occluders_are_learned_only_where_good_images_show_them(tmp_path, fixture):
    """A line with a fixture bar on a random side learns an occluder depth between the deepest bar and the band;
    a line without a border band (no bar) learns none, and its bundle leaves nothing out."""
    from calibration.synth import SynthConfig, write_dataset

    band = 0.04 if fixture else 0.0
    config = SynthConfig(
        size=512, seed=9, train=8, test_good=0, per_kind=0, fixture="random", fixture_depth=(0.25, 0.55),
        border_band=band, workers=1,
    )  # fmt: skip
    meta = write_dataset(tmp_path / "line", config, progress=False)
    images = sorted((tmp_path / "line" / "train" / "good").iterdir())
    _, reference, _ = fp.prepare_training(images, None, FitConfig(), tmp_path, False, "template")
    if not fixture:
        assert reference.sensor is None
        return
    deepest = max(bar["depth_px"] + abs(bar["tilt_px"]) for image in meta["images"] for bar in image["fixture"])
    assert deepest <= reference.sensor.max_depth <= meta["band_px"] * 1.25


@pytest.mark.parametrize("alignment", ["nonrigid", "rigid"])
def test_a_nonrigid_fit_learns_the_clutter_band_its_field_does_not_measure(tmp_path, alignment):
    """The field's fit learns per edge how deep the good images show what the part does not explain (clutter,
    fixture bars and their blurred edges, all within synth's border band): more than nothing and not beyond the
    band, plus a fine pixel; a rigid fit, which has no field, learns none."""
    from calibration.synth import SynthConfig, write_dataset

    config = SynthConfig(size=512, seed=9, train=8, test_good=0, per_kind=0, bend_px=0.8, workers=1)
    meta = write_dataset(tmp_path / "line", config, progress=False)
    images = sorted((tmp_path / "line" / "train" / "good").iterdir())
    _, reference, _ = fp.prepare_training(images, None, FitConfig(alignment=alignment), tmp_path, False, "template")
    if alignment == "rigid":
        assert reference.sensor is None or reference.sensor.clutter_depth == (0.0, 0.0, 0.0, 0.0)
        return
    reach = meta["band_px"] + reference.factors[1]
    assert all(0 < depth <= reach for depth in reference.sensor.clutter_depth), reference.sensor.clutter_depth


def test_a_bundle_from_before_the_clutter_band_measures_the_whole_band(tmp_path):
    """Bundles record the learned clutter band with the sensor model; one without the record (fitted before it)
    loads with none, so its field measures where it did when its statistics were computed."""
    from engines import sensor
    from engines.inspector import _sensor_model

    mu = np.zeros((1, 8, 8), np.float16)
    cfg = {"sensor": {"max_depth_px": 3.0, "user_mask": False, **sensor.parameters()}}
    assert _sensor_model(None, cfg, {"mu": mu}, (8, 8)).clutter_depth == (0.0, 0.0, 0.0, 0.0)
    cfg["sensor"]["clutter_depth_px"] = [4.0, 0.0, 8.0, 12.0]
    assert _sensor_model(None, cfg, {"mu": mu}, (8, 8)).clutter_depth == (4.0, 0.0, 8.0, 12.0)


@pytest.mark.parametrize(("bend", "chosen"), [(0.8, "nonrigid"), (0.0, "rigid")])
def test_auto_alignment_follows_whether_the_good_images_bend(tmp_path, bend, chosen):
    """--alignment auto (the default) measures the good images' bends: bent parts get the field, rigid ones not."""
    from calibration.synth import SynthConfig, write_dataset

    config = SynthConfig(size=512, seed=4, train=8, test_good=0, per_kind=0, bend_px=bend, workers=1)
    write_dataset(tmp_path / "line", config, progress=False)
    images = sorted((tmp_path / "line" / "train" / "good").iterdir())
    _, reference, resolved = fp.prepare_training(images, None, FitConfig(), tmp_path, False, "template")
    print(f"bend {bend}: {resolved.measured_bend_px} px, gain {resolved.measured_field_gain}: {resolved.alignment}")
    assert resolved.alignment == chosen and (reference.field is not None) == (chosen == "nonrigid")
    assert (resolved.measured_field_gain > fp.FIELD_GAIN_MIN) == (chosen == "nonrigid")


def test_auto_alignment_keeps_a_part_that_does_not_bend_rigid(tmp_path):
    """A field fitted to noise removes some of the residual of the blocks it was fitted to, nothing of the blocks
    between them: ``--alignment auto`` decides on the latter. These 256 px parts do not bend, yet the field removed
    more than FIELD_GAIN_MIN of their residual in sample and the fit went non-rigid (held-back easy seed 9006 alike,
    at 0.023: its field then bent the border band's marker dots 3-4.5 px off on 5 of 200 good parts)."""
    from tests.helpers import make_dataset

    root = make_dataset(tmp_path / "ds", size=256, n_train=12, n_good=0, kinds=())
    images = sorted((root / "train" / "good").iterdir())
    _, reference, resolved = fp.prepare_training(images, None, FitConfig(), tmp_path, False, "template")
    print(f"in sample {resolved.measured_field_gain_in_sample}, held out {resolved.measured_field_gain}")
    assert resolved.measured_field_gain_in_sample > fp.FIELD_GAIN_MIN  # the measure before would choose the field
    assert resolved.alignment == "rigid" and reference.field is None
    assert resolved.field_gain_measure == fp.FIELD_GAIN_MEASURE and resolved.measured_field_gain < fp.FIELD_GAIN_MIN


def test_bundles_from_before_keep_their_registration(bundle_dir):
    """A manifest without the pose search, the field and the sensor model (older bundles) registers as before:
    ECC from the identity, rigid, nothing left out."""
    from dataclasses import replace

    from engines.inspector import registration_reference

    bundle = Bundle.load(bundle_dir)
    manifest = json.loads(json.dumps(bundle.manifest))
    for key in ("search", "field", "sensor"):
        manifest["registration"].pop(key, None)
    old = registration_reference(replace(bundle, manifest=manifest), bundle.reference())
    assert old.search is None and old.field is None and old.sensor is None
    assert registration_reference(bundle, bundle.reference()).search is not None


def test_shape_scores_are_fitted_when_asked_or_when_the_self_test_finds_they_pay(dataset, bundle_dir, tmp_path):
    """`fit` (--shape-scores auto) on a line without benign marks keeps the fine and coarse scores only (one gain
    map, no shape scales: the graph of bundles before them, at its speed), and says why; `inspectd fit
    --shape-scores` adds the blob and line scores, each with its gain map and scale, and still passes the goods and
    rejects the defects; `--shape-scores off` leaves them out without a self-test of them."""
    from daemon.cli import main

    default = Bundle.load(bundle_dir)
    assert "blob_scale" not in default.calibration and "line_scale" not in default.calibration
    assert default.reference()["fine_gain"].shape[0] == 1
    assert default.manifest["fit_config"]["shape_scores"] is False
    auto = default.calibration["shape_scores_auto"]
    assert auto["chose"] == "off" and auto["mean_recall_with"] < auto["mean_recall_without"] + auto["gain_min"]

    data = dataset.train_good[0].parents[2]
    assert main(["fit", str(data), "--out", str(tmp_path / "shapes"), "--shape-scores"]) == 0
    shapes = Bundle.load(tmp_path / "shapes")
    assert shapes.manifest["fit_config"]["shape_scores"] is True
    assert shapes.calibration["blob_scale"] > 0 and shapes.calibration["line_scale"] > 0
    assert shapes.reference()["fine_gain"].shape[0] == 3
    assert "shape_scores_auto" not in shapes.calibration and "with_shape_scores" not in shapes.calibration["self_test"]
    with Inspector.load(tmp_path / "shapes", "onnxruntime") as inspector:
        verdicts = {s.path: inspector.inspect_path(s.path).verdict for s in dataset.test}
    assert [verdicts[s.path] for s in dataset.test] == ["pass" if s.is_good else "reject" for s in dataset.test]


def test_a_bundle_keeps_the_lighting_fit_it_was_fitted_with(bundle_dir):
    """New fits record the lighting fit ("flat-tukey"); a bundle from before it was recorded runs with "trim"."""
    from dataclasses import replace

    from engines import registration as reg
    from engines.errors import BundleError
    from engines.inspector import registration_reference

    bundle = Bundle.load(bundle_dir)
    assert bundle.manifest["registration"]["light_fit"] == reg.LIGHT_FIT == "flat-tukey"
    assert registration_reference(bundle, bundle.reference()).light_fit == "flat-tukey"
    older = json.loads(json.dumps(bundle.manifest))
    del older["registration"]["light_fit"]
    assert registration_reference(replace(bundle, manifest=older), bundle.reference()).light_fit == "trim"
    older["registration"]["light_fit"] = "magic"
    with pytest.raises(BundleError, match="refit"):
        registration_reference(replace(bundle, manifest=older), bundle.reference())


def test_one_worker_fits_the_same_bundle_as_several(bundle_dir, dataset, tmp_path, monkeypatch):
    """Images and strips worked on side by side (``parallel.FIT_WORKERS``) change nothing: the same arrays,
    bit for bit, and the same calibration as one at a time."""
    monkeypatch.setattr(parallel, "FIT_WORKERS", 1)
    alone = Bundle.load(fit_template(dataset.train_good, tmp_path / "alone", progress=False))
    shared = Bundle.load(bundle_dir)
    want, got = shared.reference(), alone.reference()
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert alone.calibration["threshold"] == shared.calibration["threshold"]
    assert alone.calibration["good_scores"] == shared.calibration["good_scores"]
