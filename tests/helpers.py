"""Small synthetic datasets for the tests: a simple aligned part in the MVTec AD layout.

The part is a bright plate on a dark background with holes, a ring and a few lines, drawn
anti-aliased (4x supersampled) and slightly blurred. Each image gets its own pose jitter
(about 1 px and 0.3 degrees), gain, illumination gradient and Gaussian noise. Defects are
drawn after the pose, in frame pixels, and their ground-truth masks are written alongside.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

from engines.bundle import GRAPH_FP16, GRAPH_FP32, Bundle
from engines.decode import read_image
from engines.inspector import Inspector
from engines.onnxruntime_backend import OnnxRuntimeBackend
from engines.tolerance import BLOCK

SUPERSAMPLE = 4
BACKGROUND = 30.0
PLATE = 150.0


def render_part(height: int, width: int | None = None) -> np.ndarray:
    """The canonical part as float32 grey levels [H, W]: plate, holes, ring, lines; anti-aliased."""
    width = width or height
    s = SUPERSAMPLE
    canvas = np.full((height * s, width * s), BACKGROUND, np.float32)
    h, w = height * s, width * s

    def pt(fx: float, fy: float) -> tuple[int, int]:
        return int(fx * w), int(fy * h)

    side = min(h, w)
    cv2.rectangle(canvas, pt(0.08, 0.08), pt(0.92, 0.92), PLATE, -1)
    for fx, fy, fr in ((0.25, 0.25, 0.06), (0.75, 0.28, 0.045), (0.3, 0.72, 0.05)):
        cv2.circle(canvas, pt(fx, fy), int(fr * side), 70.0, -1)
    cv2.circle(canvas, pt(0.68, 0.7), int(0.09 * side), 205.0, max(1, int(0.012 * side)))
    thickness = max(1, int(0.01 * side))
    cv2.line(canvas, pt(0.12, 0.5), pt(0.55, 0.47), 210.0, thickness)
    cv2.line(canvas, pt(0.5, 0.12), pt(0.47, 0.4), 95.0, thickness)
    cv2.line(canvas, pt(0.6, 0.45), pt(0.88, 0.58), 200.0, thickness)
    small = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (0, 0), 0.8)


def pose_matrix(angle_deg: float, dx: float, dy: float, height: int, width: int) -> np.ndarray:
    """Reference-to-frame 2x3 matrix: rotation about the image centre, then a shift."""
    m = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle_deg, 1.0)
    m[:, 2] += (dx, dy)
    return m


def place_frame(part: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The part as seen with the reference-to-frame pose ``matrix`` (float32, same size)."""
    h, w = part.shape[:2]
    return cv2.warpAffine(part, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def lighting(frame: np.ndarray, gain: float, gx: float, gy: float, offset: float = 0.0) -> np.ndarray:
    """``gain * frame + offset`` plus a linear gradient of ``gx``/``gy`` grey levels across the image."""
    h, w = frame.shape[:2]
    ramp = gx * (np.arange(w, dtype=np.float32)[None, :] / w - 0.5) + gy * (
        np.arange(h, dtype=np.float32)[:, None] / h - 0.5
    )
    return frame * np.float32(gain) + np.float32(offset) + ramp


def flat_spots(part: np.ndarray, size: int) -> np.ndarray:
    """Boolean [H, W]: top-left corners where a ``size`` px square lies on flat plate, away from edges."""
    grad = cv2.morphologyEx(part, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    flat = (np.abs(part - PLATE) < 3) & (grad < 2)
    flat = cv2.erode(flat.astype(np.uint8), np.ones((size + 8, size + 8), np.uint8)) > 0
    ok = np.zeros_like(flat)
    half = (size + 8) // 2
    h, w = part.shape[:2]
    ny, nx = h - size - 8, w - size - 8
    ok[:ny, :nx] = flat[half : half + ny, half : half + nx]
    return ok


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator, part: np.ndarray) -> np.ndarray:
    """Draw one defect of ``kind`` ("dot" or "stain") into float ``image`` in place; returns its mask."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    if kind == "dot":
        spots = np.argwhere(flat_spots(part, 6))
        y, x = spots[rng.integers(len(spots))]
        image[y : y + 6, x : x + 6] -= 50
        mask[y : y + 6, x : x + 6] = 255
    elif kind == "stain":
        spots = np.argwhere(flat_spots(part, 60))
        y, x = spots[rng.integers(len(spots))] + 30
        blob = np.zeros((h, w), np.float32)
        cv2.ellipse(blob, (int(x), int(y)), (26, 9), float(rng.uniform(-20, 20)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), 3.0)
        blob /= blob.max()
        image += 15 * blob
        mask[blob > 0.3] = 255
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return mask


def make_frame(part: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One float32 frame of ``part`` with random pose jitter, gain, gradient (no noise yet)."""
    h, w = part.shape[:2]
    matrix = pose_matrix(rng.uniform(-0.3, 0.3), rng.uniform(-1, 1), rng.uniform(-1, 1), h, w)
    frame = place_frame(part, matrix)
    return lighting(frame, rng.uniform(0.96, 1.04), rng.uniform(-4, 4), rng.uniform(-4, 4))


def finish(frame: np.ndarray, rng: np.random.Generator, sigma: float = 2.0) -> np.ndarray:
    """Add Gaussian noise and quantise to uint8."""
    noisy = frame + rng.normal(0, sigma, frame.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")
    return path


def make_dataset(
    root: Path,
    size: int = 384,
    n_train: int = 10,
    n_good: int = 4,
    kinds: tuple[str, ...] = ("dot", "stain"),
    n_per_kind: int = 3,
    seed: int = 0,
) -> Path:
    """Write an MVTec-layout dataset (train/good, test/good, test/<kind>, ground_truth/<kind>) to ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    part = render_part(size)
    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", finish(make_frame(part, rng), rng))
    for i in range(n_good):
        write_png(root / "test" / "good" / f"{i:03d}.png", finish(make_frame(part, rng), rng))
    for kind in kinds:
        for i in range(n_per_kind):
            frame = make_frame(part, rng)
            mask = add_defect(frame, kind, rng, part)
            write_png(root / "test" / kind / f"{i:03d}.png", finish(frame, rng))
            write_png(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


def random_reference(rng: np.random.Generator, height: int, width: int, channels: int) -> dict[str, np.ndarray]:
    """Random reference statistics in the layout of reference.npz (mu, lo, hi, weight, inv_sigma<l>, fine gains)."""
    from engines.graphs import LEVELS
    from engines.tiling import cell_grid

    shape = (channels, height, width)
    mu = rng.uniform(40, 200, shape).astype(np.float32)
    lo = mu - rng.uniform(2, 12, shape).astype(np.float32)
    hi = mu + rng.uniform(2, 12, shape).astype(np.float32)
    weight = (rng.random((height, width)) > 0.1).astype(np.uint8)
    ref: dict[str, np.ndarray] = {
        "mu": mu.astype(np.float16),
        "lo": lo.astype(np.float16),
        "hi": hi.astype(np.float16),
        "weight": weight,
    }
    for level in LEVELS:
        inv = rng.uniform(0.0, 3.0, (channels, *cell_grid(height, width, 2**level))).astype(np.float32)
        ref[f"inv_sigma{level}"] = inv.astype(np.float16)
    blocks = cell_grid(height, width, BLOCK)
    ref["fine_gain"] = rng.uniform(0.3, 1.0, blocks).astype(np.float16)
    ref["fine_ring_gain"] = np.ones(blocks, np.float16)
    return ref


def random_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random lighting coefficients (registration.PHOTO_TERMS, unit coordinates): gain near 1, gentle curvature."""
    gain = [rng.uniform(0.9, 1.1), *rng.uniform(-0.05, 0.05, 2), *rng.uniform(-0.03, 0.03, 3)]
    return np.array([*gain, rng.uniform(-8, 8), *rng.uniform(-4, 4, 2)], np.float32)


def maps_agree(reference: Inspector, other: Inspector, samples: list[Path]) -> tuple[float, bool]:
    """(largest |other - reference| / max(|reference|, 1), verdicts all equal) on the same prepared frames."""
    worst, same = 0.0, True
    with reference, other:
        for path in samples:
            prepared = reference.prepare(read_image(path))
            want, got = reference.infer(prepared), other.infer(prepared)
            worst = max(worst, float((np.abs(got - want) / np.maximum(np.abs(want), 1)).max()))
            same &= other.decide(prepared, got).verdict == reference.decide(prepared, want).verdict
    return worst, same


def fp32_inspector(bundle: Bundle) -> Inspector:
    """The bundle on ONNX Runtime with its FP32 graph: the reference every other path is compared with."""
    return Inspector(bundle, OnnxRuntimeBackend(bundle.file(GRAPH_FP32), threads=2))


def fp16_vs_fp32(bundle_dir: Path, samples: list[Path]) -> float:
    """Largest |FP16 map - FP32 map| / max(|FP32 map|, 1) of a bundle's two graphs on real frames."""
    bundle = Bundle.load(bundle_dir)
    fp16 = Inspector(bundle, OnnxRuntimeBackend(bundle.file(GRAPH_FP16), threads=2))
    return maps_agree(fp32_inspector(bundle), fp16, samples)[0]


def tile_feeds(rng: np.random.Generator, core: int, gains: int = 1, halo: int = 64) -> dict[str, np.ndarray]:
    """FP32 feeds for one tile of any inspectd graph: a noisy frame with a dot, a lighting model, random statistics."""
    from engines.graphs import FINE_GAIN_LEVEL, LEVELS

    t = core + 2 * halo
    mean = rng.uniform(40, 200, (1, 1, t, t)).astype(np.float32)
    image = np.clip(mean + rng.normal(0, 6, mean.shape), 0, 255).astype(np.uint8)
    image[0, 0, t // 2 - 2 : t // 2 + 2, t // 2 - 2 : t // 2 + 2] = 250  # a dot
    weight = np.ones((1, 1, t, t), np.float32)
    weight[..., :10, :] = 0
    side = t >> FINE_GAIN_LEVEL
    feeds = {
        "image": image,
        "photo": np.array([[1.05, 1e-4, -2e-4, 1e-7, -2e-7, 5e-8, 3.0, 0.01, -0.02]], np.float32),
        "mean": mean,
        "low": mean - rng.uniform(2, 12, mean.shape).astype(np.float32),
        "high": mean + rng.uniform(2, 12, mean.shape).astype(np.float32),
        "weight": weight,
        "fine_gain": rng.uniform(0.3, 1.0, (1, gains, side, side)).astype(np.float32),
    }
    for level in LEVELS:
        feeds[f"coarse{level}"] = rng.uniform(0, 3, (1, 1, t >> level, t >> level)).astype(np.float32)
    return feeds


def emulated_trt_vs_fp32(bundle_dir: Path, samples: list[Path], plan: Path) -> tuple[float, bool]:
    """(worst relative map error, verdicts all equal) of the bundle's FP16 graph as an EMULATED TensorRT plan.

    The caller installs the emulation (``tests.emulation.install``): this exercises the Inspector,
    the plan build and the TensorRT backend's buffers and bindings with the real graph's inputs;
    it proves nothing about a GPU or TensorRT's kernels.
    """
    from engines.tensorrt_backend import TensorRTBackend
    from engines.trt_build import build_engine

    bundle = Bundle.load(bundle_dir)
    build_engine(bundle.file(GRAPH_FP16), plan, max_batch=4, workspace_mb=64, timing_cache=None)
    return maps_agree(fp32_inspector(bundle), Inspector(bundle, TensorRTBackend(plan), batch=4), samples)


def lighting_truth(coef: np.ndarray, xs: np.ndarray, ys: np.ndarray, height: int, width: int) -> tuple:
    """Gain and offset at pixel coordinates, written out independently of engines.registration."""
    half = max(height, width) / 2
    x, y = (xs - (width - 1) / 2) / half, (ys - (height - 1) / 2) / half
    g0, gx, gy, gxx, gyy, gxy, o0, ox, oy = (float(v) for v in coef)
    return g0 + gx * x + gy * y + gxx * x * x + gyy * y * y + gxy * x * y, o0 + ox * x + oy * y


def convert_dataset(src: Path, dst: Path, layout: str) -> Path:
    """Copy a mono 8-bit dataset as "colour" (BGR with channel offsets) or "mono16" (16-bit with low-bit noise)."""
    rng = np.random.default_rng(0)
    for path in sorted(Path(src).rglob("*.png")):
        target = Path(dst) / path.relative_to(src)
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if "ground_truth" not in path.relative_to(src).parts:
            if layout == "colour":
                shifted = np.clip(image.astype(np.int16) + 20, 0, 255).astype(np.uint8)
                image = cv2.merge([image, shifted, (image * 0.8).astype(np.uint8)])
            elif layout == "mono16":
                image = (image.astype(np.uint16) * 257 + rng.integers(0, 200, image.shape)).astype(np.uint16)
            else:
                raise ValueError(f"unknown layout {layout!r}")
        write_png(target, image)
    return Path(dst)


def render_speckled_part(size: int, seed: int = 3) -> np.ndarray:
    """A plate covered with small bright pads (3-8 px at 5120 px, scaled, at least 1 px) and nothing large.

    At the coarse registration levels such a part keeps little but its outline, so a fixture bar
    and vignetting that stay with the camera weigh as much as the part: the hard case for ECC.
    """
    canvas = np.full((size, size), 40, np.float32)
    cv2.rectangle(canvas, (int(0.03 * size), int(0.03 * size)), (int(0.97 * size), int(0.97 * size)), 120, -1)
    rng = np.random.default_rng(seed)
    for _ in range(3000):
        x, y = rng.uniform(0.08, 0.92, 2) * size
        cv2.circle(canvas, (int(x), int(y)), max(1, int(rng.uniform(3, 8) * size / 5120)), 200, -1)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)


def sensor_clutter(frame: np.ndarray, edges: tuple[int, ...] = (0, 2), depth: float = 0.022) -> np.ndarray:
    """Add what stays with the camera: dark fixture bars ``depth`` of the side deep along ``edges``
    (0 top, 1 bottom, 2 left, 3 right) and 30 % vignetting over the outer 4 % of the side; float32."""
    out = frame.astype(np.float32).copy()
    h, w = out.shape[:2]
    bar = int(depth * min(h, w))
    for edge in edges:
        view = {0: out[:bar], 1: out[h - bar :], 2: out[:, :bar], 3: out[:, w - bar :]}[edge]
        view[...] = 10.0
    band = 0.04 * min(h, w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    to_edge = np.minimum(np.minimum(ys, h - 1 - ys), np.minimum(xs, w - 1 - xs))
    return out * (1 - 0.3 * np.clip(1 - to_edge / band, 0, 1) ** 2)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str, name: str | None = None) -> ModuleType:
    """A script of ``benchmarks/`` loaded as a module (they are scripts, not a package), as ``name``.

    Registered in ``sys.modules`` before it runs (a dataclass under ``from __future__ import
    annotations`` looks its module up there) and run with ``benchmarks/`` on the path, as when run
    as a script (some import their neighbours).
    """
    name = name or script
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
