"""Fit the template (variation-model) detector from good images and calibrate it on held-out goods.

1. The shared fit pipeline (``calibration.fit_pipeline``): registration, lighting, reference
   statistics (per-pixel mean, spread and min/max band; per-place spread of block means).
2. k-fold: fit the statistics without each fold, score the fold with the real graph (fine and
   coarse components), learn the local tolerance cross-fitted, so the scales and the threshold
   come from good images the statistics did not see.
3. Write the bundle (FP32 and FP16 graphs, reference, calibration) atomically.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from calibration import fit_pipeline as fp
from calibration import probes
from calibration import tolerance_fit as tol
from calibration.fit_pipeline import FitConfig, Training
from calibration.thresholds import good_threshold
from engines import registration as reg
from engines.bundle import GRAPH_FP16, GRAPH_FP32
from engines.graphs import COMPONENTS, TemplateGraphSpec, build_template_graph
from engines.tolerance import BLOCK


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
        config = replace(config, shape_scores=folds.shape_scores)  # auto resolved: the bundle's graph and manifest
        stats = fp.apply_local_tolerance(fp.statistics(training, range(len(images)), config), folds.tolerance)
        stats["fine_gain"], stats["fine_ring_gain"] = (g.astype(np.float16) for g in folds.gains())
        stats["held_out_blocks"] = folds.blocks.astype(np.float16)  # for diagnostics and reports
        return _write(out, training, stats, reference, folds, config, images, excluded, started)


def components(config: FitConfig) -> tuple[str, ...]:
    """The scores a fit calibrates: fine and coarse, and the shape scores unless they are off.

    ``config.shape_scores`` None (auto) scores all four on the held-out goods, and the
    calibration keeps the shape scores only where the self-test finds that they pay.
    """
    return COMPONENTS[:2] if config.shape_scores is False else COMPONENTS


def _components_graph(config: FitConfig, training: Training, tmp: Path) -> Path:
    """The real graph with every score of ``components(config)`` as its own output channel, unscaled."""
    shapes = {f"{name}_scale": 1.0 for name in components(config)[2:]}
    spec = TemplateGraphSpec(
        training.geometry.channels,
        config.core,
        input_dtype=fp.graph_input_dtype(training.geometry),
        components=True,
        resident_precision="fp16",  # the fit's statistics are FP16: the same values at half the memory
        **shapes,
    )
    path = tmp / "components.onnx"
    onnx.save(build_template_graph(spec), path)
    return path


@dataclass
class FoldCalibration:
    """What the k-fold calibration learns: threshold and scales, the local tolerance, the held-out evidence."""

    calibration: dict
    tolerance: tol.LocalTolerance  # of the fine and coarse scores
    shape_tolerances: list[tol.LocalTolerance]  # of each shape score (blob, line): gains only
    blocks: np.ndarray  # [n, C, Hb, Wb] raw block maxima of each calibrated score of each held-out image
    held_out_map: np.ndarray  # [n, Hb, Wb] each image's anomaly map (block maxima) as scored, cross-fitted
    shape_scores: bool = False  # whether the calibrated scores include the blob and line scores

    def gains(self) -> tuple[np.ndarray, np.ndarray]:
        """The graph's gain maps [G, Hb, Wb] (fine, then each shape score): part frame and sensor ring."""
        tolerances = [self.tolerance, *self.shape_tolerances]
        return np.stack([t.part_gain for t in tolerances]), np.stack([t.ring_gain for t in tolerances])


@dataclass
class HeldOut:
    """Raw block maxima of the held-out goods [n, C, Hb, Wb] and of their probed copies, each by its fold's graph."""

    goods: np.ndarray
    probed: list[list[np.ndarray]]  # per image, per probe: its raw blocks [C, h, w] in the probed copy (only those)
    plans: list[list[probes.Probe]]
    folds: int
    leave_one_out: bool = False  # each image's statistics are the others' (else its fold's are the other folds')


# --shape-scores auto keeps the blob and line scores when they raise the self-test's mean recall
# by at least this much: they cost about 3x the graph's time per tile, so a tie is not enough.
SHAPE_GAIN_MIN = 0.05


def calibrate_folds(
    training: Training, config: FitConfig, progress: bool, fold_stats: list[dict] | None = None
) -> FoldCalibration:
    """k-fold: statistics without each fold, real-graph scores on it; local tolerance, scales, threshold.

    The local tolerance applied to each held-out image is learned from the other folds' images
    only (cross-fitting), so the threshold is set on scores the tolerance was not tuned on.
    ``fold_stats`` (``fit_pipeline.fold_statistics``), when another detector of the same fit already holds
    them; otherwise each fold's statistics are computed and dropped in turn, to keep memory low.
    The self-test (``calibration.probes``) scores a probed copy of each held-out image with the
    same fold's statistics; with ``shape_scores`` None its recall decides whether the shape
    scores are kept.
    """
    held = _held_out(training, config, progress, fold_stats)
    names = components(config)
    groups = _score_groups(training, held, len(names))
    if config.shape_scores is None:  # fine and coarse alone, then with the shape scores: one evidence, two readings
        without = _calibrated(training, held, groups[:1], names[:2], config)
        with_shapes = _calibrated(training, held, groups, names, config)
        chosen, test = with_shapes if keeps_shape_scores(without[1], with_shapes[1]) else without
        chosen.calibration["shape_scores_auto"] = {
            "chose": "on" if chosen.shape_scores else "off",
            "mean_recall_without": without[1].get("mean_recall"),
            "mean_recall_with": with_shapes[1].get("mean_recall"),
            "gain_min": SHAPE_GAIN_MIN,
        }
        test = {"without_shape_scores": without[1], "with_shape_scores": with_shapes[1], "kept": test}
    else:
        chosen, kept = _calibrated(training, held, groups, names, config)
        test = {"kept": kept}
    chosen.calibration["self_test"] = test
    return chosen


def keeps_shape_scores(without: dict, with_shapes: dict) -> bool:
    """--shape-scores auto: keep them when the self-test's mean recall gains SHAPE_GAIN_MIN with them.

    Without a self-test (an image too small for probes) they are not kept: they are never
    chosen without evidence.
    """
    if not without.get("probes") or not with_shapes.get("probes"):
        return False
    return with_shapes["mean_recall"] - without["mean_recall"] >= SHAPE_GAIN_MIN


def _held_out(training: Training, config: FitConfig, progress: bool, fold_stats: list[dict] | None) -> HeldOut:
    n = len(training.coefs)
    folds = len(fold_stats) if fold_stats is not None else fp.fold_count(config, n)
    channels = len(components(config))
    border_px = tol.border_blocks(training.geometry) * BLOCK
    plans = probes.plan_probes(training.weight, border_px, n)
    goods = np.zeros((n, channels, *tol.block_shape(training.geometry)), np.float32)
    probed: list[list[np.ndarray]] = [[] for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp, _held_out_statistics(training, config, fold_stats, folds) as sets:
        graph = _components_graph(config, training, Path(tmp))
        for rows, statistics in tqdm(sets, desc="calibrating", disable=not progress, unit="set"):
            stats = statistics()
            with fp.block_scorer(graph, stats, training.geometry, config.core, channels) as score:
                goods[rows] = score(training, rows)
                for i in rows:  # one probed copy at a time, only the probes' blocks kept: frames are large at 5120 px
                    windows = [q.blocks for q in plans[i]]  # only the tiles under the probes: the rest is not kept
                    image = score(probes.probed_training(training, [i], plans), [0], windows)[0]
                    probed[i] = [image[:, r0:r1, c0:c1].copy() for r0, r1, c0, c1 in windows]
            del stats  # the next set's statistics are computed without this one's alive
            fp.release_free_heap()
    return HeldOut(goods, probed, plans, folds, _leave_one_out(config, fold_stats))


def _leave_one_out(config: FitConfig, fold_stats: list[dict] | None) -> bool:
    return config.leave_one_out and fold_stats is None and not config.augment


@contextlib.contextmanager
def _held_out_statistics(
    training: Training, config: FitConfig, fold_stats: list[dict] | None, folds: int
) -> Iterator[list[tuple[list[int], Callable[[], dict]]]]:
    """(held-out images, their statistics when called) per set: each fold, or each image alone.

    With ``--leave-one-out`` each good image is scored with the statistics of all the others
    (``fit_pipeline.LeaveOneOut``): with k folds, images that share a rare nuisance are held out
    together and each scores as if nothing like it had been seen, above what the statistics of
    all the images give a part like it (README, held-back seed 9003 at 5120 px). Not the default:
    on a 2048 px line the k-fold scores' surplus was what kept the threshold above rarer good
    parts (README). With ``fold_stats`` (another detector's, held already) or ``--augment``
    (variants are drawn per fold) the folds stay.
    """
    n = len(training.coefs)
    if fold_stats is not None:
        yield [(fp.fold_members(n, folds, f)[0], functools.partial(dict, fold_stats[f])) for f in range(folds)]
        return
    if not _leave_one_out(config, None):
        kept = [fp.fold_members(n, folds, f) for f in range(folds)]
        yield [(rows, functools.partial(fp.statistics, training, others, config)) for rows, others in kept]
        return
    loo = fp.LeaveOneOut(training, config, fp.stack_dir(training))
    try:
        yield [([i], functools.partial(loo.statistics, i)) for i in range(n)]
    finally:
        loo.close()


@dataclass
class _ScoreGroup:
    """One group of scores sharing a tolerance (fine and coarse together, or one shape score), cross-fitted."""

    channels: list[int]  # its channels of ``HeldOut.goods``
    normalised: np.ndarray  # [n, len(channels), Hb, Wb] each held-out map by its fold's tolerance
    probe_max: np.ndarray  # [n, probes, len(channels)] each probe's maximum, normalised alike
    tolerance: tol.LocalTolerance  # learned from every image: the bundle's


def _score_groups(training: Training, held: HeldOut, channels: int) -> list[_ScoreGroup]:
    """The first ``channels`` scores of ``held`` in their tolerance groups, each cross-fitted once.

    Fine and coarse share one tolerance (as before); each shape score learns its own gains, on 16 px
    ring lines (``tolerance_fit.fit_local_tolerance``): only the fine score needs 8 px.
    """
    inside = tol.block_inside(training.weight)
    border = tol.border_blocks(training.geometry)
    poses = training.poses
    groups = []
    for g in [[0, 1], *([k] for k in range(2, channels))]:
        blocks, fine_ring = held.goods[:, g], g == [0, 1]
        maps, tolerances = tol.cross_fitted(blocks, poses, inside, border, held.folds, fine_ring=fine_ring)
        probe_max = np.zeros((len(blocks), len(held.plans[0]), len(g)), np.float32)
        for i, (windows, plan) in enumerate(zip(held.probed, held.plans, strict=True)):
            if not plan:
                continue  # an image too small for probes: no self-test
            mine = [w[g] for w in windows]
            at = tolerances[i % held.folds].normalise_at(mine, [q.blocks for q in plan], poses[i])
            probe_max[i] = [w.max(axis=(1, 2)) for w in at]
        tolerance = tol.fit_local_tolerance(blocks, poses, inside, border, fine_ring)
        groups.append(_ScoreGroup(g, maps, probe_max, tolerance))
    return groups


def _calibrated(
    training: Training, held: HeldOut, groups: list[_ScoreGroup], names: Sequence[str], config: FitConfig
) -> tuple[FoldCalibration, dict]:
    """Calibrate the scores ``names`` (the channels of ``groups``); with the self-test's recall."""
    inside = tol.block_inside(training.weight)
    border = tol.border_blocks(training.geometry)
    raw = np.concatenate([group.normalised.max(axis=(2, 3)) for group in groups], axis=1)
    scales = np.array(component_scales(raw, names), np.float32)
    held_out_map = np.zeros((len(raw), *held.goods.shape[2:]), np.float32)
    for group in groups:  # one group at a time: at 5120 px each is ~100 MB
        ratio = group.normalised / scales[group.channels, None, None]
        np.maximum(held_out_map, ratio.max(axis=1), out=held_out_map)
    probe_scores = (np.concatenate([group.probe_max for group in groups], axis=2) / scales).max(axis=2)
    calibration = good_threshold(held_out_map.max(axis=(1, 2)), config.target_frr, config.threshold_margin)
    tolerance, *shapes = (group.tolerance for group in groups)
    calibration.update(
        **{f"{name}_scale": float(scale) for name, scale in zip(names, scales, strict=True)},
        folds=held.folds,
        held_out_statistics="leave-one-out" if held.leave_one_out else "k-fold",
        held_out_components=[[round(float(v), 4) for v in row] for row in raw],
        local_tolerance=tolerance.summary(inside, border),
        shape_tolerance={name: t.summary(inside, border) for name, t in zip(names[2:], shapes, strict=True)},
    )
    blocks = held.goods[:, : len(names)]
    fold = FoldCalibration(calibration, tolerance, shapes, blocks, held_out_map, len(names) > 2)
    return fold, probes.recall(probe_scores, held.plans, calibration["threshold"])


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
