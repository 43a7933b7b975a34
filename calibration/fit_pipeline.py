"""The fit pipeline every detector shares: good images in, registered training set, statistics, folds, bundle out.

1. ``prepare_training``: read every good image once at two low resolutions; bootstrap a
   registration reference (register to the first image, average, register again to the
   average); register each image at full resolution against the reference the bundle will
   carry, fit its lighting, and keep the registered frame on disk (``Training``).
2. ``statistics``: per-pixel mean, spread and min/max band (dilated, so sub-pixel edge motion is
   tolerated), and per-place spread of the residual at each pyramid level.
3. Folds: ``fold_members`` / ``fold_statistics`` (the statistics without each fold) and
   ``graph_blocks`` (a graph's held-out map of each image, max-pooled to blocks), from which each
   detector calibrates on good images the statistics did not see.
4. ``apply_local_tolerance`` bakes a learned local normalisation into the statistics;
   ``write_fitted_bundle`` audits the held-out good scores (``calibration.audit``: which good
   images score far above the others, where, and what they cost), writes the fit report next
   to the bundle and any detector's bundle atomically.

``select_training`` applies the user's ``--exclude``: named images are left out of the fit and
recorded in the manifest, never dropped silently.

The template (``calibration.template_fit``), learned (``calibration.learned_fit``) and ensemble
(``calibration.ensemble_fit``) fits are built from these pieces.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import mmap
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from calibration import audit as aud
from calibration import probes
from calibration import tolerance_fit as tol
from calibration.parallel import in_order
from engines import registration as reg
from engines import sensor
from engines.bundle import CALIBRATION, REFERENCE, sha256_file, write_bundle
from engines.decode import read_image
from engines.errors import BundleError, InspectError, UserError
from engines.graphs import ALIGN, HALO, LEVELS
from engines.inspector import resident_inputs
from engines.libc import glibc
from engines.nonrigid import ALIGNMENTS, DEFAULT_ALIGNMENT, Field, FieldReference, parameters
from engines.nonrigid import BLOCK as FIELD_BLOCK
from engines.onnxruntime_backend import OnnxRuntimeBackend
from engines.sensor import SensorModel, learn_clutter_depth, learn_max_depth
from engines.tiling import TilePlan, block_max, cell_grid
from engines.tolerance import BLOCK
from engines.types import MIN_SIDE, Geometry

MIN_GOOD = 8
STRIP = 64  # rows of the image the statistics take at a time: a strip's arrays stay in the CPU's cache
# --alignment auto: a line gets the field where it removes more than this fraction of the residual of the
# median good image's interior (each block's own gain and offset taken out) on blocks it was not estimated from
# (``held_out_field_gain``). Measured on the fraction of the residual removed on the very blocks the field was fitted
# to, parts that do not bend measured 0.001 or less when this was set, 0.003-0.023 since (every change that let
# the field fit more freely raised what it finds in noise, the lighting fit and the pose search's residual too):
# easy seed 9006 measured 0.023 and went non-rigid, its field then bent the border band's marker dots 3-4.5 px off
# on 5 of 200 good parts and rejected them. Held out, a field fitted to noise removes nothing (easy 9006: -0.009
# against 0.023 in sample; easy and fixture 11, 12: -0.027 to -0.012) and a bend keeps what it removed (fixture-hard
# 11, 12: 0.922, 0.918 against 0.933, 0.927; 512 px parts bent by a grid of 0.1 px: 0.28). docs/measurements.md.
FIELD_GAIN_MIN = 0.02
# The field that gain is measured with: the one FIELD_GAIN_MIN was measured with (3 steps, x and y solved apart),
# not a bundle's. Converged further (nonrigid.COUPLED), the field fits more of the noise of a part that does not
# bend as well: the tests' 384 px line measured 0.034 with it against 0.0045, and went non-rigid.
FIELD_GAIN_PROBE = {"steps": 3, "coupled": False}
# How the gain that decides is measured, recorded in the manifest's fit_config ("in-sample" before it was recorded).
FIELD_GAIN_MEASURE = "held-out"
# Tile core sides (px). The template graph is a chain of elementwise passes and pools over whole tiles, bound by
# memory bandwidth once a tile's tensors outgrow the caches: 640 px tiles (512 px cores) keep their speed when the
# memory bus is shared (with the next frame's preparation, or another tenant of the host), where 1152 px tiles
# slow by a third; on an idle bus both run alike (docs/frame_path.md, "Tiles that fit the cache"). The learned
# network's convolutions do arithmetic, not streaming, and keep the larger core.
TEMPLATE_CORE = 512
NETWORK_CORE = 1024
COARSE_FLOOR = 0.3  # grey levels (8-bit units)
TRIM_FROM = 16  # images: below this the second-highest value is too poor an estimate of the range


@dataclass(frozen=True)
class FitConfig:
    """Knobs of the template fit; the defaults suit aligned parts with geometric structure."""

    core: int = TEMPLATE_CORE  # tile core side (px); a multiple of 32 (NETWORK_CORE for the networks)
    folds: int = 5  # k-fold calibration on the good images
    leave_one_out: bool = False  # template: each held-out good scored with the statistics of all the others
    target_frr: float = 0.005  # false-reject rate the threshold is set for
    # threshold >= (1 + margin) * worst typical held-out good score (one far above the others: 1.1 times it,
    # calibration.thresholds). The held-out goods are the training images (30 on a typical line), and the worst of
    # 200 good parts lies well above the worst of 30 (README, "The threshold's margin")
    threshold_margin: float = 0.5
    band_sigma: float = 3.0  # the band is at least mean +- band_sigma * per-pixel spread
    band_tol: float = 2.0  # grey levels (8-bit units) added on both sides of the band
    band_dilate: int = 1  # px of spatial tolerance for the min/max band
    band_trim: int | None = None  # per pixel, lowest/highest values left out (None: 1 from TRIM_FROM images on)
    margin_px: int | None = None  # inspection-region margin along the border (None: automatic)
    max_shift_px: float | None = None  # registration limit, fit and run time (None: 4 % of the longer side)
    max_rotation_deg: float = 3.0  # registration limit, fit and run time
    min_correlation: float = 0.5
    alignment: str = DEFAULT_ALIGNMENT  # "rigid": the pose only; "nonrigid": plus a smooth field (parts that bend)
    measured_bend_px: float | None = None  # "auto": the median good image's bend (px, set by the fit)
    measured_field_gain: float | None = None  # "auto": the fraction of its residual the field removes (decides)
    # "auto": how measured_field_gain was measured (FIELD_GAIN_MEASURE), and what the field removed on the blocks it
    # was fitted to (the gain that decided before: kept for comparison)
    field_gain_measure: str | None = None
    measured_field_gain_in_sample: float | None = None
    occluders: bool = True  # learn whether good images show the sensor frame's occluders (engines.sensor)
    sensor_mask: str | None = None  # PNG, sensor frame, non-zero = leave out of every frame (--sensor-mask)
    exclude: tuple[str, ...] = ()  # good images the user left out of the fit (names as given; ``select_training``)
    augment: int = 0  # variants of each good image in the statistics (``augmented_frames``): pose and lighting
    shape_scores: bool | None = None  # blob and line scores too; None (auto): where the self-test finds they pay


@dataclass
class Training:
    """Registered good images and what the statistics need of them."""

    geometry: Geometry
    unit: float  # multiply raw pixel values by this to get 8-bit grey units
    weight: np.ndarray  # uint8 [H, W] inspection region, 1 = inspect
    registered: np.ndarray  # [n, H, W(, C)] raw dtype, registered frames (disk-backed)
    coefs: np.ndarray  # [n, PHOTO_TERMS] lighting model per image
    poses: np.ndarray  # [n, 2, 3] reference -> frame transform per image
    pyramids: list[dict[int, np.ndarray]]  # per image: level -> [C, H_l, W_l] 3x3 block means of xn * w


def select_training(images: Sequence[Path], exclude: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(images to fit on, images excluded): each name in ``exclude`` must match exactly one good image.

    A name matches an image by its path as listed, its absolute path, a trailing part of its path
    (``train/good/007.png``) or its file name (``007.png``). Unknown or ambiguous names are user
    errors: an exclusion is never guessed and never silent.
    """
    images = [Path(p) for p in images]
    excluded: list[Path] = []
    for name in exclude:
        matches = [p for p in images if _names(p, name)]
        if len(matches) != 1:
            folder = images[0].parent if images else "dataset"
            why = "matches no" if not matches else f"matches {len(matches)}"
            raise UserError(
                f"--exclude {name}: {why} good image of the {len(images)} in {folder} "
                f"(expected a file name such as {images[0].name if images else '000.png'}, or its path)"
            )
        if matches[0] not in excluded:
            excluded.append(matches[0])
    return [p for p in images if p not in excluded], excluded


def _names(path: Path, name: str) -> bool:
    given = Path(name)
    if str(path) == name or path.name == name:
        return True
    if given.is_absolute():
        return path.resolve() == given.resolve()
    return len(given.parts) > 1 and path.parts[-len(given.parts) :] == given.parts


def prepare_training(
    images: list[Path], roi: Path | None, config: FitConfig, tmp: Path, progress: bool, detector: str
) -> tuple[Training, reg.RegistrationReference, FitConfig]:
    """Check the good images, build the registration reference and register every image to it (on disk in ``tmp``).

    Returns the registered training set, the reference the bundle will carry, and the config with
    its automatic values resolved for these images.
    """
    if len(images) < MIN_GOOD:
        raise UserError(
            f"{images[0].parent if images else 'dataset'}: {len(images)} good images, "
            f"the {detector} detector needs at least {MIN_GOOD}"
        )
    if not 0 <= config.augment <= 16:
        raise UserError(f"--augment {config.augment}: expected 0 to 16 variants per good image")
    if config.folds < 2:
        raise UserError(f"--folds {config.folds}: expected at least 2 (each fold is scored by the others)")
    if config.max_shift_px is not None and not config.max_shift_px > 0:
        raise UserError(f"--max-shift {config.max_shift_px:g}: expected a positive number of pixels")
    if not 0 < config.max_rotation_deg <= 180:
        raise UserError(f"--max-rotation {config.max_rotation_deg:g}: expected degrees in (0, 180]")
    if config.alignment not in ALIGNMENTS:
        raise UserError(f"--alignment {config.alignment}: expected one of {', '.join(ALIGNMENTS)}")
    first = read_image(images[0])
    geometry = Geometry(first.shape[0], first.shape[1], 1 if first.ndim == 2 else 3, str(first.dtype))
    if min(geometry.height, geometry.width) < MIN_SIDE:
        raise UserError(f"{images[0]}: images are {geometry.describe()}, expected at least {MIN_SIDE} px on each side")
    config = resolve_config(config, geometry)
    weight = inspection_region(geometry, roi, config.margin_px or 0)
    reference, levels = bootstrap_reference(images, geometry, weight, config, progress)
    training = register_all(images, geometry, weight, reference, tmp, progress, "registering (1/2)")
    # Register again against exactly the reference the bundle will carry, so the images the
    # statistics and thresholds are computed from were prepared as run time will prepare frames.
    mu = statistics(training, range(len(images)), config)["mu"]
    reference = _final_reference(mu, weight, reference, config.alignment != "rigid")
    if config.alignment == "auto":
        config, reference = _choose_alignment(images, geometry, training, reference, config, progress)
    reference = replace(reference, sensor=learn_sensor(levels, training, reference, mu, config))
    training = register_all(images, geometry, weight, reference, tmp, progress, "registering (2/2)")
    return training, reference, config


def resolve_config(config: FitConfig, geometry: Geometry) -> FitConfig:
    side = max(geometry.height, geometry.width)
    if config.core % ALIGN:
        raise UserError(f"--core {config.core}: must be a multiple of {ALIGN}")
    shift = config.max_shift_px if config.max_shift_px is not None else 0.04 * side
    margin = config.margin_px if config.margin_px is not None else max(4, int(np.ceil(side / 512)) + 2)
    core = min(config.core, -(-side // ALIGN) * ALIGN)
    return replace(config, max_shift_px=shift, margin_px=margin, core=core)


def graph_input_dtype(geometry: Geometry) -> str:
    """The graphs' frame input type: uint8 frames go up as bytes, 16-bit ones as float32 8-bit grey units."""
    return "float32" if geometry.dtype == "uint16" else "uint8"


def inspection_region(geometry: Geometry, roi: Path | None, margin: int) -> np.ndarray:
    """The region to inspect: the ROI mask (non-zero = inspect) minus a margin along the border."""
    h, w = geometry.height, geometry.width
    weight = np.ones((h, w), np.uint8)
    if roi is not None:
        mask = cv2.imread(str(roi), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise UserError(f"{roi}: not a readable mask image (expected a PNG, non-zero = inspect)")
        if mask.shape != (h, w):
            raise UserError(f"{roi}: mask is {mask.shape[1]}x{mask.shape[0]}, expected {w}x{h} like the images")
        weight = (mask > 0).astype(np.uint8)
    if margin > 0:
        weight[:margin] = weight[-margin:] = 0
        weight[:, :margin] = weight[:, -margin:] = 0
    if not weight.any():
        raise UserError(f"{roi or 'inspection region'}: nothing left to inspect after a {margin} px margin")
    return weight


def _level_mask(weight: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    small = cv2.resize(weight.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return ((small > 0.999) * 255).astype(np.uint8)


def registration_mask(weight: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Where registration looks, on a level of ``shape``: the inspection region without the border zone.

    A fixture bar, vignetting and clutter in the border zone stay with the camera; left in, they
    pull ECC towards the sensor's own pose. Where the region lies mostly in that zone, it is kept whole.
    """
    region = _level_mask(weight, shape)
    inner = reg.light_mask(region)
    return inner if inner.sum() >= 0.25 * region.sum() else region


def _read_checked(path: Path, geometry: Geometry) -> np.ndarray:
    image = read_image(path)
    problem = geometry.check(image)
    if problem:
        raise UserError(f"{path}: {problem} (all images of a dataset must match the first)")
    return image


def bootstrap_reference(
    images: list[Path], geometry: Geometry, weight: np.ndarray, config: FitConfig, progress: bool
) -> tuple[reg.RegistrationReference, list[tuple[np.ndarray, np.ndarray]]]:
    """A registration reference made from the images themselves (register to #0, average, repeat).

    Returns it with every image's (coarse, fine) registration levels, read once.
    """
    coarse_f, fine_f = reg.level_factors(geometry.height, geometry.width)

    def read_levels(path: Path) -> tuple[np.ndarray, np.ndarray]:
        image = _read_checked(path, geometry)
        return reg.downscale(image, coarse_f), reg.downscale(image, fine_f)

    reading = in_order(read_levels, images)
    levels = list(tqdm(reading, desc="reading", total=len(images), disable=not progress, unit="img"))
    coarse0, fine0 = levels[0]
    limits = {"max_shift_px": float(config.max_shift_px or 0), "max_rotation_deg": config.max_rotation_deg}
    # first pass against image 0: another image's pose relative to it can be up to twice the limits
    doubled = replace(config, max_shift_px=2 * limits["max_shift_px"], max_rotation_deg=2 * config.max_rotation_deg)
    ref = level_reference(coarse0, fine0, weight, doubled)
    for _ in range(2):
        fine_sum = np.zeros_like(fine0, np.float64)
        for path, (coarse, fine) in zip(images, levels, strict=True):
            pose = _register_or_fail(ref, coarse, fine, path)
            coef = ref.photometric(coarse, pose)
            fine_pose = reg.Pose(reg._scale_matrix(pose.matrix, fine.shape, ref.full_shape), 1.0)
            registered = reg.warp_to_reference(fine, fine_pose)
            fine_sum += normalise(registered[None], coef, fine.shape, ref.full_shape)[0]
        mean_fine = (fine_sum / len(images)).astype(np.float32)
        mean_coarse = cv2.resize(mean_fine, coarse0.shape[::-1], interpolation=cv2.INTER_AREA)
        ref = replace(ref, coarse=mean_coarse, fine=mean_fine, **limits).with_search()
    return ref, levels


def level_reference(
    coarse: np.ndarray, fine: np.ndarray, weight: np.ndarray, config: FitConfig, search: bool = True
) -> reg.RegistrationReference:
    """A registration reference from one image's (coarse, fine) levels, the inspection region and the pose limits.

    ``search``: the coarse pose search before ECC, which looks at the region without its border
    zone; without it ECC starts at the identity on the whole region (bundles before the search,
    kept for the alignment benchmark's baseline).
    """
    full_shape = weight.shape
    masks = registration_mask if search else _level_mask
    ref = reg.RegistrationReference(
        coarse=coarse,
        fine=fine,
        coarse_mask=masks(weight, coarse.shape),
        fine_mask=masks(weight, fine.shape),
        factors=reg.level_factors(*full_shape),  # the factors the levels were made with
        full_shape=full_shape,
        max_shift_px=float(config.max_shift_px or 0),
        max_rotation_deg=config.max_rotation_deg,
        min_correlation=config.min_correlation,
    )
    return ref.with_search() if search else ref


def _choose_alignment(
    images: list[Path],
    geometry: Geometry,
    training: Training,
    reference: reg.RegistrationReference,
    config: FitConfig,
    progress: bool,
) -> tuple[FitConfig, reg.RegistrationReference]:
    """``--alignment auto``: non-rigid where the good images bend, rigid where they do not.

    Each good image's field is estimated after its first-pass pose, and what it buys measured:
    the fraction of the interior's residual against the reference it removes on blocks it was
    not estimated from (``held_out_field_gain``). Above FIELD_GAIN_MIN for the median image the
    line bends and the field pays for itself; below, it would only fit noise (it still "finds" a
    bend of some tenths of a pixel, and more in the border band, where nothing outside the image
    holds it). The bend, both gains and how the deciding one was measured are recorded.
    """
    assert reference.field is not None
    field = replace(reference.field, **FIELD_GAIN_PROBE)
    halves = checker_halves(field)

    def measure(i: int) -> tuple[float, float, float]:
        level = reg.downscale(_read_checked(images[i], geometry), field.factor)
        matrix = training.poses[i]
        found = field.estimate(level, matrix)
        return found.interior_bend(), _gain(field, level, matrix, found), held_out_field_gain(halves, level, matrix)

    measured = in_order(measure, range(len(images)))
    rows = list(tqdm(measured, desc="measuring bends", total=len(images), disable=not progress, unit="img"))
    bends, in_sample, gains = (list(column) for column in zip(*rows, strict=True))
    gain = float(np.median(gains))
    chosen = "nonrigid" if gain > FIELD_GAIN_MIN else "rigid"
    config = replace(
        config,
        alignment=chosen,
        measured_bend_px=round(float(np.median(bends)), 3),
        measured_field_gain=round(gain, 4),
        field_gain_measure=FIELD_GAIN_MEASURE,
        measured_field_gain_in_sample=round(float(np.median(in_sample)), 4),
    )
    return config, reference if chosen == "nonrigid" else replace(reference, field=None)


def checker_halves(field: FieldReference) -> tuple[FieldReference, FieldReference]:
    """``field`` measured on alternate blocks of its level only (a checkerboard of its FIELD_BLOCK px blocks), and
    on the others: neighbouring blocks share a bend (the spline's nodes are several blocks apart), not their noise."""
    h, w = field.level.shape
    rows = np.arange(h)[:, None] // FIELD_BLOCK
    cols = np.arange(w)[None, :] // FIELD_BLOCK
    even = (rows + cols) % 2 == 0
    first, second = (replace(field, mask=np.where(half, field.mask, 0).astype(np.uint8)) for half in (even, ~even))
    return first, second


def held_out_field_gain(halves: tuple[FieldReference, FieldReference], level: np.ndarray, matrix: np.ndarray) -> float:
    """What a field estimated on one half of the blocks (``checker_halves``) removes of the other half's residual,
    both ways round, averaged: a bend carries over to the blocks between, a field fitted to noise does not."""
    first, second = halves
    both = [_gain(test, level, matrix, fit.estimate(level, matrix)) for fit, test in ((first, second), (second, first))]
    return float(np.mean(both))


def _gain(field: FieldReference, level: np.ndarray, matrix: np.ndarray, found: Field) -> float:
    """The fraction of the residual on ``field``'s measured blocks that ``found`` removes."""
    before = field.residual_energy(level, matrix, None)
    return 1 - field.residual_energy(level, matrix, found) / before if before > 0 else 0.0


def learn_sensor(
    levels: list[tuple[np.ndarray, np.ndarray]],
    training: Training,
    reference: reg.RegistrationReference,
    mu: np.ndarray,
    config: FitConfig,
) -> SensorModel | None:
    """What to leave out of every frame: occluders as deep as the good images show them, and the user's mask.

    The good images' occluders are found against the reference the bundle carries, with each
    image's pose and lighting from the first registration pass. None when there is nothing to leave out.
    """
    user = read_sensor_mask(Path(config.sensor_mask), training.geometry) if config.sensor_mask else None
    depth, clutter = 0.0, (0.0, 0.0, 0.0, 0.0)
    if config.occluders or reference.field is not None:
        frames = [
            (fine, reg.expected_on_level(reference, reg.Pose(matrix, 1.0), coef))
            for (_, fine), matrix, coef in zip(levels, training.poses, training.coefs, strict=True)
        ]
        if config.occluders:
            depth = learn_max_depth(frames, reference.factors[1], reference.full_shape)
        if reference.field is not None:  # only the field reads it (SensorModel.clutter_band)
            clutter = learn_clutter_depth(frames, reference.factors[1], reference.full_shape)
    model = SensorModel(depth, mu, user, clutter)
    return model if model.active else None


def read_sensor_mask(path: Path, geometry: Geometry) -> np.ndarray:
    """A sensor-frame ignore mask (PNG, non-zero = leave out) of the images' size, as a bool array."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise UserError(f"{path}: not a readable mask image (expected a PNG, non-zero = leave out)")
    if mask.shape != (geometry.height, geometry.width):
        h, w = mask.shape
        raise UserError(f"{path}: mask is {w}x{h}, expected {geometry.width}x{geometry.height} like the images")
    return mask > 0


def _final_reference(
    mu: np.ndarray, weight: np.ndarray, previous: reg.RegistrationReference, nonrigid: bool
) -> reg.RegistrationReference:
    """The registration reference the bundle carries: the mean good part at both levels (and the field's)."""
    mu = mu.astype(np.float32)
    mu_img = mu[0] if mu.shape[0] == 1 else np.ascontiguousarray(mu.transpose(1, 2, 0))
    coarse_f, fine_f = previous.factors
    coarse, fine = reg.downscale(mu_img, coarse_f), reg.downscale(mu_img, fine_f)
    field = FieldReference.from_full(mu_img, weight, previous.full_shape) if nonrigid else None
    return replace(
        previous,
        coarse=coarse,
        fine=fine,
        coarse_mask=registration_mask(weight, coarse.shape),
        fine_mask=registration_mask(weight, fine.shape),
        field=field,
    ).with_search()


def _register_or_fail(ref: reg.RegistrationReference, coarse, fine, path: Path) -> reg.Pose:
    try:
        return ref.register(coarse, fine)
    except InspectError as exc:
        raise UserError(
            f"{path}: registration failed: {exc.detail} (is it the same part and view? the limits are "
            f"--max-shift {ref.max_shift_px:g} px and --max-rotation {ref.max_rotation_deg:g} deg)"
        ) from None


def _align_or_fail(ref: reg.RegistrationReference, image: np.ndarray, path: Path) -> reg.Aligned:
    try:
        return reg.align(image, ref)
    except InspectError as exc:
        raise UserError(f"{path}: registration failed: {exc.detail} (is it the same part and view?)") from None


def normalise(
    frames: np.ndarray,
    coef: np.ndarray,
    shape: tuple[int, int],
    full_shape: tuple[int, int],
    rows: slice = slice(None),
) -> np.ndarray:
    """Apply the lighting model: (x - offset) / gain on a grid of ``shape`` spanning the full image.

    ``frames`` is [C, h, w] in 8-bit grey units; the coordinates are full-resolution pixel centres.
    With ``rows``, ``frames`` holds only those rows of the grid; every value is the one the whole grid gets.
    """
    h, w = shape
    sy, sx = full_shape[0] / h, full_shape[1] / w
    xs = (np.arange(w, dtype=np.float32) * sx + (sx - 1) / 2)[None, :]
    ys = (np.arange(h, dtype=np.float32) * sy + (sy - 1) / 2)[rows, None]
    gain, offset = reg.lighting_fields(coef, xs, ys, full_shape)
    return (frames - offset) / gain


def planes(image: np.ndarray, unit: float) -> np.ndarray:
    """[H, W(, C)] raw pixels -> [C, H, W] float32 in 8-bit grey units."""
    planes = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    return planes.astype(np.float32) * np.float32(unit)


def register_all(
    images: list[Path],
    geometry: Geometry,
    weight: np.ndarray,
    reference: reg.RegistrationReference,
    tmp: Path,
    progress: bool,
    desc: str,
) -> Training:
    unit = 1 / 257 if geometry.dtype == "uint16" else 1.0
    registered = np.lib.format.open_memmap(tmp / "registered.npy", "w+", geometry.dtype, (len(images), *geometry.shape))
    coefs = np.zeros((len(images), reg.PHOTO_TERMS), np.float32)
    poses = np.zeros((len(images), 2, 3), np.float64)

    def register(i: int) -> dict[int, np.ndarray]:  # each image writes only its own rows of the arrays
        aligned = _align_or_fail(reference, _read_checked(images[i], geometry), images[i])
        coefs[i] = aligned.coef
        poses[i] = aligned.pose.matrix
        registered[i] = aligned.registered
        return lit_block_means(registered[i], coefs[i], unit, weight)

    pyramids = []
    registering = in_order(register, range(len(images)))
    for pyramid in tqdm(registering, desc=desc, total=len(images), disable=not progress, unit="img"):
        pyramids.append(pyramid)
        release_pages(registered)
    return Training(geometry, unit, weight, registered, coefs, poses, pyramids)


def release_pages(frames: np.ndarray) -> None:
    """Unmap the pages of a disk-backed stack (``np.memmap``) this process has touched; no-op for plain arrays.

    The registered frames live in a file mapped into memory; every page read or written stays
    mapped and counts as this process's resident memory (the whole stack, by the end of a fit)
    although the kernel holds it in its page cache anyway. Released, the next access maps it
    again from the cache, with the data as last written.
    """
    mapping = getattr(frames, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``); a no-op elsewhere.

    glibc keeps freed blocks below its mmap threshold in the heap for reuse, and the threshold
    rises (up to 32 MB) as large numpy temporaries are freed; at 5120 px one phase's tiles and
    strips then stay resident while the next phase allocates other shapes (about 300 MB of a
    5120 px fit's peak). Called between phases, not per allocation: a fixed low threshold
    instead made every temporary a fresh mapping (100 times the page faults, 15 times the
    system time).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = glibc("malloc_trim")


def block_means(planes: np.ndarray) -> dict[int, np.ndarray]:
    """The graph's coarse path in numpy: 2x2 mean pyramid, then the 3x3 neighbourhood mean per level.

    Computed on the image edge-padded to whole ALIGN cells (as tiles pad it), each level
    cropped to its ``cell_grid``.
    """
    _, h, w = planes.shape
    return _neighbourhoods(_pyramid(_pad_aligned(planes)), h, w)


def lit_block_means(frame: np.ndarray, coef: np.ndarray, unit: float, weight: np.ndarray) -> dict[int, np.ndarray]:
    """``block_means`` of the lit frame times the region, ``STRIP`` rows at a time (equal to the whole-frame result).

    ``frame`` is one registered image [H, W(, C)] in raw pixels: no full-size float copy is made.
    """
    h, w = weight.shape
    levels: dict[int, list[np.ndarray]] = {level: [] for level in range(1, max(LEVELS) + 1)}
    for start in range(0, h, STRIP):  # STRIP is a multiple of ALIGN: a strip's blocks are whole
        rows = slice(start, min(start + STRIP, h))
        xn = normalise(planes(frame[rows], unit), coef, (h, w), (h, w), rows)
        xn *= weight[rows]
        for level, pooled in _pyramid(_pad_aligned(xn)).items():
            levels[level].append(pooled)
    return _neighbourhoods({level: np.concatenate(parts, axis=1) for level, parts in levels.items()}, h, w)


def _pad_aligned(planes: np.ndarray) -> np.ndarray:
    """Edge-replicate [C, h, w] planes to multiples of ALIGN (the coarsest block) on the bottom and right."""
    _, h, w = planes.shape
    hp, wp = -(-h // ALIGN) * ALIGN, -(-w // ALIGN) * ALIGN
    return np.pad(planes, ((0, 0), (0, hp - h), (0, wp - w)), mode="edge")


def _pyramid(padded: np.ndarray) -> dict[int, np.ndarray]:
    """The 2x2 mean pyramid of ALIGN-padded planes, every level from 1 to max(LEVELS)."""
    out, pooled = {}, padded
    for level in range(1, max(LEVELS) + 1):
        pooled = _mean_2x2(pooled)
        out[level] = pooled
    return out


def _mean_2x2(planes: np.ndarray) -> np.ndarray:
    """``planes.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))`` bit for bit, some 15 times faster.

    numpy adds a 2x2 block as (top-left + top-right) + (bottom-left + bottom-right) in float32 and
    divides by 4; the same additions of whole shifted rows run vectorised instead of block by block.
    """
    c, h, w = planes.shape
    pairs = planes.reshape(c, h, w // 2, 2)
    rows = (pairs[..., 0] + pairs[..., 1]).reshape(c, h // 2, 2, w // 2)
    out = rows[:, :, 0] + rows[:, :, 1]
    out /= np.float32(4)
    return out


def _neighbourhoods(pyramid: dict[int, np.ndarray], h: int, w: int) -> dict[int, np.ndarray]:
    """The 3x3 neighbourhood mean of the pyramid's LEVELS for an h x w image, each cropped to its ``cell_grid``."""
    out = {}
    for level in LEVELS:
        rows, cols = cell_grid(h, w, 2**level)
        blur = [cv2.blur(p, (3, 3), borderType=cv2.BORDER_REPLICATE)[:rows, :cols] for p in pyramid[level]]
        out[level] = np.stack(blur)
    return out


def statistics(training: Training, indices: Sequence[int], config: FitConfig) -> dict[str, np.ndarray]:
    """Reference statistics from the registered images at ``indices`` (the reference.npz arrays).

    With ``band_trim`` = 1 (the default from TRIM_FROM images on) each pixel's lowest and
    highest value are left out of the mean, the spread and the min/max band: debris that one
    good image happened to carry at a pixel must not widen the tolerance there for every future
    part. What good parts do systematically (edges that move, blur that changes) shows in many
    images and stays in the band.

    Everything per pixel is computed ``STRIP`` rows at a time (``_strip_statistics``), so no
    full-size float copy of any image and no full-size float64 sum is ever made; the results
    equal those of whole frames, bit for bit.

    With ``augment`` = K, the statistics are those of the images at ``indices`` and K variants
    of each (``augmented_frames``), written beside the registered frames for the call; an
    image's variants carry what it carries (a mark, debris), so they are trimmed with it.
    """
    n = len(indices)
    trim = config.band_trim if config.band_trim is not None else int(n >= TRIM_FROM)
    if n - 2 * trim < 2:
        raise UserError(f"{n} images leave fewer than 2 per pixel after trimming {trim} at each end")
    if not config.augment:
        return _statistics(training, indices, trim, config)
    with tempfile.TemporaryDirectory(dir=stack_dir(training)) as tmp:
        augmented = augmented_training(training, indices, config.augment, Path(tmp))
        return _statistics(augmented, range(len(augmented.coefs)), trim * (1 + config.augment), config)


def _statistics(training: Training, indices: Sequence[int], trim: int, config: FitConfig) -> dict[str, np.ndarray]:
    return _assembled(training, indices, config, functools.partial(_strip_statistics, training, indices, trim))


StripStatistics = Callable[[slice], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _assembled(
    training: Training, indices: Sequence[int], config: FitConfig, strips: StripStatistics
) -> dict[str, np.ndarray]:
    """The reference statistics of the images at ``indices`` from their per-strip moments and extremes (``strips``)."""
    geo = training.geometry
    full = (geo.height, geo.width)
    mu, sigma, lo, hi = (np.empty((geo.channels, *full), np.float32) for _ in range(4))
    _fill_by_strips((mu, sigma, lo, hi), strips, training.registered)
    noise = _region_median(sigma, training.weight) if training.weight.any() else 1.0
    k = 2 * config.band_dilate + 1
    kernel = np.ones((k, k), np.uint8)
    for low, high in zip(lo, hi, strict=True):  # in place (OpenCV supports it): no second full-size copy
        cv2.erode(low, kernel, dst=low)
        cv2.dilate(high, kernel, dst=high)
    # lo = min(lo, mu - band_sigma * sigma) - band_tol and its mirror for hi, in place (the same float32 steps)
    spread = np.multiply(sigma, config.band_sigma, out=sigma)
    np.minimum(lo, np.subtract(mu, spread), out=lo)
    lo -= config.band_tol
    np.maximum(hi, np.add(mu, spread, out=spread), out=hi)
    hi += config.band_tol
    del sigma, spread
    stats = {
        "mu": mu,
        "lo": lo,
        "hi": hi,
        "weight": training.weight,
        "fine_gain": np.ones(tol.block_shape(geo), np.float32),
        "fine_ring_gain": np.ones(tol.block_shape(geo), np.float32),
    }
    stats.update(_coarse_spread(training, indices, max(noise, 0.5)))
    stats = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in stats.items()}
    release_free_heap()
    return stats


def _fill_by_strips(outputs: Sequence[np.ndarray], strips: StripStatistics, registered: np.ndarray) -> None:
    """Each of ``outputs`` ([C, H, W]) from ``strips``, STRIP rows at a time, strips side by side (``in_order``)."""
    height = outputs[0].shape[1]

    def strip(rows: slice) -> None:  # each strip writes only its own rows
        for out, values in zip(outputs, strips(rows), strict=True):
            out[:, rows] = values

    for _ in in_order(strip, [slice(start, min(start + STRIP, height)) for start in range(0, height, STRIP)]):
        release_pages(registered)


def _region_median(planes: np.ndarray, region: np.ndarray) -> float:
    """``np.median(planes[:, region > 0])`` without index arrays and with one plane's copy at a time.

    Boolean indexing of one plane at a time: ``np.compress`` along an axis of 26 M took 0.8 s a plane at 5120 px,
    this 0.05 s (the same values in the same order, so the same median).
    """
    inside = region.ravel() > 0
    values = np.empty((len(planes), np.count_nonzero(inside)), planes.dtype)
    for plane, out in zip(planes, values, strict=True):
        out[:] = plane.ravel()[inside]
    return float(np.median(values, overwrite_input=True))


def _strip_statistics(
    training: Training, indices: Sequence[int], trim: int, rows: slice
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, spread and the trimmed low and high extremes of ``rows`` of the images at ``indices``."""
    total, total_sq, lows, highs = _trimmed_sums(training, indices, trim, rows, trim + 1)
    mu, sigma = _moments(total, total_sq, len(indices) - 2 * trim)
    return mu, sigma, lows[trim], highs[trim]


def _trimmed_sums(
    training: Training, indices: Sequence[int], trim: int, rows: slice, ranks: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Over ``rows`` of the images at ``indices``: the float64 sum and sum of squares per pixel without the
    ``trim`` most extreme values at each end, and the ``ranks`` lowest and highest values, most extreme first."""
    geo = training.geometry
    shape = (geo.channels, len(range(*rows.indices(geo.height))), geo.width)
    total = np.zeros(shape, np.float64)
    total_sq = np.zeros_like(total)
    lows = [np.full(shape, np.inf, np.float32) for _ in range(ranks)]
    highs = [np.full(shape, -np.inf, np.float32) for _ in range(ranks)]
    for i in indices:
        xn = _normalised(training, i, rows)
        total += xn
        total_sq += np.square(xn, dtype=np.float64)
        _keep_extremes(lows, xn, np.minimum, np.maximum)
        _keep_extremes(highs, xn, np.maximum, np.minimum)
    for extreme in (*lows[:trim], *highs[:trim]):
        total -= extreme
        total_sq -= np.square(extreme, dtype=np.float64)
    return total, total_sq, lows, highs


def _normalised(training: Training, i: int, rows: slice) -> np.ndarray:
    """``rows`` of registered image ``i`` in the reference's lighting (float32 planes)."""
    full = (training.geometry.height, training.geometry.width)
    return normalise(planes(training.registered[i, rows], training.unit), training.coefs[i], full, full, rows)


def _moments(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread (float32) of ``n`` values per pixel from their float64 sum and sum of squares."""
    mu = (total / n).astype(np.float32)
    sigma = np.sqrt(np.maximum(total_sq / n - np.square(mu, dtype=np.float64), 0) * n / (n - 1)).astype(np.float32)
    return mu, sigma


class LeaveOneOut:
    """The statistics without any one image, from one pass over all of them (exact, up to the sums' rounding).

    k-fold calibration holds out a fifth of the good images at once: images that share a rare
    nuisance (stray light over one corner, an edge moved by the same pose) land in one fold, so
    each is scored without the others' evidence, and a held-out good scores far above what a
    part scores against the statistics of all of them (README, 5120 px). Leaving out one image
    at a time needs, per pixel, the sums and the ``trim + 2`` highest and lowest values: without
    image j the trimmed sums lose j and the extremes that are not j, and the band's extreme moves
    one place where j was among them (j's own value, compared with them, says where). Those
    arrays live in a file beside the registered frames (``dir``) and are read a strip at a time,
    so a 5120 px fit keeps its memory.
    """

    def __init__(self, training: Training, config: FitConfig, dir: str | None) -> None:
        n = len(training.coefs)
        self.training, self.config, self.n = training, config, n
        self.trim = config.band_trim if config.band_trim is not None else int(n - 1 >= TRIM_FROM)
        if n - 1 - 2 * self.trim < 2:
            raise UserError(f"{n - 1} images leave fewer than 2 per pixel after trimming {self.trim} at each end")
        geo = training.geometry
        self._tmp = tempfile.TemporaryDirectory(dir=dir)
        shape = (geo.channels, geo.height, geo.width)

        def stack(name: str, dtype, count: int = 0) -> np.ndarray:
            path = Path(self._tmp.name) / f"{name}.npy"
            return np.lib.format.open_memmap(path, "w+", dtype, (count, *shape) if count else shape)

        self.sums = [stack("total", np.float64), stack("total_sq", np.float64)]
        self.highs, self.lows = (stack(name, np.float32, 2) for name in ("highs", "lows"))
        for start in range(0, geo.height, STRIP):
            self._accumulate(slice(start, min(start + STRIP, geo.height)))

    def close(self) -> None:
        self._tmp.cleanup()

    def _stacks(self) -> list[np.ndarray]:
        return [*self.sums, self.highs, self.lows]

    def _accumulate(self, rows: slice) -> None:
        # trimmed as if every image were kept; two extremes past the trim kept at each end
        total, total_sq, lows, highs = _trimmed_sums(self.training, range(self.n), self.trim, rows, self.trim + 2)
        self.sums[0][:, rows], self.sums[1][:, rows] = total, total_sq
        # only the (trim + 1)-th and (trim + 2)-th extremes are read again: the ones that can move
        self.highs[:, :, rows], self.lows[:, :, rows] = np.stack(highs[self.trim :]), np.stack(lows[self.trim :])
        for stack in self._stacks():
            release_pages(stack)
        release_pages(self.training.registered)

    def statistics(self, held: int) -> dict[str, np.ndarray]:
        """``statistics(training, every image but held, config)``: the reference statistics without image ``held``."""
        kept = [i for i in range(self.n) if i != held]
        return _assembled(self.training, kept, self.config, functools.partial(self._strip, held))

    def _strip(self, held: int, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Without image ``held``: the sums lose its value; where it was among the trim + 1 most extreme (or tied
        with the (trim + 1)-th: the same values), the (trim + 1)-th is trimmed instead of it and the next is the
        band's extreme."""
        x = _normalised(self.training, held, rows)
        total, total_sq = self.sums[0][:, rows] - x, self.sums[1][:, rows] - np.square(x, dtype=np.float64)
        band = []
        for extremes, outer in ((self.highs, np.greater_equal), (self.lows, np.less_equal)):
            last, after = extremes[:, :, rows]
            moved = outer(x, last)
            total -= np.where(moved, last - x, 0)
            total_sq -= np.where(moved, np.square(last, dtype=np.float64) - np.square(x, dtype=np.float64), 0)
            band.append(np.where(moved, after, last))
        for stack in self._stacks():
            release_pages(stack)
        mu, sigma = _moments(total, total_sq, self.n - 1 - 2 * self.trim)
        return mu, sigma, band[1], band[0]


AUGMENT_SHIFT_PX = 0.5  # a variant's pose: up to half a pixel of shift and of rotation at the image's corners
LIGHTING_CELL = 32  # px: the scale of the lighting residual a variant takes from another good image
LIGHTING_CLIP = 8.0  # grey levels: residuals clipped before averaging, so marks and debris stay where they are


def augmented_frames(
    training: Training, indices: Sequence[int], variants: int
) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
    """Each registered image at ``indices`` (lighting-normalised planes [C, H, W] and its pyramid), then its variants.

    With few good images the statistics see few poses and lightings. A variant of image i is i
    resampled at another sub-pixel pose (up to ``AUGMENT_SHIFT_PX``: what registration leaves)
    and lit like another image j of ``indices``: i's smooth lighting residual (what the lighting
    model leaves, at ``LIGHTING_CELL`` px) replaced by j's. Variants are drawn from the images
    at ``indices`` only, so a fold's statistics never see a held-out image, and from seeds that
    depend only on (i, k), so every fold sees the same variants of an image.
    """
    geo = training.geometry
    full = (geo.height, geo.width)

    def frame(i: int) -> np.ndarray:
        return normalise(planes(training.registered[i], training.unit), training.coefs[i], full, full)

    residuals = _lighting_residuals(training, indices, frame) if variants else {}
    for i in indices:
        xn = frame(i)
        yield xn, training.pyramids[i]
        for k in range(variants):
            rng = np.random.default_rng([AUGMENT_SEED, i, k])
            others = [j for j in indices if j != i]
            j = others[int(rng.integers(len(others)))] if others else i
            shifted = _repose(xn, rng)
            relit = shifted + _upsample(residuals[j] - residuals[i], full)[None]
            yield relit, block_means(relit * training.weight)


AUGMENT_SEED = 1601


def _lighting_residuals(training: Training, indices: Sequence[int], frame) -> dict[int, np.ndarray]:
    """Per image, its smooth residual against the images' mean (first plane, clipped, in LIGHTING_CELL px cells)."""
    h, w = training.geometry.height, training.geometry.width
    cells = (max(1, w // LIGHTING_CELL), max(1, h // LIGHTING_CELL))
    mean = np.zeros((h, w), np.float64)
    for i in indices:
        mean += frame(i)[0]
    mean = (mean / len(indices)).astype(np.float32)
    out = {}
    for i in indices:
        clipped = np.clip(frame(i)[0] - mean, -LIGHTING_CLIP, LIGHTING_CLIP)
        out[i] = cv2.resize(clipped, cells, interpolation=cv2.INTER_AREA)
    return out


def _upsample(cells: np.ndarray, full: tuple[int, int]) -> np.ndarray:
    return cv2.resize(cells, (full[1], full[0]), interpolation=cv2.INTER_LINEAR)


def _repose(planes_: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``planes_`` [C, H, W] resampled (bicubic) at a random pose within AUGMENT_SHIFT_PX of the identity."""
    _, h, w = planes_.shape
    angle = np.degrees(rng.uniform(-1, 1) * AUGMENT_SHIFT_PX / max(np.hypot(h, w) / 2, 1))
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    matrix[:, 2] += rng.uniform(-AUGMENT_SHIFT_PX, AUGMENT_SHIFT_PX, 2)
    return np.stack(
        [cv2.warpAffine(p, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE) for p in planes_]
    )


def augmented_training(training: Training, indices: Sequence[int], variants: int, tmp: Path) -> Training:
    """The images at ``indices`` and their variants (``augmented_frames``) as a Training of their own.

    Its frames are the lighting-normalised planes in a float32 stack in ``tmp`` (disk-backed, as
    the registered frames are), with the identity lighting model, so ``statistics`` reads them
    a strip at a time like any registered frame.
    """
    geo = training.geometry
    count = len(indices) * (1 + variants)
    stack = np.lib.format.open_memmap(tmp / "augmented.npy", "w+", np.float32, (count, *geo.shape))
    pyramids = []
    for k, (xn, pyramid) in enumerate(augmented_frames(training, indices, variants)):
        stack[k] = xn[0] if geo.channels == 1 else xn.transpose(1, 2, 0)
        pyramids.append(pyramid)
        release_pages(stack)
    identity = np.eye(1, reg.PHOTO_TERMS, dtype=np.float32)[0]
    coefs = np.tile(identity, (count, 1))
    poses = np.repeat(training.poses[list(indices)], 1 + variants, axis=0)
    return Training(geo, 1.0, training.weight, stack, coefs, poses, pyramids)


def stack_dir(training: Training) -> str | None:
    """The folder of the registered frames' file (the fit's scratch space), or None for the system's."""
    name = getattr(training.registered, "filename", None)
    return str(Path(name).parent) if name else None


def _keep_extremes(ranked: list[np.ndarray], x: np.ndarray, better, worse) -> None:
    """Insert ``x`` into per-pixel running extremes, most extreme first (``better`` = np.minimum for lows)."""
    carry = x
    for k, current in enumerate(ranked):
        ranked[k] = better(current, carry)
        if k + 1 < len(ranked):
            carry = worse(current, carry)


def _coarse_spread(training: Training, indices: Sequence[int], noise: float) -> dict[str, np.ndarray]:
    """1/sigma of the block-mean residual per place and level; zero outside the inspection region."""
    out = {}
    region = block_means(training.weight[None].astype(np.float32))
    for level in LEVELS:
        sigma = _spread([training.pyramids[i][level] for i in indices])
        # Below COARSE_FLOOR grey levels, block means move with the lighting model and the
        # registration more than with anything a defect does; never trust a smaller spread.
        floor = max(noise / (3 * 2**level), COARSE_FLOOR)
        sigma = np.maximum(sigma, floor)
        sigma = np.stack([cv2.dilate(p, np.ones((3, 3), np.uint8)) for p in sigma])
        inside = region[level] > 0.999
        out[f"inv_sigma{level}"] = np.where(inside, 1.0 / sigma, 0.0).astype(np.float32)
    return out


def _spread(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``np.stack(arrays).std(axis=0, ddof=1)``, bit for bit, without the stack: two passes, float32 as numpy sums.

    numpy sums a float32 stack along its first axis in order and divides by the count as an intp
    (in float64, stored as float32); the same steps are taken here one array at a time.
    """
    total = np.zeros_like(arrays[0])
    for a in arrays:
        total += a
    mean = np.true_divide(total, np.intp(len(arrays)), out=total, casting="unsafe")
    squares = np.zeros_like(mean)
    for a in arrays:
        deviation = a - mean
        squares += np.multiply(deviation, deviation, out=deviation)
    var = np.true_divide(squares, np.intp(max(len(arrays) - 1, 0)), out=squares, casting="unsafe")
    return np.sqrt(var, out=var)


def graph_blocks(
    training: Training,
    graph: Path,
    stats: dict[str, np.ndarray],
    indices: Sequence[int],
    core: int,
    channels: int,
) -> np.ndarray:
    """[len(indices), channels, Hb, Wb]: the FP32 ``graph``'s map of each image, unnormalised, max-pooled to blocks."""
    with block_scorer(graph, stats, training.geometry, core, channels) as score:
        return score(training, indices)


@contextlib.contextmanager
def block_scorer(
    graph: Path, stats: dict[str, np.ndarray], geometry: Geometry, core: int, channels: int
) -> Iterator[Callable[[Training, Sequence[int]], np.ndarray]]:
    """``graph_blocks`` for several image sets with the same statistics: the backend opened and its resident
    statistics tiled once (in the precision the graph declares for them)."""
    plan = TilePlan(geometry.height, geometry.width, core, HALO, ALIGN)
    with OnnxRuntimeBackend(graph) as backend:
        backend.activate(resident_inputs(plan, stats, backend.inputs["mean"].dtype))
        yield functools.partial(_graph_blocks, backend, plan, channels)


def _graph_blocks(
    backend: OnnxRuntimeBackend,
    plan: TilePlan,
    channels: int,
    training: Training,
    indices: Sequence[int],
    windows: Sequence[tuple[int, int, int, int]] | None = None,
) -> np.ndarray:
    """``windows`` (block rows and columns, end exclusive): only the tiles under them are scored, the other blocks
    stay 0. Tiles are independent (``engines/tiling.py``), so a window's blocks are those of the whole map."""
    core = plan.core
    blocks = np.zeros((len(indices), channels, *tol.block_shape(training.geometry)), np.float32)
    origins = [plan.origin(t) for t in range(plan.n_tiles)]
    per_core = core // BLOCK
    wanted = range(plan.n_tiles) if windows is None else tiles_under(plan, windows)
    for row, i in enumerate(indices):
        for tiles, out in _scored(backend, registered_tiles(training, plan, origins, i, wanted)):
            y, x = plan.origin(tiles.start)
            h, w = _valid_core(plan, tiles.start)
            maps = out["anomaly"][0]
            if (h, w) != (core, core):  # a tile over the image's edge: what lies outside counts as 0
                maps = np.zeros((channels, core, core), np.float32)
                maps[:, :h, :w] = out["anomaly"][0][:, :h, :w]
            pooled = block_max(maps, BLOCK)
            by, bx = y // BLOCK, x // BLOCK
            target = blocks[row, :, by : by + per_core, bx : bx + per_core]
            target[...] = pooled[:, : target.shape[1], : target.shape[2]]
        release_pages(training.registered)
        release_free_heap()
    return blocks


def _scored(
    backend: OnnxRuntimeBackend, jobs: Iterator[tuple[dict[str, np.ndarray], range]]
) -> Iterator[tuple[range, dict[str, np.ndarray]]]:
    """Run the jobs a few at a time (one per core at once), yielding each tile range with its outputs, in order."""
    while chunk := list(itertools.islice(jobs, 2 * backend.threads)):
        for (_, tiles), out in zip(chunk, backend.infer_many(chunk), strict=True):
            yield tiles, out


def tiles_under(plan: TilePlan, windows: Sequence[tuple[int, int, int, int]]) -> list[int]:
    """The tiles whose cores hold any block of ``windows`` (block rows r0:r1, columns c0:c1), in tile order."""
    per_core = plan.core // BLOCK
    found = set()
    for r0, r1, c0, c1 in windows:
        rows = range(r0 // per_core, (r1 - 1) // per_core + 1)
        cols = range(c0 // per_core, (c1 - 1) // per_core + 1)
        found.update(r * plan.cols + c for r in rows for c in cols)
    return sorted(found)


def registered_tiles(
    training: Training,
    plan: TilePlan,
    origins: list[tuple[int, int]],
    index: int,
    wanted: Sequence[int],
) -> Iterator[tuple[dict[str, np.ndarray], range]]:
    """Graph feeds, one tile at a time, for the ``wanted`` tiles of training image ``index`` (registered and lit)."""
    frame = training.registered[index]
    if training.unit != 1:
        frame = frame.astype(np.float32) * np.float32(training.unit)
    padded = plan.pad(np.ascontiguousarray(frame))
    photo = reg.tile_photometric(training.coefs[index], origins, plan.halo, (plan.height, plan.width))
    side = plan.tile // BLOCK
    gain = np.ones((1, 1, side, side), np.float32)  # fitting scores raw: the tolerance is learned from these
    for t in wanted:
        tiles = range(t, t + 1)
        yield {"image": plan.extract(padded, tiles), "photo": photo[tiles.start : tiles.stop], "fine_gain": gain}, tiles


def _valid_core(plan: TilePlan, index: int) -> tuple[int, int]:
    y, x = plan.origin(index)
    return min(plan.core, plan.height - y), min(plan.core, plan.width - x)


def fold_statistics(training: Training, config: FitConfig, progress: bool) -> list[dict[str, np.ndarray]]:
    """Per fold f (images ``i % folds == f``), the statistics of all the other images."""
    n = len(training.coefs)
    folds = fold_count(config, n)
    return [
        statistics(training, fold_members(n, folds, f)[1], config)
        for f in tqdm(range(folds), desc="fold statistics", disable=not progress, unit="fold")
    ]


def fold_members(n: int, folds: int, fold: int) -> tuple[list[int], list[int]]:
    """(held out, kept) image indices of ``fold``: image ``i`` belongs to fold ``i % folds``."""
    held = list(range(fold, n, folds))
    return held, [i for i in range(n) if i % folds != fold]


def fold_count(config: FitConfig, n: int) -> int:
    """How many folds ``n`` good images are split into (``prepare_training`` has checked folds >= 2, n >= MIN_GOOD)."""
    return min(config.folds, n)


def apply_local_tolerance(stats: dict[str, np.ndarray], tolerance: tol.LocalTolerance) -> dict:
    """Bake the local normalisation into the statistics: the fine gain maps, larger block spreads."""
    out = dict(stats)
    for level in LEVELS:
        inv = stats[f"inv_sigma{level}"]
        grow = _on_level_grid(tolerance.factor, level, inv.shape[1:])
        out[f"inv_sigma{level}"] = (inv.astype(np.float32) / grow).astype(np.float16)
    out["fine_gain"] = tolerance.part_gain.astype(np.float16)
    out["fine_ring_gain"] = tolerance.ring_gain.astype(np.float16)
    out["local_factor"] = tolerance.factor
    return out


def _on_level_grid(blocks: np.ndarray, level: int, shape: tuple[int, int]) -> np.ndarray:
    """A BLOCK-grid map on the grid ``shape`` of pyramid level ``level``.

    Repeated where the level's cells are smaller than a block, max-pooled where they are larger;
    both grids follow ``cell_grid`` over the same image, so the result covers ``shape`` exactly.
    """
    cell = 2**level
    if cell <= BLOCK:
        rep = BLOCK // cell
        grid = np.repeat(np.repeat(blocks, rep, axis=0), rep, axis=1)
    else:
        k = cell // BLOCK
        hb, wb = -(-blocks.shape[0] // k) * k, -(-blocks.shape[1] // k) * k
        padded = np.pad(blocks, ((0, hb - blocks.shape[0]), (0, wb - blocks.shape[1])), mode="edge")
        grid = padded.reshape(hb // k, k, wb // k, k).max(axis=(1, 3))
    if grid.shape[0] < shape[0] or grid.shape[1] < shape[1]:
        raise ValueError(f"{blocks.shape} blocks of {BLOCK} px cannot cover the {shape} grid of {cell} px cells")
    return grid[: shape[0], : shape[1]]


def fingerprint(images: list[Path]) -> dict:
    digest = {p.name: sha256_file(p) for p in images}
    return {
        "n_images": len(images),
        "sha256": hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest(),
    }


def write_fitted_bundle(
    out: Path,
    detector: str,
    training: Training,
    stats: dict[str, np.ndarray],
    registration: reg.RegistrationReference,
    calibration: dict,
    config: FitConfig,
    images: list[Path],
    started: float,
    graphs: dict[str, Callable[[Path], None]],
    extra_manifest: dict | None = None,
    held_out_map: np.ndarray | None = None,
    excluded: Sequence[Path] = (),
) -> Path:
    """Write a bundle of any detector fitted on registered good images: graphs, reference, calibration.

    With ``held_out_map`` ([n, Hb, Wb], each good image's map as its held-out score was taken),
    the good images are audited first: the audit goes into the calibration and, with overlays,
    into the fit report beside the bundle (``calibration.audit.report_path``). ``excluded``: the
    images the user left out (``select_training``), recorded in the manifest with their hashes.
    """
    if Path(out).exists():  # as write_bundle would say, before the report of that bundle is touched
        raise BundleError(f"{out}: already exists; choose another --out or remove it")
    with _fit_report(out, detector, training, calibration, images, held_out_map, excluded) as calibration:
        reference = _reference_arrays(stats, registration)
        manifest = _manifest(detector, training, registration, config, images, started, excluded)
        writers = {
            **graphs,
            REFERENCE: lambda p: _save_npz(p, reference),
            CALIBRATION: lambda p: p.write_text(json.dumps(calibration, indent=2) + "\n", encoding="utf-8"),
        }
        return write_bundle(out, {**manifest, **(extra_manifest or {})}, writers)


def _reference_arrays(stats: dict[str, np.ndarray], registration: reg.RegistrationReference) -> dict[str, np.ndarray]:
    """reference.npz: the statistics and what registration needs at run time."""
    reference = {
        **stats,
        "reg_coarse": registration.coarse,
        "reg_fine": registration.fine,
        "reg_coarse_mask": registration.coarse_mask,
        "reg_fine_mask": registration.fine_mask,
    }
    if registration.field is not None:
        reference.update(reg_field=registration.field.level, reg_field_mask=registration.field.mask)
    if registration.sensor is not None and registration.sensor.user_mask is not None:
        reference["sensor_mask"] = np.packbits(registration.sensor.user_mask, axis=None)
    return reference


def _manifest(
    detector: str,
    training: Training,
    registration: reg.RegistrationReference,
    config: FitConfig,
    images: list[Path],
    started: float,
    excluded: Sequence[Path],
) -> dict:
    """The manifest's fitted part: what was fitted on what, how registration runs, with which configuration."""
    coarse_f, fine_f = registration.factors
    return {
        "detector": detector,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fit_seconds": round(time.time() - started, 1),
        "geometry": training.geometry.to_dict(),
        "tiling": {"core": config.core, "halo": HALO, "align": ALIGN, "levels": list(LEVELS)},
        "registration": {
            "factors": [coarse_f, fine_f],
            "max_shift_px": config.max_shift_px,
            "max_rotation_deg": config.max_rotation_deg,
            "min_correlation": config.min_correlation,
            "search": registration.search is not None,  # coarse pose search before ECC (absent: none)
            "light_fit": registration.light_fit,  # how each frame's lighting is fitted (absent: "trim")
            # the smooth field after the pose (absent: rigid), with what its estimation depended on
            **({"field": _field_manifest(registration.field)} if registration.field else {}),
            # what of the sensor frame is left out of every frame (absent: nothing)
            **({"sensor": _sensor_manifest(registration.sensor)} if registration.sensor else {}),
        },
        "fit_config": asdict(config),
        "training": {
            **fingerprint(images),
            "excluded": [{"name": str(p), "sha256": sha256_file(p)} for p in excluded],
        },
    }


@contextlib.contextmanager
def _fit_report(
    out: Path,
    detector: str,
    training: Training,
    calibration: dict,
    images: list[Path],
    held_out_map: np.ndarray | None,
    excluded: Sequence[Path],
) -> Iterator[dict]:
    """Audit the good images and write the fit report beside ``out``; yields the calibration with the audit.

    Without ``held_out_map`` nothing is audited and the calibration is yielded as given. If the
    bundle is not written after all, the report of it is removed too.
    """
    if held_out_map is None:
        yield calibration
        return
    shape = (training.geometry.height, training.geometry.width)
    audit = aud.audit_goods([str(p) for p in images], held_out_map, training.poses, calibration, shape)
    report = aud.report_path(out)
    audited = {
        **calibration,
        "good_images": [str(p) for p in images],
        "audit": {**audit.summary(), "report": str(report)},
    }
    extra = {"bundle": str(out), "detector": detector, "excluded": [str(p) for p in excluded], "report": str(report)}
    extra["self_test"] = probes.describe(calibration)
    aud.write_fit_report(report, audit, images, held_out_map, training.poses, extra)
    try:
        yield audited
    except BaseException:
        shutil.rmtree(report, ignore_errors=True)
        raise


def _field_manifest(field: FieldReference) -> dict:
    """The field's constants, with the steps this fit's reference takes (they depend on its level, ``steps_for``)."""
    return {"factor": field.factor, **parameters(), "steps": field.steps}


def _sensor_manifest(model: SensorModel) -> dict:
    return {
        "max_depth_px": round(model.max_depth, 2),
        "user_mask": model.user_mask is not None,
        "clutter_depth_px": [round(d, 2) for d in model.clutter_depth],
        **sensor.parameters(),
    }


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
