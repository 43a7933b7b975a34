"""The shared fit pipeline's augmentation: variants of the good images in the statistics, without leaking folds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from calibration import fit_pipeline as fp
from engines.registration import PHOTO_TERMS
from engines.types import Geometry

H, W = 96, 128


def training(n: int = 8, seed: int = 0) -> fp.Training:
    """n registered 'good images': a bright bar on grey with noise, each with its own smooth lighting residual."""
    rng = np.random.default_rng(seed)
    xs = np.arange(W, dtype=np.float32)[None, :]
    frames = []
    for _ in range(n):
        img = np.full((H, W), 120.0, np.float32)
        img[40:56, 30:100] = 180
        img += rng.uniform(-6, 6) * (xs / W) + rng.normal(0, 2, (H, W))
        frames.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    registered = np.stack(frames)
    coefs = np.tile(np.eye(1, PHOTO_TERMS, dtype=np.float32), (n, 1))
    weight = np.ones((H, W), np.uint8)
    weight[:4] = weight[-4:] = 0
    pyramids = [fp.block_means(fp.planes(f, 1.0) * weight) for f in registered]
    poses = np.tile(np.eye(2, 3), (n, 1, 1))
    return fp.Training(Geometry(H, W, 1, "uint8"), 1.0, weight, registered, coefs, poses, pyramids)


def test_variants_come_after_each_image_and_repeat_exactly():
    """augment=K yields each image then K variants of it, the same ones on every call (seeded by image and variant)."""
    tr = training()
    first = [x for x, _ in fp.augmented_frames(tr, [0, 2, 5], 2)]
    again = [x for x, _ in fp.augmented_frames(tr, [0, 2, 5], 2)]
    assert len(first) == 9
    np.testing.assert_array_equal(first[3], fp.normalise(fp.planes(tr.registered[2], 1.0), tr.coefs[2], (H, W), (H, W)))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], first[0]) and not np.array_equal(first[1], first[2])


def test_a_folds_statistics_never_see_a_held_out_image_through_a_variant():
    """The statistics of the kept images, augmented, do not change when a held-out image changes."""
    tr = training()
    kept = [0, 1, 2, 4, 5, 7]
    config = replace(fp.FitConfig(), augment=3)
    before = fp.statistics(tr, kept, config)
    tr.registered[3] = 255 - tr.registered[3]  # held out
    tr.registered[6] = 0
    after = fp.statistics(tr, kept, config)
    for key, value in before.items():
        np.testing.assert_array_equal(value, after[key], err_msg=key)


def test_variants_widen_the_band_a_little_where_images_differ_and_leave_the_mean():
    """Lighting and sub-pixel pose variants widen the band (more poses and lightings) without moving the mean."""
    tr = training()
    plain = fp.statistics(tr, range(8), fp.FitConfig())
    more = fp.statistics(tr, range(8), replace(fp.FitConfig(), augment=2))
    mu0, mu1 = (s["mu"].astype(np.float32)[0, 8:-8, 8:-8] for s in (plain, more))
    assert np.abs(mu1 - mu0).mean() < 0.3
    width = {
        name: (s["hi"].astype(np.float32) - s["lo"].astype(np.float32))[0, 8:-8, 8:-8]
        for name, s in (("plain", plain), ("more", more))
    }
    assert 0 < (width["more"] - width["plain"]).mean() < 3


def test_augment_outside_its_range_is_refused(tmp_path):
    """--augment below 0 or above 16 is a one-line error before any work."""
    from engines.errors import UserError

    with pytest.raises(UserError, match="--augment 17"):
        fp.prepare_training(
            [tmp_path / f"{i}.png" for i in range(8)],
            None,
            replace(fp.FitConfig(), augment=17),
            tmp_path,
            False,
            "template",
        )
