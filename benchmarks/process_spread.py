"""How much one process's speed differs from the next's: bare predict in several fresh processes.

    python benchmarks/process_spread.py --model M --images DIR [--processes 5] [--frames 30]

Each process loads the bundle, warms up on one frame, then runs ``Inspector.inspect`` on the
same raw frames (decoded once, before timing) and reports its wall p50 and its CPU time per
frame (every thread). Code, bundle and frames are identical in every process, so the spread
between them is what the machine does to a process (memory placement, caches, neighbours):
the noise floor under any comparison of two processes, such as the daemon against bare
predict in ``frame_path.py --daemon``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_process(model: Path, images: list[Path], frames: int) -> dict[str, float]:
    """Run in the child: bare predict over ``frames`` frames; wall p50 and CPU per frame in ms."""
    from frame_path import bare_inspect  # this script's folder: the same timing loop as frame_path's bare worker

    from engines.decode import read_image
    from engines.inspector import Inspector

    raw = [read_image(p) for p in images]
    with Inspector.load(model, backend="onnxruntime") as inspector:
        inspector.inspect(raw[0])
        timed = bare_inspect(inspector, raw, frames)
    return {"wall_p50": statistics.median(timed["ms"]), "cpu_per_frame": timed["cpu_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a fitted bundle")
    parser.add_argument("--images", type=Path, required=True, help="folder of frames (searched recursively)")
    parser.add_argument("--limit", type=int, default=10, help="frames used (the first of the sorted list)")
    parser.add_argument("--frames", type=int, default=30, help="inspections per process")
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".tif", ".tiff", ".bmp"))
    if not images:
        raise SystemExit(f"{args.images}: no images found (expected PNG, TIFF or BMP files)")
    images = images[: args.limit]
    if args.child:
        print(json.dumps(one_process(args.model, images, args.frames)))
        return 0
    rows = []
    for k in range(args.processes):
        argv = [sys.executable, __file__, "--child", "--model", str(args.model), "--images", str(args.images)]
        argv += ["--limit", str(args.limit), "--frames", str(args.frames)]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"process {k + 1} failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        wall, cpu = rows[-1]["wall_p50"], rows[-1]["cpu_per_frame"]
        print(f"process {k + 1}: wall p50 {wall:.1f} ms, CPU {cpu:.1f} ms per frame", flush=True)
    for key, label in (("wall_p50", "wall p50"), ("cpu_per_frame", "CPU per frame")):
        values = [r[key] for r in rows]
        mid = statistics.median(values)
        print(
            f"{label}: median {mid:.1f} ms, from {min(values):.1f} to {max(values):.1f} "
            f"({100 * (min(values) / mid - 1):+.1f} % to {100 * (max(values) / mid - 1):+.1f} % of the median)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
