"""Thresholds: from good images alone (a target false-reject rate), or from labelled defects too."""

from __future__ import annotations

import math

import numpy as np

EULER_GAMMA = 0.5772156649


def gumbel_fit(maxima: np.ndarray) -> tuple[float, float]:
    """Method-of-moments Gumbel fit (location, scale) of per-image maximum scores."""
    scale = max(float(np.std(maxima, ddof=1)) * math.sqrt(6) / math.pi, 1e-6)
    return float(np.mean(maxima)) - EULER_GAMMA * scale, scale


def gumbel_quantile(loc: float, scale: float, q: float) -> float:
    return loc - scale * math.log(-math.log(q))


def good_threshold(scores: np.ndarray, target_frr: float, margin: float) -> dict:
    """Threshold for ``target_frr`` on good images the fit did not see.

    Per-image maxima of good parts follow an extreme-value law, so the tail beyond the few
    observed scores comes from a Gumbel fit; the threshold is never below the worst observed
    good score times (1 + margin). It can therefore never make every good part anomalous.
    """
    scores = np.asarray(scores, np.float64)
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError("need at least two finite good scores to calibrate")
    if not 0 < target_frr < 0.5:
        raise ValueError(f"target false-reject rate must be in (0, 0.5), got {target_frr}")
    loc, scale = gumbel_fit(scores)
    tail = gumbel_quantile(loc, scale, 1 - target_frr)
    worst = float(scores.max())
    threshold = max(tail, worst * (1 + margin))
    return {
        "threshold": threshold,  # unrounded: rounding could drop it below the floor
        "policy": "good-frr",
        "target_frr": target_frr,
        "min_area": 1,
        "good_scores": [round(float(s), 5) for s in scores],
        "good_max": round(worst, 5),
        "margin": round(threshold / worst - 1, 4) if worst > 0 else None,
        "margin_floor": margin,
        "gumbel": {"loc": round(loc, 5), "scale": round(scale, 5)},
        "expected_frr": round(1 - math.exp(-math.exp(-(threshold - loc) / scale)), 6),
    }
