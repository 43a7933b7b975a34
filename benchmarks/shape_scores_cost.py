"""What the template graph's shape scores cost per tile: the graph without them, with blob, with blob and line.

    python benchmarks/shape_scores_cost.py                      # 1024 px cores (1152 px tiles), mono, one thread
    python benchmarks/shape_scores_cost.py --core 512 --threads 2 --runs 20

Builds the three template graphs (``engines.graphs.build_template_graph``) for the same tile
geometry, feeds each the same synthetic tile (noise around a tolerance band, so every score has
work to do) and runs them alternately in one process with ONNX Runtime on the CPU, so all three
see the same machine load. Prints the median time per tile of each graph and its ratio to the
graph without shape scores. On a shared machine read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

from engines.graphs import TemplateGraphSpec, build_template_graph

GRAPHS = {
    "fine + coarse": {},
    "+ blob": {"gains": 2, "blob_scale": 1.0},
    "+ blob + line": {"gains": 3, "blob_scale": 1.0, "line_scale": 1.0},
}
TYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}


def session(spec: TemplateGraphSpec, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = build_template_graph(spec).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One tile: grey levels around 125 inside a band 110-140, unit lighting, gains and spreads."""
    out = {}
    for spec in sess.get_inputs():
        shape = [1 if isinstance(d, str) or d is None else d for d in spec.shape]
        kind = TYPES[spec.type]
        if spec.name == "image":
            out[spec.name] = rng.normal(125, 12, shape).clip(0, 255).astype(kind)
        elif spec.name == "photo":
            out[spec.name] = np.eye(1, shape[1], dtype=kind).repeat(shape[0], axis=0)
        else:
            value = {"low": 110.0, "high": 140.0, "mean": 125.0}.get(spec.name, 1.0)
            out[spec.name] = np.full(shape, value, kind)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core", type=int, default=1024, help="tile core side in px (multiple of 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--runs", type=int, default=7, help="runs of each graph (interleaved)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sessions, inputs, times = {}, {}, {}
    for name, extra in GRAPHS.items():
        spec = TemplateGraphSpec(args.channels, args.core, precision=args.precision, **extra)
        sessions[name] = session(spec, args.threads)
        inputs[name] = feeds(sessions[name], rng)
        sessions[name].run(None, inputs[name])  # warm-up: allocations, first-run kernels
        times[name] = []
    for _ in range(args.runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, inputs[name])
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fine + coarse"])
    tile = args.core + 2 * TemplateGraphSpec(args.channels, args.core).halo
    what = f"{args.channels} channel(s), {args.precision}, {args.threads} thread(s)"
    print(f"template graph per {tile} px tile ({what}), median of {args.runs} interleaved runs:")
    print("| graph | median ms | ratio |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.1f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
