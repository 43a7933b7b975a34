"""A frame's tiles on one worker and side by side: what the second core buys, per bundle, in one process.

    python benchmarks/tile_workers.py --images syn5120/test --model M512 M1024 [--frames 6] [--rounds 3]

The template graph streams whole tiles through memory pass after pass, so where the memory bus
is busy (the next frame's preparation, other tenants of the host) a second tile worker adds
little and each tile's run stretches. For each bundle (all loaded in this one process, run
alternately frame by frame so that all see the same machine) this prepares ``--frames`` frames
once and times ``Inspector.infer`` on each with the ONNX Runtime backend's tile workers limited
to one and with its default (one per core), and every tile's ``session.run`` (wall and the
worker's CPU). Prints per bundle and worker count: the tile side and count, infer's median ms per
frame and the median ms per tile run; and the speed-up of all workers over one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `inspectd serve` does before numpy loads
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import heap
from daemon.sender import list_images
from engines.decode import read_image
from engines.inspector import Inspector
from engines.onnxruntime_backend import available_cores


def timed_runs(inspector: Inspector, tiles: list[float]) -> None:
    """Record each tile run's wall ms in ``tiles`` (the backend's own run, wrapped)."""
    run = inspector.backend._infer_impl

    def timed(feeds: Any, window: range) -> Any:
        start = time.perf_counter()
        out = run(feeds, window)
        tiles.append((time.perf_counter() - start) * 1000)
        return out

    inspector.backend._infer_impl = timed


def load(model: Path, workers: int, tiles: list[float]) -> Inspector:
    inspector = Inspector.load(model, "onnxruntime")
    inspector.backend._threads = workers  # before activation, which sets the tile workers up
    inspector.activate()
    timed_runs(inspector, tiles)
    return inspector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, nargs="+", required=True, help="bundles (template)")
    parser.add_argument("--images", type=Path, required=True, help="folder of frames (searched recursively)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    heap.keep_frame_blocks()
    cores = available_cores()
    counts = tuple(dict.fromkeys((1, cores)))
    frames = [read_image(p) for p in list_images(args.images)[: args.frames]]
    runs: dict[tuple[Path, int], dict[str, list[float]]] = {}
    inspectors = {}
    for model in args.model:
        for workers in counts:
            record = runs[model, workers] = {"infer": [], "tile": []}
            inspectors[model, workers] = load(model, workers, record["tile"])
    prepared = {model: [inspectors[model, 1].prepare(f) for f in frames] for model in args.model}
    for _ in range(args.rounds):
        for index in range(len(frames)):
            for (model, workers), inspector in inspectors.items():
                start = time.perf_counter()
                inspector.infer(prepared[model][index])
                runs[model, workers]["infer"].append((time.perf_counter() - start) * 1000)
    print(f"{len(frames)} frames x {args.rounds} rounds, {cores} cores, load average {_load()}")
    print(f"{'bundle':<28}{'tile':>6}{'tiles':>7}{'workers':>9}{'infer ms':>10}{'per tile ms':>13}{'speed-up':>10}")
    for (model, workers), record in runs.items():
        plan = inspectors[model, workers].plan
        infer = statistics.median(record["infer"])
        one = statistics.median(runs[model, 1]["infer"])
        tile = statistics.median(record["tile"])
        print(
            f"{model.name[:27]:<28}{plan.core + 2 * plan.halo:>6}{plan.n_tiles:>7}{workers:>9}{infer:>10.1f}"
            f"{tile:>13.2f}{one / infer:>10.2f}"
        )
    for inspector in inspectors.values():
        inspector.deactivate()
    return 0


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    sys.exit(main())
