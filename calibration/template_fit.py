"""Fit the template (variation-model) detector from good images and calibrate it on held-out goods.

1. The shared fit pipeline (``calibration.fit_pipeline``): registration, lighting, reference
   statistics (per-pixel mean, spread and min/max band; per-place spread of block means).
2. k-fold: fit the statistics without each fold, score the fold with the real graph (fine and
   coarse components), learn the local tolerance cross-fitted, so the scales and the threshold
   come from good images the statistics did not see.
3. Write the bundle (FP32 and FP16 graphs, reference, calibration) atomically.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from calibration import fit_pipeline as fp
from calibration import tolerance_fit as tol
from calibration.fit_pipeline import FitConfig, Training
from calibration.thresholds import good_threshold
from engines import registration as reg
from engines.bundle import GRAPH_FP16, GRAPH_FP32
from engines.graphs import COMPONENTS, TemplateGraphSpec, build_template_graph


def fit_template(
    images: Sequence[Path],
    out: Path,
    roi: Path | None = None,
    config: FitConfig | None = None,
    progress: bool = True,
    workdir: Path | None = None,
) -> Path:
    """Fit, calibrate and write a template bundle to ``out``; returns ``out``."""
    config = config or FitConfig()
    images, excluded = fp.select_training(images, config.exclude)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        training, reference, config = fp.prepare_training(images, roi, config, Path(tmp), progress, "template")
        folds = calibrate_folds(training, config, progress)
        stats = fp.apply_local_tolerance(fp.statistics(training, range(len(images)), config), folds.tolerance)
        stats["fine_gain"], stats["fine_ring_gain"] = (g.astype(np.float16) for g in folds.gains())
        stats["held_out_blocks"] = folds.blocks.astype(np.float16)  # for diagnostics and reports
        return _write(out, training, stats, reference, folds, config, images, excluded, started)


def components(config: FitConfig) -> tuple[str, ...]:
    """The scores a fit calibrates: fine and coarse, and the shape scores with ``--shape-scores``."""
    return COMPONENTS if config.shape_scores else COMPONENTS[:2]


def _component_blocks(
    training: Training,
    stats: dict[str, np.ndarray],
    indices: Sequence[int],
    config: FitConfig,
    tmp: Path,
) -> np.ndarray:
    """Per held-out image, each score of ``components(config)`` from the real graph, max-pooled to BLOCK px blocks."""
    geo = training.geometry
    shapes = {f"{name}_scale": 1.0 for name in components(config)[2:]}  # unscaled in a components graph
    spec = TemplateGraphSpec(
        geo.channels, config.core, input_dtype=fp.graph_input_dtype(geo), components=True, **shapes
    )
    path = tmp / "components.onnx"
    onnx.save(build_template_graph(spec), path)
    return fp.graph_blocks(training, path, stats, indices, config.core, len(components(config)))


@dataclass
class FoldCalibration:
    """What the k-fold calibration learns: threshold and scales, the local tolerance, the held-out evidence."""

    calibration: dict
    tolerance: tol.LocalTolerance  # of the fine and coarse scores
    shape_tolerances: list[tol.LocalTolerance]  # of each shape score (blob, line): gains only
    blocks: np.ndarray  # [n, C, Hb, Wb] raw block maxima of each calibrated score of each held-out image
    held_out_map: np.ndarray  # [n, Hb, Wb] each image's anomaly map (block maxima) as scored, cross-fitted

    def gains(self) -> tuple[np.ndarray, np.ndarray]:
        """The graph's gain maps [G, Hb, Wb] (fine, then each shape score): part frame and sensor ring."""
        tolerances = [self.tolerance, *self.shape_tolerances]
        return np.stack([t.part_gain for t in tolerances]), np.stack([t.ring_gain for t in tolerances])


def calibrate_folds(
    training: Training, config: FitConfig, progress: bool, fold_stats: list[dict] | None = None
) -> FoldCalibration:
    """k-fold: statistics without each fold, real-graph scores on it; local tolerance, scales, threshold.

    The local tolerance applied to each held-out image is learned from the other folds' images
    only (cross-fitting), so the threshold is set on scores the tolerance was not tuned on.
    ``fold_stats`` (``fit_pipeline.fold_statistics``), when another detector of the same fit already holds
    them; otherwise each fold's statistics are computed and dropped in turn, to keep memory low.
    """
    n = len(training.coefs)
    folds = len(fold_stats) if fold_stats is not None else fp.fold_count(config, n)
    names = components(config)
    blocks = np.zeros((n, len(names), *tol.block_shape(training.geometry)), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for fold in tqdm(range(folds), desc="calibrating (k-fold)", disable=not progress, unit="fold"):
            held, kept = fp.fold_members(n, folds, fold)
            stats = fold_stats[fold] if fold_stats is not None else fp.statistics(training, kept, config)
            blocks[held] = _component_blocks(training, stats, held, config, Path(tmp))
    inside = tol.block_inside(training.weight)
    border = tol.border_blocks(training.geometry)
    # Fine and coarse share one tolerance (as before); each shape score learns its own gains.
    groups = [[0, 1], *([k] for k in range(2, len(names)))]
    poses = training.poses
    normalised = np.concatenate(
        [tol.cross_fitted_maps(blocks[:, g], poses, inside, border, folds) for g in groups], axis=1
    )
    raw = normalised.max(axis=(2, 3))
    scales = component_scales(raw, names)
    held_out_map = (normalised / np.array(scales, np.float32)[None, :, None, None]).max(axis=1)
    calibration = good_threshold(held_out_map.max(axis=(1, 2)), config.target_frr, config.threshold_margin)
    tolerance, *shapes = (tol.fit_local_tolerance(blocks[:, g], poses, inside, border) for g in groups)
    calibration.update(
        **{f"{name}_scale": scale for name, scale in zip(names, scales, strict=True)},
        folds=folds,
        held_out_components=[[round(float(v), 4) for v in row] for row in raw],
        local_tolerance=tolerance.summary(inside, border),
        shape_tolerance={name: t.summary(inside, border) for name, t in zip(names[2:], shapes, strict=True)},
    )
    return FoldCalibration(calibration, tolerance, shapes, blocks, held_out_map)


SCALE_FLOORS = {"fine": 0.5, "coarse": 2.0, "blob": 0.5, "line": 0.5}  # grey levels / spreads: never a smaller scale


def component_scales(raw: np.ndarray, names: Sequence[str] = COMPONENTS) -> list[float]:
    """Each component's scale: the 90th percentile of its held-out maxima [n, C], never below its floor.

    Every component is measured in units of what good parts typically reach in it, so the map's
    maximum over components is "how far beyond normal, in the most telling component".
    """
    return [max(float(np.quantile(raw[:, k], 0.9)), SCALE_FLOORS[name]) for k, name in enumerate(names)]


def _write(
    out: Path,
    training: Training,
    stats: dict[str, np.ndarray],
    registration: reg.RegistrationReference,
    folds: FoldCalibration,
    config: FitConfig,
    images: list[Path],
    excluded: list[Path],
    started: float,
) -> Path:
    geo = training.geometry
    calibration = folds.calibration
    base = dict(
        gains=len(components(config)) - 1,
        channels=geo.channels,
        core=config.core,
        input_dtype=fp.graph_input_dtype(geo),
        fine_scale=calibration["fine_scale"],
        coarse_scale=calibration["coarse_scale"],
        blob_scale=calibration.get("blob_scale"),
        line_scale=calibration.get("line_scale"),
    )
    graphs = {
        GRAPH_FP32: lambda p: onnx.save(build_template_graph(TemplateGraphSpec(**base, precision="fp32")), p),
        GRAPH_FP16: lambda p: onnx.save(build_template_graph(TemplateGraphSpec(**base, precision="fp16")), p),
    }
    return fp.write_fitted_bundle(
        out,
        "template",
        training,
        stats,
        registration,
        calibration,
        config,
        images,
        started,
        graphs,
        held_out_map=folds.held_out_map,
        excluded=excluded,
    )
