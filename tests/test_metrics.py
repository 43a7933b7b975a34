"""Tests for calibration.metrics: hand-computed curves, thresholds, pixel metrics and region matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import metrics

# P=3, N=3 with ties across classes (0.5) and within a class (0.2).
LABELS = [1, 1, 0, 1, 0, 0]
SCORES = [0.9, 0.5, 0.5, 0.3, 0.2, 0.2]


def test_roc_curve_hand_computed_with_ties() -> None:
    """Tied scores form one ROC step, matching the hand-computed points."""
    fpr, tpr, thr = metrics.roc_curve(LABELS, SCORES)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.3, 0.2])


def test_pr_curve_hand_computed_with_ties() -> None:
    """Precision and recall at each distinct score match the hand-computed values."""
    precision, recall, thr = metrics.pr_curve(LABELS, SCORES)
    np.testing.assert_allclose(precision, [1, 2 / 3, 3 / 4, 1 / 2])
    np.testing.assert_allclose(recall, [1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(thr, [0.9, 0.5, 0.3, 0.2])


def test_auroc_counts_ties_as_half() -> None:
    """AUROC equals the pairwise win rate with ties scoring 1/2 (7.5 of 9 pairs)."""
    assert metrics.image_auroc(LABELS, SCORES) == pytest.approx(7.5 / 9)


def test_auroc_perfect_random_inverted() -> None:
    """Perfect scores give 1, inverted 0, constant 0.5 and random about 0.5."""
    y = np.array([0] * 50 + [1] * 50)
    s = np.arange(100, dtype=float)
    assert metrics.image_auroc(y, s) == pytest.approx(1.0)
    assert metrics.image_auroc(y, -s) == pytest.approx(0.0)
    assert metrics.image_auroc(y, np.ones(100)) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20000)
    assert metrics.image_auroc(y, rng.random(20000)) == pytest.approx(0.5, abs=0.02)


def test_auroc_needs_both_classes() -> None:
    """An ROC curve with a single class is refused rather than returning NaN."""
    with pytest.raises(ValueError):
        metrics.image_auroc([1, 1], [0.1, 0.2])


def test_auc_trapezoid_either_direction() -> None:
    """The trapezoid area is the same for increasing and decreasing x."""
    assert metrics.auc([0, 1, 2], [0, 1, 1]) == pytest.approx(1.5)
    assert metrics.auc([2, 1, 0], [1, 1, 0]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        metrics.auc([0, 2, 1], [0, 0, 0])


def test_f1_optimal_threshold_crafted() -> None:
    """The best F1 (6/7) rejects the top three distinct scores, so t is midway between 0.3 and 0.2."""
    t, f1 = metrics.f1_optimal_threshold(LABELS, SCORES)
    assert t == pytest.approx(0.25)
    assert f1 == pytest.approx(6 / 7)
    c = metrics.confusion(LABELS, np.array(SCORES) > t)
    assert c["f1"] == pytest.approx(f1)


def test_f1_optimal_separable_is_between_classes() -> None:
    """With separable classes the threshold lies midway between the top good and the lowest defect."""
    t, f1 = metrics.f1_optimal_threshold([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9])
    assert (t, f1) == (pytest.approx(0.5), pytest.approx(1.0))


def test_recall_target_threshold() -> None:
    """The threshold is the highest midway candidate still reaching the recall target."""
    assert metrics.recall_target_threshold(LABELS, SCORES, 0.3) == pytest.approx(0.7)
    assert metrics.recall_target_threshold(LABELS, SCORES, 0.5) == pytest.approx(0.4)
    assert metrics.recall_target_threshold(LABELS, SCORES, 1.0) == pytest.approx(0.25)
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 500), np.round(rng.random(500), 2)
    t = metrics.recall_target_threshold(y, s, 0.99)
    assert metrics.confusion(y, s > t)["recall"] >= 0.99
    higher = np.unique(s[s > t])  # the next candidate up must fall short of the target
    assert metrics.confusion(y, s > higher[0])["recall"] < 0.99


def test_confusion_counts() -> None:
    """Counts and rates of an ordinary case."""
    c = metrics.confusion([1, 1, 0, 0, 0], [1, 0, 1, 0, 0])
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (1, 1, 2, 1)
    assert c["precision"] == pytest.approx(0.5)
    assert c["recall"] == pytest.approx(0.5)
    assert c["f1"] == pytest.approx(0.5)
    assert c["false_reject_rate"] == pytest.approx(1 / 3)
    assert c["accuracy"] == pytest.approx(0.6)


def test_confusion_edge_cases() -> None:
    """Zero denominators take the "nothing went wrong" value instead of raising."""
    all_good_pass = metrics.confusion([0, 0], [0, 0])
    assert (all_good_pass["precision"], all_good_pass["recall"], all_good_pass["f1"]) == (1.0, 1.0, 1.0)
    all_good_reject = metrics.confusion([0, 0], [1, 0])
    assert (all_good_reject["precision"], all_good_reject["f1"]) == (0.0, 0.0)
    assert all_good_reject["false_reject_rate"] == 0.5
    missed = metrics.confusion([1, 1], [0, 0])
    assert (missed["precision"], missed["recall"], missed["f1"], missed["false_reject_rate"]) == (1, 0, 0, 0)
    empty = metrics.confusion([], [])
    assert empty["accuracy"] == 1.0 and empty["tp"] == 0
    json.dumps(empty, allow_nan=False)


def _random_maps(seed: int, n: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        mask = np.zeros((40, 60), bool)
        if i % 3:  # some images have no defect at all
            y, x = rng.integers(0, 30), rng.integers(0, 50)
            mask[y : y + rng.integers(2, 10), x : x + rng.integers(2, 10)] = True
        maps.append((rng.normal(size=mask.shape) + 1.5 * mask).astype(np.float32))
        masks.append(mask)
    return maps, masks


def test_pixel_auroc_matches_exact_sort_based() -> None:
    """The binned pixel AUROC agrees with the exact sort-based value within 1e-3."""
    maps, masks = _random_maps(2)
    exact = metrics.image_auroc(
        np.concatenate([m.ravel() for m in masks]).astype(int), np.concatenate([m.ravel() for m in maps])
    )
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(exact, abs=1e-3)
    assert 0.7 < exact < 0.99  # the data is neither trivial nor random


def test_pixel_auroc_shape_mismatch_refused() -> None:
    """A mask that does not match its map's shape is an error, not a silent broadcast."""
    with pytest.raises(ValueError, match="downsample_mask"):
        metrics.pixel_auroc([np.zeros((4, 4))], [np.zeros((8, 8), bool)])


def test_downsample_mask_keeps_tiny_defects() -> None:
    """A 1-pixel defect survives 8x downsampling as one defective cell."""
    mask = np.zeros((64, 64), bool)
    mask[13, 50] = True
    small = metrics.downsample_mask(mask, (8, 8))
    assert small.sum() == 1 and small[1, 6]


def _two_region_mask() -> np.ndarray:
    mask = np.zeros((50, 50), bool)
    mask[5:10, 5:15] = True
    mask[30:45, 30:35] = True
    return mask


def test_aupro_perfect_map_is_one() -> None:
    """A map equal to the mask has PRO 1 at FPR 0, so the normalised AUPRO is 1."""
    mask = _two_region_mask()
    assert metrics.aupro([mask.astype(np.float32)], [mask]) == pytest.approx(1.0)


def test_aupro_missing_region_is_below_one() -> None:
    """A map that lights up only one of two equal-weight regions loses half the PRO until the ties."""
    mask = _two_region_mask()
    amap = np.zeros(mask.shape, np.float32)
    amap[5:10, 5:15] = 1.0
    value = metrics.aupro([amap], [mask])
    # PRO is 0.5 at FPR 0; the missed region ties with all good pixels at 0, so the curve then runs
    # linearly to (1, 1) and reaches 0.65 at FPR 0.3: mean height (0.5 + 0.65) / 2.
    assert value == pytest.approx(0.575)
    # Pixel AUROC is dominated by the big region; AUPRO weighs regions equally.
    assert value < 1.0


def _exact_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    """Reference AUPRO: every distinct score is a threshold (slow, small data only)."""
    import cv2

    region_scores, neg = [], []
    for m, g in zip(maps, masks, strict=True):
        n, lab = cv2.connectedComponents(g.astype(np.uint8), connectivity=8)
        region_scores += [m[lab == i] for i in range(1, n)]
        neg.append(m[~g])
    negs = np.concatenate(neg)
    ts = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fpr = np.r_[0.0, [(negs >= t).mean() for t in ts]]
    pro = np.r_[0.0, [np.mean([(r >= t).mean() for r in region_scores]) for t in ts]]
    j = int(np.argmax(fpr > limit))
    frac = (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
    x = np.r_[fpr[:j], limit]
    y = np.r_[pro[:j], pro[j - 1] + frac * (pro[j] - pro[j - 1])]
    return metrics.auc(x, y) / limit


def test_aupro_matches_exact_on_random_data() -> None:
    """The binned AUPRO agrees with an exact per-threshold computation within 2e-3."""
    maps, masks = _random_maps(3)
    assert metrics.aupro(maps, masks) == pytest.approx(_exact_aupro(maps, masks, 0.3), abs=2e-3)


def _l_shape() -> np.ndarray:
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:13] = True  # vertical bar
    mask[27:30, 10:30] = True  # bottom bar: bbox (10, 10, 30, 30), top-right corner empty
    return mask


def test_match_defects_bbox_corner_is_not_found() -> None:
    """A box inside the L's bbox but touching no mask pixel does not locate the defect."""
    regions = metrics.match_defects([(24, 10, 30, 16)], _l_shape())
    assert regions == [metrics.GtRegion((10, 10, 30, 30), 20, False)]


def test_match_defects_touching_pixel_is_found() -> None:
    """A box covering a single mask pixel (x1/y1 exclusive) locates the region."""
    assert metrics.match_defects([(29, 29, 31, 31)], _l_shape())[0].found
    assert not metrics.match_defects([(30, 30, 35, 35)], _l_shape())[0].found


def test_match_defects_eight_connectivity_and_sizes() -> None:
    """Diagonally touching pixels form one region; separate blobs are matched independently."""
    mask = np.zeros((20, 20), bool)
    mask[2, 2] = mask[3, 3] = True
    mask[10:15, 12:14] = True
    regions = metrics.match_defects([(12, 14, 13, 15)], mask)
    assert [(r.bbox, r.size_px, r.found) for r in regions] == [
        ((2, 2, 4, 4), 2, False),
        ((12, 10, 14, 15), 5, True),
    ]


@pytest.mark.parametrize(
    ("size", "bucket"),
    [(0, "<10"), (9.99, "<10"), (10, "10-50"), (49, "10-50"), (50, "50-200"), (199, "50-200"), (200, ">200")],
)
def test_size_bucket_edges(size: float, bucket: str) -> None:
    """Buckets are half-open [lo, hi): each edge belongs to the bucket above it."""
    assert metrics.size_bucket(size) == bucket


def _record(image: str, score: float, boxes: list[list[int]], threshold: float = 1.0) -> dict:
    verdict = "reject" if score > threshold else "pass"
    defects = [{"bbox": b, "area": 1, "score": score} for b in boxes]
    return {"image": image, "verdict": verdict, "score": score, "threshold": threshold, "defects": defects}


def test_summarise_tiny_synthetic_set() -> None:
    """Image, per-kind, per-size and worst-case figures of a 6-image set match hand counts."""
    scratch = np.zeros((300, 300), bool)
    scratch[10:15, 10:70] = True  # size 60 -> "50-200", found
    scratch[200:203, 200:203] = True  # size 3 -> "<10", missed
    dent = np.zeros((300, 300), bool)
    dent[100:120, 100:120] = True  # size 20 -> "10-50", missed (image passes)
    records = [
        _record("g1.png", 0.2, []),
        _record("g2.png", 0.5, []),
        _record("g3.png", 1.4, [[0, 0, 5, 5]]),  # false reject
        _record("s1.png", 3.0, [[20, 8, 30, 12]]),
        _record("d1.png", 0.9, []),
        _record("d2.png", float("nan"), []),  # failed frame: ranked above everything
    ]
    records[5]["verdict"] = "reject"
    truth = {
        "g1.png": {"kind": "good", "mask": None},
        "g2.png": {"kind": "good", "mask": None},
        "g3.png": {"kind": "good", "mask": np.zeros((300, 300), bool)},
        "s1.png": {"kind": "scratch", "mask": scratch},
        "d1.png": {"kind": "dent", "mask": dent},
        "d2.png": {"kind": "dent", "mask": None},
        "unused.png": {"kind": "good", "mask": None},
    }
    s = metrics.summarise(records, truth, n_worst=2)
    json.dumps(s, allow_nan=False)
    assert (s["n_images"], s["n_good"], s["n_defect"], s["unscored"], s["threshold"]) == (6, 3, 3, 1, 1.0)
    img = s["image"]
    assert (img["tp"], img["fp"], img["tn"], img["fn"]) == (2, 1, 2, 1)
    assert img["false_reject_rate"] == pytest.approx(1 / 3)
    # Ranking: nan(d) > 3.0(d) > 1.4(g) > 0.9(d) > 0.5(g) > 0.2(g): 8 of 9 pairs ordered.
    assert img["auroc"] == pytest.approx(8 / 9)
    assert img["f1_optimal_threshold"] == pytest.approx(0.7) and img["f1_optimal_f1"] == pytest.approx(6 / 7)
    assert img["recall_target_threshold"] == pytest.approx(0.7)
    assert s["per_kind"] == {
        "dent": {"n": 2, "recall": 0.5, "regions": 1, "located": 0.0},
        "scratch": {"n": 1, "recall": 1.0, "regions": 2, "located": 0.5},
    }
    assert s["per_size"] == {
        "<10": {"n": 1, "recall": 0.0},
        "10-50": {"n": 1, "recall": 0.0},
        "50-200": {"n": 1, "recall": 1.0},
        ">200": {"n": 0, "recall": None},
    }
    assert [(w["image"], w["why"]) for w in s["worst"]] == [
        ("g3.png", "high-scoring good"),
        ("g2.png", "high-scoring good"),
        ("d1.png", "low-scoring defect"),
        ("s1.png", "low-scoring defect"),
        ("d2.png", "weakest or unlocated reject"),  # the one rejected defect not listed yet
    ]
    assert s["masks"] == {"defect_images": 3, "with_mask": 2}


def test_summarise_all_good_has_no_auroc() -> None:
    """With goods only, undefined metrics are None and the summary is still strict JSON."""
    s = metrics.summarise([_record("g.png", 0.3, [])], {"g.png": {"kind": "good", "mask": None}})
    assert s["image"]["auroc"] is None and s["image"]["f1_optimal_threshold"] is None
    json.dumps(s, allow_nan=False)


def test_summarise_unknown_image_is_an_error() -> None:
    """A record without ground truth is refused, naming the image."""
    with pytest.raises(ValueError, match=r"x\.png"):
        metrics.summarise([_record("x.png", 0.3, [])], {})


def test_summarise_takes_predict_records_with_null_scores() -> None:
    """``predict`` writes "score": null for a frame it could not register; it ranks above every score."""
    records = [_record("g.png", 0.2, []), _record("d.png", 0.5, [])]
    records[1].update(score=None, verdict="reject", reason="registration")
    truth = {"g.png": {"kind": "good", "mask": None}, "d.png": {"kind": "dent", "mask": None}}
    s = metrics.summarise(records, truth)
    assert s["image"]["auroc"] == 1.0 and s["image"]["recall"] == 1.0
    assert s["scores"]["defect"] == {"n": 0, "min": None, "median": None, "p95": None, "max": None, "unscored": 1}
    assert metrics.per_image(records, truth)[1]["score"] is None
    json.dumps(s, allow_nan=False)


def test_threshold_choices_give_each_thresholds_figures_on_the_data() -> None:
    """Calibrated (the verdicts), F1-optimal and recall-target thresholds, each with precision, recall, F1, FRR."""
    # LABELS/SCORES with the records' threshold at 0.6: only the 0.9 defect is rejected.
    rejects = np.array(SCORES) > 0.6
    t = metrics.threshold_choices(np.array(LABELS), np.array(SCORES), rejects, 0.6, recall=1.0)
    assert t["calibrated"] == {
        "threshold": 0.6,
        "precision": 1.0,
        "recall": round(1 / 3, 4),
        "f1": 0.5,
        "false_reject_rate": 0.0,
        "rejected_goods": 0,
        "found_defects": 1,
    }
    # F1-optimal at 0.25 rejects 0.9, 0.5, 0.5, 0.3: 3 defects and 1 of 3 goods.
    f1 = t["f1_optimal"]
    assert (f1["threshold"], f1["recall"], f1["precision"], f1["f1"]) == (0.25, 1.0, 0.75, round(6 / 7, 4))
    assert (f1["false_reject_rate"], f1["rejected_goods"]) == (round(1 / 3, 4), 1)
    assert t["recall_target"]["target"] == 1.0 and t["recall_target"]["threshold"] == 0.25


def test_threshold_choices_without_defects_leave_the_labelled_ones_empty() -> None:
    """On good parts only the calibrated threshold still has its false-reject rate; the others are None."""
    t = metrics.threshold_choices(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 1.5]), np.array([0, 0, 0, 1]), 1.0, 0.99)
    assert t["calibrated"]["false_reject_rate"] == 0.25 and t["calibrated"]["rejected_goods"] == 1
    assert t["calibrated"]["recall"] is None  # nothing to find is not "recall 1.0"
    assert t["f1_optimal"]["threshold"] is None and t["recall_target"]["false_reject_rate"] is None


def test_summarise_good_only_gives_false_rejects_and_score_distribution() -> None:
    """A test set of good parts: the false-reject rate and the distribution of their scores."""
    scores = [0.1, 0.2, 0.3, 0.4, 1.5]
    records = [_record(f"g{i}.png", v, []) for i, v in enumerate(scores)]
    truth = {r["image"]: {"kind": "good", "mask": None} for r in records}
    s = metrics.summarise(records, truth)
    assert s["image"]["false_reject_rate"] == pytest.approx(0.2)
    good = s["scores"]["good"]
    assert (good["n"], good["min"], good["median"], good["max"], good["unscored"]) == (5, 0.1, 0.3, 1.5, 0)
    assert good["p95"] == pytest.approx(np.percentile(scores, 95), abs=1e-4)
    assert s["scores"]["defect"]["n"] == 0
    json.dumps(s, allow_nan=False)


def test_per_image_rows_say_what_each_decision_was() -> None:
    """One row per record: outcome against the truth, number of detected regions, and located only where a mask is."""
    mask = np.zeros((50, 50), bool)
    mask[10:20, 10:20] = True
    records = [
        _record("g.png", 1.4, [[0, 0, 5, 5]]),  # false reject
        _record("hit.png", 3.0, [[12, 12, 15, 15]]),  # box on the defect
        _record("off.png", 2.0, [[40, 40, 45, 45], [30, 30, 32, 32]]),  # rejected, but elsewhere
        _record("esc.png", 0.5, []),
        _record("nomask.png", 2.0, [[1, 1, 2, 2]]),  # image label only
    ]
    truth = {
        "g.png": {"kind": "good", "mask": None},
        "hit.png": {"kind": "dent", "mask": mask},
        "off.png": {"kind": "dent", "mask": mask},
        "esc.png": {"kind": "dent", "mask": mask},
        "nomask.png": {"kind": "dent", "mask": None},
    }
    rows = metrics.per_image(records, truth)
    assert [tuple(r) for r in rows] == [metrics.PER_IMAGE_COLUMNS] * 5
    assert [(r["outcome"], r["defects"], r["gt_regions"], r["located"]) for r in rows] == [
        ("false reject", 1, None, None),
        ("correct reject", 1, 1, True),
        ("correct reject, defect not located", 2, 1, False),
        ("escape", 0, 1, False),
        ("correct reject", 1, None, None),
    ]
    assert rows[0]["score"] == 1.4 and rows[0]["threshold"] == 1.0 and rows[0]["verdict"] == "reject"
