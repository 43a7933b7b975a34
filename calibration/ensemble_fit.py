"""Fit the ensemble detector: template and learned detectors on one registration, their calibrated maps combined.

Both detectors are fitted and calibrated exactly as on their own (``calibration.template_fit``,
``calibration.learned_fit``) on the same registered good images, so every image has a held-out
score from each, cross-fitted. The ensemble graph (``engines.ensemble_graph``) outputs
max(template / its threshold, learned / its threshold); its per-image held-out score is the
larger of the two ratios, and the ensemble threshold is set on those (``good_threshold``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from calibration import learned_fit as lf
from calibration import template_fit as tf
from calibration.thresholds import good_threshold
from engines.bundle import GRAPH_FP16, GRAPH_FP32
from engines.ensemble_graph import EnsembleGraphSpec, build_ensemble_graph


def fit_ensemble(
    images: Sequence[Path],
    out: Path,
    roi: Path | None = None,
    config: tf.FitConfig | None = None,
    learn: lf.LearnConfig | None = None,
    progress: bool = True,
    workdir: Path | None = None,
) -> Path:
    """Fit both detectors, calibrate their combination and write an ensemble bundle to ``out``; returns ``out``."""
    config = config or tf.FitConfig()
    learn = learn or lf.LearnConfig()
    images = [Path(p) for p in images]
    out = Path(out)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        training, reference, config = tf.prepare_training(images, roi, config, Path(tmp), progress, "ensemble")
        template_cal, tolerance, _ = tf._calibrate_folds(training, config, progress)
        learned = lf.learn_and_calibrate(training, images, config, learn, out, Path(tmp), progress)
        calibration = combined_calibration(template_cal, learned.calibration, config)
        stats = tf.apply_local_tolerance(tf._statistics(training, range(len(images)), config), tolerance)
        stats["fine_gain"] = np.stack([tolerance.part_gain, learned.part_gain]).astype(np.float16)
        stats["fine_ring_gain"] = np.stack([tolerance.ring_gain, learned.ring_gain]).astype(np.float16)
        geo = training.geometry
        spec = EnsembleGraphSpec(
            geo.channels,
            config.core,
            input_dtype="float32" if geo.dtype == "uint16" else "uint8",
            fine_scale=template_cal["fine_scale"],
            coarse_scale=template_cal["coarse_scale"],
            template_threshold=template_cal["threshold"],
            learned_threshold=learned.calibration["threshold"],
        )
        graphs = {
            GRAPH_FP32: lambda p: onnx.save(build_ensemble_graph(replace(spec, precision="fp32"), learned.weights), p),
            GRAPH_FP16: lambda p: onnx.save(build_ensemble_graph(replace(spec, precision="fp16"), learned.weights), p),
        }
        extra = {"learned": learned.manifest(learn)}
        return tf.write_fitted_bundle(
            out, "ensemble", training, stats, reference, calibration, config, images, started, graphs, extra
        )


def combined_calibration(template: dict, learned: dict, config: tf.FitConfig) -> dict:
    """The ensemble's threshold from each image's held-out scores, each divided by its detector's threshold."""
    t_scores = np.asarray(template["good_scores"], np.float64) / template["threshold"]
    l_scores = np.asarray(learned["good_scores"], np.float64) / learned["threshold"]
    calibration = good_threshold(np.maximum(t_scores, l_scores), config.target_frr, config.threshold_margin)
    calibration.update(template=template, learned=learned)
    return calibration
