"""Evaluation metrics for the anomaly detector: image-level curves and thresholds, pixel-level
AUROC/AUPRO, and matching of predicted defect boxes to ground-truth regions.

Conventions used throughout:

* ``labels`` are 1 (defect, the positive class) or 0 (good); ``scores`` are "higher = more
  anomalous".
* A threshold ``t`` rejects an image when ``score > t`` (the rule ``inspectd predict`` applies).
  Thresholds returned by the threshold finders lie midway between neighbouring distinct scores,
  so they keep working when scores are re-read from JSON rounded to a few digits.
* A ratio whose denominator is zero takes the value meaning "nothing went wrong": precision 1
  when nothing was rejected, recall 1 when there were no defects, false-reject rate 0 when there
  were no goods, accuracy 1 on an empty set. F1 is ``2tp / (2tp + fp + fn)`` (1 when that is 0/0),
  which equals the harmonic mean of precision and recall under these conventions.
* Functions that have no meaningful answer (an ROC curve with a single class, AUPRO without
  defect pixels) raise ``ValueError`` rather than return NaN; ``summarise`` turns those into None.

Only numpy and OpenCV (connected components) are used, so the module is cheap to import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

DEFAULT_BINS = 4096
SIZE_BUCKETS = ("<10", "10-50", "50-200", ">200")
_CHUNK = 1 << 22  # pixels per bincount call: bounds temporary index arrays to ~32 MiB


# --------------------------------------------------------------------------- image level


def _as_arrays(labels: Iterable[Any], scores: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (bool labels, float64 scores)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D and equally long, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), s


def _cumulative(labels: Iterable[Any], scores: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) with the tp and fp counts of the rule ``score >= that value``.

    Grouping equal scores into one step is what makes ties correct: tied items change state
    together, so a curve through them is a straight segment (half credit in AUROC).
    """
    y, s = _as_arrays(labels, scores)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], dtype=int)
    tp = np.cumsum(y)[last_of_group]
    fp = np.cumsum(~y)[last_of_group]
    return s[last_of_group], tp.astype(np.int64), fp.astype(np.int64)


def _midpoints(distinct_desc: np.ndarray) -> np.ndarray:
    """Threshold just below each distinct score: midway to the next lower one.

    The lowest score has no lower neighbour, so the last gap is mirrored (or 0.5 score units,
    half the "edge of normal", when there is only one distinct score).
    """
    if distinct_desc.size == 0:
        return distinct_desc.copy()
    lower = np.empty_like(distinct_desc)
    lower[:-1] = distinct_desc[1:]
    gap = distinct_desc[-2] - distinct_desc[-1] if distinct_desc.size > 1 else 1.0
    lower[-1] = distinct_desc[-1] - gap
    return (distinct_desc + lower) / 2.0


def roc_curve(labels: Iterable[Any], scores: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as ``(fpr, tpr, thresholds)``.

    Point ``i`` is the rule ``score >= thresholds[i]``; thresholds are the distinct scores in
    descending order, preceded by ``+inf`` for the (0, 0) point. Needs both classes.
    """
    distinct, tp, fp = _cumulative(labels, scores)
    n_pos, n_neg = (tp[-1], fp[-1]) if tp.size else (0, 0)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs at least one good and one defect")
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, distinct]


def pr_curve(labels: Iterable[Any], scores: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve as ``(precision, recall, thresholds)``.

    Point ``i`` is the rule ``score >= thresholds[i]`` over the distinct scores in descending
    order (recall non-decreasing). No artificial end point is added. Needs a defect.
    """
    distinct, tp, fp = _cumulative(labels, scores)
    n_pos = tp[-1] if tp.size else 0
    if n_pos == 0:
        raise ValueError("a precision-recall curve needs at least one defect")
    precision = tp / (tp + fp)  # tp + fp >= 1 at every distinct score
    return precision, tp / n_pos, distinct


def auc(x: Iterable[float], y: Iterable[float]) -> float:
    """Area under the piecewise-linear curve through ``(x, y)`` (trapezoid rule).

    ``x`` must be monotonic (either direction); the area is returned as a positive number.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError("x and y must be 1-D and equally long")
    if xa.size < 2:
        return 0.0
    dx = np.diff(xa)
    if not ((dx >= 0).all() or (dx <= 0).all()):
        raise ValueError("x must be monotonic")
    return float(abs(np.sum(dx * (ya[1:] + ya[:-1]) / 2.0)))


def image_auroc(labels: Iterable[Any], scores: Iterable[float]) -> float:
    """Area under the ROC curve: the probability a random defect outscores a random good (ties 1/2)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return auc(fpr, tpr)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def f1_optimal_threshold(labels: Iterable[Any], scores: Iterable[float]) -> tuple[float, float]:
    """The threshold (``score > t`` rejects) maximising F1, and that F1.

    Candidates lie midway between neighbouring distinct scores (plus one below the lowest, i.e.
    "reject all"). On equal F1 the highest threshold wins, i.e. the one rejecting fewest parts.
    """
    distinct, tp, fp = _cumulative(labels, scores)
    if distinct.size == 0 or tp[-1] == 0:
        raise ValueError("F1 needs at least one defect")
    f1 = _f1(tp, fp, tp[-1] - tp)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(_midpoints(distinct)[best]), float(f1[best])


def recall_target_threshold(labels: Iterable[Any], scores: Iterable[float], recall: float) -> float:
    """The highest threshold (``score > t`` rejects, midway convention) whose recall is >= ``recall``."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall target must be in (0, 1], got {recall}")
    distinct, tp, _ = _cumulative(labels, scores)
    if distinct.size == 0 or tp[-1] == 0:
        raise ValueError("a recall target needs at least one defect")
    # A tiny tolerance so that e.g. 0.99 * 100 defects counts 99 found as enough.
    ok = np.flatnonzero(tp / tp[-1] >= recall - 1e-12)
    return float(_midpoints(distinct)[ok[0]])


def confusion(labels: Iterable[Any], rejects: Iterable[Any]) -> dict[str, float | int]:
    """Confusion counts and rates of decisions ``rejects`` against ``labels`` (see module conventions)."""
    y = np.asarray(labels).astype(bool)
    r = np.asarray(rejects).astype(bool)
    if y.shape != r.shape or y.ndim != 1:
        raise ValueError(f"labels and rejects must be 1-D and equally long, got {y.shape} and {r.shape}")
    tp, fp = int(np.sum(y & r)), int(np.sum(~y & r))
    fn, tn = int(np.sum(y & ~r)), int(np.sum(~y & ~r))
    n = tp + fp + fn + tn
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "f1": float(_f1(np.array(tp), np.array(fp), np.array(fn))),
        "false_reject_rate": fp / (fp + tn) if fp + tn else 0.0,
        "accuracy": (tp + tn) / n if n else 1.0,
    }


# --------------------------------------------------------------------------- pixel level


def _paired(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m, g = np.asarray(m), np.asarray(g)
        if m.shape != g.shape:
            raise ValueError(f"map {i} has shape {m.shape} but its mask {g.shape}; resize masks with downsample_mask")
        pairs.append((m, g))
    if not pairs:
        raise ValueError("no anomaly maps given")
    return pairs


def _score_range(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], score_range: tuple[float, float] | None
) -> tuple[float, float]:
    if score_range is None:
        lo = min(float(np.min(m)) for m, _ in pairs)  # NaN propagates and is rejected below
        hi = max(float(np.max(m)) for m, _ in pairs)
    else:
        lo, hi = map(float, score_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("anomaly maps must be finite")
    return lo, hi if hi > lo else lo + 1.0  # a constant map still needs a non-empty range


def _bincount(values: np.ndarray, lo: float, hi: float, bins: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Histogram of ``values`` over [lo, hi] in ``bins`` equal bins (outliers clipped to the ends).

    Chunked so the temporary index array stays small even for a 5120 x 5120 map.
    """
    out = np.zeros(bins, dtype=np.float64)
    flat = values.ravel()
    w = None if weights is None else weights.ravel()
    scale = bins / (hi - lo)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK].astype(np.float64)
        idx = np.clip(((chunk - lo) * scale).astype(np.int64), 0, bins - 1)
        cw = None if w is None else w[start : start + _CHUNK]
        out += np.bincount(idx, weights=cw, minlength=bins)
    return out


def _above(hist: np.ndarray) -> np.ndarray:
    """Counts at or above each bin edge, from the top bin down, with a leading 0 (threshold above all)."""
    return np.r_[0.0, np.cumsum(hist[::-1])]


def downsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a boolean GT mask to an anomaly map's ``(H, W)``: a cell is defective if any of it is.

    "Any" rather than nearest-neighbour so that defects smaller than one map cell do not vanish.
    """
    m = np.asarray(mask, dtype=np.float32)
    if m.shape == tuple(shape):
        return m > 0
    return cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) > 0


def pixel_auroc(
    maps: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    bins: int = DEFAULT_BINS,
    score_range: tuple[float, float] | None = None,
) -> float:
    """Pixel-level AUROC over all maps together, from per-class score histograms.

    Memory is O(bins) beyond the maps themselves (no concatenation or sort of all pixels).
    Pixels falling into the same bin count as ties (half credit), so the error is at most half
    the fraction of (defect, good) pixel pairs sharing a bin: with 4096 bins over the score
    range this is well below 1e-3 unless a few extreme outliers stretch the range; pass
    ``score_range`` to fix the range (values outside are clipped to the end bins).
    """
    pairs = _paired(maps, masks)
    lo, hi = _score_range(pairs, score_range)
    pos = np.zeros(bins)
    neg = np.zeros(bins)
    for m, g in pairs:
        g = g.astype(bool)
        # Good = all - defect: avoids copying the (large) good part of the map out with m[~g].
        hit = _bincount(m[g], lo, hi, bins)
        pos += hit
        neg += _bincount(m, lo, hi, bins) - hit
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("pixel AUROC needs both defect and good pixels")
    tpr = _above(pos) / pos.sum()
    fpr = _above(neg) / neg.sum()
    return auc(fpr, tpr)


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """For the defect pixels (in ``mask`` order), 1 / size of their 8-connected GT region; and the
    number of regions. Only defect pixels get a weight, to keep the temporaries small."""
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    owner = lab[mask]
    sizes = np.bincount(owner, minlength=n).astype(np.float64)
    return 1.0 / sizes[owner], n - 1


def aupro(
    maps: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    fpr_limit: float = 0.3,
    bins: int = DEFAULT_BINS,
    score_range: tuple[float, float] | None = None,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1] (MVTec AD).

    PRO(t) is the mean over all GT regions (8-connected components, all images pooled) of the
    fraction of the region's pixels scoring >= t; FPR(t) is over all good pixels. Rather than
    one histogram per region, each defect pixel is weighted by 1/(its region's size) in a single
    histogram: summing those weights above t gives the sum of per-region overlaps. Binning as in
    ``pixel_auroc``; the curve is linearly interpolated at ``fpr_limit``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    pairs = _paired(maps, masks)
    lo, hi = _score_range(pairs, score_range)
    overlap = np.zeros(bins)
    neg = np.zeros(bins)
    n_regions = 0
    for m, g in pairs:
        g = g.astype(bool)
        w, n = _region_weights(g)
        n_regions += n
        inside = m[g]
        overlap += _bincount(inside, lo, hi, bins, weights=w)
        neg += _bincount(m, lo, hi, bins) - _bincount(inside, lo, hi, bins)
    if n_regions == 0 or neg.sum() == 0:
        raise ValueError("AUPRO needs both defect regions and good pixels")
    fpr = _above(neg) / neg.sum()
    pro = _above(overlap) / n_regions
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) for x in [0, limit]; x is non-decreasing from 0."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit:  # interpolate the crossing point (x reaches 1 >= limit at the end)
        j = int(np.argmax(x > limit))
        frac = (limit - x[j - 1]) / (x[j] - x[j - 1])
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y[j - 1] + frac * (y[j] - y[j - 1])]
    return auc(xs, ys)


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class GtRegion:
    """One ground-truth defect (8-connected component): bbox (x1/y1 exclusive), max side, found."""

    bbox: tuple[int, int, int, int]
    size_px: int
    found: bool

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": list(self.bbox), "size_px": self.size_px, "found": self.found}


def match_defects(pred_boxes: Iterable[Sequence[float]], gt_mask: np.ndarray) -> list[GtRegion]:
    """GT regions of ``gt_mask`` and whether a predicted box contains at least one of their pixels.

    Boxes are ``(x0, y0, x1, y1)`` in the mask's pixel frame, x1/y1 exclusive. Overlap of bounding
    boxes is not enough: an L-shaped scratch's bbox corner may be empty, and a box there has not
    located the defect.
    """
    mask = np.asarray(gt_mask).astype(np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"gt_mask must be 2-D, got shape {mask.shape}")
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    covered = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    for box in pred_boxes:
        # Outward rounding: a fractional box covers every pixel it touches.
        x0, y0 = math.floor(float(box[0])), math.floor(float(box[1]))
        x1, y1 = math.ceil(float(box[2])), math.ceil(float(box[3]))
        covered[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = True
    found = set(np.unique(lab[covered]).tolist())
    regions = []
    for i in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        regions.append(GtRegion((x, y, x + bw, y + bh), max(bw, bh), i in found))
    return regions


def size_bucket(size_px: float) -> str:
    """Size class of a defect by its max bbox side: [0,10) "<10", [10,50), [50,200), [200,inf) ">200"."""
    if size_px < 10:
        return "<10"
    if size_px < 50:
        return "10-50"
    if size_px < 200:
        return "50-200"
    return ">200"


# --------------------------------------------------------------------------- summary


def _or_none(fn: Any, *args: Any) -> Any:
    """Call a metric, mapping "undefined for this data" (ValueError) to None for the JSON summary."""
    try:
        return fn(*args)
    except ValueError:
        return None


def _score(record: Mapping[str, Any]) -> float:
    """A record's score as a float; NaN where there is none (``predict`` writes null for a failed frame)."""
    value = record.get("score")
    return float("nan") if value is None else float(value)


def ranking_scores(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Record scores, with missing or non-finite ones (failed frames) ranked above every finite score."""
    s = np.array([_score(r) for r in records], dtype=np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        top = float(np.max(s[~bad])) if (~bad).any() else 0.0
        s[bad] = top + 1.0
    return s


def _image_level(labels: np.ndarray, scores: np.ndarray, rejects: np.ndarray, recall: float) -> dict[str, Any]:
    out: dict[str, Any] = {"auroc": _or_none(image_auroc, labels, scores)}
    out.update(confusion(labels, rejects))
    if not labels.any():  # good parts only: "recall 1.0" would read as a finding; there was nothing to find
        out.update(precision=None, recall=None, f1=None)
    opt = _or_none(f1_optimal_threshold, labels, scores)
    out["f1_optimal_threshold"], out["f1_optimal_f1"] = opt if opt else (None, None)
    out["recall_target"] = recall
    out["recall_target_threshold"] = _or_none(recall_target_threshold, labels, scores, recall)
    return out


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _regions(records: Sequence[Mapping[str, Any]], truth: Mapping[str, Mapping[str, Any]]) -> list[list]:
    """GT regions per record (empty list when the image has no mask)."""
    out = []
    for r in records:
        mask = truth[r["image"]].get("mask")
        boxes = [d["bbox"] for d in r.get("defects", [])]
        out.append([] if mask is None else match_defects(boxes, mask))
    return out


def _per_kind(
    records: Sequence[Mapping[str, Any]], kinds: list[str], rejects: np.ndarray, regions: list[list]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds) - {"good"}):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        regs = [g for i in idx for g in regions[i]]
        out[kind] = {
            "n": len(idx),
            "recall": _rate(int(rejects[idx].sum()), len(idx)),
            "regions": len(regs),
            "located": _rate(sum(g.found for g in regs), len(regs)),
        }
    return out


def _per_size(regions: list[list]) -> dict[str, dict[str, Any]]:
    out = {b: {"n": 0, "recall": None} for b in SIZE_BUCKETS}
    found = dict.fromkeys(SIZE_BUCKETS, 0)
    for g in (g for regs in regions for g in regs):
        b = size_bucket(g.size_px)
        out[b]["n"] += 1
        found[b] += int(g.found)
    for b in SIZE_BUCKETS:
        out[b]["recall"] = _rate(found[b], out[b]["n"])
    return out


def _finite_or_none(value: Any) -> float | None:
    """Plain float, or None for NaN/inf, which strict JSON cannot hold."""
    v = float(value)
    return v if math.isfinite(v) else None


def _worst(
    records: Sequence[Mapping[str, Any]],
    kinds: list[str],
    scores: np.ndarray,
    located: Sequence[bool | None],
    n_worst: int,
) -> list[dict[str, Any]]:
    """Highest-scoring goods (false-reject risks), lowest-scoring defects (escape risks), then a few
    rejected defects not listed yet: those whose ground truth no detected region overlaps first
    (rejected for something else), then the weakest (closest to escaping)."""
    goods = [i for i, k in enumerate(kinds) if k == "good"]
    defects = [i for i, k in enumerate(kinds) if k != "good"]
    goods.sort(key=lambda i: -scores[i])
    defects.sort(key=lambda i: scores[i])
    low = defects[:n_worst]
    rejected = [i for i in defects if i not in low and records[i]["verdict"] == "reject"]
    rejected.sort(key=lambda i: (located[i] is not False, scores[i]))
    out = []
    groups = (
        ("high-scoring good", goods[:n_worst]),
        ("low-scoring defect", low),
        ("weakest or unlocated reject", rejected[: max(1, n_worst // 2)] if n_worst else []),
    )
    for why, idx in groups:
        for i in idx:
            r = records[i]
            out.append(
                {
                    "image": str(r["image"]),
                    "kind": kinds[i],
                    "why": why,
                    "score": _finite_or_none(_score(r)),
                    "threshold": float(r["threshold"]),
                    "verdict": str(r["verdict"]),
                }
            )
    return out


def _operating_point(threshold: float | None, labels: np.ndarray, rejects: np.ndarray | None) -> dict[str, Any]:
    """Precision, recall, F1 and false-reject rate of one threshold's decisions (all None without one)."""
    if threshold is None or rejects is None:
        keys = ("precision", "recall", "f1", "false_reject_rate", "rejected_goods", "found_defects")
        return {"threshold": None, **dict.fromkeys(keys)}
    c = confusion(labels, rejects)
    defects = bool(np.asarray(labels).any())  # without defects, precision/recall/F1 would only be conventions

    def rate(key: str) -> float | None:
        return round(float(c[key]), 4) if defects or key == "false_reject_rate" else None

    return {
        "threshold": round(float(threshold), 4),
        **{k: rate(k) for k in ("precision", "recall", "f1", "false_reject_rate")},
        "rejected_goods": c["fp"],
        "found_defects": c["tp"],
    }


def threshold_choices(
    labels: np.ndarray, scores: np.ndarray, rejects: np.ndarray, threshold: float | None, recall: float
) -> dict[str, dict[str, Any]]:
    """The three thresholds a quality engineer chooses between, each with its figures on this data.

    ``calibrated`` is the records' own threshold and verdicts (what the line does); ``f1_optimal``
    and ``recall_target`` are chosen on these labels and apply the rule ``score > t`` (failed
    frames, ranked highest, are rejected by every threshold). The latter two are None without defects.
    """
    y = np.asarray(labels).astype(int)
    out = {"calibrated": _operating_point(threshold, y, rejects)}
    f1 = _or_none(f1_optimal_threshold, y, scores)
    out["f1_optimal"] = _operating_point(None if f1 is None else f1[0], y, None if f1 is None else scores > f1[0])
    rt = _or_none(recall_target_threshold, y, scores, recall)
    out["recall_target"] = {"target": recall, **_operating_point(rt, y, None if rt is None else scores > rt)}
    return out


def _quantiles(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {"n": 0, **dict.fromkeys(("min", "median", "p95", "max"))}
    names = ("min", "median", "p95", "max")
    q = np.percentile(values, (0, 50, 95, 100))
    return {"n": int(values.size), **{k: round(float(v), 4) for k, v in zip(names, q, strict=True)}}


def score_distribution(records: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class (good, defect): how many were scored, min/median/95th percentile/max, and how many
    frames could not be scored at all (registration failed, bad frame), which never count as finite."""
    scores = np.array([_score(r) for r in records], dtype=np.float64)
    out = {}
    for name, members in (("good", [k == "good" for k in kinds]), ("defect", [k != "good" for k in kinds])):
        sel = scores[np.asarray(members, dtype=bool)] if records else scores
        finite = sel[np.isfinite(sel)]
        out[name] = {**_quantiles(finite), "unscored": int(sel.size - finite.size)}
    return out


def outcome(kind: str, verdict: str, located: bool | None = None) -> str:
    """What a decision means against the truth: correct pass, false reject, escape or correct reject.

    A rejected defect whose ground truth no detected region overlaps (``located`` False) was
    rejected for something else: "correct reject, defect not located".
    """
    if kind == "good":
        return "false reject" if verdict == "reject" else "correct pass"
    if verdict != "reject":
        return "escape"
    return "correct reject, defect not located" if located is False else "correct reject"


def _located(regions: Sequence[GtRegion], has_mask: bool) -> bool | None:
    """Whether a detected region overlaps the ground truth; None without a mask or without a GT region."""
    return any(g.found for g in regions) if has_mask and regions else None


PER_IMAGE_COLUMNS = (
    "image",
    "kind",
    "outcome",
    "score",
    "threshold",
    "verdict",
    "reason",
    "defects",
    "gt_regions",
    "located",
)


def per_image(records: Sequence[Mapping[str, Any]], truth: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per record (``PER_IMAGE_COLUMNS``): its decision against the truth.

    ``defects`` is the number of detected regions, ``gt_regions`` the number of ground-truth
    regions (None without a mask) and ``located`` whether a detected region overlaps the ground
    truth (None where there is no mask or it is empty).
    """
    rows = []
    for r, regs in zip(records, _regions(records, truth), strict=True):
        t = truth[r["image"]]
        has_mask = t.get("mask") is not None
        located = _located(regs, has_mask)
        rows.append(
            {
                "image": str(r["image"]),
                "kind": str(t["kind"]),
                "outcome": outcome(str(t["kind"]), str(r["verdict"]), located),
                "score": _finite_or_none(_score(r)),
                "threshold": float(r["threshold"]),
                "verdict": str(r["verdict"]),
                "reason": str(r.get("reason", "")),
                "defects": len(r.get("defects", [])),
                "gt_regions": len(regs) if has_mask else None,
                "located": located,
            }
        )
    return rows


def summarise(
    records: Sequence[Mapping[str, Any]],
    truth: Mapping[str, Mapping[str, Any]],
    recall_target: float = 0.99,
    n_worst: int = 5,
) -> dict[str, Any]:
    """Score ``inspectd predict`` records against ground truth; returns a JSON-serialisable dict.

    ``truth`` maps each record's image path to ``{"kind": "good" | <defect kind>, "mask": bool
    ndarray (full resolution) | None}``; a defect image without a mask counts at image level
    only. Keys: ``n_images``, ``n_good``, ``n_defect``, ``masks`` (defect images with a mask),
    ``unscored`` (truth images without a record), ``threshold`` (the records' threshold when they
    all agree, else None), ``image`` (AUROC, confusion at the records' verdicts, F1-optimal
    threshold and F1, recall-target threshold), ``thresholds`` (``threshold_choices``),
    ``scores`` (``score_distribution``), ``per_kind``, ``per_size`` and ``worst``.
    Undefined metrics (e.g. AUROC without goods) are None. Failed frames (null or non-finite
    score) rank above all others.
    """
    missing = [str(r["image"]) for r in records if r["image"] not in truth]
    if missing:
        raise ValueError(f"no ground truth for {len(missing)} image(s), e.g. {missing[0]}")
    kinds = [str(truth[r["image"]]["kind"]) for r in records]
    labels = np.array([k != "good" for k in kinds], dtype=bool)
    scores = ranking_scores(records)
    rejects = np.array([r["verdict"] == "reject" for r in records], dtype=bool)
    thresholds = {float(r["threshold"]) for r in records}
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    regions = _regions(records, truth)
    located = [
        _located(regs, truth[r["image"]].get("mask") is not None) for r, regs in zip(records, regions, strict=True)
    ]
    seen = {r["image"] for r in records}
    masked = sum(1 for r, y in zip(records, labels, strict=True) if y and truth[r["image"]].get("mask") is not None)
    return {
        "n_images": len(records),
        "n_good": int((~labels).sum()),
        "n_defect": int(labels.sum()),
        "masks": {"defect_images": int(labels.sum()), "with_mask": masked},
        "unscored": sum(1 for k in truth if k not in seen),
        "threshold": threshold,
        "image": _image_level(labels.astype(int), scores, rejects, recall_target),
        "thresholds": threshold_choices(labels, scores, rejects, threshold, recall_target),
        "scores": score_distribution(records, kinds),
        "per_kind": _per_kind(records, kinds, rejects, regions),
        "per_size": _per_size(regions),
        "worst": _worst(records, kinds, scores, located, n_worst),
    }
