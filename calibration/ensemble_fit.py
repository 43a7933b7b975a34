"""Fit the ensemble detector: template and learned detectors on one registration, their calibrated maps combined.

Both detectors are fitted and calibrated exactly as on their own (``calibration.template_fit``,
``calibration.learned_fit``) on the same registered good images, so every image has a held-out
map from each, cross-fitted, as 8 px block maxima. The ensemble graph
(``engines.ensemble_graph``) outputs the mean of (template / its threshold) and (learned / its
threshold). Its held-out score per image is taken from the mean of the two *block-maximum*
maps, which is never below the block maximum of the pixel-wise mean: the ensemble's threshold
is set (``good_threshold``) on an upper bound of what held-out good parts score, so it errs
towards a higher threshold (a faint defect may pass), never towards more false rejects than
calibrated.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from calibration import fit_pipeline as fp
from calibration import learned_fit as lf
from calibration import template_fit as tf
from calibration.thresholds import good_threshold
from engines.bundle import GRAPH_FP16, GRAPH_FP32
from engines.ensemble_graph import EnsembleGraphSpec, build_ensemble_graph


def fit_ensemble(
    images: Sequence[Path],
    out: Path,
    roi: Path | None = None,
    config: fp.FitConfig | None = None,
    learn: lf.LearnConfig | None = None,
    progress: bool = True,
    workdir: Path | None = None,
) -> Path:
    """Fit both detectors, calibrate their combination and write an ensemble bundle to ``out``; returns ``out``."""
    config = config or fp.FitConfig(core=fp.NETWORK_CORE)
    learn = learn or lf.LearnConfig()
    images, excluded = fp.select_training(images, config.exclude)
    out = Path(out)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        training, reference, config = fp.prepare_training(images, roi, config, Path(tmp), progress, "ensemble")
        fold_stats = fp.fold_statistics(training, config, progress)  # both detectors' held-out references
        template = tf.calibrate_folds(training, config, progress, fold_stats)
        config = replace(config, shape_scores=template.shape_scores)  # auto resolved
        learned = lf.learn_and_calibrate(training, images, config, learn, out, Path(tmp), progress, fold_stats)
        template_cal = template.calibration
        calibration, held_out_map = combined_calibration(
            template_cal, template.held_out_map, learned.calibration, learned.held_out_map, config
        )
        stats = fp.apply_local_tolerance(fp.statistics(training, range(len(images)), config), template.tolerance)
        part, ring = template.gains()
        stats["fine_gain"] = np.concatenate([part, learned.tolerance.part_gain[None]]).astype(np.float16)
        stats["fine_ring_gain"] = np.concatenate([ring, learned.tolerance.ring_gain[None]]).astype(np.float16)
        geo = training.geometry
        spec = EnsembleGraphSpec(
            geo.channels,
            config.core,
            gains=len(part) + 1,
            input_dtype=fp.graph_input_dtype(geo),
            fine_scale=template_cal["fine_scale"],
            coarse_scale=template_cal["coarse_scale"],
            blob_scale=template_cal.get("blob_scale"),
            line_scale=template_cal.get("line_scale"),
            template_threshold=template_cal["threshold"],
            learned_threshold=learned.calibration["threshold"],
        )
        weights, network = learned.weights, learn.network
        graphs = {
            GRAPH_FP32: lambda p: onnx.save(build_ensemble_graph(replace(spec, precision="fp32"), weights, network), p),
            GRAPH_FP16: lambda p: onnx.save(build_ensemble_graph(replace(spec, precision="fp16"), weights, network), p),
        }
        extra = {"learned": learned.manifest(learn)}
        return fp.write_fitted_bundle(
            out,
            "ensemble",
            training,
            stats,
            reference,
            calibration,
            config,
            images,
            started,
            graphs,
            extra,
            held_out_map=held_out_map,
            excluded=excluded,
        )


def combined_calibration(
    template: dict, template_map: np.ndarray, learned: dict, learned_map: np.ndarray, config: fp.FitConfig
) -> tuple[dict, np.ndarray]:
    """The ensemble's threshold from held-out block maps [n, Hb, Wb] of both detectors, as the graph combines them.

    Returns the calibration and the combined held-out map it was set on.
    """
    combined = (template_map / template["threshold"] + learned_map / learned["threshold"]) / 2
    calibration = good_threshold(combined.max(axis=(1, 2)), config.target_frr, config.threshold_margin)
    calibration.update(combination="mean", template=template, learned=learned)
    return calibration, combined
