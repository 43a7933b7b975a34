"""The alignment's additions as a share of predict time: one bundle, one process, the same frames.

    python benchmarks/alignment_share.py --model M --images DIR              # 10 frames, 3 runs
    python benchmarks/alignment_share.py --model M --images DIR --frames 6 --runs 5

``M`` is a bundle fitted on a line whose parts bend and carry a fixture (``inspectd fit`` on a
``fixture-hard`` line: ``alignment nonrigid``, occluders and a clutter band learned). Two inspectors
are made from it in this process: the bundle as fitted, and the same bundle with the non-rigid field
and the sensor model (occluders left out, the clutter band) taken out of its registration reference,
in memory, for this benchmark only. The pose search stays in both: without it ECC from the identity
does not converge on parts ±1.5 deg off, and its own cost is a millisecond or two
(``alignment_cost.py``). Without the field the frame's levels are read as a rigid bundle reads them.

Frames are decoded once, before timing, and handed over as the daemon hands them (read-only views of
a received buffer). Each run goes through the frames once, every frame through both inspectors, the
order swapped from frame to frame, so the machine's speed moves both alike: ``alignment_cost.py``
and ``frame_path.py`` measured minutes apart gave shares of 12.9-16.2 % for the same code. Per run
and over all runs: the median wall time of bare predict (``Inspector.inspect``: registration,
anomaly map, regions; not the decode) with and without the additions, of its registration stage,
the additions (the median of the per-frame differences of the registration stage, where all of them
happen: without the sensor model the fixture bar is scored, which changes the regions stage) and
their share of predict time as fitted and over predict time less them. Threads as ``inspectd
predict`` has them (one BLAS thread; OpenCV and ONNX Runtime their defaults). Timings on a shared
machine are only indicative; compare within a run.
"""

from __future__ import annotations

import os

from daemon.cli import prepare_environment

prepare_environment("predict")  # before numpy loads, as ``inspectd predict`` does

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from frame_path import _raw, pick_images  # noqa: E402 (this script's folder: the frame path's frame list and frames)

from engines.decode import read_image  # noqa: E402
from engines.inspector import Inspector  # noqa: E402

SIDES = ("as fitted", "without")


def without_additions(inspector: Inspector) -> Inspector:
    """The same inspector with its registration reference's field and sensor model taken out."""
    ref = inspector._registration
    if ref.field is None and ref.sensor is None:
        raise SystemExit("the bundle has neither a field nor a sensor model: nothing to measure")
    inspector._registration = replace(ref, field=None, sensor=None)
    return inspector


def timed(inspector: Inspector, frame: np.ndarray) -> tuple[float, float, str]:
    """Wall ms of bare predict, of its registration stage, and the verdict."""
    start = time.perf_counter()
    result = inspector.inspect(frame)
    total = (time.perf_counter() - start) * 1000
    return total, result.timings_ms.get("registration", float("nan")), f"{result.verdict}/{result.reason}"


def one_run(inspectors: dict[str, Inspector], frames: list[np.ndarray], run: int) -> dict[str, list]:
    rows: dict[str, list] = {side: [] for side in SIDES}
    for i, frame in enumerate(frames):
        order = SIDES if (i + run) % 2 == 0 else SIDES[::-1]
        for side in order:
            rows[side].append(timed(inspectors[side], frame))
    return rows


def summary(rows: dict[str, list]) -> dict[str, float]:
    """Medians; the additions from the registration stage alone (all of them happen there: without the sensor
    model the fixture bar is left in and scored, which changes what the regions stage has to do)."""
    fitted, without = rows[SIDES[0]], rows[SIDES[1]]
    additions = statistics.median(a[1] - b[1] for a, b in zip(fitted, without, strict=True))
    predict = statistics.median(r[0] for r in fitted)
    return {
        "predict": predict,
        "predict_without": statistics.median(r[0] for r in without),
        "registration": statistics.median(r[1] for r in fitted),
        "registration_without": statistics.median(r[1] for r in without),
        "additions": additions,
        "share": additions / predict,
        "over": additions / (predict - additions),
    }


def print_table(per_run: list[dict[str, float]], pooled: dict[str, float]) -> None:
    print(
        "| run | predict as fitted ms | (without, measured) | registration as fitted ms | without ms "
        "| additions ms | share of predict | over predict less them |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in [*((str(i + 1), s) for i, s in enumerate(per_run)), ("all", pooled)]:
        print(
            f"| {name} | {s['predict']:.1f} | ({s['predict_without']:.1f}) | {s['registration']:.1f} "
            f"| {s['registration_without']:.1f} | {s['additions']:.1f} | {100 * s['share']:.1f} % "
            f"| {100 * s['over']:.1f} % |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of frames (searched recursively)")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    paths = pick_images(args.images, args.frames)
    frames = [_raw(read_image(p)) for p in paths]
    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; {os.cpu_count()} cores")
    print(f"{len(frames)} frames x {args.runs} runs: " + ", ".join(f"{p.parent.name}/{p.name}" for p in paths))
    inspectors = {SIDES[0]: Inspector.load(args.model, "onnxruntime")}
    inspectors[SIDES[1]] = without_additions(Inspector.load(args.model, "onnxruntime"))
    for inspector in inspectors.values():
        inspector.activate()
        timed(inspector, frames[0])  # warm-up beyond activate's own
    runs = [one_run(inspectors, frames, run) for run in range(args.runs)]
    for inspector in inspectors.values():
        inspector.deactivate()
    pooled = {side: [row for rows in runs for row in rows[side]] for side in SIDES}
    print()
    print_table([summary(rows) for rows in runs], summary(pooled))
    verdicts = {side: sorted({r[2] for r in pooled[side]}) for side in SIDES}
    print(f"\nverdicts seen: as fitted {verdicts[SIDES[0]]}; without {verdicts[SIDES[1]]}")
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
