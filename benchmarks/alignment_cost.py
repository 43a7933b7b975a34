"""What the alignment costs and buys: rigid ECC as before, with the pose search, and with the non-rigid field.

    python benchmarks/alignment_cost.py                    # 5120 px, 6 frames, 3 runs
    python benchmarks/alignment_cost.py --size 2048 --frames 10

Frames are made like ``inspectd synth`` makes a hard line (±1.5 deg, ±24 px, a bend of 0.8 px
on a 9x9 grid, light drift, one dark fixture bar on a random side, border vignetting, noise),
so the true position of every reference pixel in every frame is known. Three preparations run
on the same frames in the same process, in turn:

- ``affine``: ECC from the identity with the whole region as mask, then ``cv2.warpAffine``
  (how bundles fitted before the pose search register);
- ``search``: the pose search and ECC on the region without the border zone (rigid bundles now);
- ``occluders``: the search plus the sensor frame's occluders found and left out (a fit whose good
  images show a fixture bar; the frames here have one);
- ``field``: the same plus the smooth displacement field, folded into one remap (``--alignment
  nonrigid``, or ``auto`` on a line that bends).

``--before CHECKOUT`` adds a row: the field with another checkout's ``engines/registration.py`` and
``engines/nonrigid.py`` (loaded as modules of their own), on the same frames in turn, and prints the
field's addition (over ``occluders``) per frame against it: a before/after that load hits alike
(the two run in turn, the order swapped from frame to frame).
``--cpu`` times the CPU of one thread (``cv2.setNumThreads(1)``, process time) instead of the wall
clock: on a shared machine it moves far less with the other jobs than the wall clock does.

Per preparation: median milliseconds of the whole preparation (registration, lighting fit,
field, resampling; what ``inspectd predict`` reports as "registration"), its ratio to
``affine``, and the residual misalignment of the part's edges along their normals (median and
95th percentile over edge pixels, median over frames; the outer 3 % of the side, where the bar
may hide the part, left out). The references are built from the synthetic part's design, as a
fit builds them from the mean good part. Timings on a shared machine are only indicative.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

from calibration import synth
from calibration.fit_pipeline import FitConfig, level_reference
from engines import nonrigid as nr
from engines import registration as reg
from engines.sensor import SensorModel, edge_view


def region(size: int) -> np.ndarray:
    """The inspection region ``fit`` uses without an ROI: all but its default margin."""
    weight = np.ones((size, size), np.uint8)
    margin = max(4, math.ceil(size / 512) + 2)
    weight[:margin] = weight[-margin:] = 0
    weight[:, :margin] = weight[:, -margin:] = 0
    return weight


def references(design: np.ndarray) -> dict[str, reg.RegistrationReference]:
    size = design.shape[0]
    weight = region(size)
    coarse_f, fine_f = reg.level_factors(size, size)
    levels = reg.downscale(design, coarse_f), reg.downscale(design, fine_f)
    limits = FitConfig(max_shift_px=0.04 * size, max_rotation_deg=3.0)
    searched = level_reference(*levels, weight, limits)
    occluders = replace(searched, sensor=SensorModel(0.06 * size, design[None].astype(np.float16)))
    field = nr.FieldReference.from_full(design, weight, (size, size))
    return {
        "affine": level_reference(*levels, weight, limits, search=False),
        "search": searched,
        "occluders": occluders,
        "field": replace(occluders, field=field),
    }


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def before(checkout: Path, refs: dict, design: np.ndarray) -> tuple:
    """(align, reference) of the field preparation with ``checkout``'s registration and field modules."""
    old_nr = _load("before_nonrigid", checkout / "engines" / "nonrigid.py")
    old_reg = _load("before_registration", checkout / "engines" / "registration.py")
    occ = refs["occluders"]
    ref = old_reg.RegistrationReference(**{f.name: getattr(occ, f.name) for f in fields(occ)})
    field = old_nr.FieldReference.from_full(design, region(design.shape[0]), design.shape)
    return old_reg.align, replace(ref, field=field)


def frame(design: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    size = design.shape[0]
    config = synth.SynthConfig(size=size, seed=seed, bend_px=0.8, max_rotation_deg=1.5, max_shift_px=24, light=2.5)
    rng = np.random.default_rng(seed)
    matrix = synth._pose_matrix(synth._sample_pose(config, rng))
    image, disp = synth._warp(design, matrix, config, rng)
    band = round(config.border_band * size)
    gain = synth._gain_field(config, rng)
    synth._band_vignette(gain, band, (0.12, 0.3), rng)
    image *= gain
    bar = edge_view(image, int(rng.integers(4)))
    bar[: int(band * rng.uniform(0.25, 0.55))] = synth.FIXTURE
    image += rng.normal(0, 2, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), matrix, disp


def edge_pixels(design: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    size = design.shape[0]
    gx = cv2.Sobel(design, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(design, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    strength = np.hypot(gx, gy)
    ys, xs = np.nonzero(strength > 10)
    keep = np.minimum(np.minimum(xs, size - 1 - xs), np.minimum(ys, size - 1 - ys)) >= 0.03 * size
    ys, xs = ys[keep], xs[keep]
    return xs, ys, gx[ys, xs] / strength[ys, xs], gy[ys, xs] / strength[ys, xs]


def misalignment(pose: reg.Pose, matrix: np.ndarray, disp: tuple, edges: tuple, size: int) -> np.ndarray:
    xs, ys, nx, ny = edges
    q = matrix[:, :2] @ np.stack([xs, ys]) + matrix[:, 2:]
    qi = np.clip(np.rint(q).astype(int), 0, size - 1)
    true = q - matrix[:, :2] @ np.stack([disp[0][qi[1], qi[0]], disp[1][qi[1], qi[0]]])
    found = pose.matrix[:, :2] @ np.stack([xs, ys]) + pose.matrix[:, 2:]
    if pose.field is not None:
        bx, by = nr._basis(xs, size), nr._basis(ys, size)
        found = found + np.stack([np.einsum("nk,kl,nl->n", by, pose.field.coef[c], bx) for c in range(2)])
    error = found - true
    return np.abs(error[0] * nx + error[1] * ny)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11, help="design and frames derive from it")
    parser.add_argument("--before", type=Path, metavar="CHECKOUT", help="also the field with this checkout's code")
    parser.add_argument("--cpu", action="store_true", help="CPU time of one thread instead of the wall clock")
    args = parser.parse_args()
    if args.cpu:
        cv2.setNumThreads(1)
    design = synth.render_design(synth.SynthConfig(size=args.size, seed=args.seed)).image
    refs = references(design)
    preps = {name: (reg.align, ref) for name, ref in refs.items()}
    if args.before:
        preps["field before"] = before(args.before, refs, design)
    edges = edge_pixels(design)
    frames = [frame(design, 1000 * args.seed + i) for i in range(args.frames)]
    clock = time.process_time if args.cpu else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in preps}
    errors: dict[str, list[tuple[float, float]]] = {name: [] for name in preps}
    for run in range(args.runs):
        for i, (image, matrix, disp) in enumerate(frames):
            order = list(preps)
            if args.before and (run * len(frames) + i) % 2:
                # the second of two like preparations of a frame ran faster: 0.78 against 0.92 the other way round
                order[-2:] = order[:-3:-1]
            for name in order:  # in turn on each frame, so load changes hit all alike
                align, ref = preps[name]
                start = clock()
                aligned = align(image, ref)
                times[name].append((clock() - start) * 1000)
                if run == 0:
                    error = misalignment(aligned.pose, matrix, disp, edges, args.size)
                    errors[name].append((float(np.median(error)), float(np.percentile(error, 95))))
    report(args, times, errors)
    return 0


def report(args: argparse.Namespace, times: dict[str, list[float]], errors: dict[str, list]) -> None:
    base = statistics.median(times["affine"])
    unit = "CPU ms of one thread" if args.cpu else "ms"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{args.size} px, {args.frames} frames x {args.runs} runs, medians of {unit}; load average {load}\n")
    print(f"| preparation | {unit} | ratio to affine | edge misalignment median px | 95 % px |")
    print("|---|---|---|---|---|")
    for name in times:
        ms = statistics.median(times[name])
        med = statistics.median(e[0] for e in errors[name])
        p95 = statistics.median(e[1] for e in errors[name])
        print(f"| {name} | {ms:.0f} | {ms / base:.2f} | {med:.3f} | {p95:.3f} |")
    if "field before" in times:
        # per frame, so that load that comes and goes hits both alike
        occ = times["occluders"]
        ratio = [(n - o) / (b - o) for n, b, o in zip(times["field"], times["field before"], occ, strict=True)]
        median = statistics.median(ratio)
        print(f"\nthe field's addition over occluders, this code / before, per frame: median {median:.2f}")


if __name__ == "__main__":
    sys.exit(main())
