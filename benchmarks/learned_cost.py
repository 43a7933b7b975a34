"""What the learned network costs on the CPU, per architecture, measured in one run on the same frames.

    python benchmarks/learned_cost.py --model L --images syn5120/test --runs 3 --limit 6
    python benchmarks/learned_cost.py --model L --images syn5120/test --profile    # plus ORT's per-op split
    python benchmarks/learned_cost.py --model L --images syn5120/test --tile-cpu 9  # plus CPU time per tile

``L`` is any learned bundle; its reference statistics, tiling and gains are used. For
each architecture of ``engines.learned_graph.ARCHITECTURES`` the learned graph is built for the
bundle's geometry with random weights (He initialisation: the time of a dense convolution does not
depend on the values); the bundle's own graph is measured too (``bundle``: its trained network as
fitted, by whichever release). Each frame is registered once, then every graph's anomaly map is
computed on it in turn (``Inspector.infer``, the stage ``predict`` reports as ``anomaly_map``: all
tiles, both cores), so machine load hits every architecture alike. Prints the median and p90 per
architecture and its ratio to the dilated network's median in the same run.

``--profile``: one tile of the first frame through each graph on one thread with ONNX Runtime's
profiler, warm-up runs left out, the operators that take the most time.

``--tile-cpu N``: one tile of the first frame through each graph on one thread, N runs taken in
turn (first left out), the median of this process's CPU time per run and its ratio to the dilated
network's: on a shared machine CPU time moves less with other jobs than wall time (not at all with
their share of the cores, still with their share of the caches and memory bandwidth).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from engines.bundle import GRAPH_FP32, Bundle
from engines.decode import IMAGE_SUFFIXES, read_image
from engines.inspector import Inspector, resident_inputs
from engines.learned_graph import ARCHITECTURES, LearnedGraphSpec, build_learned_graph, macs_per_pixel, weight_shapes
from engines.onnxruntime_backend import OnnxRuntimeBackend, session_options

BASELINE = "dilated"


def random_weights(channels: int, network: str, seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised weights of ``network``, biases zero (keeps every layer's activations in range)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(channels, network).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        weights[name] = (rng.normal(0, np.sqrt(2 / fan_in), shape) if len(shape) > 1 else np.zeros(shape)).astype(
            np.float32
        )
    return weights


def build_graphs(bundle: Bundle, workdir: Path) -> dict[str, Path]:
    """One FP32 graph per architecture for the bundle's geometry and tiling, and the bundle's own."""
    if bundle.detector != "learned":
        raise SystemExit(f"a {bundle.detector} bundle; give a learned one (the graphs read its one gain map)")
    tiling, geo = bundle.manifest["tiling"], bundle.geometry
    input_dtype = "uint8" if geo.dtype == "uint8" else "float32"
    spec = LearnedGraphSpec(geo.channels, tiling["core"], tiling["halo"], input_dtype=input_dtype)
    graphs = {"bundle": bundle.file(GRAPH_FP32)}
    for network in ARCHITECTURES:
        path = workdir / f"{network}.onnx"
        onnx.save(build_learned_graph(spec, random_weights(geo.channels, network), network), path)
        graphs[network] = path
    return graphs


def time_maps(bundle: Bundle, graphs: dict[str, Path], images: list[Path], runs: int) -> dict[str, list[float]]:
    """Milliseconds of the anomaly map per graph, each frame registered once and mapped by every graph in turn."""
    inspectors = {name: Inspector(bundle, OnnxRuntimeBackend(path)) for name, path in graphs.items()}
    for inspector in inspectors.values():
        inspector.activate()
    times: dict[str, list[float]] = {name: [] for name in graphs}
    try:
        for _ in range(runs):
            for path in images:
                prepared = next(iter(inspectors.values())).prepare(read_image(path), str(path))
                for name, inspector in inspectors.items():
                    start = time.perf_counter()
                    inspector.infer(prepared)
                    times[name].append((time.perf_counter() - start) * 1000)
    finally:
        for inspector in inspectors.values():
            inspector.deactivate()
    return times


def print_times(times: dict[str, list[float]], channels: int) -> None:
    base = statistics.median(times[BASELINE])
    print(f"{'graph':<12}{'MAC/px':>8}{'median ms':>11}{'p90 ms':>9}{'x dilated':>11}")
    for name, values in times.items():
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        macs = "" if name == "bundle" else str(macs_per_pixel(channels, name))
        median = statistics.median(values)
        print(f"{name:<12}{macs:>8}{median:>11.1f}{p90:>9.1f}{median / base:>11.3f}")


def profile_tile(graph: Path, feeds: dict[str, np.ndarray], runs: int = 5, warmup: int = 2, top: int = 12) -> None:
    """Per-operator kernel time of one tile on one thread (ONNX Runtime's profiler), warm-up runs left out."""
    options = session_options(1)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[warmup]:
            per_op[f"{e['args']['op_name']} {e['name'].removesuffix('_kernel_time')}"] += e["dur"] / runs / 1000
    total = sum(per_op.values())
    print(f"  {graph.stem}: {total:.1f} ms per tile in kernels")
    for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {name:<40}{ms:>8.2f} ms {100 * ms / total:>6.1f} %")


def time_tile_cpu(graphs: dict[str, Path], feeds: dict[str, np.ndarray], runs: int) -> dict[str, list[float]]:
    """CPU milliseconds of one tile per graph on one thread, the graphs taken in turn, the first run left out."""
    sessions = {
        name: ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        for name, path in graphs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for run in range(runs + 1):
        for name, session in sessions.items():
            start = time.process_time()
            session.run(None, feeds)
            if run:
                times[name].append((time.process_time() - start) * 1000)
    return times


def first_tile_feeds(bundle: Bundle, graph: Path, image: Path) -> dict[str, np.ndarray]:
    """The first tile's inputs of ``image``, as the Inspector feeds them."""
    inspector = Inspector(bundle, OnnxRuntimeBackend(graph))
    prepared = inspector.prepare(read_image(image), str(image))
    feeds = {name: value[:1] for name, value in resident_inputs(inspector.plan, bundle.reference()).items()}
    feeds["image"] = inspector.plan.extract(prepared.padded, range(1))
    feeds["photo"] = prepared.photo[:1]
    feeds["fine_gain"] = prepared.fine_gain[:1].astype(np.float32)
    return feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a learned or ensemble bundle")
    parser.add_argument(
        "--images", type=Path, required=True, help="frames of the bundle's geometry (searched recursively)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=6, help="images measured (spread over the sorted list)")
    parser.add_argument("--profile", action="store_true", help="also ORT's per-operator split of one tile")
    parser.add_argument("--tile-cpu", type=int, default=0, metavar="N", help="also CPU time of one tile, N runs")
    args = parser.parse_args(argv)
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = images[:: max(1, len(images) // args.limit)][: args.limit]
    bundle = Bundle.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = build_graphs(bundle, Path(tmp))
        print(f"anomaly map of {bundle.geometry.describe()}, {len(images)} images x {args.runs} runs, ONNX Runtime")
        print_times(time_maps(bundle, graphs, images, args.runs), bundle.geometry.channels)
        feeds = first_tile_feeds(bundle, graphs["bundle"], images[0]) if args.tile_cpu or args.profile else {}
        if args.tile_cpu:
            print(f"\none tile, one thread, CPU time of this process, {args.tile_cpu} runs:")
            print_times(time_tile_cpu(graphs, feeds, args.tile_cpu), bundle.geometry.channels)
        if args.profile:
            print("\none tile, one thread (ONNX Runtime profiler):")
            for graph in graphs.values():
                profile_tile(graph, feeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
