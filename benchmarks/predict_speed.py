"""Speed and memory of `inspectd predict` per full-resolution frame, split by stage.

    python benchmarks/predict_speed.py                       # synthesise 5120 px parts, fit, measure
    python benchmarks/predict_speed.py --width 4096 --height 3000  # another sensor size
    python benchmarks/predict_speed.py --model M --images D  # measure an existing bundle on your images

Prints median (and p90) milliseconds per stage — decode, registration, anomaly map, regions,
total — over several runs, the peak resident memory of the measuring process, and, measured in
the same run as the floor to compare against, one plain read + write pass over the same bytes
(the PNG file, and the decoded pixels in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from engines.decode import IMAGE_SUFFIXES

STAGES = ("decode", "registration", "anomaly_map", "regions")


def measure(model: Path, images: list[Path], runs: int, backend: str) -> dict:
    """Runs in a fresh process so the peak memory is the predict path's alone."""
    import numpy as np

    from engines.decode import read_image
    from engines.inspector import Inspector

    inspector = Inspector.load(model, backend)
    rows: dict[str, list[float]] = {k: [] for k in (*STAGES, "total", "floor_file_rw", "floor_pixels_rw")}
    with inspector, tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            for path in images:
                start = time.perf_counter()
                result = inspector.inspect_path(path)
                rows["total"].append((time.perf_counter() - start) * 1000)
                for stage in STAGES:
                    rows[stage].append(result.timings_ms.get(stage, 0.0))
                rows["floor_file_rw"].append(_file_rw(path, Path(tmp) / f"copy{run}"))
                pixels = read_image(path)
                start = time.perf_counter()
                np.copyto(np.empty_like(pixels), pixels)
                rows["floor_pixels_rw"].append((time.perf_counter() - start) * 1000)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows,
        "peak_mb": peak_mb,
        "geometry": inspector.geometry.describe(),
        "backend": inspector.backend.name,
    }


def _file_rw(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    data = src.read_bytes()
    with open(dst, "wb") as fh:
        fh.write(data)
        fh.flush()
    return (time.perf_counter() - start) * 1000


def print_table(report: dict, runs: int, n_images: int) -> None:
    rows = report["rows"]
    floor = statistics.median(rows["floor_file_rw"])
    print(f"\npredict on {report['geometry']} ({report['backend']}), {n_images} images x {runs} runs, medians")
    print(f"{'stage':<22}{'median ms':>11}{'p90 ms':>9}{'x file r+w':>12}")
    for name, values in rows.items():
        ordered = sorted(values)
        median = statistics.median(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(f"{name:<22}{median:>11.1f}{p90:>9.1f}{median / floor:>12.2f}")
    print(f"{'peak resident memory':<22}{report['peak_mb']:>11.0f} MB")
    total = statistics.median(rows["total"])
    print(
        f"\ntarget: total <= 1000 ms -> {'met' if total <= 1000 else 'NOT met'} ({total:.0f} ms); "
        f"peak <= 2048 MB -> {'met' if report['peak_mb'] <= 2048 else 'NOT met'}"
    )


def prepare(width: int, height: int, workdir: Path) -> tuple[Path, list[Path]]:
    """A synthetic line of ``width`` x ``height`` px and a template model fitted on it."""
    from calibration.synth import SynthConfig, write_dataset
    from calibration.template_fit import FitConfig, fit_template

    data = workdir / "data"
    config = SynthConfig(width=width, height=height, seed=11, train=10, test_good=2, per_kind=1)
    write_dataset(data, replace(config, kinds=("dot", "stain")))
    train = sorted((data / "train" / "good").glob("*.png"))
    model = fit_template(train, workdir / "model", config=FitConfig(folds=3))
    images = sorted((data / "test").rglob("*.png"))
    return model, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=5120, help="square image side of the synthesised line")
    parser.add_argument("--width", type=int, help="image width of the synthesised line (default --size)")
    parser.add_argument("--height", type=int, help="image height of the synthesised line (default --size)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--limit", type=int, default=6, help="images measured (spread over the sorted list)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        images = images[:: max(1, len(images) // args.limit)][: args.limit]
        print(json.dumps(measure(args.model, images, args.runs, args.backend)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model, images = prepare(args.width or args.size, args.height or args.size, Path(tmp))
            image_dir = Path(tmp) / "data" / "test"
        else:
            model, image_dir = args.model, args.images
            images = sorted(p for p in image_dir.rglob("*") if p.is_file())
        cmd = [
            sys.executable,
            __file__,
            "--measure",
            "--model",
            str(model),
            "--images",
            str(image_dir),
            "--runs",
            str(args.runs),
            "--backend",
            args.backend,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
        report = json.loads(out.stdout.strip().splitlines()[-1])
    print_table(report, args.runs, min(len(images), args.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
