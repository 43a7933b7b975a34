"""Sub-pixel registration of a frame to the reference part, and the per-frame illumination fit.

Registration is a coarse search (``PoseSearch``: a sweep of rotations, each scored by phase
correlation of windowed gradient images at about 160 px) followed by coarse-to-fine ECC
(Euclidean: translation + rotation) on two downscaled levels of the frame, with the
inspection region as mask. Bundles fitted with this version leave the border zone
(``light_mask``) out of the masks: a fixture bar or vignetting there stays with the camera and
would pull ECC towards the sensor's pose (a bar along one edge moved a 2048 px part by 2.5 px).
ECC's correlation is invariant to global gain and offset, so lighting drift does not disturb
it. The result maps reference pixel coordinates to frame coordinates.

The illumination fit then models the registered frame as gain(x, y) * mean + offset(x, y)
with the gain quadratic and the offset linear in x and y, fitted robustly on the coarse level.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import cv2
import numpy as np

from engines.errors import InspectError

MIN_LEVEL_SIDE = 64  # px: the short side of a registration level is never brought below this

if TYPE_CHECKING:
    from engines.nonrigid import Field, FieldReference
    from engines.sensor import SensorModel


def level_factors(height: int, width: int) -> tuple[int, int]:
    """Downscale factors (coarse, fine) giving about 320 px and 640 px on the long side.

    ECC at 640 px lands within 0.03 px (full resolution) of ECC at 1280 px on 5120 px parts,
    at a quarter of the cost. On very elongated sensors the short side limits the factors
    (it keeps at least MIN_LEVEL_SIDE px), or a 5472x128 part would be registered on 8 rows.
    """
    side = max(height, width)
    cap = 2 ** max(0, math.floor(math.log2(min(height, width) / MIN_LEVEL_SIDE)))
    fine = min(cap, max(1, 2 ** round(math.log2(max(side / 640, 1)))))
    coarse = min(cap, max(fine, 2 ** round(math.log2(max(side / 320, 1)))))
    return coarse, fine


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``image`` by ``factor`` into float32 8-bit grey units (luminance for colour)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if factor == 1 else image
    h, w = image.shape[:2]
    small = image if factor == 1 else cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint16:
        return small.astype(np.float32) * np.float32(1 / 257)
    return small.astype(np.float32)  # what "* 1" gave, without a second copy of the level


def _scale_matrix(m: np.ndarray, shape_full: tuple[int, int], shape_small: tuple[int, int]) -> np.ndarray:
    """Re-express a warp between ``shape_small`` pixel grids on ``shape_full`` grids (either way round)."""
    sy = shape_full[0] / shape_small[0]
    sx = shape_full[1] / shape_small[1]
    # small pixel i covers full pixels [s*i, s*i + s): its centre is s*i + (s-1)/2
    to_full = np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])
    to_small = np.linalg.inv(to_full)
    m3 = np.vstack([m, [0, 0, 1]])
    return (to_full @ m3 @ to_small)[:2]


@dataclass(frozen=True)
class Pose:
    """Reference-to-frame transform (2x3, full-resolution pixels), the ECC correlation reached, and
    the smooth displacement field (frame px) added to it where the bundle aligns non-rigidly."""

    matrix: np.ndarray
    correlation: float
    field: Field | None = None

    @property
    def shift(self) -> tuple[float, float]:
        return float(self.matrix[0, 2]), float(self.matrix[1, 2])

    @property
    def angle_deg(self) -> float:
        return math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0]))

    def to_dict(self) -> dict[str, float]:
        dx, dy = self.shift
        out = {
            "dx": round(dx, 3),
            "dy": round(dy, 3),
            "angle_deg": round(self.angle_deg, 4),
            "ecc": round(self.correlation, 4),
        }
        if self.field is not None:
            out["bend_px"] = round(self.field.magnitude, 3)
        return out


SEARCH_SIDE = 160  # px: long side of the level the coarse pose search runs on
SEARCH_STEP_PX = 0.5  # px at that level: how far the angle grid's spacing moves the farthest window pixel


def _rotation(angle_deg: float, shape: tuple[int, int]) -> np.ndarray:
    """Reference-to-frame rotation by ``angle_deg`` (``Pose.angle_deg``'s sense) about the centre of ``shape``."""
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2])
    return np.hstack([rot, (centre - rot @ centre)[:, None]])


@contextlib.contextmanager
def _without_ipp() -> Iterator[None]:
    """OpenCV's Intel IPP paths off for the calling thread (``cv2.ipp.setUseIPP`` is per thread), then as before.

    With IPP the search's gradient spectrum of the same level differed slightly from call to call
    (found at 5120 px: the same good images registered twice in one process moved by up to 2e-6
    px, and two fits of the same images gave thresholds 1.8248 and 1.8243); without it the same
    frame always gets the same pose. The spectrum costs the same either way (0.14 ms).
    """
    was = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        yield
    finally:
        cv2.ipp.setUseIPP(was)


def _gradient(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude: edges of the part, not its grey levels (lighting gain and offset drop out)."""
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy)


@dataclass(frozen=True)
class PoseSearch:
    """A start for ECC anywhere within the pose limits: a rotation sweep with phase correlation.

    For each angle of a grid over ±``max_rotation_deg``, the reference's gradient image at about
    ``SEARCH_SIDE`` px is rotated and windowed once (``build``); per frame, its own windowed
    gradient image is phase-correlated with each (one forward DFT, one inverse per angle), and
    the angle with the sharpest peak gives the rotation and the peak the shift. The window is
    zero over the border zone (``light_mask``), in the sensor frame: a fixture bar, vignetting
    and clutter there stay with the camera and would otherwise vote for the identity.
    """

    factor: int  # search level = coarse level downscaled by this
    angles: np.ndarray  # degrees (Pose.angle_deg's sense)
    spectra: np.ndarray  # [n, h, w, 2] DFTs of the windowed gradient of the reference rotated by each angle
    window: np.ndarray  # float32 [h, w]

    @classmethod
    def build(cls, coarse: np.ndarray, mask: np.ndarray, max_rotation_deg: float) -> PoseSearch:
        """Precompute the rotated reference spectra from the coarse reference and its registration mask."""
        factor = max(1, round(max(coarse.shape) / SEARCH_SIDE))
        level = _search_level(coarse, factor)
        h, w = level.shape
        window = _area(light_mask(mask).astype(np.float32) / 255, factor)
        window = cv2.GaussianBlur((window > 0.999).astype(np.float32), (0, 0), 1.5)
        radius = 0.5 * math.hypot(h, w)
        step = math.degrees(2 * SEARCH_STEP_PX / radius)
        n = max(1, math.ceil(max_rotation_deg / step))
        angles = np.arange(-n, n + 1) * step
        spectra = np.stack([cls._spectrum(cls._rotated(level, a), window) for a in angles])
        return cls(factor, angles.astype(np.float64), spectra, window)

    @staticmethod
    def _rotated(level: np.ndarray, angle: float) -> np.ndarray:
        m = _rotation(angle, level.shape)
        return cv2.warpAffine(level, m, level.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    @staticmethod
    def _spectrum(level: np.ndarray, window: np.ndarray) -> np.ndarray:
        with _without_ipp():
            return cv2.dft(_gradient(level) * window, flags=cv2.DFT_COMPLEX_OUTPUT)

    def find(self, coarse_img: np.ndarray) -> np.ndarray:
        """The best (rotation, shift) for a frame's coarse level, as a 2x3 reference-to-frame warp at that level."""
        level = _search_level(coarse_img, self.factor)
        frame = self._spectrum(level, self.window)
        peaks = [_phase_peak(frame, ref) for ref in self.spectra]
        best = int(np.argmax([p[0] for p in peaks]))
        angle = self.angles[best] + _parabola_offset([p[0] for p in peaks], best) * _step(self.angles)
        # the shift found at the best grid angle, re-expressed about the same centre for the refined angle
        shift = np.array(peaks[best][1])
        warp = _rotation(angle, level.shape)
        warp[:, 2] += shift
        return _scale_matrix(warp, coarse_img.shape, level.shape)


def _step(angles: np.ndarray) -> float:
    return float(angles[1] - angles[0]) if len(angles) > 1 else 0.0


def _search_level(image: np.ndarray, factor: int) -> np.ndarray:
    """The search level: low-passed before decimation, so fine periodic structure (a grid of pads, a
    grating) becomes a flat area with edges where it ends instead of a moire that moves another way."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.5 * factor) if factor > 1 else image
    return _area(blurred, factor)


def _area(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image.astype(np.float32)
    h, w = image.shape[:2]
    return cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA).astype(np.float32)


def _phase_peak(frame: np.ndarray, ref: np.ndarray) -> tuple[float, tuple[float, float]]:
    """(peak height, (dx, dy)) of the phase correlation: the frame is the reference moved by (dx, dy)."""
    cross = cv2.mulSpectrums(frame, ref, 0, conjB=True)
    magnitude = cv2.magnitude(cross[..., 0], cross[..., 1]) + 1e-6
    cross /= magnitude[..., None]
    surface = cv2.idft(cross, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    h, w = surface.shape
    y, x = np.unravel_index(int(np.argmax(surface)), surface.shape)
    dx = x + _parabola_offset(surface[y, [(x - 1) % w, x, (x + 1) % w]], 1)
    dy = y + _parabola_offset(surface[[(y - 1) % h, y, (y + 1) % h], x], 1)
    wrap = lambda v, n: v - n if v > n / 2 else v  # noqa: E731 - circular shift to signed
    return float(surface[y, x]), (wrap(dx, w), wrap(dy, h))


def _parabola_offset(values, i: int) -> float:
    """Sub-sample offset (-0.5..0.5) of the maximum of a parabola through values[i-1], values[i], values[i+1]."""
    if i <= 0 or i >= len(values) - 1:
        return 0.0
    a, b, c = (float(values[k]) for k in (i - 1, i, i + 1))
    denom = a - 2 * b + c
    return 0.0 if denom >= 0 else float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))


# How the per-frame lighting is fitted. "trim": least squares over the whole light mask, pixels beyond
# 3 x MAD dropped for three passes (bundles from before "light_fit" was recorded). "flat-tukey": the
# reference's flat pixels only, Tukey-biweighted. Structure edges dominate the residuals (a sub-pixel pose
# error moves an edge by a large fraction of its contrast) and which edge pixels survive a hard 3 x MAD cut
# depends on the pose: the quadratic gain at the corners jumped by 1-3 % in ~5 % of parts, 3-4 grey levels
# on a high-contrast plate near a corner, enough for a coarse-score false reject (docs/measurements.md).
LIGHT_FITS = ("trim", "flat-tukey")
LIGHT_FIT = "flat-tukey"
FLAT_SHARE = 0.6  # the flattest share of the light mask's pixels (by the reference's gradient) that fit the lighting
MIN_FLAT_SPREAD = 0.5  # the flat pixels' grey-level spread, relative to the whole mask's, below which all pixels fit
TUKEY_C = 4.685  # biweight cut-off in robust standard deviations (95 % efficiency under Gaussian noise)
TUKEY_ITERATIONS = 10


@dataclass(frozen=True)
class RegistrationReference:
    """What registration needs from the bundle: the reference at two levels and masks."""

    coarse: np.ndarray  # float32 reference mean at the coarse level
    fine: np.ndarray  # float32 reference mean at the fine level
    coarse_mask: np.ndarray  # uint8, non-zero = use for registration and illumination fit
    fine_mask: np.ndarray
    factors: tuple[int, int]
    full_shape: tuple[int, int]
    max_shift_px: float
    max_rotation_deg: float
    min_correlation: float
    search: PoseSearch | None = None  # None (bundles from before the search): ECC starts at the identity
    field: FieldReference | None = None  # None: rigid alignment only (bundles fitted without --alignment nonrigid)
    sensor: SensorModel | None = None  # None: nothing of the sensor frame is left out (bundles from before it)
    light_fit: str = LIGHT_FIT  # how ``photometric`` fits the lighting (bundles record theirs; older ones: "trim")

    def with_search(self) -> RegistrationReference:
        """This reference with a coarse pose search built from its coarse level and mask."""
        return replace(self, search=PoseSearch.build(self.coarse, self.coarse_mask, self.max_rotation_deg))

    def register(self, coarse_img: np.ndarray, fine_img: np.ndarray) -> Pose:
        """Find the reference-to-frame transform; raises InspectError("registration") on failure.

        With a search: ECC from its start (coarse, then fine); should that fail or land below the
        correlation limit, fine ECC straight from the start (coarse ECC can drift on structure near
        its level's resolution), then the identity. Without (older bundles): ECC from the identity.
        """
        if self.search is None:
            warp = self._ecc_level("coarse", np.eye(2, 3, dtype=np.float32), coarse_img)
            return self._finish(self._ecc_level("fine", self._to_fine(warp), fine_img))
        start = self.search.find(coarse_img).astype(np.float32)
        attempts = (
            lambda: self._to_fine(self._ecc_level("coarse", start, coarse_img)),
            lambda: self._to_fine(start),
            lambda: self._to_fine(self._ecc_level("coarse", np.eye(2, 3, dtype=np.float32), coarse_img)),
        )
        failure: InspectError | None = None
        for attempt in attempts:
            try:
                pose = self._finish(self._ecc_level("fine", attempt(), fine_img))
            except InspectError as exc:
                failure = failure or exc
                continue
            return pose
        assert failure is not None
        raise failure

    def _to_fine(self, coarse_warp: np.ndarray) -> np.ndarray:
        return _scale_matrix(coarse_warp, self.fine.shape, self.coarse.shape).astype(np.float32)

    def _ecc_level(self, level: str, warp: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, float] | np.ndarray:
        """ECC on the coarse level (returns the warp) or the fine level (returns warp and correlation)."""
        coarse = level == "coarse"
        template, mask = (self.coarse, self.coarse_mask) if coarse else (self.fine, self.fine_mask)
        iterations, eps = (60, 1e-4) if coarse else (25, 1e-5)
        try:
            found = self._ecc_corr(template, image, mask, warp, iterations, eps)
        except cv2.error as exc:
            raise InspectError("registration", f"{level} alignment did not converge ({exc.err})") from None
        return found[0] if coarse else found

    def _finish(self, fine: tuple[np.ndarray, float]) -> Pose:
        warp_fine, corr = fine
        pose = Pose(_scale_matrix(warp_fine, self.full_shape, self.fine.shape), float(corr))
        self._check(pose)
        return pose

    @staticmethod
    def _ecc_corr(template, image, mask, warp, iterations, eps) -> tuple[np.ndarray, float]:
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps)
        corr, warp = cv2.findTransformECC(template, image, warp.copy(), cv2.MOTION_EUCLIDEAN, criteria, mask, 3)
        return warp, corr

    def _check(self, pose: Pose) -> None:
        # the part's shift is how far its centre moves; the matrix's own translation mixes in the rotation
        cy, cx = (self.full_shape[0] - 1) / 2, (self.full_shape[1] - 1) / 2
        dx, dy = pose.matrix @ np.array([cx, cy, 1.0]) - np.array([cx, cy])
        if pose.correlation < self.min_correlation:
            raise InspectError(
                "registration",
                f"part does not match the reference (correlation {pose.correlation:.3f} < {self.min_correlation})",
            )
        if math.hypot(dx, dy) > self.max_shift_px or abs(pose.angle_deg) > self.max_rotation_deg:
            raise InspectError(
                "registration",
                f"pose outside limits: shift ({dx:.1f}, {dy:.1f}) px, rotation {pose.angle_deg:.2f} deg "
                f"(limits {self.max_shift_px:.0f} px, {self.max_rotation_deg:.1f} deg)",
            )

    def photometric(self, coarse_img: np.ndarray, pose: Pose) -> np.ndarray:
        """Fit frame = gain * reference + offset; returns the PHOTO_TERMS coefficients (see ``fit_photometric``)."""
        small_warp = _scale_matrix(pose.matrix, self.coarse.shape, self.full_shape)
        h, w = self.coarse.shape
        registered = cv2.warpAffine(
            coarse_img,
            small_warp,
            (w, h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        try:
            return fit_photometric(registered, self.coarse, self._light_pixels, self.full_shape, self.light_fit)
        except InspectError:
            if self.light_fit == "trim":
                raise
        # the flat pixels of a tiny or noisy reference (a 333x200 first image) can leave the fit without a
        # sane gain where every pixel still gives one: the older fit is the fallback, not a failed frame
        return fit_photometric(registered, self.coarse, light_mask(self.coarse_mask), self.full_shape, "trim")

    @cached_property
    def _light_pixels(self) -> np.ndarray:
        # the reference's own pixels decide which take part: computed once per reference, not per frame
        inner = light_mask(self.coarse_mask)
        return flat_mask(self.coarse, inner) if self.light_fit == "flat-tukey" else inner


LIGHT_MARGIN = 0.06  # fraction of the side along each edge left out of the lighting fit


def light_mask(mask: np.ndarray) -> np.ndarray:
    """The registration mask without a LIGHT_MARGIN band along the image edges.

    Vignetting, stray light and clutter in the border band are not global lighting: fitted
    there, a quadratic gain and linear offset bend to them and miss the interior (a dark hole
    near a corner came out 25 grey levels too dark). The band's own variation is what the
    learned border-ring tolerance takes care of.
    """
    h, w = mask.shape
    m = math.ceil(LIGHT_MARGIN * min(h, w))
    inner = np.zeros_like(mask)
    inner[m : h - m, m : w - m] = mask[m : h - m, m : w - m]
    return inner


PHOTO_TERMS = 9  # [g0, gx, gy, gxx, gyy, gxy, o0, ox, oy]: quadratic gain, linear offset


def _unit_coordinates(xs: np.ndarray, ys: np.ndarray, full_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixel coordinates -> the lighting model's coordinates: centred, half-side = 1."""
    h, w = full_shape
    half = max(h, w) / 2
    return (xs - (w - 1) / 2) / half, (ys - (h - 1) / 2) / half


def lighting_fields(
    coef: np.ndarray, xs: np.ndarray, ys: np.ndarray, full_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Gain and offset of the lighting model at full-resolution pixel coordinates (broadcasting)."""
    g0, gx, gy, gxx, gyy, gxy, o0, ox, oy = (float(v) for v in coef)
    x, y = _unit_coordinates(np.asarray(xs, np.float64), np.asarray(ys, np.float64), full_shape)
    gain = g0 + gx * x + gy * y + gxx * x * x + gyy * y * y + gxy * x * y
    return gain.astype(np.float32), (o0 + ox * x + oy * y).astype(np.float32)


def flat_mask(reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mask's pixels where the reference is flat: below its FLAT_SHARE gradient quantile, then eroded.

    The erosion takes off the foot of each edge as well (the gradient at a coarse level spreads
    over a pixel or so each side). Where too few flat pixels are left, or they show too few grey
    levels to tell gain from offset, the whole mask.
    """
    ref = reference.astype(np.float32)
    grad = np.hypot(cv2.Sobel(ref, cv2.CV_32F, 1, 0), cv2.Sobel(ref, cv2.CV_32F, 0, 1))
    inside = mask > 0
    if inside.sum() < 40 * PHOTO_TERMS:
        return mask
    # "<=": a noise-free reference is exactly flat (gradient 0) over most of its pixels
    flat = (grad <= np.quantile(grad[inside], FLAT_SHARE)).astype(np.uint8)
    flat = cv2.erode(flat, np.ones((3, 3), np.uint8)) > 0
    out = np.where(inside & flat, mask, 0).astype(mask.dtype)
    # a part that is all structure: better the edges than a fit on a handful of pixels
    if np.count_nonzero(out) < 20 * PHOTO_TERMS:
        return mask
    # gain and offset are told apart only by pixels of different grey levels: where the flat pixels are
    # mostly one level (a small part on a wide, flat background), the gain would be guessed, not fitted
    spread = reference[out > 0].std() / (reference[inside].std() + 1e-6)
    return out if spread >= MIN_FLAT_SPREAD else mask


def fit_photometric(
    registered: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    full_shape: tuple[int, int],
    method: str = "trim",
) -> np.ndarray:
    """Robust least squares of registered = gain(x, y) * reference + offset(x, y) over the mask's pixels.

    The gain is quadratic in x and y (vignetting and a light source's fall-off are, to first
    order, quadratic across the field), the offset linear (stray light, dark level). x and y
    are the centred coordinates of each coarse pixel's centre (see ``_unit_coordinates``).
    ``method`` (see LIGHT_FITS) is how defects are kept from bending the model; "flat-tukey"
    expects the mask already cut to flat pixels (``flat_mask``).
    """
    if method not in LIGHT_FITS:
        raise ValueError(f"unknown lighting fit {method!r} (known: {', '.join(LIGHT_FITS)})")
    design, target, scale = _photo_design(registered, reference, mask, full_shape)
    solve = _tukey_solve if method == "flat-tukey" else _trimmed_solve
    coef = solve(design, target, scale) / scale
    corners = lighting_fields(coef, np.array([0, full_shape[1] - 1]), np.array([[0], [full_shape[0] - 1]]), full_shape)
    if not np.all(np.isfinite(coef)) or corners[0].min() <= 0.05 or coef[0] <= 0.05:
        raise InspectError("registration", "illumination fit failed (image too dark or featureless)")
    return coef.astype(np.float32)


def _photo_design(
    registered: np.ndarray, reference: np.ndarray, mask: np.ndarray, full_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lighting model's design matrix (columns scaled to unit size), its target and the column scales."""
    h, w = reference.shape
    sy, sx = full_shape[0] / h, full_shape[1] / w
    ys, xs = np.nonzero(mask)
    x, y = _unit_coordinates(xs * sx + (sx - 1) / 2, ys * sy + (sy - 1) / 2, full_shape)
    mu = reference[ys, xs].astype(np.float64)
    target = registered[ys, xs].astype(np.float64)
    ones = np.ones_like(mu)
    design = np.stack([mu, mu * x, mu * y, mu * x * x, mu * y * y, mu * x * y, ones, x, y], axis=1)
    # columns scaled to unit size so the normal equations stay well conditioned
    scale = np.abs(design).max(axis=0) + 1e-12
    return design / scale, target, scale


def _trimmed_solve(design: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Three passes, each dropping the pixels beyond 3 x MAD of the last fit (the "trim" method)."""
    keep = np.ones(len(target), bool)
    coef = np.eye(1, PHOTO_TERMS)[0] * scale
    for _ in range(3):
        if keep.sum() < 4 * PHOTO_TERMS:
            break
        d = design[keep]
        coef = np.linalg.solve(d.T @ d + 1e-9 * np.eye(PHOTO_TERMS), d.T @ target[keep])
        resid = target - design @ coef
        mad = np.median(np.abs(resid[keep])) * 1.4826 + 1e-6
        keep = np.abs(resid) < 3 * mad
    return coef


def _tukey_solve(design: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Iteratively reweighted least squares with Tukey's biweight (the "flat-tukey" method).

    A pixel's weight falls smoothly to zero as its residual grows, so a pixel near the cut-off
    moves the fit a little, not all or nothing as with a hard trim: the fit no longer jumps
    between poses. The scale is the MAD of all residuals, re-estimated each iteration.
    """
    if len(target) < 4 * PHOTO_TERMS:
        return np.eye(1, PHOTO_TERMS)[0] * scale
    columns = np.ascontiguousarray(design.T)  # [terms, n]: the weighted products run along memory (~3x faster)
    weights = np.ones(len(target))
    coef = np.zeros(PHOTO_TERMS)
    half = len(target) // 2
    for _ in range(TUKEY_ITERATIONS):
        weighted = columns * weights
        coef = np.linalg.solve(weighted @ columns.T + 1e-9 * np.eye(PHOTO_TERMS), weighted @ target)
        resid = target - coef @ columns
        mad = np.partition(np.abs(resid), half)[half] * 1.4826 + 1e-6  # the (upper) median, without a sort
        u = resid / (TUKEY_C * mad)
        weights = np.clip(1 - u * u, 0, None) ** 2
    return coef


def tile_photometric(
    coef: np.ndarray, origins: list[tuple[int, int]], halo: int, full_shape: tuple[int, int]
) -> np.ndarray:
    """The lighting model per tile as a polynomial in tile-local pixels (u = column, v = row of the input tile).

    Returns [n, PHOTO_TERMS]: gain = p0 + p1 u + p2 v + p3 u^2 + p4 v^2 + p5 u v, offset = p6 + p7 u + p8 v.
    """
    _, gx, gy, gxx, gyy, gxy, _, ox, oy = (float(v) for v in coef)
    k = 1 / (max(full_shape) / 2)  # unit coordinates per pixel
    out = np.empty((len(origins), PHOTO_TERMS), np.float32)
    for i, (y0, x0) in enumerate(origins):
        u0, v0 = x0 - halo, y0 - halo  # image pixel of the tile's first pixel
        gain0, offset0 = lighting_fields(coef, np.float64(u0), np.float64(v0), full_shape)
        x, y = _unit_coordinates(np.float64(u0), np.float64(v0), full_shape)
        gain_u = (gx + 2 * gxx * x + gxy * y) * k
        gain_v = (gy + 2 * gyy * y + gxy * x) * k
        out[i] = (gain0, gain_u, gain_v, gxx * k * k, gyy * k * k, gxy * k * k, offset0, ox * k, oy * k)
    return out


@dataclass(frozen=True)
class Aligned:
    """A frame brought onto the reference: its pose (with the field, if any), lighting model and resampled pixels,
    and how many of them showed the sensor frame's clutter (replaced by the reference, see engines.sensor)."""

    pose: Pose
    coef: np.ndarray
    registered: np.ndarray
    left_out: int = 0


def align(image: np.ndarray, ref: RegistrationReference, out: np.ndarray | None = None) -> Aligned:
    """Register a (conformed) frame, fit its lighting, find its bend if the reference has a field, and resample
    (into ``out`` if given: the interior of the padded frame at run time, so it is not copied again).

    The one preparation both the fit and run time use, so the statistics are computed from images
    prepared exactly as frames on the line will be. Raises InspectError("registration").
    """
    fine_f = ref.factors[1]
    coarse, fine, level = frame_levels(image, ref)
    pose = ref.register(coarse, fine)
    coef = ref.photometric(coarse, pose)
    clutter = None
    if ref.sensor is not None and ref.sensor.leaves_out:
        expected = expected_on_level(ref, pose, coef, ref.sensor.search_rows(fine_f))
        clutter = ref.sensor.frame_clutter(fine, expected, fine_f) or None
    if ref.field is not None:
        step, shape = ref.field.factor, level.shape
        pieces = []
        if clutter is not None:
            pieces = _on_level(clutter.in_reference(pose.matrix, ref.full_shape, step=step), shape)
        band = ref.sensor.clutter_band() if ref.sensor is not None else None
        if band is not None:  # the clutter band: not measured where the part is flat (engines.sensor)
            banded = _on_level(band.band_in_reference(pose.matrix, ref.full_shape, step), shape)
            pieces += [(rows, cols, mask & ref.field.flat[rows, cols]) for rows, cols, mask in banded]
        hidden = np.zeros(shape, bool) if pieces else None
        for rows, cols, mask in pieces:
            hidden[rows, cols] |= mask
        areas = [(rows, cols) for rows, cols, _ in pieces]
        pose = replace(pose, field=ref.field.estimate(level, pose.matrix, hidden, areas))
    registered = warp_to_reference(image, pose, out)
    left_out = 0
    if clutter is not None:
        from engines.sensor import leave_out

        grow = 0.0 if pose.field is None else pose.field.magnitude  # the field moves the part a little further
        pieces = clutter.in_reference(pose.matrix, ref.full_shape, grow=grow)
        unit = 1 / 257 if image.dtype == np.uint16 else 1.0
        left_out = leave_out(registered, pieces, ref.sensor.mean, coef, unit)
    return Aligned(pose, coef, registered, left_out)


def _on_level(pieces: list, shape: tuple[int, int]) -> list:
    """(rows, cols, mask) pieces cropped to a level of ``shape``: ``downscale`` keeps whole level pixels only
    (``h // step`` rows) where ``in_reference`` also counts a partial last one, which overran the field's level on a
    side that is not a multiple of its factor (a 2051 x 1999 frame was refused with a broadcast error)."""
    out = []
    for rows, cols, mask in pieces:
        rows, cols = slice(rows.start, min(rows.stop, shape[0])), slice(cols.start, min(cols.stop, shape[1]))
        if rows.start < rows.stop and cols.start < cols.stop:
            out.append((rows, cols, mask[: rows.stop - rows.start, : cols.stop - cols.start]))
    return out


def frame_levels(image: np.ndarray, ref: RegistrationReference) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The frame's coarse and fine registration levels, and its field level where the reference has a field.

    A field that shares its level (``FieldReference.shared_levels``) has the frame read once, at the field's level
    (the finest of the three): reading a 5120 px frame costs 6-9 ms a level, area-averaging the field's level
    down to the other two under 2 ms. The field's level is rounded to the frame's type once (as a direct downscale
    is), its averages are not: the levels differ from a direct downscale by up to a grey level, so bundles fitted
    before keep reading three times.
    """
    coarse_f, fine_f = ref.factors
    field = ref.field
    if field is not None and field.shared_levels and fine_f % field.factor == 0 and coarse_f % fine_f == 0:
        level = downscale(image, field.factor)
        fine = _area(level, fine_f // field.factor)
        return _area(fine, coarse_f // fine_f), fine, level
    coarse = downscale(image, coarse_f)
    fine = downscale(image, fine_f) if fine_f != coarse_f else coarse
    if field is None:
        return coarse, fine, None
    levels = {coarse_f: coarse, fine_f: fine}
    return coarse, fine, levels[field.factor] if field.factor in levels else downscale(image, field.factor)


def expected_on_level(
    ref: RegistrationReference, pose: Pose, coef: np.ndarray, edge_rows: int | None = None
) -> np.ndarray:
    """The reference part as the frame should show it on the fine level: lit like the frame, posed (sensor frame).

    ``edge_rows``: only the rows (columns) within that many of each edge are computed, the rest left at zero (the
    occluder search at run time looks nowhere else): a seventh of the pixels of a 5120 px frame's fine level, 1.4 of
    2 ms. Each pixel's lighting is its own; its sample's position is formed from the box's corner, which OpenCV's
    fixed-point warp rounds a little differently: within 0.008 grey levels of the whole level's values, and the
    same occluders on every frame compared (``docs/measurements.md``).
    """
    h, w = ref.fine.shape
    matrix = _scale_matrix(pose.matrix, (h, w), ref.full_shape)
    if edge_rows is None or 2 * edge_rows >= min(h, w):
        lit = _lit_fine(ref, coef, (0, h, 0, w))
        return cv2.warpAffine(lit, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = np.zeros((h, w), np.float32)
    k = edge_rows
    if k <= 0:
        return out
    inverse = cv2.invertAffineTransform(matrix)
    for y0, y1, x0, x1 in ((0, k, 0, w), (h - k, h, 0, w), (k, h - k, 0, k), (k, h - k, w - k, w)):
        out[y0:y1, x0:x1] = _expected_box(ref, inverse, coef, (y0, y1, x0, x1))
    return out


def _lit_fine(ref: RegistrationReference, coef: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The reference's fine level over the box (y0, y1, x0, x1) of its pixels, lit by the lighting model ``coef``
    (each pixel's gain and offset at its full-resolution centre)."""
    h, w = ref.fine.shape
    y0, y1, x0, x1 = box
    sy, sx = ref.full_shape[0] / h, ref.full_shape[1] / w
    xs = (np.arange(x0, x1) * sx + (sx - 1) / 2)[None, :]
    ys = (np.arange(y0, y1) * sy + (sy - 1) / 2)[:, None]
    gain, offset = lighting_fields(coef, xs, ys, ref.full_shape)
    return gain * ref.fine[y0:y1, x0:x1] + offset


def _expected_box(
    ref: RegistrationReference, inverse: np.ndarray, coef: np.ndarray, box: tuple[int, int, int, int]
) -> np.ndarray:
    """``expected_on_level`` on the fine-level box (y0, y1, x0, x1), ``inverse`` the pose on that level (frame ->
    reference): the reference lit over the part of it the box samples (two pixels more, or up to its edge, where the
    replicated border begins as on the whole level)."""
    h, w = ref.fine.shape
    y0, y1, x0, x1 = box
    corners = np.array([[x0, y0, 1], [x1 - 1, y0, 1], [x0, y1 - 1, 1], [x1 - 1, y1 - 1, 1]], np.float64) @ inverse.T
    lo = np.floor(corners.min(axis=0)).astype(int) - 2
    hi = np.ceil(corners.max(axis=0)).astype(int) + 3
    sx0, sy0 = max(0, int(lo[0])), max(0, int(lo[1]))
    sx1, sy1 = min(w, max(int(hi[0]), sx0 + 1)), min(h, max(int(hi[1]), sy0 + 1))
    lit = _lit_fine(ref, coef, (sy0, sy1, sx0, sx1))
    shifted = inverse.copy()
    shifted[:, 2] = inverse[:, 0] * x0 + inverse[:, 1] * y0 + inverse[:, 2] - (sx0, sy0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(lit, shifted, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def warp_to_reference(image: np.ndarray, pose: Pose, out: np.ndarray | None = None) -> np.ndarray:
    """Resample the frame on the reference grid (bilinear, sub-pixel), through the pose's field if it has one;
    into ``out`` (the frame's shape and type, a view is fine) if given."""
    if pose.field is not None:
        return pose.field.resample(image, pose.matrix, out)
    h, w = image.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if out is None:
        return cv2.warpAffine(image, pose.matrix, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    _check_out(out, image)
    result = cv2.warpAffine(image, pose.matrix, (w, h), dst=out, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    if result is not out:  # OpenCV wrote elsewhere (it raises for a layout it cannot take): never a stale ``out``
        out[...] = result
    return out


def _check_out(out: np.ndarray, image: np.ndarray) -> None:
    """OpenCV writes into ``dst`` only when it already has the result's shape and type (else it allocates anew)."""
    if out.shape != image.shape or out.dtype != image.dtype:
        raise ValueError(f"out is {out.shape} {out.dtype}, the frame {image.shape} {image.dtype}")


def bbox_to_frame(bbox: tuple[int, int, int, int], pose: Pose, height: int, width: int) -> tuple[int, int, int, int]:
    """Map a reference-frame box (x1/y1 exclusive) into the frame's own pixels, rounded outwards."""
    x0, y0, x1, y1 = bbox
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64)
    pts = corners @ pose.matrix.T
    fx0, fy0 = np.floor(pts.min(axis=0)).astype(int)
    fx1, fy1 = np.ceil(pts.max(axis=0)).astype(int)
    x0c = int(min(max(0, fx0), width - 1))
    y0c = int(min(max(0, fy0), height - 1))
    return x0c, y0c, int(min(width, max(fx1, x0c + 1))), int(min(height, max(fy1, y0c + 1)))
