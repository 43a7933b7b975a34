"""`inspectd evaluate`: score a labelled dataset through the exact run-time path and write a report.

Image-level metrics come from the same records `inspectd predict` writes; pixel metrics
(AUROC, AUPRO) from max-pooled anomaly maps with the ground truth moved into the reference
frame. ``--downscale`` adds the baseline this project exists to beat: the same detector fitted
and run on images shrunk to N px, deciding on one global (mean) score per image.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from calibration import metrics
from calibration.datasets import Dataset, Sample, load_test_folder
from engines.decode import read_image
from engines.inspector import Inspector
from engines.types import Result

MAP_SIDE = 640  # pixel metrics on maps max-pooled to about this many px


def evaluate(
    model: Path,
    root: Path,
    report_dir: Path,
    backend: str = "auto",
    downscale: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every test image, summarise, plot; returns the summary (also written as summary.json)."""
    from calibration.report import Overlay, write_report

    dataset = load_test_folder(root)
    inspector = Inspector.load(model, backend)
    records, truth, maps, masks, timings = [], {}, [], [], []
    with inspector:
        for sample in tqdm(dataset.test, desc="evaluating", disable=not progress, unit="img"):
            image = read_image(sample.path)
            result = inspector.inspect(image, str(sample.path))
            records.append({"image": str(sample.path), **result.to_dict()})
            mask = _read_mask(sample, image.shape[:2])
            truth[str(sample.path)] = {"kind": sample.kind, "mask": mask}
            timings.append(result.timings_ms)
            if result.anomaly_map is not None:
                small, small_mask = _pixel_pair(result, mask)
                maps.append(small)
                masks.append(small_mask)
        summary = metrics.summarise(records, truth)
        summary["pixel"] = _pixel_metrics(maps, masks)
        summary["timings_ms_median"] = _median_timings(timings)
        summary["model"] = {"bundle_id": inspector.bundle_id, "geometry": inspector.geometry.to_dict()}
        overlays = [Overlay(*_overlay(inspector, w["image"], truth)) for w in summary["worst"]]
    labels = np.array([0 if truth[r["image"]]["kind"] == "good" else 1 for r in records])
    scores = np.array([np.inf if r["score"] is None else r["score"] for r in records])
    baseline = _baseline(dataset, downscale, progress) if downscale else None
    if baseline:
        summary["baseline"] = baseline
    write_report(report_dir, summary, labels, scores, inspector.threshold, overlays, baseline)
    return summary


def _read_mask(sample: Sample, shape: tuple[int, ...]) -> np.ndarray | None:
    if sample.mask is None:
        return None
    mask = read_image(sample.mask)
    mask = mask if mask.ndim == 2 else mask[:, :, 0]
    if mask.shape != shape:
        from engines.errors import UserError

        raise UserError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, expected {shape[1]}x{shape[0]}")
    return mask > 0


def _max_pool(amap: np.ndarray, factor: int) -> np.ndarray:
    h, w = (amap.shape[0] // factor) * factor, (amap.shape[1] // factor) * factor
    return amap[:h, :w].reshape(h // factor, factor, w // factor, factor).max(axis=(1, 3))


def _pixel_pair(result: Result, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Max-pooled map and the ground truth moved into the reference frame at the same size."""
    amap = result.anomaly_map
    factor = max(1, -(-max(amap.shape) // MAP_SIDE))
    small = _max_pool(amap, factor)
    if mask is None:
        return small, np.zeros(small.shape, bool)
    h, w = amap.shape
    ref_mask = cv2.warpAffine(
        mask.view(np.uint8), result.pose_matrix, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    )
    return small, metrics.downsample_mask(
        ref_mask[: small.shape[0] * factor, : small.shape[1] * factor] > 0, small.shape
    )


def _pixel_metrics(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, fn in (("auroc", metrics.pixel_auroc), ("aupro", metrics.aupro)):
        try:
            out[name] = round(float(fn(maps, masks)), 5)
        except ValueError:
            out[name] = None
    return out


def _median_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for t in timings for k in t})
    return {k: round(statistics.median(t[k] for t in timings if k in t), 1) for k in keys}


def _overlay(inspector: Inspector, image_path: str, truth: dict) -> tuple:
    """Image, anomaly map (moved back into the frame's pixels), boxes and mask of one case."""
    image = read_image(Path(image_path))
    result = inspector.inspect(image, image_path)
    amap = np.zeros(image.shape[:2], np.float32)
    if result.anomaly_map is not None:
        h, w = amap.shape
        amap = cv2.warpAffine(result.anomaly_map, result.pose_matrix, (w, h))
    name = f"{Path(image_path).parent.name}/{Path(image_path).name} {result.verdict} ({result.reason})"
    boxes = [d.bbox for d in result.defects]
    return name, image, amap, boxes, truth[image_path]["mask"]


def _baseline(dataset: Dataset, side: int, progress: bool) -> dict[str, Any]:
    """The common failure, measured: fit and run at ``side`` px, one global mean score per image.

    The baseline is given its best possible threshold (chosen on the test set itself), so its
    F1 is an upper bound; ours uses the threshold calibrated on good images only.
    """
    from calibration.template_fit import FitConfig, fit_template

    with tempfile.TemporaryDirectory() as tmp:
        train = [_shrunk(p, Path(tmp) / "train" / f"{i:04d}.png", side) for i, p in enumerate(dataset.train_good)]
        model = fit_template(train, Path(tmp) / "model", config=FitConfig(), progress=progress)
        inspector = Inspector.load(model, "onnxruntime")
        labels, scores, kinds = [], [], []
        with inspector:
            weight = inspector._ref["weight"] > 0
            for i, sample in enumerate(tqdm(dataset.test, desc="baseline", disable=not progress, unit="img")):
                small = read_image(_shrunk(sample.path, Path(tmp) / "test" / f"{i:04d}.png", side))
                result = inspector.inspect(small)
                amap = result.anomaly_map
                scores.append(float(amap[weight].mean()) if amap is not None else np.inf)
                labels.append(0 if sample.is_good else 1)
                kinds.append(sample.kind)
    labels_a, scores_a = np.array(labels), np.array(scores)
    threshold, f1 = metrics.f1_optimal_threshold(labels_a, scores_a)
    rejects = scores_a > threshold
    per_kind = {
        k: round(float(rejects[[kk == k for kk in kinds]].mean()), 4) for k in sorted(set(kinds)) if k != "good"
    }
    conf = metrics.confusion(labels_a, rejects)
    return {
        "downscale": side,
        "score": "global mean of the anomaly map",
        "auroc": round(metrics.image_auroc(labels_a, scores_a), 4),
        "f1_oracle": round(f1, 4),
        "threshold_oracle": threshold,
        "false_reject_rate": conf["false_reject_rate"],
        "recall": conf["recall"],
        "recall_per_kind": per_kind,
    }


def _shrunk(src: Path, dst: Path, side: int) -> Path:
    image = read_image(src)
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), small, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return dst
