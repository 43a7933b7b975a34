"""Leave-one-out held-out statistics (issue 15, 5120 px): exact, and what they change in the calibration."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from calibration import fit_pipeline as fp
from calibration import template_fit as tf
from calibration.fit_pipeline import FitConfig
from tests.test_fit_streaming import training_set
from tests.test_template_fit import _training_of


def assert_close(got: np.ndarray, want: np.ndarray, key: str) -> None:
    """Equal but where float32 sums in another order round to the next FP16 step (0.125 at 128-256 grey levels)."""
    assert got.dtype == want.dtype, key
    a, b = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=key)
    assert (a == b).mean() > 0.99, key


@pytest.mark.parametrize(
    ("n", "height", "width", "channels", "dtype", "trim"),
    [
        (fp.TRIM_FROM + 1, 2 * fp.STRIP + 9, 40, 1, "uint8", None),  # trimmed (n - 1 from TRIM_FROM on)
        (fp.TRIM_FROM, fp.STRIP + 3, 33, 1, "uint8", None),  # n - 1 below TRIM_FROM: untrimmed, as statistics()
        (10, fp.STRIP - 5, 30, 3, "uint8", 2),  # colour, two trimmed at each end
        (9, fp.STRIP + 1, 25, 1, "uint16", 1),  # 16 bit
    ],
)
def test_leave_one_out_statistics_equal_those_of_the_other_images(tmp_path, n, height, width, channels, dtype, trim):
    """Without each image, every reference array is statistics() of the others (float32 sums aside: to 1e-4)."""
    training = training_set(n, height, width, channels, dtype)
    config = FitConfig(band_trim=trim)
    loo = fp.LeaveOneOut(training, config, str(tmp_path))
    try:
        for held in (0, n // 2, n - 1):
            got = loo.statistics(held)
            want = fp.statistics(training, [i for i in range(n) if i != held], config)
            assert set(got) == set(want)
            for key in want:
                assert_close(got[key], want[key], key)
    finally:
        loo.close()
    assert not list(tmp_path.iterdir())  # its arrays go with it


def test_leave_one_out_moves_the_band_where_the_held_image_was_extreme(tmp_path):
    """An image brighter than the rest at a pixel, held out, leaves the band there to the others."""
    training = training_set(fp.TRIM_FROM + 1, 40, 40)
    frames = np.array(training.registered)
    frames[3, 20, 20] = 255  # the highest at (20, 20); 0's second highest...
    frames[5, 20, 20] = 250  # ...and image 5 the second
    training = fp.Training(**{**training.__dict__, "registered": frames})
    loo = fp.LeaveOneOut(training, FitConfig(), str(tmp_path))
    try:
        for held in (3, 5, 0):
            want = fp.statistics(training, [i for i in range(len(frames)) if i != held], FitConfig())["hi"]
            assert_close(loo.statistics(held)["hi"], want, "hi")
            assert loo.statistics(held)["hi"][0, 20, 20] == want[0, 20, 20]
    finally:
        loo.close()


def test_a_nuisance_two_good_images_share_is_no_surprise_to_either_held_out(tmp_path):
    """Images 0 and 5 (one fold of 5 among 10) carry the same bright patch, image 3 one of its own elsewhere.

    Held out with its fold, image 0 was scored as if no good part had ever shown the patch (the
    k-fold calibration: 40 grey levels beyond the band); scored with the statistics of all the
    others, image 5's patch is in its band. What no other good image shows still scores.
    """
    rng = np.random.default_rng(3)
    frames = np.clip(100 + rng.normal(0, 2, (10, 256, 256)), 0, 255).astype(np.uint8)
    frames[[0, 5], 100:116, 100:116] += 40
    frames[3, 40:56, 180:196] += 40
    training = _training_of(frames)
    config = FitConfig(shape_scores=False)
    folds = tf._held_out(training, config, False, None).goods[:, 0]
    assert folds[0, 12:15, 12:15].max() > 25  # the default, k folds: image 0 scored without image 5
    held = tf._held_out(training, replace(config, leave_one_out=True), False, None)
    fine = held.goods[:, 0]  # raw fine excess beyond the band, 8 px blocks
    assert held.leave_one_out
    assert fine[0, 12:15, 12:15].max() < 5 and fine[5, 12:15, 12:15].max() < 5
    assert fine[3, 5:7, 22:25].max() > 25
