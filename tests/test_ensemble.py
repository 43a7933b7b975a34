"""The ensemble detector: its graph (the calibrated maps' mean), its calibration, a fitted bundle end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration.ensemble_fit import combined_calibration
from calibration.fit_pipeline import FitConfig
from engines.ensemble_graph import EnsembleGraphSpec, build_ensemble_graph
from engines.graphs import TemplateGraphSpec, build_template_graph
from engines.learned_graph import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    LearnedGraphSpec,
    build_learned_graph,
    weight_shapes,
)
from engines.tolerance import BLOCK
from tests.helpers import tile_feeds

CORE = 64


def _run(model: onnx.ModelProto, path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["anomaly"], feeds)[0]


def _random_weights(rng: np.random.Generator, network: str = DEFAULT_ARCHITECTURE) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.4, s).astype(np.float32) for k, s in weight_shapes(1, network).items()}


@pytest.mark.parametrize("network", ARCHITECTURES)
def test_ensemble_graph_is_the_mean_of_each_detectors_calibrated_map(tmp_path, network):
    """Per pixel, the ensemble is the mean of template / its threshold and learned / its threshold (own gains)."""
    rng = np.random.default_rng(4)
    weights = _random_weights(np.random.default_rng(40), network)  # its own stream: the feeds' size does not change it
    feeds = tile_feeds(rng, CORE, gains=2)
    template = TemplateGraphSpec(1, CORE, fine_scale=2.0, coarse_scale=3.0)
    spec = EnsembleGraphSpec(1, CORE, fine_scale=2.0, coarse_scale=3.0, template_threshold=1.7, learned_threshold=4.5)
    one_gain = [{**feeds, "fine_gain": feeds["fine_gain"][:, c : c + 1]} for c in (0, 1)]
    t_map = _run(build_template_graph(template), tmp_path / "t.onnx", one_gain[0])
    l_map = _run(build_learned_graph(LearnedGraphSpec(1, CORE), weights, network), tmp_path / "l.onnx", one_gain[1])
    both = _run(build_ensemble_graph(spec, weights, network), tmp_path / "e.onnx", feeds)
    expected = (t_map / 1.7 + l_map / 4.5) / 2
    assert both.shape == (1, 1, CORE, CORE)
    assert (t_map / 1.7 > l_map / 4.5).mean() not in (0.0, 1.0), "both detectors lead somewhere on this tile"
    assert (l_map[0, 0] != l_map[0, 0, 0, 0]).mean() > 0.5, "the learned map is not constant"
    np.testing.assert_allclose(both, expected, rtol=1e-5, atol=1e-6)


def test_ensemble_spec_refuses_what_it_cannot_build():
    """Gain channels other than the template's and the learned map's, component output or a non-positive threshold
    is a construction error."""
    with pytest.raises(ValueError, match="reads 2 gain channels"):
        EnsembleGraphSpec(1, CORE, gains=1)
    with pytest.raises(ValueError, match="read 3 gain maps, the spec has 2"):
        EnsembleGraphSpec(1, CORE, gains=2, blob_scale=1.0, line_scale=1.0)
    with pytest.raises(ValueError, match="gain channels"):
        EnsembleGraphSpec(1, CORE, components=True)
    with pytest.raises(ValueError, match="positive"):
        EnsembleGraphSpec(1, CORE, learned_threshold=0.0)


def test_combined_calibration_scores_the_mean_of_the_block_maps():
    """Each held-out image scores its highest block of the mean of both maps over their detectors' thresholds."""
    template = {"threshold": 2.0}
    learned = {"threshold": 10.0}
    t_map = np.array([[[1.8, 0.2], [0.0, 0.0]], [[0.4, 0.4], [0.4, 0.4]]], np.float32)
    l_map = np.array([[[0.0, 9.0], [0.0, 0.0]], [[4.0, 4.0], [4.0, 8.0]]], np.float32)
    cal, combined = combined_calibration(template, t_map, learned, l_map, FitConfig())
    np.testing.assert_allclose(combined.max(axis=(1, 2)), cal["good_scores"], atol=1e-5)
    # image 0: peaks of the two detectors in different blocks: (0.9 + 0) / 2 and (0.1 + 0.9) / 2
    np.testing.assert_allclose(cal["good_scores"], [0.5, 0.5], atol=1e-5)
    assert cal["threshold"] >= 0.5 * 1.1 - 1e-9
    assert cal["combination"] == "mean" and cal["template"] is template and cal["learned"] is learned


torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny ensemble bundle (few training steps), fitted once for the module."""
    from calibration.datasets import load_dataset
    from calibration.ensemble_fit import fit_ensemble
    from calibration.learned_fit import LearnConfig
    from tests.helpers import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data") / "part", size=384, kinds=("dot", "stain"))
    out = tmp_path_factory.mktemp("models") / "ensemble"
    learn = LearnConfig(steps=160, checkpoint_every=40)
    return fit_ensemble(load_dataset(root).train_good, out, learn=learn, progress=False), root


def test_ensemble_bundle_carries_both_calibrations_and_gains(fitted):
    """The bundle holds one gain map per score (the template's fine score without --shape-scores, the learned map)
    and each detector's calibration beside the ensemble's."""
    from engines.bundle import Bundle

    bundle = Bundle.load(fitted[0])
    assert bundle.detector == "ensemble"
    ref = bundle.reference()
    assert ref["fine_gain"].shape == ref["fine_ring_gain"].shape == (2, 384 // BLOCK, 384 // BLOCK)
    cal = bundle.calibration
    assert len(cal["good_scores"]) == len(cal["template"]["good_scores"]) == len(cal["learned"]["good_scores"])
    assert cal["threshold"] >= max(cal["good_scores"]) * 1.1 - 1e-6


def test_predict_cli_rejects_defects_and_passes_goods(fitted, tmp_path):
    """`inspectd predict` on the ensemble bundle passes every good test image and rejects every defective one."""
    from daemon.cli import main

    model, root = fitted
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(model), str(root / "test"), "--out", str(out), "--backend", "onnxruntime"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 10
    for record in records:
        expected = "pass" if "/good/" in record["image"] else "reject"
        assert record["verdict"] == expected, (record["image"], record["score"], record["threshold"])


def test_fp16_ensemble_agrees_with_fp32(fitted):
    """On real frames the ensemble's FP16 graph gives the FP32 map within 2e-2 relative to max(|map|, 1)."""
    from tests.helpers import fp16_vs_fp32

    model, root = fitted
    samples = [root / "test" / "good" / "000.png", root / "test" / "dot" / "000.png"]
    assert fp16_vs_fp32(model, samples) <= 2e-2


def test_emulated_tensorrt_ensemble_agrees_with_fp32(fitted, monkeypatch, tmp_path):
    """The ensemble's two-gain FP16 graph as an EMULATED TensorRT plan gives the FP32 map within 2e-2, same verdicts."""
    from tests.emulation import install
    from tests.helpers import emulated_trt_vs_fp32

    model, root = fitted
    install(monkeypatch, major=11)
    samples = [root / "test" / "good" / "000.png", root / "test" / "dot" / "000.png"]
    worst, same = emulated_trt_vs_fp32(model, samples, tmp_path / "ensemble.plan")
    assert worst <= 2e-2 and same, worst
