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
  nonrigid``, or ``auto`` on a line that bends), which does not measure the part's flat stretches
  within a clutter band along every edge as deep as fixture-hard fits learn it (``CLUTTER_BAND`` of
  the side, ``SensorModel.clutter_band``).

``--before CHECKOUT`` adds every preparation once more with another checkout's
``engines/registration.py`` and ``engines/nonrigid.py`` (loaded as modules of their own), on the
same frames in turn (each preparation next to its twin, the order swapped from frame to frame), so
load hits both alike. The checkout's references get only the settings its own dataclasses have
(one from before the lighting fit's ``light_fit`` fits "trim"; one from before ``field.steps``
runs its own constant); a table says which settings each side ran with. It then prints each side's
additions over its own ``affine`` and, per frame, this code's against the checkout's.
``--cpu`` runs one thread (``cv2.setNumThreads(1)``, one BLAS thread) and takes the ratios from process CPU time
instead of the wall clock (both are printed): on a shared machine it moves far less with the other
jobs than the wall clock does.

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
import itertools
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

CLUTTER_BAND = 0.024  # of the side: the clutter band fixture-hard fits learn (48 px at 2048 px, 120 at 5120)


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
    banded = replace(occluders.sensor, clutter_depth=(CLUTTER_BAND * size,) * 4)
    return {
        "affine": level_reference(*levels, weight, limits, search=False),
        "search": searched,
        "occluders": occluders,
        "field": replace(occluders, field=field, sensor=banded),
    }


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def before(checkout: Path, refs: dict, design: np.ndarray) -> tuple[dict[str, tuple], dict[str, str]]:
    """Each preparation with ``checkout``'s registration and field modules, and what those ran with.

    A checkout's ``RegistrationReference`` (and ``FieldReference``) gets only the fields its own
    dataclass has: a setting it does not know (the lighting fit's ``light_fit``, the field's
    ``steps``, ``coupled``, ``shared_levels``...) takes its own code's behaviour, as a bundle of
    its time would. Its pose search is built with its own ``PoseSearch``.
    """
    old_nr = _load("before_nonrigid", checkout / "engines" / "nonrigid.py")
    old_reg = _load("before_registration", checkout / "engines" / "registration.py")
    known = {f.name for f in fields(old_reg.RegistrationReference)}
    preps = {}
    for name, ref in refs.items():
        old = old_reg.RegistrationReference(**{k: getattr(ref, k) for k in known if k not in ("search", "field")})
        if ref.search is not None:
            old = old.with_search()
        if ref.field is not None:
            old = replace(old, field=old_nr.FieldReference.from_full(design, region(design.shape[0]), design.shape))
        preps[f"{name} before"] = (old_reg.align, old)
    return preps, settings(preps["field before"][1], old_nr)


def settings(ref: object, nr_module: ModuleType) -> dict[str, str]:
    """What a side ran with, where the two may differ: read off its reference (a setting its code keeps as a module
    constant, not per bundle, shown as that constant; ``-``: its code has no such setting)."""
    out = {"light_fit": str(getattr(ref, "light_fit", "- (trim)"))}
    for name in ("ridge", "steps", "coupled", "shared_levels", "smooth_first", "coarse_steps"):
        value = getattr(ref.field, name, getattr(nr_module, name.upper(), "-"))
        out[f"field.{name}"] = str(value)
    return out


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
    parser.add_argument("--before", type=Path, metavar="CHECKOUT", help="also every preparation with this checkout")
    parser.add_argument("--cpu", action="store_true", help="one thread; CPU time is the figure the ratios use")
    args = parser.parse_args()
    if args.cpu:
        _one_thread()
        cv2.setNumThreads(1)
    design = synth.render_design(synth.SynthConfig(size=args.size, seed=args.seed)).image
    refs = references(design)
    preps = {name: (reg.align, ref) for name, ref in refs.items()}
    sides = {"this code": settings(refs["field"], nr)}
    if args.before:
        old, sides[str(args.before)] = before(args.before, refs, design)
        preps.update(old)
    edges = edge_pixels(design)
    frames = [frame(design, 1000 * args.seed + i) for i in range(args.frames)]
    times = {name: {"cpu": [], "wall": []} for name in preps}
    errors: dict[str, list[tuple[float, float]]] = {name: [] for name in preps}
    for run in range(args.runs):
        for i, (image, matrix, disp) in enumerate(frames):
            for name in _order(list(refs), bool(args.before), run * len(frames) + i):
                align, ref = preps[name]
                cpu, wall = time.process_time(), time.perf_counter()
                aligned = align(image, ref)
                times[name]["cpu"].append((time.process_time() - cpu) * 1000)
                times[name]["wall"].append((time.perf_counter() - wall) * 1000)
                if run == 0:
                    error = misalignment(aligned.pose, matrix, disp, edges, args.size)
                    errors[name].append((float(np.median(error)), float(np.percentile(error, 95))))
    report(args, times, errors, sides)
    return 0


BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _one_thread() -> None:
    """Run again with one BLAS thread, unless already so: process CPU time counts every thread, and OpenBLAS's
    workers spin beside the caller (the lighting fit's and the field's small products): on an idle second core
    they doubled the CPU figures (154 CPU ms against 84 wall for ECC alone), and the wall clock stayed the same.
    BLAS reads its thread count when numpy is first imported, hence a new process rather than a setting."""
    if all(os.environ.get(name) == "1" for name in BLAS_THREADS):
        return
    env = {**os.environ, **dict.fromkeys(BLAS_THREADS, "1")}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _order(names: list[str], paired: bool, count: int) -> list[str]:
    """Each preparation and its ``before`` twin one after the other, the twin first on every second frame: the
    second of two like preparations of a frame ran faster (0.78 against 0.92 the other way round)."""
    if not paired:
        return names
    pairs = [(name, f"{name} before") for name in names]
    return [n for pair in pairs for n in (pair[::-1] if count % 2 else pair)]


def report(args: argparse.Namespace, times: dict[str, dict], errors: dict[str, list], sides: dict) -> None:
    clock = "cpu" if args.cpu else "wall"
    base = statistics.median(times["affine"][clock])
    unit = "CPU ms (one thread)" if args.cpu else "wall ms"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{args.size} px, {args.frames} frames x {args.runs} runs, medians; load average {load}\n")
    names = list(sides)
    print("| setting | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in sides[names[0]]:
        print(f"| {key} | " + " | ".join(sides[n][key] for n in names) + " |")
    print(f"\n| preparation | CPU ms | wall ms | {unit}: ratio to affine | edge misalignment median px | 95 % px |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        cpu, wall = statistics.median(t["cpu"]), statistics.median(t["wall"])
        med = statistics.median(e[0] for e in errors[name])
        p95 = statistics.median(e[1] for e in errors[name])
        print(f"| {name} | {cpu:.0f} | {wall:.0f} | {statistics.median(t[clock]) / base:.2f} | {med:.3f} | {p95:.3f} |")
    print()
    for side in ("", " before"):
        if f"affine{side}" in times:
            _additions(times, side, clock, unit)
    if "field before" in times:
        _ratios(times, clock)


def _additions(times: dict[str, dict], side: str, clock: str, unit: str) -> None:
    """Each addition's cost on one side, per frame over the preparation before it (median), and all of them."""
    steps = [n for n in ("affine", "search", "occluders", "field") if f"{n}{side}" in times]
    parts = []
    for prev, name in itertools.pairwise(steps):
        diff = [a - b for a, b in zip(times[name + side][clock], times[prev + side][clock], strict=True)]
        parts.append(f"{name} +{statistics.median(diff):.1f}")
    total = [a - b for a, b in zip(times[steps[-1] + side][clock], times["affine" + side][clock], strict=True)]
    label = "this code" if not side else "before"
    print(f"additions, {label} ({unit}, per frame, medians): {', '.join(parts)}; all {statistics.median(total):.1f}")


def _ratios(times: dict[str, dict], clock: str) -> None:
    """Per frame, this code's additions against the checkout's (medians): each over the preparation before it, and
    all of them up to it over each side's own affine."""
    steps = ("affine", "search", "occluders", "field")
    for prev, name in itertools.pairwise(steps):
        own = _per_frame_ratio(times, name, prev, clock)
        upto = _per_frame_ratio(times, name, "affine", clock)
        print(f"{name}, this code / before, per frame: its own addition {own:.2f}, the additions up to it {upto:.2f}")


def _per_frame_ratio(times: dict[str, dict], name: str, base: str, clock: str) -> float:
    new = [a - b for a, b in zip(times[name][clock], times[base][clock], strict=True)]
    old = [a - b for a, b in zip(times[f"{name} before"][clock], times[f"{base} before"][clock], strict=True)]
    ratios = [n / o for n, o in zip(new, old, strict=True) if o > 0]
    return statistics.median(ratios) if ratios else math.nan  # the checkout's addition cost nothing measurable


if __name__ == "__main__":
    sys.exit(main())
