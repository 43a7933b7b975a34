"""`inspectd evaluate`: score a labelled dataset through the exact run-time path and write a report.

Image-level metrics come from the same records `inspectd predict` writes (the report keeps them
as predictions.jsonl, so anyone can re-score them); pixel metrics (AUROC, AUPRO) from max-pooled
anomaly maps with the ground truth moved into the reference frame, over the images whose ground
truth is known at pixel level (good images, defect images with a mask). ``--downscale`` adds the
baseline this project exists to beat: the same detector fitted and run on images shrunk to N px,
deciding on one global (mean) score per image.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from calibration import metrics
from calibration.commands import prediction_record
from calibration.datasets import Dataset, Sample, load_test_folder
from calibration.figures import Overlay
from engines.decode import read_image
from engines.errors import UserError
from engines.inspector import Inspector
from engines.tiling import block_max, cell_grid
from engines.types import MIN_SIDE, Result

MAP_SIDE = 640  # pixel metrics on maps max-pooled to about this many px


def evaluate(
    model: Path,
    root: Path,
    report_dir: Path,
    backend: str = "auto",
    downscale: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every test image, summarise, plot; returns the summary (also written as summary.json).

    Defect images need no mask: without one they count at image level and per kind only. A test
    set of good parts only yields the false-reject rate and the score distribution.
    """
    from calibration.figures import require_plotting
    from calibration.report import write_report

    require_plotting()
    dataset = load_test_folder(root)
    if downscale:
        _check_downscale(dataset, downscale)
    inspector = Inspector.load(model, backend)
    records, truth, maps, masks, timings = [], {}, [], [], []
    with inspector:
        for sample in tqdm(dataset.test, desc="evaluating", disable=not progress, unit="img"):
            start = time.perf_counter()
            image = read_image(sample.path)
            decode_ms = (time.perf_counter() - start) * 1000
            result = inspector.inspect(image, str(sample.path))
            result.timings_ms = {"decode": decode_ms, **result.timings_ms}
            records.append(prediction_record(sample.path, result))
            mask = _read_mask(sample, image.shape[:2])
            truth[str(sample.path)] = {"kind": sample.kind, "mask": mask}
            timings.append(result.timings_ms)
            # A defect image without a mask has defect pixels somewhere: it cannot count as good pixels.
            if result.anomaly_map is not None and (sample.is_good or mask is not None):
                small, small_mask = _pixel_pair(result, mask)
                maps.append(small)
                masks.append(small_mask)
        summary = metrics.summarise(records, truth)
        summary["pixel"] = _pixel_metrics(maps, masks, dataset)
        summary["timings_ms_median"] = _median_timings(timings)
        summary["model"] = {
            "bundle_id": inspector.bundle_id,
            "detector": inspector.bundle.detector,
            "threshold_policy": inspector.bundle.calibration.get("policy"),
            "geometry": inspector.geometry.to_dict(),
        }
        overlays = [_overlay(inspector, w, truth) for w in summary["worst"]]
    labels = np.array([0 if truth[r["image"]]["kind"] == "good" else 1 for r in records])
    scores = np.array([np.inf if r["score"] is None else r["score"] for r in records])
    baseline = _baseline(dataset, downscale, progress) if downscale else None
    if baseline:
        summary["baseline"] = baseline
    per_image = metrics.per_image(records, truth)
    write_report(report_dir, summary, labels, scores, inspector.threshold, overlays, baseline, per_image, records)
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
    """Max over ``factor`` px cells (``cell_grid``: a partial last row or column of cells counts too)."""
    rows, cols = cell_grid(*amap.shape, factor)
    padded = np.pad(amap, ((0, rows * factor - amap.shape[0]), (0, cols * factor - amap.shape[1])), mode="edge")
    return block_max(padded, factor)


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
    whole = np.zeros((small.shape[0] * factor, small.shape[1] * factor), bool)  # the cells' full extent
    whole[:h, :w] = ref_mask > 0
    return small, metrics.downsample_mask(whole, small.shape)


def _pixel_metrics(maps: list[np.ndarray], masks: list[np.ndarray], dataset: Dataset) -> dict[str, Any]:
    """Pixel AUROC and AUPRO over good images and defect images with a mask, and a note when masks are missing."""
    out: dict[str, Any] = {}
    for name, fn in (("auroc", metrics.pixel_auroc), ("aupro", metrics.aupro)):
        try:
            out[name] = round(float(fn(maps, masks)), 5)
        except ValueError:
            out[name] = None
    defects = [s for s in dataset.test if not s.is_good]
    unmasked = len(dataset.unmasked)
    if not defects:
        out["note"] = "none: there are no defect images"
    elif unmasked == len(defects):
        out["note"] = (
            f"none: they need ground-truth masks (ground_truth/KIND/NAME_mask.png) and none of the "
            f"{len(defects)} defect images has one"
        )
    elif unmasked:
        out["note"] = (
            f"over the {len(defects) - unmasked} defect images with a ground-truth mask and the good images; "
            f"{unmasked} defect images without a mask are left out"
        )
    return out


def _median_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for t in timings for k in t})
    return {k: round(statistics.median(t[k] for t in timings if k in t), 1) for k in keys}


def _overlay(inspector: Inspector, worst: dict[str, Any], truth: dict) -> Overlay:
    """One worst case, inspected again for its map (moved back into the frame's pixels) and boxes."""
    image_path = worst["image"]
    image = read_image(Path(image_path))
    result = inspector.inspect(image, image_path)
    amap = np.zeros(image.shape[:2], np.float32)
    if result.anomaly_map is not None:
        h, w = amap.shape
        amap = cv2.warpAffine(result.anomaly_map, result.pose_matrix, (w, h))
    name = f"{Path(image_path).parent.name}/{Path(image_path).name}"
    boxes = [d.bbox for d in result.defects]
    kind = truth[image_path]["kind"]
    score = worst["score"]
    return Overlay(name, image, amap, boxes, truth[image_path]["mask"], kind, score, result.verdict, result.reason)


def _baseline(dataset: Dataset, side: int, progress: bool) -> dict[str, Any]:
    """The common failure, measured: fit and run at ``side`` px, one global mean score per image.

    The baseline is given its best possible threshold (the F1-optimal one on the test set itself),
    so its figures are an upper bound; ours use the threshold calibrated on good images only. The
    result has the summary's shape (``image``, ``per_kind``) so the report sets it beside ours.
    """
    from calibration.template_fit import FitConfig, fit_template

    with tempfile.TemporaryDirectory() as tmp:
        train = [_shrunk(p, Path(tmp) / "train" / f"{i:04d}.png", side) for i, p in enumerate(dataset.train_good)]
        model = fit_template(train, Path(tmp) / "model", config=FitConfig(), progress=progress)
        inspector = Inspector.load(model, "onnxruntime")
        records = []
        with inspector:
            weight = inspector._ref["weight"] > 0
            for i, sample in enumerate(tqdm(dataset.test, desc="baseline", disable=not progress, unit="img")):
                small = read_image(_shrunk(sample.path, Path(tmp) / "test" / f"{i:04d}.png", side))
                amap = inspector.inspect(small).anomaly_map
                score = round(float(amap[weight].mean()), 6) if amap is not None else None
                records.append({"image": str(sample.path), "score": score, "defects": []})
    truth = {str(s.path): {"kind": s.kind, "mask": None} for s in dataset.test}
    about = {"downscale": side, "score": "global mean of the anomaly map"}
    labels = np.array([truth[r["image"]]["kind"] != "good" for r in records], dtype=int)
    scores = metrics.ranking_scores(records)
    try:
        threshold, _ = metrics.f1_optimal_threshold(labels, scores)
    except ValueError:
        return {**about, "note": "the baseline's threshold is chosen on labelled defects; this test set has none"}
    for r, s in zip(records, scores, strict=True):
        r.update(threshold=threshold, verdict="reject" if s > threshold else "pass")
    summary = metrics.summarise(records, truth)
    return {
        **about,
        "threshold_rule": "F1-optimal on this test set (an upper bound)",
        "threshold": round(threshold, 6),
        "n_images": summary["n_images"],
        "n_good": summary["n_good"],
        "n_defect": summary["n_defect"],
        "image": summary["image"],
        "per_kind": {k: {"n": v["n"], "recall": v["recall"]} for k, v in summary["per_kind"].items()},
    }


def _shrunk_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(width, height) of an image whose longer side is brought down to ``side`` px (never up)."""
    scale = min(1.0, side / max(height, width))
    return round(width * scale), round(height * scale)


def _check_downscale(dataset: Dataset, side: int) -> None:
    """Refuse, before any work, a baseline size whose images would be too small to fit a model on."""
    h, w = read_image(dataset.train_good[0] if dataset.train_good else dataset.test[0].path).shape[:2]
    sw, sh = _shrunk_size(h, w, side)
    if min(sw, sh) < MIN_SIDE:
        raise UserError(
            f"--downscale {side}: the {w}x{h} images would shrink to {sw}x{sh}, "
            f"below the {MIN_SIDE} px minimum side (use at least {-(-MIN_SIDE * max(h, w) // min(h, w))})"
        )


def _shrunk(src: Path, dst: Path, side: int) -> Path:
    image = read_image(src)
    small = cv2.resize(image, _shrunk_size(*image.shape[:2], side), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), small, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return dst
