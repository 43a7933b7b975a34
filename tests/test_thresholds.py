"""Good-only thresholds: Gumbel tail with a floor above the worst good score, never flagging every good part."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.thresholds import (
    OUTLIER_MARGIN,
    OUTLIER_MIN_RATIO,
    good_threshold,
    gumbel_fit,
    gumbel_quantile,
    outlier_scores,
)
from engines.regions import find_regions


def test_gumbel_fit_recovers_location_and_scale():
    """The moment fit of a large Gumbel sample is close to the true location and scale."""
    rng = np.random.default_rng(0)
    loc, scale = gumbel_fit(rng.gumbel(2.0, 0.3, 20000))
    assert loc == pytest.approx(2.0, abs=0.02) and scale == pytest.approx(0.3, abs=0.01)
    assert gumbel_quantile(2.0, 0.3, math.exp(-1)) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.25, 0.5])
def test_threshold_at_least_worst_good_times_one_plus_margin(seed, margin):
    """The threshold is never below the worst typical good score times (1 + margin), the worst of all times
    (1 + min(margin, OUTLIER_MARGIN)), nor the Gumbel tail; with no outlier, the worst good times (1 + margin)."""
    rng = np.random.default_rng(seed)
    scores = np.append(rng.gumbel(1.0, 0.1, 12), 3.0 if seed % 2 else 1.1)  # odd seeds: one outlying good part
    cal = good_threshold(scores, 0.005, margin)
    loc, scale = gumbel_fit(scores)
    outlying = outlier_scores(scores, OUTLIER_MIN_RATIO)[2]
    assert outlying.sum() == seed % 2 and cal["outlying_good_scores"] == seed % 2
    assert cal["threshold"] >= scores[~outlying].max() * (1 + margin) - 1e-5
    assert cal["threshold"] >= scores.max() * (1 + min(margin, OUTLIER_MARGIN)) - 1e-5
    assert cal["threshold"] >= gumbel_quantile(loc, scale, 0.995) - 1e-5
    assert cal["good_max"] == pytest.approx(scores.max(), abs=1e-5)
    assert 0 < cal["expected_frr"] <= 0.005 + 1e-6


def test_one_unusual_good_part_is_cleared_but_does_not_lift_the_margin():
    """29 good parts near 1 and one at 3: the threshold clears the one by OUTLIER_MARGIN (3.3) and the others by
    the margin (1.5 x their worst); the margin is not taken over the one (4.5, over the small defects)."""
    scores = np.append(np.random.default_rng(3).normal(1.0, 0.05, 29), 3.0)
    cal = good_threshold(scores, 0.005, 0.5)
    assert cal["threshold"] == pytest.approx(max(3.0 * (1 + OUTLIER_MARGIN), 1.5 * scores[:29].max()))
    assert cal["threshold"] < 3.5


def test_a_good_score_the_audit_would_name_but_not_twice_the_median_gets_the_margin():
    """Tightly spread good scores (a 3 % spread) and one at 1.5 times their median: the audit's rule (1.25 times)
    names it for a person to look at, but it is an ordinary good part for the threshold, which clears it by the
    margin (where the 10 % floor would leave the next such part at the threshold)."""
    scores = np.append(np.random.default_rng(6).normal(1.0, 0.03, 29), 1.5)
    assert outlier_scores(scores)[2][-1], "the audit's rule names it"
    assert not outlier_scores(scores, OUTLIER_MIN_RATIO)[2].any()
    assert good_threshold(scores, 0.005, 0.5)["threshold"] == pytest.approx(2.25)


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.1])
def test_a_margin_up_to_the_outlier_margin_is_taken_over_the_worst_good(margin):
    """As before the typical scores were told apart (``inspectd calibrate --margin`` 0.1 keeps its thresholds)."""
    scores = np.append(np.random.default_rng(4).normal(1.0, 0.05, 29), 3.0)
    loc, scale = gumbel_fit(scores)
    want = max(gumbel_quantile(loc, scale, 0.995), 3.0 * (1 + margin))
    assert good_threshold(scores, 0.005, margin)["threshold"] == pytest.approx(want)


def test_threshold_floor_survives_rounding():
    """The documented floor worst * (1 + margin) holds exactly, not just up to the rounding of the stored value."""
    scores = np.array([1.0] * 10 + [1.0000004])  # the outlier makes the floor beat the Gumbel tail
    margin = 0.1
    floor = scores.max() * (1 + margin)  # 1.10000044: rounding to 5 decimals gives 1.1
    loc, scale = gumbel_fit(scores)
    assert gumbel_quantile(loc, scale, 0.995) < floor
    assert good_threshold(scores, 0.005, margin)["threshold"] >= floor


@pytest.mark.parametrize("value", [0.0, 0.8, 3.0])
def test_identical_good_scores_never_make_goods_anomalous(value):
    """With degenerate identical good scores the threshold stays at or above them (no region on a good map)."""
    scores = np.full(10, value)
    cal = good_threshold(scores, 0.005, 0.1)
    assert math.isfinite(cal["threshold"]) and cal["threshold"] >= value
    good_map = np.full((16, 16), value, np.float32)
    assert find_regions(good_map, cal["threshold"]) == []


def test_small_score_scales_keep_goods_passing():
    """Good maps peaking near 1e-5 (a very quiet detector) still pass: the threshold stays above every good score."""
    value = 1.02e-5  # Gumbel tail 1.49e-5 is the larger bound; rounded to 5 decimals it becomes 1e-5 < value
    cal = good_threshold(np.full(10, value), 0.005, 0.1)
    assert find_regions(np.full((16, 16), value, np.float32), cal["threshold"]) == []


@pytest.mark.parametrize("seed", range(3))
def test_threshold_is_above_every_good_score(seed):
    """No good image of the calibration set would be rejected by its own threshold."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.3, 1.2, 20)
    cal = good_threshold(scores, 0.01, 0.05)
    assert cal["threshold"] > scores.max()
    assert cal["good_scores"] == [round(float(s), 5) for s in scores]


@pytest.mark.parametrize("target", [0.0, -0.1, 0.5, 1.0, float("nan")])
def test_rejects_bad_target_frr(target):
    """A target false-reject rate outside (0, 0.5) is refused."""
    with pytest.raises(ValueError, match="false-reject rate"):
        good_threshold(np.array([1.0, 1.1, 1.2]), target, 0.1)


@pytest.mark.parametrize("scores", [[], [1.0], [1.0, float("nan")], [1.0, float("inf")]])
def test_rejects_too_few_or_non_finite_scores(scores):
    """Fewer than two scores, or any non-finite score, is refused."""
    with pytest.raises(ValueError, match="at least two finite"):
        good_threshold(np.array(scores), 0.005, 0.1)
