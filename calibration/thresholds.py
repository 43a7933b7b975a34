"""Thresholds: from good images alone (a target false-reject rate), or from labelled defects too."""

from __future__ import annotations

import math

import numpy as np

EULER_GAMMA = 0.5772156649
Z_FLAG = 3.5  # modified z-score above which a good score is an outlier (Iglewicz and Hoaglin's rule)
MIN_RATIO = 1.25  # ... and at least this many times the median good score
MAD_FLOOR = 1e-3  # log units: a MAD below this (identical scores) is taken as this
# The floor over a good score the others do not approach: it stays above that part, but the line's margin (fit's
# default 50 %) is taken over the typical scores, or one unusual good part would lift the threshold over the
# small defects by half again (README, "The threshold's margin")
OUTLIER_MARGIN = 0.1
# ... and only a good score at least this many times the median counts as such: the audit names scores from 1.25
# times the median for a person to look at, but where good scores spread little, 1.4-1.6 times the median is an
# ordinary good part, which the margin must clear (README, "The threshold's margin": spent seed 9013's `easy` and
# `fixture` lines; the cases that lifted the threshold over defects were 3.4-3.5 times the median)
OUTLIER_MIN_RATIO = 2.0


def outlier_scores(scores: np.ndarray, min_ratio: float = MIN_RATIO) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per good score: the modified z-score of its log, its ratio to the median, and whether it is an outlier
    (z above Z_FLAG and at least ``min_ratio`` times the median). Robust statistics: the outliers move neither the
    median nor the MAD, and the log makes the test scale-free."""
    scores = np.asarray(scores, np.float64)
    median, mad = log_median_and_mad(scores)
    z = (np.log(np.maximum(scores, 1e-9)) - median) / mad
    ratio = scores / math.exp(median)
    return z, ratio, (z > Z_FLAG) & (ratio > min_ratio)


def log_median_and_mad(scores: np.ndarray) -> tuple[float, float]:
    """The median of the log scores and their MAD (scaled to a standard deviation, never below MAD_FLOOR)."""
    logs = np.log(np.maximum(np.asarray(scores, np.float64), 1e-9))
    median = float(np.median(logs))
    return median, max(float(np.median(np.abs(logs - median))) * 1.4826, MAD_FLOOR)


def gumbel_fit(maxima: np.ndarray) -> tuple[float, float]:
    """Method-of-moments Gumbel fit (location, scale) of per-image maximum scores."""
    scale = max(float(np.std(maxima, ddof=1)) * math.sqrt(6) / math.pi, 1e-6)
    return float(np.mean(maxima)) - EULER_GAMMA * scale, scale


def gumbel_quantile(loc: float, scale: float, q: float) -> float:
    return loc - scale * math.log(-math.log(q))


def good_threshold(scores: np.ndarray, target_frr: float, margin: float) -> dict:
    """Threshold for ``target_frr`` on good images the fit did not see.

    Per-image maxima of good parts follow an extreme-value law, so the tail beyond the few
    observed scores comes from a Gumbel fit; the threshold is never below the worst typical good
    score times (1 + margin), nor below any outlying one (``outlier_scores`` from OUTLIER_MIN_RATIO
    times the median) times (1 + the smaller of margin and OUTLIER_MARGIN). It can therefore never make
    every good part anomalous.
    """
    scores = np.asarray(scores, np.float64)
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError("need at least two finite good scores to calibrate")
    if not 0 < target_frr < 0.5:
        raise ValueError(f"target false-reject rate must be in (0, 0.5), got {target_frr}")
    loc, scale = gumbel_fit(scores)
    tail = gumbel_quantile(loc, scale, 1 - target_frr)
    worst = float(scores.max())
    outlying = outlier_scores(scores, OUTLIER_MIN_RATIO)[2]
    typical = float(scores[~outlying].max())
    threshold = max(tail, typical * (1 + margin), worst * (1 + min(margin, OUTLIER_MARGIN)))
    return {
        "threshold": threshold,  # unrounded: rounding could drop it below the floor
        "policy": "good-frr",
        "target_frr": target_frr,
        "min_area": 1,
        "good_scores": [round(float(s), 5) for s in scores],
        "good_max": round(worst, 5),
        "margin": round(threshold / worst - 1, 4) if worst > 0 else None,
        "margin_floor": margin,
        "outlying_good_scores": int(outlying.sum()),
        "gumbel": {"loc": round(loc, 5), "scale": round(scale, 5)},
        "expected_frr": round(1 - math.exp(-math.exp(-(threshold - loc) / scale)), 6),
    }
