"""The tile core side against the template graph's speed on the CPU: why the template fits 512 px cores.

    python benchmarks/tile_core.py                      # a 5120 px frame, cores 1024 768 512 384 256
    python benchmarks/tile_core.py --side 2048 --cores 1024 512 --rounds 5

For each core side, the template graph as ``inspectd fit`` builds it (fine and coarse scores, mono,
FP32; ``engines.graphs.build_template_graph``) maps one frame of ``--side`` px the way the ONNX
Runtime backend does: one single-threaded run per tile, one worker per core taking the next tile
when done, with the backend's own session options. The tiles are synthetic (noise around a
tolerance band, ``shape_scores_cost.feeds``): the graph's time depends on the tile's size, not on
what it shows. Per core side: the tile side, tiles per frame, the frame's map on one worker and on
all cores (medians over ``--rounds`` rounds of ``--frames`` frames, the core sides interleaved in
each round so that all see the same machine), the tile pixels per frame pixel (the halo's extra
work) and the ratio to 1024 px cores. Every pass of the graph streams whole tiles through memory:
once a tile's tensors (5.3 MB each at 1152 px) outgrow the caches, two workers share one memory
bus and a frame on two cores is barely faster than on one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import onnxruntime as ort
from shape_scores_cost import feeds

from engines.graphs import TemplateGraphSpec, build_template_graph
from engines.onnxruntime_backend import available_cores, session_options


def frame_ms(session: ort.InferenceSession, tile: dict[str, np.ndarray], tiles: int, workers: int) -> float:
    """Wall ms for ``tiles`` runs shared by ``workers`` threads, each taking the next run when done."""
    left = iter(range(tiles))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            session.run(None, tile)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=5120, help="frame side in px (default 5120)")
    parser.add_argument("--cores", type=int, nargs="+", default=[1024, 768, 512, 384, 256], help="core sides, px")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=3, help="frames per core side and round")
    args = parser.parse_args()
    workers = available_cores()
    rng = np.random.default_rng(0)
    setups = {}
    for core in args.cores:
        spec = TemplateGraphSpec(1, core)
        model = build_template_graph(spec).SerializeToString()
        session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
        tile = feeds(session, rng)
        session.run(None, tile)  # first-run allocations
        per_side = -(-args.side // core)  # tiles along a side, the last one padded
        setups[core] = (spec, session, tile, per_side**2)
    times: dict[tuple[int, int], list[float]] = {(core, k): [] for core in args.cores for k in (1, workers)}
    for _ in range(args.rounds):
        for core, (_, session, tile, tiles) in setups.items():
            for k in dict.fromkeys((1, workers)):
                times[core, k] += [frame_ms(session, tile, tiles, k) for _ in range(args.frames)]
    base = statistics.median(times[1024, workers]) if 1024 in setups else None
    print(f"template graph, one {args.side} px mono frame, {workers} cores (load average at end: {_load()})")
    print(
        f"{'core':>6}{'tile':>6}{'tiles':>7}{'1 worker ms':>13}{f'{workers} workers ms':>14}{'speed-up':>10}"
        f"{'halo px/px':>12}{'vs 1024':>9}"
    )
    for core, (spec, _, _, tiles) in setups.items():
        one, all_ = statistics.median(times[core, 1]), statistics.median(times[core, workers])
        halo = tiles * spec.tile**2 / args.side**2
        ratio = f"{all_ / base:.2f}" if base else "–"
        print(f"{core:>6}{spec.tile:>6}{tiles:>7}{one:>13.1f}{all_:>14.1f}{one / all_:>10.2f}{halo:>12.2f}{ratio:>9}")
    print(f"(medians of {args.rounds} rounds x {args.frames} frames; speed-up: 1 worker over {workers})")
    return 0


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    sys.exit(main())
