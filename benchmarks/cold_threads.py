"""A new thread's first frame: what it costs, and what warming the thread up first leaves of it.

    python benchmarks/cold_threads.py --model M --images DIR [--frames 4] [--rounds 3]

The daemon runs each stage on its own threads (prepare and decide pools, one engine thread), and
glibc gives every thread its own heap arena: the frame-sized blocks a new arena hands out are fresh
pages the first time. Per round and warm-up (none; a blank frame, as ``load_engine`` once used; the
bundle's mean part, ``Inspector.reference_frame``, as ``Scheduler.warm_up`` now does) this script
starts new threads for prepare, infer and decide, warms them, then runs the real frames through
them, and prints wall ms and minor page faults of each stage: the first real frame and the median
of the others. Each round runs in a process of its own and its threads stay alive to its end, so
no thread inherits an arena another one warmed (glibc reuses a finished thread's arena, and shares
old ones once it has made eight per core). Set as ``inspectd serve`` sets them: one OpenBLAS
thread, the heap thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `inspectd serve` does before numpy loads
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from daemon import heap
from daemon.sender import list_images
from engines.decode import read_image
from engines.errors import InspectError
from engines.inspector import Inspector
from engines.types import DTYPES

STAGES = ("prepare", "infer", "decide")


def timed(work: Callable[[], Any]) -> tuple[Any, float, int]:
    """``work()`` on the calling thread: its result, wall ms, and the thread's minor page faults."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    start = time.perf_counter()
    out = work()
    ms = (time.perf_counter() - start) * 1000
    return out, ms, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def on_new_threads(inspector: Inspector, frames: list[np.ndarray], warm: np.ndarray | None, keep: list) -> list[dict]:
    """New prepare, infer and decide threads; ``warm`` through them (if any), then ``frames``; per frame
    and stage (ms, faults)."""
    pools = {stage: ThreadPoolExecutor(1, f"cold-{stage}") for stage in STAGES}
    keep.extend(pools.values())  # alive to the process's end: the next warm-up's threads must not reuse their arenas

    def stages(frame: np.ndarray) -> dict[str, list[float]]:
        prepared, *prepare = pools["prepare"].submit(timed, lambda: inspector.prepare(frame)).result()
        amap, *infer = pools["infer"].submit(timed, lambda: inspector.infer(prepared)).result()
        _, *decide = pools["decide"].submit(timed, lambda: inspector.decide(prepared, amap)).result()
        return dict(zip(STAGES, (prepare, infer, decide), strict=True))

    if warm is not None:
        with contextlib.suppress(InspectError):  # a blank frame stops at registration, as in the daemon
            stages(warm)
    return [stages(frame) for frame in frames]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of frames (searched recursively)")
    parser.add_argument("--frames", type=int, default=4, help="real frames per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each in a fresh process (default 3)")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_round:
        print(json.dumps(measure_round(args)))
        return 0
    results: dict[str, list[list[dict]]] = {}
    argv = [sys.executable, __file__, "--model", str(args.model), "--images", str(args.images)]
    for _ in range(args.rounds):
        # A process per round: glibc makes at most 8 arenas per core, after which new threads share old (warm) ones.
        out = subprocess.run([*argv, "--frames", str(args.frames), "--one-round"], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"a round failed: {out.stderr.strip().splitlines()[-1:]}")
        for name, rows in json.loads(out.stdout.strip().splitlines()[-1]).items():
            results.setdefault(name, []).append(rows)
    print_table(results, args)
    return 0


def measure_round(args: argparse.Namespace) -> dict[str, list[dict]]:
    """One round in this process: for each warm-up, new threads, warmed, then the real frames."""
    heap.keep_frame_blocks()
    frames = [read_image(p) for p in list_images(args.images)[: args.frames]]
    inspector = Inspector.load(args.model, "onnxruntime")
    inspector.activate()
    inspector.inspect(frames[0])  # the main thread warm, as the daemon's loader thread is
    geometry = inspector.geometry
    warmups = {
        "none": None,
        "blank frame": np.zeros(geometry.shape, DTYPES[geometry.dtype]),
        "mean part": inspector.reference_frame(),
    }
    keep: list[ThreadPoolExecutor] = []
    results = {name: on_new_threads(inspector, frames, warm, keep) for name, warm in warmups.items()}
    for pool in keep:
        pool.shutdown()
    inspector.deactivate()
    return results


def print_table(results: dict[str, list[list[dict]]], args: argparse.Namespace) -> None:
    print(f"{args.model.name}, {args.frames} frames of {args.images}: new threads, {args.rounds} rounds (a process")
    print("each); ms / minor page faults per stage")
    print(f"{'warm-up':<14}{'frame':<8}" + "".join(f"{s:>20}" for s in STAGES))
    for name, rounds in results.items():
        for label, pick in (("first", lambda rows: rows[:1]), ("others", lambda rows: rows[1:])):
            cells = []
            for stage in STAGES:
                picked = [row[stage] for rows in rounds for row in pick(rows)]
                if not picked:
                    cells.append(f"{'–':>20}")
                    continue
                ms = statistics.median(p[0] for p in picked)
                faults = statistics.median(p[1] for p in picked)
                cells.append(f"{ms:>12.0f} / {faults:>5.0f}")
            print(f"{name:<14}{label:<8}" + "".join(cells))
    print("(medians over rounds; 'first': the first real frame on the new threads, 'others': the frames after it)")


if __name__ == "__main__":
    sys.exit(main())
