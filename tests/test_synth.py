"""Tests of the synthetic MVTec-layout dataset generator (small images, few of them)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration import synth
from calibration.synth import KINDS, SynthConfig, write_dataset
from engines.errors import UserError
from engines.sensor import edge_view

SMALL = SynthConfig(size=256, train=3, test_good=2, per_kind=3, workers=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, write_dataset(out, SMALL, progress=False)


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_meta(dataset: tuple[Path, dict]) -> None:
    """Every image and mask named in meta.json exists with the right size, and nothing else is written."""
    root, meta = dataset
    assert json.loads((root / "meta.json").read_text()) == meta
    expected = {"meta.json"}
    for image in meta["images"]:
        img = _read(root / image["path"])
        assert img.shape == (256, 256) and img.dtype == np.uint8
        expected.add(image["path"])
        if image["kind"] == "good":
            assert image["defects"] == [] and "mask" not in image
            continue
        assert image["mask"] == f"ground_truth/{image['kind']}/{Path(image['path']).stem}_mask.png"
        mask = _read(root / image["mask"])
        assert mask.shape == img.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        expected.add(image["mask"])
    assert set(_files(root)) == expected
    counts = {kind: sum(1 for i in meta["images"] if i["kind"] == kind and i["split"] == "test") for kind in KINDS}
    assert counts == dict.fromkeys(KINDS, 3)
    assert len(list((root / "train" / "good").iterdir())) == 3


def test_masks_match_bboxes(dataset: tuple[Path, dict]) -> None:
    """Each defect mask is non-empty and is its meta bbox grown by the 1 px dilation."""
    root, meta = dataset
    for image in meta["images"]:
        if image["kind"] == "good":
            continue
        (defect,) = image["defects"]
        assert defect["kind"] == image["kind"]
        mask = _read(root / image["mask"])
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0, image["path"]
        x0, y0, x1, y1 = defect["bbox"]
        grown = [max(0, x0 - 1), max(0, y0 - 1), min(256, x1 + 1), min(256, y1 + 1)]
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == grown, image["path"]
        assert defect["size_px"] == max(x1 - x0, y1 - y0)
        assert abs(defect["contrast"]) > synth.MATERIAL


def test_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    """The same config gives byte-identical files (whatever the worker count); another seed differs."""
    config = SynthConfig(size=192, train=2, test_good=1, per_kind=1, kinds=("dot", "missing"), workers=1)
    write_dataset(tmp_path / "a", config, progress=False)
    write_dataset(tmp_path / "b", replace(config, workers=2), progress=False)
    write_dataset(tmp_path / "c", replace(config, seed=1), progress=False)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/good/000.png"] != c["train/good/000.png"]
    assert a["test/dot/000.png"] != c["test/dot/000.png"]


@pytest.mark.parametrize(("bit_depth", "channels"), [(16, 1), (8, 3), (16, 3)])
def test_bit_depth_and_colour(tmp_path: Path, bit_depth: int, channels: int) -> None:
    """16-bit images use the whole 16-bit range and colour images are 3-channel BGR."""
    config = SynthConfig(
        size=160, train=1, test_good=0, per_kind=1, kinds=("stain",), bit_depth=bit_depth, channels=channels, workers=1
    )
    meta = write_dataset(tmp_path / "ds", config, progress=False)
    for image in meta["images"]:
        img = _read(tmp_path / "ds" / image["path"])
        assert img.dtype == (np.uint16 if bit_depth == 16 else np.uint8)
        assert img.shape == ((160, 160) if channels == 1 else (160, 160, 3))
        if bit_depth == 16:
            assert img.max() > 200 * 257 and len(np.unique(img % 257)) > 100  # finer than 8-bit steps
        if channels == 3:
            assert np.abs(img[..., 0].astype(int) - img[..., 2]).mean() > 5  # tinted, not grey
    mask = _read(tmp_path / "ds" / meta["images"][-1]["mask"])
    assert mask.shape == (160, 160) and mask.dtype == np.uint8


def test_border_band_varies_more_than_interior(tmp_path: Path) -> None:
    """Across good images the typical pixel spread in the border band is over twice that of the interior."""
    config = SynthConfig(size=320, train=8, test_good=0, per_kind=0, workers=2)
    meta = write_dataset(tmp_path / "ds", config, progress=False)
    stack = np.stack([_read(tmp_path / "ds" / i["path"]).astype(np.float32) for i in meta["images"]])
    spread = stack.std(axis=0)
    band = meta["band_px"]
    inner = np.zeros(spread.shape, bool)
    inner[band:-band, band:-band] = True
    # Medians, so the few structure edges that move with the pose do not dominate the interior.
    ratio = np.median(spread[~inner]) / np.median(spread[inner])
    assert ratio > 2, ratio
    assert np.median(spread[inner]) < 6  # "nearly identical": noise, lighting drift and sub-pixel pose


@pytest.mark.parametrize("size", [256, 1024])
def test_five_pixel_dot_is_five_pixels(size: int) -> None:
    """A 5x5 dot has a 5x5 footprint (7x7 mask) at any image size, wherever its centre falls."""
    config = SynthConfig(size=size)
    design = synth.render_design(config)
    for centre in ([100.0, 120.0], [100.5, 120.5], [101.3, 119.8]):
        img = np.full((size, size), 150, np.float32)
        frame = synth.Frame(
            config, design, img, np.ones_like(img), np.ones(1, np.float32), 0.0, np.eye(2, 3), None, 0, 0
        )
        defect = synth.draw_dot(frame, np.array(centre), (5, 5), -40.0, np.ones(1, np.float32))
        x0, y0, x1, y1 = defect["bbox"]
        assert (x1 - x0, y1 - y0) == (5, 5) and defect["size_px"] == 5
        assert frame.mask is not None
        ys, xs = np.nonzero(frame.mask)
        assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (7, 7)
        changed = np.abs(img - 150) > synth.MATERIAL
        assert not (changed & (frame.mask == 0)).any()  # the soft edge stays inside the mask


def test_dot_sizes_are_absolute(tmp_path: Path) -> None:
    """Dots drawn in whole datasets of two sizes have footprints exactly their nominal 5..12 px."""
    for size in (256, 768):
        config = SynthConfig(size=size, train=0, test_good=0, per_kind=8, kinds=("dot",), workers=1)
        meta = write_dataset(tmp_path / str(size), config, progress=False)
        for image in meta["images"]:
            (d,) = image["defects"]
            x0, y0, x1, y1 = d["bbox"]
            assert (x1 - x0, y1 - y0) == (d["params"]["w"], d["params"]["h"])
            assert 5 <= d["size_px"] <= 12


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    """A non-empty OUT is refused with a one-line error, left untouched, and no temporary is left behind."""
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = SynthConfig(size=128, train=1, test_good=0, per_kind=0, workers=1)
    with pytest.raises(UserError) as err:
        write_dataset(out, config, progress=False)
    message = str(err.value)
    assert message.startswith("OUT:") and "exists" in message and "\n" not in message
    assert _files(out) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure half-way leaves neither OUT nor a temporary directory; an empty OUT is accepted."""
    calls = []
    real = synth.render_frame

    def flaky(*args: object) -> tuple:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(synth, "render_frame", flaky)
    config = SynthConfig(size=128, train=3, test_good=0, per_kind=0, workers=1)
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "ds", config, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth, "render_frame", real)
    (tmp_path / "ds").mkdir()
    write_dataset(tmp_path / "ds", config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert len(list((tmp_path / "ds" / "train" / "good").iterdir())) == 3


@pytest.mark.parametrize(("width", "height", "bit_depth", "channels"), [(477, 333, 8, 1), (200, 352, 16, 3)])
def test_non_square_images(tmp_path: Path, width: int, height: int, bit_depth: int, channels: int) -> None:
    """--width/--height give non-square images and masks; defects and their boxes lie inside the image."""
    config = SynthConfig(
        width=width, height=height, train=2, test_good=0, per_kind=1, bit_depth=bit_depth, channels=channels, workers=1
    )
    meta = write_dataset(tmp_path / "ds", config, progress=False)
    assert (meta["config"]["width"], meta["config"]["height"]) == (width, height)
    assert meta["band_px"] == round(config.border_band * min(width, height))
    shape = (height, width) if channels == 1 else (height, width, 3)
    for image in meta["images"]:
        img = _read(tmp_path / "ds" / image["path"])
        assert img.shape == shape and img.dtype == (np.uint16 if bit_depth == 16 else np.uint8)
        if image["kind"] == "good":
            continue
        mask = _read(tmp_path / "ds" / image["mask"])
        assert mask.shape == (height, width)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = image["defects"][0]["bbox"]
        grown = [max(0, x0 - 1), max(0, y0 - 1), min(width, x1 + 1), min(height, y1 + 1)]
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == grown, image["path"]


def test_non_square_part_fills_the_field(tmp_path: Path) -> None:
    """A wide image holds the part across its width, and the noisy border band runs along all four edges."""
    config = SynthConfig(width=480, height=320, train=6, test_good=0, per_kind=0, workers=1)
    meta = write_dataset(tmp_path / "ds", config, progress=False)
    stack = np.stack([_read(tmp_path / "ds" / i["path"]).astype(np.float32) for i in meta["images"]])
    spread, band = stack.std(axis=0), meta["band_px"]
    inner = np.median(spread[band:-band, band:-band])
    for edge in (spread[:band], spread[-band:], spread[:, :band], spread[:, -band:]):
        assert np.median(edge) > 2 * inner
    design = synth.render_design(config)
    cols = np.flatnonzero(design.body.any(axis=0))
    assert cols.min() < 0.05 * 480 and cols.max() > 0.95 * 480  # the body spans the width, not a centred square


def test_square_shorthand_is_unchanged() -> None:
    """--size N is exactly --width N --height N (same design and frames)."""
    a = synth.render_design(SynthConfig(size=200, seed=3))
    b = synth.render_design(SynthConfig(width=200, height=200, seed=3))
    assert np.array_equal(a.image, b.image)


def test_cli_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI options map onto SynthConfig, main prints one line and returns 0."""
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    argv = [
        str(tmp_path / "ds"),
        "--size",
        "128",
        "--train",
        "1",
        "--test-good",
        "1",
        "--per-kind",
        "1",
        "--kinds",
        "scratch,extra,smear",
        "--seed",
        "3",
        "--max-shift",
        "1",
        "--warp",
        "1.5",
        "--workers",
        "1",
    ]
    assert synth.main(parser.parse_args(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "5 images" in lines[0]
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["config"]["kinds"] == ["scratch", "extra", "smear"]
    assert meta["config"]["max_shift_px"] == 1.0 and meta["config"]["warp_px"] == 1.5
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "x"), "--kinds", "dot,crack"])


def test_cli_width_and_height(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--width/--height set the image size (each defaults to --size); below the minimum is a one-line error."""
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    common = ["--train", "1", "--test-good", "0", "--per-kind", "0", "--workers", "1"]
    args = parser.parse_args([str(tmp_path / "ds"), "--width", "300", "--height", "150", *common])
    assert synth.main(args) == 0
    assert "300x150 px" in capsys.readouterr().out
    assert _read(tmp_path / "ds" / "train" / "good" / "000.png").shape == (150, 300)
    args = parser.parse_args([str(tmp_path / "ds2"), "--size", "160", "--width", "200", *common])
    assert synth.main(args) == 0
    assert _read(tmp_path / "ds2" / "train" / "good" / "000.png").shape == (160, 200)
    for flag in ("--width", "--height"):
        args = parser.parse_args([str(tmp_path / "ds3"), flag, str(synth.MIN_SIDE - 1), *common])
        with pytest.raises(UserError, match=f"^{flag}: expected at least {synth.MIN_SIDE}"):
            synth.main(args)
    assert not (tmp_path / "ds3").exists()


HARD = SynthConfig(
    size=640,
    seed=11,
    train=6,
    test_good=0,
    per_kind=4,
    kinds=("chip",),
    fixture="random",
    fixture_depth=(0.25, 0.55),
    band_vignette=(0.12, 0.30),
    band_blur_px=(1.2, 2.2),
    bend_px=0.8,
    max_rotation_deg=1.5,
    workers=1,
)


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_hard") / "ds"
    return out, write_dataset(out, HARD, progress=False)


def test_random_fixture_is_one_dark_bar_on_a_side_per_image_in_the_sensor_frame(hard) -> None:
    """Each image has one bar, on a drawn side, of the asked depth; its pixels are the fixture's dark grey."""
    root, meta = hard
    band = meta["band_px"]
    sides = set()
    for image in meta["images"]:
        (bar,) = image["fixture"]
        sides.add(bar["edge"])
        assert 0.25 * band <= bar["depth_px"] <= 0.55 * band
        view = edge_view(_read(root / image["path"]).astype(np.float32), bar["edge"])
        inside = view[: int(bar["depth_px"] - abs(bar["tilt_px"])) - 1]
        assert np.median(inside) < synth.FIXTURE + 20, image["path"]  # the bar, whatever the part's pose
    assert len(sides) > 1, "the side is drawn per image"


def test_band_options_are_recorded_in_meta(hard) -> None:
    """meta.json records the fixture mode, depth, vignetting, blur and bend ranges the line was made with."""
    _, meta = hard
    config = meta["config"]
    assert config["fixture"] == "random" and config["fixture_depth"] == [0.25, 0.55]
    assert config["band_vignette"] == [0.12, 0.30] and config["band_blur_px"] == [1.2, 2.2]
    assert config["bend_px"] == 0.8 and config["kinds"] == ["chip"]


def test_chips_are_small_and_inside_the_band_clear_of_bar_and_clutter(hard) -> None:
    """Every chip lies within the border band, beyond the clutter zone and its image's bar, on the part."""
    root, meta = hard
    band, keepout = meta["band_px"], meta["keepout_px"]
    size = meta["config"]["size"]
    for image in meta["images"]:
        if image["kind"] != "chip":
            continue
        (chip,) = image["defects"]
        assert chip["in_band"] and 4 <= chip["size_px"] <= synth.chip_room(band) + 2
        x0, y0, x1, y1 = chip["bbox"]
        dists = {0: y0, 1: size - y1, 2: x0, 3: size - x1}
        edge = min(dists, key=dists.get)
        assert keepout - 1 <= dists[edge] and min(dists.values()) < band, (image["path"], dists)
        for bar in image["fixture"]:
            assert dists[bar["edge"]] >= bar["depth_px"], "the chip is visible, not under the bar"
        assert _read(root / image["mask"]).any()


def test_bend_is_a_smooth_field_of_the_asked_size() -> None:
    """--bend adds a smooth displacement field with about the asked standard deviation, on a 9x9 grid."""
    config = SynthConfig(size=512, bend_px=0.8)
    rng = np.random.default_rng(0)
    design = np.zeros((512, 512), np.float32)
    spreads = []
    for _ in range(8):
        _, (dx, dy) = synth._warp(design, np.eye(2, 3), config, rng)
        spreads.append(np.std(np.concatenate([dx.ravel(), dy.ravel()])))
        assert np.abs(np.diff(dx, axis=1)).max() < 0.1 and np.abs(np.diff(dy, axis=0)).max() < 0.1  # smooth
    assert 0.4 < np.median(spreads) < 1.2
    assert synth._warp(design, np.eye(2, 3), SynthConfig(size=512), rng)[1] is None


def test_default_datasets_do_not_change_with_the_new_options_unused(tmp_path: Path) -> None:
    """The design's bars, default vignetting and blur draw as before: no per-image fixture entry, same pixels."""
    config = SynthConfig(size=160, train=1, test_good=0, per_kind=0, workers=1)
    meta = write_dataset(tmp_path / "a", config, progress=False)
    assert "fixture" not in meta["images"][0]
    same = write_dataset(
        tmp_path / "b", replace(config, fixture_depth=(0.15, 0.45), band_vignette=(0.1, 0.8)), progress=False
    )
    assert _files(tmp_path / "a") == _files(tmp_path / "b") and same["images"] == meta["images"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("fixture", "left"), ("fixture_depth", (0.6, 0.2)), ("band_vignette", (0.1, 1.5)), ("bend_px", -1.0)],
)
def test_bad_band_options_are_refused(field: str, value: object) -> None:
    """Out-of-range band options end in a UserError naming the option; chips need a band wide enough."""
    with pytest.raises(UserError, match="--" + field.split("_")[0]):
        synth.validate(replace(SynthConfig(), **{field: value}))
    with pytest.raises(UserError, match="--kinds chip"):
        synth.validate(SynthConfig(size=256, kinds=("chip",)))


def test_cli_band_options_parse_into_the_config() -> None:
    """--fixture, --fixture-depth, --band-vignette, --band-blur, --bend and --kinds chip reach SynthConfig."""
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    band = ["--fixture", "random", "--fixture-depth", "0.25,0.55", "--band-blur", "1.2,2.2", "--bend", "0.8"]
    args = parser.parse_args(["x", *band, "--band-vignette", "0.12,0.3", "--kinds", "dot,chip"])
    assert (args.fixture, args.fixture_depth, args.band_blur, args.bend) == ("random", (0.25, 0.55), (1.2, 2.2), 0.8)
    assert args.band_vignette == (0.12, 0.3) and args.kinds == ("dot", "chip")
    for bad in (["--band-blur", "2"], ["--fixture-depth", "0.5,0.2"], ["--fixture", "left"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["x", *bad])


# -- benign variation and planted defects (issue: good parts that vary) ---------------------------
BENIGN = SynthConfig(size=512, train=6, test_good=2, per_kind=1, kinds=("scratch", "dot"), workers=1)


@pytest.fixture(scope="module")
def benign_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, dict]:
    """The same small line without and with the benign variation."""
    root = tmp_path_factory.mktemp("benign")
    plain = write_dataset(root / "plain", BENIGN, progress=False)
    varied = write_dataset(root / "varied", replace(BENIGN, benign=synth.Variation(mark_rate=1.0)), progress=False)
    return root / "plain", plain, root / "varied", varied


def test_benign_variation_adds_marks_and_grain_and_nothing_else(benign_pair) -> None:
    """With --benign every image differs only on the part body; poses and defects are those of the plain line."""
    plain_root, plain, root, meta = benign_pair
    assert meta["config"]["benign"]["mark_contrast"] == [6.0, 30.0] and plain["config"]["benign"] is None
    side = (1 - 2 * synth.BODY_INSET) * BENIGN.size
    grains = []
    for a, b in zip(plain["images"], meta["images"], strict=True):
        assert (a["pose"], a["defects"]) == (b["pose"], b["defects"]), b["path"]
        assert "benign" not in a
        grains.append(b["benign"]["grain"])
        marks = b["benign"]["marks"]
        assert 1 <= len(marks) <= 4, b["path"]
        for mark in marks:
            assert mark["length"] <= 0.02 * side + 1e-6 and 6 <= abs(mark["contrast"]) <= 30
        diff = _read(root / b["path"]).astype(int) - _read(plain_root / a["path"]).astype(int)
        assert (diff[:4] == 0).all() and (diff[:, :4] == 0).all(), "outside the part nothing changes"
        for mark in marks:  # a dark mark lowers the grey under its centre (grain and noise are far smaller)
            x, y = (round(c) for c in mark["centre"])
            if mark["contrast"] < -8:
                assert diff[y - 1 : y + 2, x - 1 : x + 2].min() < -3, (b["path"], mark)
    assert max(grains) - min(grains) > 0.5, "the grain differs from part to part"


def test_planted_defects_are_recorded_with_masks(tmp_path: Path) -> None:
    """--plant N puts one real defect in N training images, named in meta.json with a mask outside test/."""
    config = SynthConfig(size=256, train=5, test_good=1, per_kind=0, plant=2, plant_kinds=("dot",), workers=1)
    meta = write_dataset(tmp_path / "ds", config, progress=False)
    planted = [i for i in meta["images"] if i.get("planted")]
    assert len(planted) == 2 and all(i["split"] == "train" and i["kind"] == "good" for i in planted)
    for image in planted:
        (defect,) = image["defects"]
        assert defect["kind"] == "dot" and image["mask"].startswith("ground_truth/planted/train_")
        assert _read(tmp_path / "ds" / image["mask"]).max() == 255
    assert all(not i["defects"] for i in meta["images"] if not i.get("planted"))
    again = write_dataset(tmp_path / "again", replace(config, plant=0), progress=False)
    unplanted = {i["path"] for i in meta["images"]} - {i["path"] for i in planted}
    for path in unplanted:
        assert (tmp_path / "ds" / path).read_bytes() == (tmp_path / "again" / path).read_bytes()
    assert len(again["images"]) == len(meta["images"])


def test_benign_cli_options(tmp_path: Path) -> None:
    """--benign and its knobs reach meta.json; a knob without --benign, or out of range, is a one-line error."""
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    base = ["--size", "160", "--train", "2", "--test-good", "0", "--per-kind", "0", "--workers", "1"]
    args = parser.parse_args([str(tmp_path / "a"), *base, "--benign", "--mark-contrast", "3,6", "--grain", "0,1"])
    assert synth.main(args) == 0
    config = json.loads((tmp_path / "a" / "meta.json").read_text())["config"]
    assert config["benign"]["mark_contrast"] == [3.0, 6.0] and config["benign"]["grain"] == [0.0, 1.0]
    with pytest.raises(UserError, match="--mark-contrast: only with --benign"):
        synth.main(parser.parse_args([str(tmp_path / "b"), *base, "--mark-contrast", "3,6"]))
    with pytest.raises(UserError, match="--mark-length"):
        synth.main(parser.parse_args([str(tmp_path / "c"), *base, "--benign", "--mark-length", "0.1,0.5"]))
    with pytest.raises(UserError, match="--plant"):
        synth.main(parser.parse_args([str(tmp_path / "d"), *base, "--plant", "3"]))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
