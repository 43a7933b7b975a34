"""GPU path benchmark: per-frame latency breakdown of full-resolution tiled inference.

    python benchmarks/gpu.py [--bundle DIR] [--size 5120] [--batches 1,2,4,8] [--frames 3]

For each tile batch size it reports medians over frames of H2D, GPU compute, D2H
(CUDA events), host tiling + stitching, total wall time per frame, throughput and the
copy/compute overlap achieved (share of serial copy + compute time hidden). Rows:

* ``tensorrt``: the TensorRT backend pipelining a frame (needs tensorrt + pycuda);
* ``pinned copies (pycuda|cupy)``: the frame's H2D and D2H bytes through page-locked
  buffers on two streams, i.e. the copy floor of any GPU path;
* ``onnxruntime-cpu``: the CPU baseline on the FP32 graph, same frame and tiling.

Whatever cannot run is a row saying "not available: why"; the rest still runs.
With ``--bundle`` the bundle's own graphs run on a frame of its geometry (its reference mean
plus noise), fed exactly as the Inspector feeds them (resident statistics, per-tile lighting
model and local gains). Without, a toy tiled graph of similar arithmetic intensity is built
(photometric correction, z-score against resident reference statistics, two 5x5
smoothing passes, core crop), with the template's I/O types.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.tiling import TilePlan

COLUMNS = ("path", "batch", "h2d", "compute", "d2h", "tile+stitch", "total", "frames/s", "overlap", "note")


# -- graph ------------------------------------------------------------------------------
def toy_tiled_graph(path: Path, tile: int, core: int, fp16: bool) -> Path:
    """A graph shaped like the template: image u8, photo f32, resident reference f16 -> anomaly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kind = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    halo = (tile - core) // 2
    make = helper.make_node
    nodes = [
        make("Cast", ["image"], ["x"], to=kind),
        make("Cast", ["photo"], ["p"], to=kind),
        make("Slice", ["p", "i0", "i1", "ax1"], ["gain"]),
        make("Slice", ["p", "i1", "i2", "ax1"], ["offset"]),
        make("Unsqueeze", ["gain", "ax23"], ["gain4"]),
        make("Unsqueeze", ["offset", "ax23"], ["offset4"]),
        make("Mul", ["x", "gain4"], ["xg"]),
        make("Add", ["xg", "offset4"], ["xc"]),
        make("Cast", ["reference"], ["ref"], to=kind),
        make("Slice", ["ref", "i0", "i1", "ax1"], ["mean"]),
        make("Slice", ["ref", "i1", "i2", "ax1"], ["inv_std"]),
        make("Sub", ["xc", "mean"], ["d"]),
        make("Mul", ["d", "inv_std"], ["z"]),
        make("Mul", ["z", "z"], ["z2"]),
        make("AveragePool", ["z2"], ["s1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], count_include_pad=0),
        make("AveragePool", ["s1"], ["s2"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], count_include_pad=0),
        make("Sqrt", ["s2"], ["score"]),
        make("Slice", ["score", "lo", "hi", "ax23"], ["anomaly"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(v, np.int64), n)
        for n, v in {
            "i0": [0],
            "i1": [1],
            "i2": [2],
            "ax1": [1],
            "ax23": [2, 3],
            "lo": [halo, halo],
            "hi": [halo + core, halo + core],
        }.items()
    ]
    graph = helper.make_graph(
        nodes,
        "toy_tiled",
        [
            helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, tile, tile]),
            helper.make_tensor_value_info("photo", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("reference", TensorProto.FLOAT16, ["N", 4, tile, tile]),
        ],
        [helper.make_tensor_value_info("anomaly", kind, ["N", 1, core, core])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


# -- the frame -------------------------------------------------------------------------
class Workload:
    """One frame, its tiling, and what the graph reads besides the image: resident inputs and per-tile feeds.

    Arrays are kept in FP32 (FP16 for the toy graph) and cast once per backend to the types its
    graph declares, as the Inspector does.
    """

    def __init__(self, plan: TilePlan, image: np.ndarray, resident: dict, per_frame: dict) -> None:
        self.plan, self.image, self.resident, self.per_frame = plan, image, resident, per_frame
        self.channels = 1 if image.ndim == 2 else image.shape[2]

    @classmethod
    def toy(cls, size: int, core: int, halo: int, seed: int = 0) -> Workload:
        """A random frame for the toy graph (``toy_tiled_graph``)."""
        rng = np.random.default_rng(seed)
        plan = TilePlan(size, size, core, halo, align=1)
        image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        n, tile = plan.n_tiles, plan.tile
        reference = np.empty((n, 4, tile, tile), np.float16)
        reference[:, 0] = 128
        reference[:, 1] = 1 / 40
        reference[:, 2:] = 0
        photo = np.tile(np.array([1, 0, 0, 0, 0, 0], np.float32), (n, 1))
        return cls(plan, image, {"reference": reference}, {"photo": photo})

    @classmethod
    def from_bundle(cls, bundle_dir: Path, seed: int = 0) -> Workload:
        """A frame of the bundle's geometry (its reference mean plus noise), fed exactly as the Inspector feeds it."""
        from engines.bundle import Bundle
        from engines.inspector import detector_gains, gain_tiles, resident_inputs
        from engines.registration import PHOTO_TERMS

        bundle = Bundle.load(bundle_dir)
        geo, tiling = bundle.geometry, bundle.manifest["tiling"]
        if geo.dtype != "uint8":
            raise SystemExit(f"{bundle_dir}: the benchmark feeds 8-bit frames; this bundle is {geo.describe()}")
        plan = TilePlan(geo.height, geo.width, tiling["core"], tiling["halo"], tiling["align"])
        ref = bundle.reference()
        mean = ref["mu"].astype(np.float32)
        noisy = mean + np.random.default_rng(seed).normal(0, 2, mean.shape).astype(np.float32)
        image = np.clip(noisy[0] if geo.channels == 1 else np.moveaxis(noisy, 0, -1), 0, 255).astype(np.uint8)
        photo = np.tile(np.eye(1, PHOTO_TERMS, dtype=np.float32), (plan.n_tiles, 1))  # gain 1, no offset
        gain = gain_tiles(plan, detector_gains(ref, "fine_gain"))
        return cls(plan, image, resident_inputs(plan, ref, np.float32), {"photo": photo, "fine_gain": gain})

    def resident_for(self, backend: Any) -> dict[str, np.ndarray]:
        return {k: v.astype(backend.inputs[k].dtype, copy=False) for k, v in self.resident.items()}

    def frame_batches(self, batch: int, backend: Any) -> tuple[list, float]:
        """Per-batch (feeds, tiles) for this frame and the host tiling time in ms."""
        started = time.perf_counter()
        padded = self.plan.pad(self.image)
        per_frame = {k: v.astype(backend.inputs[k].dtype, copy=False) for k, v in self.per_frame.items()}
        batches = [
            (
                {
                    "image": self.plan.extract(padded, tiles),
                    **{k: v[tiles.start : tiles.stop] for k, v in per_frame.items()},
                },
                tiles,
            )
            for tiles in self.plan.batches(batch)
        ]
        return batches, (time.perf_counter() - started) * 1e3

    def stitch(self, outputs: list, batches: list) -> float:
        started = time.perf_counter()
        out = np.empty((self.plan.height, self.plan.width), np.float32)
        for result, (_, tiles) in zip(outputs, batches, strict=True):
            self.plan.stitch(result["anomaly"], tiles, out)
        return (time.perf_counter() - started) * 1e3


def row(path: str, batch: object = "", note: str = "", **values: float) -> dict:
    return {"path": path, "batch": batch, "note": note, **values}


def medians(samples: list[dict]) -> dict:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


# -- rows ------------------------------------------------------------------------------
def run_frames(
    work: Workload, backend: Any, batch: int, frames: int, infer: Callable[[list], tuple[list, dict]]
) -> dict:
    """Median per-frame numbers for one backend at one batch size (one warm-up frame first)."""
    samples = []
    for index in range(frames + 1):
        started = time.perf_counter()
        batches, tiling = work.frame_batches(batch, backend)
        outputs, gpu = infer(batches)
        stitching = work.stitch(outputs, batches)
        total = (time.perf_counter() - started) * 1e3
        if index:
            samples.append({**gpu, "tile+stitch": tiling + stitching, "total": total})
    result = medians(samples)
    result["frames/s"] = 1e3 / result["total"]
    return result


def onnxruntime_rows(work: Workload, graph_fp32: Path, batches: list[int], frames: int) -> list[dict]:
    from engines.onnxruntime_backend import OnnxRuntimeBackend

    rows = []
    with OnnxRuntimeBackend(graph_fp32) as backend:
        backend.activate(work.resident_for(backend))
        for batch in batches:

            def infer(items: list) -> tuple[list, dict]:
                return backend.infer_many(items), {}  # batches side by side, as the Inspector runs them

            result = run_frames(work, backend, batch, frames, infer)
            rows.append(row("onnxruntime-cpu", batch, f"{backend.threads} threads", **result))
    return rows


def tensorrt_rows(work: Workload, graph_fp16: Path, batches: list[int], frames: int, scratch: Path) -> list[dict]:
    try:
        from engines.tensorrt_backend import TensorRTBackend
        from engines.trt_build import build_engine

        plan = scratch / "bench.plan"
        started = time.perf_counter()
        build_engine(graph_fp16, plan, max_batch=max(batches), workspace_mb=4096, timing_cache=None)
        built = time.perf_counter() - started
        backend = TensorRTBackend(plan)
    except Exception as exc:  # report, never abort the whole benchmark
        return [row("tensorrt", note=f"not available: {exc}")]
    rows = []
    with backend:
        backend.activate(work.resident_for(backend))
        for batch in batches:

            def infer(items: list) -> tuple[list, dict]:
                outs = backend.infer_many(items)
                t = backend.last_timings_ms
                return outs, {k: t[k] for k in ("h2d", "compute", "d2h", "overlap")}

            result = run_frames(work, backend, batch, frames, infer)
            rows.append(row("tensorrt", batch, f"engine built in {built:.0f} s", **result))
    return rows


def copy_rows(work: Workload, frames: int) -> list[dict]:
    """The frame's copies alone through pinned memory on two streams: pycuda, else cupy."""
    tile, core, n = work.plan.tile, work.plan.core, work.plan.n_tiles
    up, down = n * work.channels * tile * tile, n * core * core * 2  # uint8 tiles in, float16 cores out
    errors = []
    for name, measure in (("pycuda", _copies_pycuda), ("cupy", _copies_cupy)):
        try:
            result = measure(up, down, frames)
        except Exception as exc:
            errors.append(f"{name}: {exc}")
            continue
        note = f"{up / 2**20:.0f} MiB up, {down / 2**20:.0f} MiB down per frame"
        return [row(f"pinned copies ({name})", "all", note, **result)]
    return [row("pinned copies", note="not available: " + "; ".join(errors))]


def _copies_pycuda(up: int, down: int, frames: int) -> dict:
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        host_up, host_down = cuda.pagelocked_empty(up, np.uint8), cuda.pagelocked_empty(down, np.uint8)
        dev_up, dev_down = cuda.mem_alloc(up), cuda.mem_alloc(down)
        streams = [cuda.Stream(), cuda.Stream()]
        marks = [cuda.Event() for _ in range(4)]
        samples = []
        for _ in range(frames + 1):
            marks[0].record(streams[0])
            cuda.memcpy_htod_async(dev_up, host_up, streams[0])
            marks[1].record(streams[0])
            streams[1].wait_for_event(marks[0])
            marks[2].record(streams[1])
            cuda.memcpy_dtoh_async(host_down, dev_down, streams[1])
            marks[3].record(streams[1])
            marks[1].synchronize()
            marks[3].synchronize()
            h2d, d2h = marks[1].time_since(marks[0]), marks[3].time_since(marks[2])
            span = max(marks[1].time_since(marks[0]), marks[3].time_since(marks[0]))
            samples.append({"h2d": h2d, "d2h": d2h, "total": span, "overlap": max(0.0, 1 - span / (h2d + d2h))})
        dev_up.free()
        dev_down.free()
        host_up.base.free()
        host_down.base.free()
        return _bandwidth(medians(samples[1:]), up, down)
    finally:
        cuda.Context.pop()


def _copies_cupy(up: int, down: int, frames: int) -> dict:
    import cupy
    import cupyx

    host_up, host_down = cupyx.empty_pinned(up, np.uint8), cupyx.empty_pinned(down, np.uint8)
    dev_up, dev_down = cupy.empty(up, cupy.uint8), cupy.empty(down, cupy.uint8)
    streams = [cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)]
    samples = []
    for _ in range(frames + 1):
        marks = [cupy.cuda.Event() for _ in range(4)]
        marks[0].record(streams[0])
        dev_up.set(host_up, stream=streams[0])
        marks[1].record(streams[0])
        streams[1].wait_event(marks[0])
        marks[2].record(streams[1])
        dev_down.get(stream=streams[1], out=host_down)
        marks[3].record(streams[1])
        marks[1].synchronize()
        marks[3].synchronize()
        h2d = cupy.cuda.get_elapsed_time(marks[0], marks[1])
        d2h = cupy.cuda.get_elapsed_time(marks[2], marks[3])
        span = max(h2d, cupy.cuda.get_elapsed_time(marks[0], marks[3]))
        samples.append({"h2d": h2d, "d2h": d2h, "total": span, "overlap": max(0.0, 1 - span / (h2d + d2h))})
    return _bandwidth(medians(samples[1:]), up, down)


def _bandwidth(result: dict, up: int, down: int) -> dict:
    result["frames/s"] = 1e3 / result["total"]
    result["h2d_gbps"] = up / result["h2d"] / 1e6
    result["d2h_gbps"] = down / result["d2h"] / 1e6
    return result


# -- output ------------------------------------------------------------------------------
def render(rows: list[dict]) -> str:
    def cell(value: object, key: str) -> str:
        if isinstance(value, float):
            return f"{value:.2f}" if key in ("frames/s", "overlap") else f"{value:.1f}"
        return str(value)

    table = [list(COLUMNS)] + [[cell(r.get(k, "-"), k) for k in COLUMNS] for r in rows]
    for r, line in zip(rows, table[1:], strict=True):
        if "h2d_gbps" in r:
            line[-1] += f"; {r['h2d_gbps']:.1f} GB/s up, {r['d2h_gbps']:.1f} GB/s down"
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)] + [0]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a fitted 8-bit bundle: its graphs, statistics and frame size")
    parser.add_argument("--size", type=int, default=5120, help="toy graph: frame side in pixels (default 5120)")
    parser.add_argument("--batches", default="1,2,4,8", help="tile batch sizes (default 1,2,4,8)")
    parser.add_argument("--frames", type=int, default=3, help="timed frames per row (default 3)")
    parser.add_argument("--core", type=int, default=512, help="toy graph: tile core (default 512)")
    parser.add_argument("--halo", type=int, default=32, help="toy graph: tile halo (default 32)")
    parser.add_argument("--skip-cpu", action="store_true", help="leave out the ONNX Runtime baseline")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    work = Workload.from_bundle(args.bundle) if args.bundle else Workload.toy(args.size, args.core, args.halo)
    plan = work.plan
    print(
        f"frame {plan.width}x{plan.height} u8 x{work.channels}, {plan.n_tiles} tiles of {plan.tile}^2 "
        f"(core {plan.core}), {args.frames} timed frames per row; times are per-frame medians in ms"
        + (f"; bundle {args.bundle}" if args.bundle else "; toy graph")
    )
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.bundle:
            fp32, fp16 = args.bundle / "graph_fp32.onnx", args.bundle / "graph_fp16.onnx"
        else:
            tile = work.plan.tile
            fp32 = toy_tiled_graph(scratch / "graph_fp32.onnx", tile, args.core, fp16=False)
            fp16 = toy_tiled_graph(scratch / "graph_fp16.onnx", tile, args.core, fp16=True)
        rows = tensorrt_rows(work, fp16, batches, args.frames, scratch)
        rows += copy_rows(work, args.frames)
        if not args.skip_cpu:
            rows += onnxruntime_rows(work, fp32, batches, max(1, args.frames - 1))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
