"""The raw-frame path, stage by stage, against its floors and against a baseline checkout, in one run.

    python benchmarks/frame_path.py --model M --images DIR            # this checkout vs main at 633562a
    python benchmarks/frame_path.py --fit DATASET --images DATASET/test --daemon   # everything

1. Floors, on one of the frames: a ZeroMQ hop over loopback TCP and over ipc, memcpy, area resize to 1/8, an
   affine warp of the frame, a 5-op elementwise map (numpy, and ONNX Runtime float32), uint8 to
   float32, one pass of "map above threshold", connected components on a dense and on a sparse map.
2. The raw-frame path (``Inspector.prepare`` / ``infer`` / ``decide`` on decoded frames, as the
   daemon gets them) for this checkout and the baseline, each in its own long-lived process that
   imports its own checkout (PYTHONPATH), fed the same frames alternately, frame by frame, so
   both see the same machine load. ``--frames`` frames x ``--runs`` runs; medians of wall time
   and of the process's CPU time per stage, each stage's ratio to the baseline and to its floor.
3. Identity, on every frame of the first run: verdicts, reasons, defect boxes and areas equal to
   the baseline's; maps and scores within 1e-3.
4. ``--sessions``: ONNX Runtime session options (threads, spinning, optimisation level, arena,
   memory patterns, IO binding) on this checkout's graph and one frame's tiles; ``--nodes``: ONNX
   Runtime's own profiler on each checkout's graph, one tile on one thread, time per op type.
5. ``--daemon``: per run and checkout a fresh daemon (``served.py``: ``inspectd serve`` that also
   times bare predict in its own process, on its own engine, while no frame is in flight), fed
   raw frames over loopback at ``--load`` of the rate that in-process bare predict sustains, or
   at ``--daemon-rate`` Hz; ``--runs`` runs, checkouts interleaved. The ``--daemon-frames`` go in
   ``--daemon-blocks`` blocks, and the daemon times bare predict (``--frames`` frames) before the
   first, between the blocks and after the last: bare predict's median moves by ~10 % within one
   process over a run, and with bare predict timed only at the run's two ends that drift weighed
   as much as the daemon's own overhead. Per run: end-to-end p50 / p99 and the overhead over the
   p50 of all the daemon's own bare predict (like with like: the same process, memory and threads;
   bare predict in another process moves by ~6 % from one process to the next,
   ``process_spread.py``), and, as before, over the separate worker's bare p50. Each bare block is
   followed by a paced one: bare predict with the idle time before each frame that the served frames
   have (the period less latency), and the overhead over that too: at 70 % load the daemon idles
   ~30 % of the time, and waking from idle costs this machine ~6 % (``paced_bare.py``), a cost of
   the load, not of the daemon, that back-to-back bare predict never pays. Then CPU ms, system
   ms and minor page faults per frame by thread (bare predict -> serving, same process), stage
   medians, and the slowest frames' stage times.
   ``--daemon-env LABEL:NAME=VALUE,...`` adds daemon variants (environment variables; served.py
   also reads a few experiment knobs) run interleaved with the rest.
6. ``--fit DATASET``: ``inspectd fit`` under each checkout (wall time, peak resident memory, the
   two bundles compared); the frame path then runs each checkout on its own bundle.

The baseline is a detached ``git worktree`` of ``--baseline`` (default 633562a) made for the run
and removed after it, or ``--baseline-dir``. On a shared machine, read the ratios (both sides saw
the same load) and the CPU columns; the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE = "633562a"
MAP_TOLERANCE = 1e-3
STAGES = ("prepare", "infer", "decide", "total")
# Sub-stages timed by wrapping functions of whichever checkout a worker imports; a checkout
# without one of them shows a dash. (label, module, attribute path)
PROBES = (
    ("prepare", "downscale", "engines.registration", "downscale"),
    ("prepare", "register (ECC)", "engines.registration", "RegistrationReference.register"),
    ("prepare", "photometric fit", "engines.registration", "RegistrationReference.photometric"),
    ("prepare", "resample", "engines.registration", "warp_to_reference"),
    ("prepare", "pad", "engines.tiling", "TilePlan.pad"),
    ("prepare", "pad: border only", "engines.tiling", "TilePlan.replicate"),
    ("prepare", "fine gain", "engines.inspector", "frame_fine_gain"),
    ("infer", "extract tiles", "engines.tiling", "TilePlan.extract"),
    ("infer", "stitch", "engines.tiling", "TilePlan.stitch"),
    ("decide", "regions", "engines.inspector", "find_regions"),
)
FLOOR_OF = {  # stage -> the floors (summed) that bound it
    "prepare": ("area resize to 1/8", "area resize to 1/8", "affine warp (uint8)"),
    "downscale": ("area resize to 1/8", "area resize to 1/8"),
    "resample": ("affine warp (uint8)",),
    "infer": ("5-op map, ONNX Runtime float32",),
    "decide": ("map above threshold (one pass)",),
    "regions": ("map above threshold (one pass)",),
    "total": (
        *("area resize to 1/8", "area resize to 1/8", "affine warp (uint8)"),
        *("5-op map, ONNX Runtime float32", "map above threshold (one pass)"),
    ),
}


# ---------------------------------------------------------------------------------------------
# floors
# ---------------------------------------------------------------------------------------------
def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _zmq_hop(frame: np.ndarray, repeats: int, transport: str = "tcp") -> float:
    """One frame's bytes PUSHed to a PULL socket over loopback TCP (or ``ipc``, a Unix socket): send call to
    the last byte received."""
    import zmq

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    with tempfile.TemporaryDirectory(prefix="frame_path-hop-") as tmp:
        try:
            if transport == "ipc":
                endpoint = f"ipc://{tmp}/frames"
                pull.bind(endpoint)
            else:
                endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
            push.connect(endpoint)
            payload = np.ascontiguousarray(frame).data
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                push.send(payload, copy=False)
                pull.recv(copy=False)
                times.append((time.perf_counter() - start) * 1000)
            return statistics.median(times[1:])
        finally:
            push.close(linger=0)
            pull.close(linger=0)
            ctx.term()


def _ort_map_ms(x: np.ndarray, repeats: int) -> float:
    """y = max((x - b) / a - mu, 0) * w as one ONNX Runtime float32 run over the whole frame."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = ("x", "b", "a", "mu", "w")
    nodes = [
        helper.make_node("Sub", ["x", "b"], ["t1"]),
        helper.make_node("Div", ["t1", "a"], ["t2"]),
        helper.make_node("Sub", ["t2", "mu"], ["t3"]),
        helper.make_node("Relu", ["t3"], ["t4"]),
        helper.make_node("Mul", ["t4", "w"], ["y"]),
    ]
    shape = list(x.shape)
    graph = helper.make_graph(
        nodes,
        "floor",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = _cores()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": x, "b": np.full_like(x, 3), "a": np.full_like(x, 1.02), "mu": x * 0.97, "w": np.ones_like(x)}
    return _median_ms(lambda: session.run(None, feeds), repeats)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure_floors(frame: np.ndarray, repeats: int) -> dict[str, float]:
    """The floors of the module docstring on ``frame`` (mono, or the first channel of colour)."""
    import cv2

    plane = np.ascontiguousarray(frame if frame.ndim == 2 else frame[:, :, 0])
    h, w = plane.shape
    out: dict[str, float] = {"ZeroMQ hop, loopback TCP": _zmq_hop(frame, repeats)}
    out["ZeroMQ hop, ipc (same host)"] = _zmq_hop(frame, repeats, "ipc")
    copy = np.empty_like(frame)
    out["memcpy"] = _median_ms(lambda: np.copyto(copy, frame), repeats)
    out["area resize to 1/8"] = _median_ms(
        lambda: cv2.resize(plane, (w // 8, h // 8), interpolation=cv2.INTER_AREA), repeats
    )
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.3, 1.0)
    matrix[:, 2] += (2.3, -1.7)
    warped = np.empty_like(plane)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    out["affine warp (uint8)"] = _median_ms(
        lambda: cv2.warpAffine(plane, matrix, (w, h), warped, flags=flags, borderMode=cv2.BORDER_REPLICATE), repeats
    )
    x = np.empty(plane.shape, np.float32)
    out["uint8 -> float32"] = _median_ms(lambda: np.copyto(x, plane), repeats)
    b, a, mu, wt, y = np.full_like(x, 3), np.full_like(x, 1.02), x * 0.97, np.ones_like(x), np.empty_like(x)

    def numpy_map() -> None:
        np.subtract(x, b, out=y)
        np.divide(y, a, out=y)
        np.subtract(y, mu, out=y)
        np.maximum(y, 0, out=y)
        np.multiply(y, wt, out=y)

    out["5-op map, numpy float32"] = _median_ms(numpy_map, repeats)
    out["5-op map, ONNX Runtime float32"] = _ort_map_ms(x[None, None], repeats)
    above = np.empty(plane.shape, bool)
    out["map above threshold (one pass)"] = _median_ms(lambda: np.greater(y, 0.5, out=above), repeats)
    dense = np.ones(plane.shape, np.uint8)  # every pixel above threshold: one region the size of the frame
    sparse = np.zeros(plane.shape, np.uint8)  # five small defects
    for i in range(5):
        sparse[h // 6 * (i + 1) : h // 6 * (i + 1) + 12, w // 7 * (i + 1) : w // 7 * (i + 1) + 9] = 1
    out["connected components, dense"] = _median_ms(lambda: cv2.connectedComponentsWithStats(dense, 8), repeats)
    out["connected components, sparse"] = _median_ms(lambda: cv2.connectedComponentsWithStats(sparse, 8), repeats)
    return out


# ---------------------------------------------------------------------------------------------
# worker: one checkout's raw-frame path, driven over stdin/stdout
# ---------------------------------------------------------------------------------------------
class Probes:
    """Wall and thread-CPU time of the PROBES functions, summed per frame."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.present: list[str] = []
        for _, label, module, path in PROBES:
            if self._wrap(label, module, path):
                self.present.append(label)

    def _wrap(self, label: str, module: str, path: str) -> bool:
        import importlib

        try:
            owner: Any = importlib.import_module(module)
            *parents, attr = path.split(".")
            for name in parents:
                owner = getattr(owner, name)
            fn = getattr(owner, attr)
        except (ImportError, AttributeError):
            return False
        probes = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                probes.wall[label] = probes.wall.get(label, 0.0) + (time.perf_counter() - wall) * 1000
                probes.cpu[label] = probes.cpu.get(label, 0.0) + (time.thread_time() - cpu) * 1000

        setattr(owner, attr, timed)  # on a class, a plain function binds like the method it replaces
        return True

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()


def _raw(image: np.ndarray) -> np.ndarray:
    """The frame as the daemon hands it over: a read-only view of a received buffer."""
    return np.frombuffer(np.ascontiguousarray(image).tobytes(), image.dtype).reshape(image.shape)


def worker(model: Path, images: list[Path], maps: Path) -> None:
    """Serve commands from stdin, one JSON line each; answer with one JSON line on stdout."""
    import engines
    from engines.decode import read_image
    from engines.inspector import Inspector

    frames = [_raw(read_image(p)) for p in images]
    probes = Probes()
    inspector = Inspector.load(model, "onnxruntime")
    inspector.activate()
    inspector.decide(*_run_stages(inspector, frames[0], {}, {}))  # warm-up beyond activate's own
    _reply({"engines": str(Path(engines.__file__).parent.parent), "probes": probes.present})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "frame":
            _reply(_frame(inspector, probes, frames[cmd["index"]], maps if cmd.get("save") else None, cmd["index"]))
        elif cmd["op"] == "bare":
            _reply(bare_inspect(inspector, frames, cmd["count"]))
        elif cmd["op"] == "sessions":
            _reply({"rows": session_options_table(inspector, frames[0], cmd["repeats"])})
        elif cmd["op"] == "nodes":
            _reply({"ops": node_profile(inspector, frames[0], cmd["repeats"])})
        elif cmd["op"] == "peak":
            _reply({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "now_mb": _rss_mb()})
        elif cmd["op"] == "quit":
            _reply({})
            return


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _run_stages(inspector: Any, frame: np.ndarray, wall: dict[str, float], cpu: dict[str, float]) -> tuple:
    prepared = anomaly = None
    for stage in ("prepare", "infer"):
        w, c = time.perf_counter(), time.process_time()
        if stage == "prepare":
            prepared = inspector.prepare(frame)
        else:
            anomaly = inspector.infer(prepared)
        wall[stage], cpu[stage] = (time.perf_counter() - w) * 1000, (time.process_time() - c) * 1000
    return prepared, anomaly


def _frame(inspector: Any, probes: Probes, frame: np.ndarray, maps: Path | None, index: int) -> dict:
    probes.reset()
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    prepared, anomaly = _run_stages(inspector, frame, wall, cpu)
    w, c = time.perf_counter(), time.process_time()
    result = inspector.decide(prepared, anomaly)
    wall["decide"], cpu["decide"] = (time.perf_counter() - w) * 1000, (time.process_time() - c) * 1000
    wall["total"], cpu["total"] = sum(wall.values()), sum(cpu.values())
    out = {"wall": wall, "cpu": cpu, "probe_wall": dict(probes.wall), "probe_cpu": dict(probes.cpu)}
    if maps is not None:
        np.save(maps / f"{index}.npy", np.asarray(anomaly, np.float32))
        out["decision"] = {
            "verdict": result.verdict,
            "reason": result.reason,
            "score": result.score,
            "defects": [[list(map(int, d.bbox)), int(d.area), float(d.score)] for d in result.defects],
        }
    return out


def bare_inspect(inspector: Any, frames: list[np.ndarray], count: int, pause_ms: float = 0.0) -> dict[str, Any]:
    """Inspector.inspect wall time per frame, as daemon_latency.py measures bare predict, and the process's CPU
    time per frame over them (every thread). ``pause_ms``: idle time before each frame (not timed), as a daemon
    fed below its rate has between frames."""
    times, stages = [], []
    cpu = time.process_time()
    for i in range(count):
        if pause_ms:
            time.sleep(pause_ms / 1000)
        start = time.perf_counter()
        result = inspector.inspect(frames[i % len(frames)])
        times.append((time.perf_counter() - start) * 1000)
        stages.append(result.timings_ms)
    medians = {k: statistics.median(t.get(k, 0.0) for t in stages) for k in stages[0]} if stages else {}
    return {"ms": times, "cpu_ms": (time.process_time() - cpu) * 1000 / count, "stages": medians}


# ---------------------------------------------------------------------------------------------
# ONNX Runtime session options (worker side, this checkout)
# ---------------------------------------------------------------------------------------------
def _tile_feeds(inspector: Any, frame: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Every input of every tile of one prepared frame, one tile per dict (resident statistics included)."""
    from engines.inspector import resident_inputs

    prepared = inspector.prepare(frame)
    resident = resident_inputs(inspector.plan, inspector._ref, np.float32)
    gain = prepared.fine_gain.astype(np.float32)
    jobs = []
    for tiles in inspector.plan.batches(1):
        a, b = tiles.start, tiles.stop
        feeds = {"image": inspector.plan.extract(prepared.padded, tiles), "photo": prepared.photo[a:b]}
        feeds["fine_gain"] = gain[a:b]
        feeds.update({k: v[a:b] for k, v in resident.items()})
        jobs.append(feeds)
    return jobs


def node_profile(inspector: Any, frame: np.ndarray, repeats: int) -> dict[str, float]:
    """ONNX Runtime's own profiler on the bundle's FP32 graph, one thread, the middle tile: ms per op type.

    Each node's median over ``repeats`` runs, summed per op type, and the run's thread CPU median.
    """
    import collections

    import onnxruntime as ort

    jobs = _tile_feeds(inspector, frame)
    feeds = jobs[len(jobs) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "nodes")
        session = ort.InferenceSession(str(inspector.backend.graph_path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feeds)
        cpu = []
        for _ in range(repeats):
            start = time.thread_time()
            session.run(None, feeds)
            cpu.append((time.thread_time() - start) * 1000)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[(event["args"]["op_name"], event["name"])].append(event["dur"] / 1000)
    ops: dict[str, float] = collections.defaultdict(float)
    for (op, _), durations in per_node.items():
        ops[op] += statistics.median(durations[3:] or durations)
    ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    ops["(sum of node medians)"] = sum(ops.values())
    ops["(run, thread CPU median)"] = statistics.median(cpu)
    return ops


def session_options_table(inspector: Any, frame: np.ndarray, repeats: int) -> list[dict]:
    """Every tile of one prepared frame through the bundle's FP32 graph under different session options."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    jobs = _tile_feeds(inspector, frame)
    graph = str(inspector.backend.graph_path)
    cores = _cores()
    level = ort.GraphOptimizationLevel

    def session(threads: int, spin: bool = False, opt: Any = level.ORT_ENABLE_ALL, **flags: bool) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = opt
        options.enable_cpu_mem_arena = flags.get("arena", True)
        options.enable_mem_pattern = flags.get("pattern", True)
        if flags.get("parallel"):
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            options.inter_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    pool = ThreadPoolExecutor(cores)

    def in_turn(s: Any) -> Callable[[], list]:
        return lambda: [s.run(None, f)[0] for f in jobs]

    def side_by_side(s: Any) -> Callable[[], list]:
        return lambda: list(pool.map(lambda f: s.run(None, f)[0], jobs))

    def bound(s: Any, parallel: bool) -> Callable[[], list]:
        core = inspector.plan.core

        def one(f: dict) -> np.ndarray:
            binding = s.io_binding()
            for name, value in f.items():
                binding.bind_cpu_input(name, value)
            out = np.empty((1, 1, core, core), np.float32)
            binding.bind_output("anomaly", "cpu", 0, np.float32, out.shape, out.ctypes.data)
            s.run_with_iobinding(binding)
            return out

        return (lambda: list(pool.map(one, jobs))) if parallel else (lambda: [one(f) for f in jobs])

    single = session(1)
    cases = {
        f"before: {min(cores, 8)} intra-op threads, spinning, tiles in turn": in_turn(
            session(min(cores, 8), spin=True)
        ),
        f"{cores} intra-op threads, no spinning, tiles in turn": in_turn(session(cores)),
        f"{cores} intra-op threads, parallel executor": in_turn(session(cores, parallel=True)),
        "1 thread, tiles in turn": in_turn(single),
        f"1 thread per run, {cores} tiles side by side (chosen)": side_by_side(single),
        "  ... basic graph optimisation": side_by_side(session(1, opt=level.ORT_ENABLE_BASIC)),
        "  ... extended graph optimisation": side_by_side(session(1, opt=level.ORT_ENABLE_EXTENDED)),
        "  ... no memory arena": side_by_side(session(1, arena=False)),
        "  ... no memory patterns": side_by_side(session(1, pattern=False)),
        "  ... IO binding (output into a preallocated buffer)": bound(single, True),
    }
    reference = None
    rows = {name: ([], []) for name in cases}
    for name, fn in cases.items():
        out = fn()
        reference = out if reference is None else reference
        if not all(np.array_equal(a, b) for a, b in zip(reference, out, strict=True)):
            raise SystemExit(f"session option '{name}' changed the map")
    for _ in range(repeats):
        for name, fn in cases.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            rows[name][0].append((time.perf_counter() - w) * 1000)
            rows[name][1].append((time.process_time() - c) * 1000)
    pool.shutdown()
    return [{"option": k, "wall": statistics.median(w), "cpu": statistics.median(c)} for k, (w, c) in rows.items()]


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
class Worker:
    """A worker process on one checkout."""

    def __init__(self, name: str, checkout: Path, model: Path, images: list[Path], maps: Path) -> None:
        self.name, self.maps, self._closed = name, maps, False
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        argv = [sys.executable, __file__, "--worker", "--model", str(model), "--maps", str(maps)]
        argv += ["--image-list", *map(str, images)]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        hello = self._read()
        if Path(hello["engines"]).resolve() != checkout.resolve():
            raise SystemExit(f"{name}: imported engines from {hello['engines']}, not {checkout}")
        self.probes: list[str] = hello["probes"]

    def ask(self, **cmd: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} worker exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        """Stop the worker (once)."""
        if self._closed or self.proc.poll() is not None:
            return
        self._closed = True
        self.ask(op="quit")
        self.proc.wait(30)


@contextlib.contextmanager
def baseline_checkout(args: argparse.Namespace, workdir: Path) -> Iterator[Path]:
    if args.baseline_dir:
        yield args.baseline_dir
        return
    path = workdir / f"baseline-{args.baseline}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), args.baseline], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


def pick_images(folder: Path, limit: int) -> list[Path]:
    """``limit`` images spread over the sorted list (so defects of several kinds come with the goods)."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".tif", ".tiff", ".bmp"))
    if not paths:
        raise SystemExit(f"{folder}: no images")
    step = max(1, len(paths) // limit)
    return paths[::step][:limit]


def compare(base: dict, new: dict, index: int, maps: tuple[Path, Path]) -> dict:
    """Identity of one frame: decisions equal, maps and scores within MAP_TOLERANCE."""
    a, b = (np.load(d / f"{index}.npy") for d in maps)
    diff = float(np.abs(a - b).max())
    db, dn = base["decision"], new["decision"]
    boxes = [d[:2] for d in db["defects"]] == [d[:2] for d in dn["defects"]]
    scores = [db["score"]] + [d[2] for d in db["defects"]], [dn["score"]] + [d[2] for d in dn["defects"]]
    counted = len(scores[0]) == len(scores[1])  # as many defect regions: their scores compare one to one
    score_diff = max(abs(x - y) for x, y in zip(*scores, strict=True)) if counted else float("inf")
    same = db["verdict"] == dn["verdict"] and db["reason"] == dn["reason"] and boxes
    for d in maps:
        (d / f"{index}.npy").unlink()
    return {"decision": same, "map_diff": diff, "score_diff": score_diff, "verdict": dn["verdict"]}


def run_frames(workers: dict[str, Worker], n_frames: int, runs: int) -> tuple[dict, list[dict]]:
    """Every frame through both workers, alternating which goes first; the first run also checks identity."""
    samples: dict[str, list[dict]] = {name: [] for name in workers}
    identity = []
    names = list(workers)
    for run in range(runs):
        for i in range(n_frames):
            order = names if (run * n_frames + i) % 2 == 0 else names[::-1]
            got = {name: workers[name].ask(op="frame", index=i, save=run == 0) for name in order}
            for name in names:
                samples[name].append(got[name])
            if run == 0 and len(names) == 2:
                maps = (workers[names[0]].maps, workers[names[1]].maps)
                identity.append(compare(got[names[0]], got[names[1]], i, maps))
        print(f"  run {run + 1}/{runs} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    return samples, identity


def _med(rows: list[dict], key: str, field: str) -> float | None:
    values = [r[key][field] for r in rows if field in r[key]]
    return statistics.median(values) if values else None


def _fmt(value: float | None, width: int = 9, digits: int = 1) -> str:
    return f"{'–':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_stage_table(samples: dict[str, list[dict]], floors: dict[str, float], names: list[str]) -> None:
    base, new = (names[0], names[1]) if len(names) == 2 else (None, names[0])
    print(f"\n{'stage (medians, ms)':<26}", end="")
    if base:
        print(f"{'baseline':>9}{'cpu':>8}", end="")
    print(f"{'new':>9}{'cpu':>8}", end="")
    if base:
        print(f"{'new/base':>9}{'cpu n/b':>9}", end="")
    print(f"{'floor':>8}{'new/floor':>10}")
    rows: list[tuple[str, str, str]] = []
    for stage in STAGES:
        rows.append((stage, "wall", "cpu"))
        rows += [(f"  {label}", "probe_wall", "probe_cpu") for s, label, *_ in PROBES if s == stage]
    for label, wall_key, cpu_key in rows:
        key = label.strip()
        n_wall, n_cpu = _med(samples[new], wall_key, key), _med(samples[new], cpu_key, key)
        line = f"{label:<26}"
        if base:
            b_wall, b_cpu = _med(samples[base], wall_key, key), _med(samples[base], cpu_key, key)
            line += _fmt(b_wall) + _fmt(b_cpu, 8)
        line += _fmt(n_wall) + _fmt(n_cpu, 8)
        if base:
            line += _fmt(n_wall / b_wall if n_wall and b_wall else None, 9, 2)
            line += _fmt(n_cpu / b_cpu if n_cpu and b_cpu else None, 9, 2)
        floor = sum(floors[f] for f in FLOOR_OF[key]) if key in FLOOR_OF else None
        line += _fmt(floor, 8) + _fmt(n_wall / floor if n_wall and floor else None, 10, 2)
        print(line)
    print("(cpu: the process's CPU time, every thread; sub-stages: the calling thread's, summed over calls)")


def print_floors(floors: dict[str, float]) -> None:
    print(f"\n{'floor (median ms)':<34}{'ms':>8}")
    for name, value in floors.items():
        print(f"{name:<34}{value:>8.1f}")


def print_identity(identity: list[dict]) -> bool:
    ok = all(r["decision"] and r["map_diff"] <= MAP_TOLERANCE and r["score_diff"] <= MAP_TOLERANCE for r in identity)
    worst = max((r["map_diff"] for r in identity), default=float("nan"))
    verdicts = {v: sum(r["verdict"] == v for r in identity) for v in ("pass", "reject")}
    same = sum(r["decision"] for r in identity)
    print(
        f"\nidentity vs baseline: decisions identical on {same}/{len(identity)} frames "
        f"(this checkout: {verdicts['pass']} pass, {verdicts['reject']} reject); worst map difference {worst:.2e}, "
        f"worst score difference {max((r['score_diff'] for r in identity), default=float('nan')):.2e} "
        f"(tolerance {MAP_TOLERANCE:g}) -> {'IDENTICAL' if ok else 'DIFFERENT'}"
    )
    return ok


def print_nodes(profiles: dict[str, dict[str, float]]) -> None:
    names = list(profiles)
    print(f"\n{'graph nodes, one tile, one thread (ms)':<40}" + "".join(f"{n:>12}" for n in names))
    ops = list(dict.fromkeys(op for p in profiles.values() for op in p))
    for op in sorted(ops, key=lambda o: (o.startswith("("), -max(p.get(o, 0.0) for p in profiles.values()))):
        print(f"{op:<40}" + "".join(f"{profiles[n].get(op, 0.0):>12.2f}" for n in names))


def print_sessions(rows: list[dict]) -> None:
    before = rows[0]
    title = "ONNX Runtime session options, every tile of one frame (medians, ms)"
    print(f"\n{title:<70}{'wall':>8}{'cpu':>8}{'cpu/before':>11}")
    for row in rows:
        print(f"{row['option']:<70}{row['wall']:>8.1f}{row['cpu']:>8.1f}{row['cpu'] / before['cpu']:>11.2f}")


# ---------------------------------------------------------------------------------------------
# daemon and fit
# ---------------------------------------------------------------------------------------------
def run_daemons(args: argparse.Namespace, workers: dict[str, Worker], checkouts: dict[str, Path], models: dict) -> None:
    """Per run and checkout: bare predict in the worker, then a fresh daemon that times bare predict in its own
    process before and after serving the frames (``served.py``); the overhead is against that in-process bare."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from engines.decode import read_image

    paths = pick_images(args.images, args.frames)
    images = [(p.name, read_image(p)) for p in paths]
    variants = dict(args.daemon_env) or {"": {}}
    cases = [
        (name, label, via)
        for name in checkouts
        for label in variants
        for via in args.daemon_transport
        if via != "shm" or (checkouts[name] / "daemon" / "shm.py").exists()  # a checkout without slots: TCP/ipc only
    ]
    results: dict[str, list[dict]] = {_case(*case): [] for case in cases}
    for r in range(args.runs):
        for name, label, via in cases if r % 2 == 0 else cases[::-1]:
            worker_bare = workers[name].ask(op="bare", count=args.frames)
            log = args.workdir / f"daemon-{name}{label}{via}-{r}.log"
            with _environment(variants[label]):
                row = daemon_run(args, checkouts[name], models[name], paths, images, log, via)
            row["worker_p50"] = statistics.median(worker_bare["ms"])
            row["worker_cpu"] = worker_bare["cpu_ms"]
            results[_case(name, label, via)].append(row)
    (args.workdir / "daemon.json").write_text(json.dumps(results))
    print_daemon_table(args, results)
    print_threads(results)
    print_slowest(results)
    print_overlap(results)


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:NAME=VALUE,NAME=VALUE`` -> (label, environment); ``LABEL:`` is the daemon as it is."""
    label, _, pairs = text.partition(":")
    try:
        return label, dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL:NAME=VALUE,NAME=VALUE") from None


def _case(name: str, label: str, via: str = "tcp") -> str:
    """The row's name: the checkout, then the variant's label and ``ipc`` where there are."""
    return "/".join([name, *([label] if label else []), *([via] if via != "tcp" else [])])


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ while a daemon starts (it inherits them), then as before."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def daemon_run(
    args: argparse.Namespace, checkout: Path, model: Path, paths: list[Path], images: list, log: Path, via: str
) -> dict[str, Any]:
    """One fresh daemon: bare predict in its process, then ``--daemon-blocks`` blocks of frames at the offered
    rate, each followed by bare predict again, so that every served frame is compared with bare predict timed
    minutes, not a whole run, away (bare predict's own median moves by ~10 % within one process)."""
    from daemon_latency import Daemon, rss_mb, run

    launcher = [sys.executable, str(REPO / "benchmarks" / "served.py"), "--image-list", *map(str, paths), "--"]
    daemon = Daemon(model, "onnxruntime", 5000.0, 4, log, repo=checkout, launcher=launcher, transport=via)
    blocks = _block_sizes(args.daemon_frames, args.daemon_blocks)
    try:
        threads = [daemon.ask(op="threads")["threads"]]
        bares = [daemon.ask(op="bare", count=args.frames)]
        rate = args.daemon_rate or args.load * 1000 / statistics.median(bares[0]["ms"])
        # The idle time the served frames leave before each other (period less latency), given to bare predict too.
        pause_ms = max(0.0, 1000 / rate - statistics.median(bares[0]["ms"]))
        paced = [daemon.ask(op="bare", count=args.frames, pause_ms=pause_ms)]
        threads.append(daemon.ask(op="threads")["threads"])
        served: list[tuple[Any, dict[str, dict]]] = []  # per block: the sender's report, the daemon's stage times
        cpu = 0.0
        for count in blocks:
            start = _process_cpu_s(daemon.proc.pid)
            report = run(daemon, images, count, rate, None)
            cpu += _process_cpu_s(daemon.proc.pid) - start
            threads.append(daemon.ask(op="threads")["threads"])
            served.append((report, {str(f["frame_id"]): f for f in daemon.ask(op="frames")["frames"]}))
            bares.append(daemon.ask(op="bare", count=args.frames))
            paced.append(daemon.ask(op="bare", count=args.frames, pause_ms=pause_ms))
            threads.append(daemon.ask(op="threads")["threads"])
        rss = rss_mb(daemon.proc.pid)
    finally:
        daemon.stop()
    row = _daemon_row(args, rate, served, cpu, bares, threads, rss, paced)
    row["pause_ms"] = pause_ms
    return row


def _block_sizes(frames: int, blocks: int) -> list[int]:
    """``frames`` split into ``blocks`` nearly equal blocks (none empty)."""
    blocks = max(1, min(blocks, frames))
    return [frames // blocks + (i < frames % blocks) for i in range(blocks)]


def _daemon_row(
    args: argparse.Namespace,
    rate: float,
    served: list[tuple[Any, dict[str, dict]]],
    cpu: float,
    bares: list[dict],
    threads: list[dict],
    rss: float,
    paced: list[dict],
) -> dict[str, Any]:
    """One daemon run's figures. ``threads`` alternates bare spans and serving spans: t0 bare t1 serve t2 bare t3 ...
    (each bare span: a back-to-back block of bare predict, then a paced one)."""
    from daemon_latency import latencies, percentiles

    decisions = [d for report, _ in served for d in report.decisions.values()]
    decided = max(len(decisions), 1)
    row = percentiles([ms for report, _ in served for ms in latencies(report)])
    sent = sum(report.sent for report, _ in served)
    row.update(rate=rate, decided=len(decisions), sent=sent, cpu=cpu * 1000 / decided, rss_mb=rss)
    row["inside"] = _inside_p50(decisions)
    row["bare"] = [statistics.median(b["ms"]) for b in bares]
    row["bare_p50"] = statistics.median(ms for b in bares for ms in b["ms"])
    row["bare_cpu"] = statistics.mean(b["cpu_ms"] for b in bares)
    row["bare_stages"] = {k: statistics.median(b["stages"][k] for b in bares) for k in bares[0]["stages"]}
    spans = list(itertools.pairwise(threads))
    row["paced"] = [statistics.median(b["ms"]) for b in paced]
    row["paced_p50"] = statistics.median(ms for b in paced for ms in b["ms"])
    row["threads_bare"] = _thread_delta(spans[0::2], (len(bares) + len(paced)) * args.frames)
    row["threads_daemon"] = _thread_delta(spans[1::2], decided)
    row["frames"] = [
        {**f, "block": i} for i, (report, stages) in enumerate(served) for f in _frame_rows(report, stages)
    ]
    row["paired"] = _paired_overhead(row["frames"], row["bare"])
    row["paired_paced"] = _paired_overhead(row["frames"], row["paced"])
    return row


def _paired_overhead(frames: list[dict], bare_blocks: list[float]) -> float | None:
    """Median over served frames of e2e over the bare predict timed next to the frame's own block (the mean of
    the bare blocks' medians just before and just after it), minus one: the machine's speed drifts by a tenth
    within minutes, and this compares each frame with bare predict at the speed the machine had then."""
    ratios = [f["e2e"] / ((bare_blocks[f["block"]] + bare_blocks[f["block"] + 1]) / 2) for f in frames]
    return statistics.median(ratios) - 1 if ratios else None


def _thread_group(name: str) -> str:
    """A thread's name without its native id and pool index: inspectd-tile_1#123 -> inspectd-tile."""
    base = name.split("#")[0]
    return base.rsplit("_", 1)[0] if base.rsplit("_", 1)[-1].isdigit() else base


def _thread_delta(spans: list[tuple[dict, dict]], frames: int) -> dict[str, tuple[float, ...]]:
    """CPU ms, minor faults and system CPU ms per frame by thread group over the (before, after) snapshots."""
    out: dict[str, list[float]] = {}
    for first, last in spans:
        for name, now in last.items():
            was = first.get(name, {"cpu_s": 0.0, "sys_s": 0.0, "minflt": 0})
            acc = out.setdefault(_thread_group(name), [0.0, 0.0, 0.0])
            acc[0] += (now["cpu_s"] - was["cpu_s"]) * 1000
            acc[1] += now["minflt"] - was["minflt"]
            acc[2] += (now["sys_s"] - was["sys_s"]) * 1000
    return {k: tuple(x / frames for x in v) for k, v in out.items()}


def _frame_rows(report: Any, stages: dict[str, dict]) -> list[dict[str, float]]:
    """Per decided frame: end-to-end ms, the daemon's own latency and its stage times (kept by served.py)."""
    rows = []
    for key in report.decisions:
        if key not in report.sent_ns:
            continue
        row = {"e2e": (report.received_ns[key] - report.sent_ns[key]) / 1e6}
        decision = report.decisions[key]
        if isinstance(decision.get("t_received_ns"), int) and isinstance(decision.get("t_decided_ns"), int):
            # One host, one clock: sender -> daemon's intake, and the daemon's decision -> the sender.
            row["hop_in"] = (decision["t_received_ns"] - report.sent_ns[key]) / 1e6
            row["hop_out"] = (report.received_ns[key] - decision["t_decided_ns"]) / 1e6
            row["t_in"], row["t_out"] = decision["t_received_ns"] / 1e6, decision["t_decided_ns"] / 1e6
        own = stages.get(str(key), {})
        row.update({k: own[k] for k in ("latency_ms", "prepare", "infer", "decide") if k in own})
        rows.append(row)
    return rows


def print_daemon_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    offered = f"{args.load:.0%} of each daemon's own bare rate" if not args.daemon_rate else f"{args.daemon_rate} Hz"
    print(f"\ndaemon: raw frames over loopback at {offered}, {args.daemon_frames} frames per run, ", end="")
    print("a fresh daemon per run")
    print(f"{'checkout':<16}{'run':>4}{'rate Hz':>8}{'bare in-proc':>20}{'e2e p50':>8}{'e2e p99':>8}", end="")
    print(f"{'overhead':>9}{'paired':>8}{'paced (idle)':>15}{'over':>8}{'paired':>8}", end="")
    print(f"{'inside p50':>11}{'hops in/out':>12}", end="")
    print(f"{'decided':>8}{'worker p50':>11}{'vs worker':>10}", end="")
    print(f"{'cpu/frame bare':>15}{'daemon':>7}{'RSS MB':>7}")
    for name, rows in results.items():
        for i, row in enumerate(rows, 1):
            spread = f"{min(row['bare']):.0f}-{max(row['bare']):.0f}"
            print(
                f"{name:<16}{i:>4}{row['rate']:>8.2f}{row['bare_p50']:>11.1f} ({spread:>7}){row['p50']:>8.1f}"
                f"{row['p99']:>8.1f}{100 * (row['p50'] / row['bare_p50'] - 1):>+8.1f}%{_pct(row.get('paired'))}"
                f"{_paced(row)}{_fmt(row['inside'], 11)}{_hops(row['frames'])}"
                f"{row['decided']:>5}/{row['sent']:<2}{row['worker_p50']:>11.1f}"
                f"{100 * (row['p50'] / row['worker_p50'] - 1):>+9.1f}%{row['bare_cpu']:>15.0f}{row['cpu']:>7.0f}"
                f"{row['rss_mb']:>7.0f}"
            )
    print("(bare in-proc: bare predict's p50 in the daemon's own process, over its blocks before, between and after")
    print(" the blocks of frames (the blocks' own medians, lowest-highest); overhead: e2e p50 over it. worker p50 /")
    print(" vs worker: bare predict in the separate worker process just before, the earlier comparison. paired: the")
    print(" median over frames of e2e over the mean of the bare blocks just before and after the frame's block, less")
    print(" one. paced (idle): bare predict with the idle time the served frames have before each (the period less")
    print(" the first block's bare p50; in brackets, ms) in a block after each back-to-back one; over: e2e p50 over")
    print(" its p50; paired: as above, against the paced blocks. The paced blocks carry what idling between frames")
    print(" costs this machine (caches, wake-ups), which back-to-back bare predict never pays, so that over it is")
    print(" what the daemon itself adds. inside p50: frame arrival to decision as the daemon measured it; hops:")
    print(" sender to the daemon's intake and the daemon's decision to the sender, medians. cpu/frame: CPU ms of")
    print(" every thread of the daemon's process per frame, bare predict and serving; RSS: its resident memory at the")
    print(" end)")


def print_threads(results: dict[str, list[dict]]) -> None:
    """CPU ms and minor faults per frame by thread group: bare predict and serving, in the same process."""
    for name, rows in results.items():
        groups = sorted({g for row in rows for g in (*row["threads_bare"], *row["threads_daemon"])})
        print(f"\n{name}: per frame by thread, median over runs, bare predict -> serving (same process)")
        print(f"  {'thread':<24}{'CPU ms':>18}{'of it system ms':>20}{'minor faults':>18}")
        for group in groups:
            b = [statistics.median(row["threads_bare"].get(group, (0.0,) * 3)[i] for row in rows) for i in range(3)]
            d = [statistics.median(row["threads_daemon"].get(group, (0.0,) * 3)[i] for row in rows) for i in range(3)]
            if max(b[0], d[0]) >= 0.5:
                cells = f"{b[0]:>9.1f} ->{d[0]:>6.1f}{b[2]:>12.1f} ->{d[2]:>6.1f}{b[1]:>10.0f} ->{d[1]:>6.0f}"
                print(f"  {group:<24}{cells}")
        stages = {k: statistics.median(r["bare_stages"][k] for r in rows) for k in rows[0]["bare_stages"]}
        served = {k: _median_or_nan([f[k] for r in rows for f in r["frames"] if k in f]) for k in STAGES[:3]}
        print("  stage p50 ms, bare predict: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        print("  stage p50 ms, serving:      " + ", ".join(f"{k} {v:.1f}" for k, v in served.items()))


def _median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_slowest(results: dict[str, list[dict]], count: int = 3) -> None:
    """The slowest frames of each run and where their time went (the p99 frames)."""
    for name, rows in results.items():
        print(f"\n{name}: slowest {count} frames per run, e2e (hop in, inside: prepare + infer + decide, rest =")
        print("  waits, hop out)")
        for i, row in enumerate(rows, 1):
            worst = sorted(row["frames"], key=lambda f: -f["e2e"])[:count]
            cells = []
            for f in worst:
                parts = [f.get(k, 0.0) for k in ("prepare", "infer", "decide")]
                rest = f.get("latency_ms", 0.0) - sum(parts)
                stages = "+".join(f"{p:.0f}" for p in parts)
                inside = f"{f.get('latency_ms', 0.0):.0f}: {stages}, {rest:+.0f}"
                cells.append(f"{f['e2e']:.0f} ({f.get('hop_in', 0.0):.0f}, {inside}, {f.get('hop_out', 0.0):.0f})")
            print(f"  run {i}: " + "; ".join(cells))


def print_overlap(results: dict[str, list[dict]]) -> None:
    """Frames that arrived while the one before was still being inspected, and their stages beside the rest's:
    what pipelining costs the frame that waits (its prepare runs beside the other's inference)."""
    print("\nframes arriving while the previous one was in flight: share, then stage p50 ms (overlapped / alone)")
    for name, rows in results.items():
        for i, row in enumerate(rows, 1):
            frames = sorted((f for f in row["frames"] if "t_in" in f), key=lambda f: f["t_in"])
            late = {id(b) for a, b in itertools.pairwise(frames) if b["t_in"] < a["t_out"]}
            cells = []
            for stage in ("prepare", "infer", "latency_ms"):
                over = [f[stage] for f in frames if id(f) in late and stage in f]
                alone = [f[stage] for f in frames if id(f) not in late and stage in f]
                cells.append(f"{stage} {_median_or_nan(over):.0f} / {_median_or_nan(alone):.0f}")
            print(f"  {name:<14} run {i}: {len(late)}/{len(frames)}; " + ", ".join(cells))


def _paced(row: dict, width: int = 31) -> str:
    """The paced bare reference's cells (rows from before it existed: blank)."""
    if "paced_p50" not in row:
        return " " * width
    cell = f"{row['paced_p50']:.1f} ({row['pause_ms']:>3.0f})"
    return f"{cell:>15}{100 * (row['p50'] / row['paced_p50'] - 1):>+7.1f}%{_pct(row.get('paired_paced'))}"


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, every thread (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(value: float | None, width: int = 8) -> str:
    return f"{'–':>{width}}" if value is None else f"{100 * value:>+{width - 1}.1f}%"


def _hops(frames: list[dict], width: int = 12) -> str:
    """Median ms of the frame's hop in and the decision's hop out, ``in/out``."""
    hop_in, hop_out = ([f[k] for f in frames if k in f] for k in ("hop_in", "hop_out"))
    if not (hop_in and hop_out):
        return f"{'–':>{width}}"
    return f"{statistics.median(hop_in):.1f}/{statistics.median(hop_out):.1f}".rjust(width)


def _inside_p50(decisions: Iterable[dict]) -> float | None:
    """Median over frames of the daemon's own latency: frame received to decision made (``latency_ms``)."""
    inside = [d["latency_ms"] for d in decisions if isinstance(d.get("latency_ms"), int | float)]
    return statistics.median(inside) if inside else None


def run_fits(args: argparse.Namespace, checkouts: dict[str, Path]) -> dict[str, Path]:
    """``inspectd fit`` under each checkout: wall time, peak resident memory; the bundles compared."""
    models, rows = {}, []
    for name, checkout in checkouts.items():
        out = args.workdir / f"model-{name}"
        if out.exists():
            shutil.rmtree(out)
        argv = [sys.executable, "-m", "daemon.cli", "fit", str(args.fit), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        print(f"fitting with the {name} checkout ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status:
            raise SystemExit(f"{name} fit failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        models[name] = out
        rows.append((name, wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime))
    print(f"\n{'fit':<10}{'wall':>10}{'peak MB':>9}{'cpu s':>8}")
    for name, wall, peak, cpu in rows:
        print(f"{name:<10}{int(wall // 60):>6}:{wall % 60:04.1f}{peak:>9.0f}{cpu:>8.1f}")
    if len(rows) == 2:
        compare_bundles(*(models[n] for n in checkouts))
    return models


def compare_bundles(a: Path, b: Path) -> None:
    """reference.npz arrays and calibration of two bundles fitted on the same images."""
    ra, rb = np.load(a / "reference.npz"), np.load(b / "reference.npz")
    worst = {}
    for key in sorted(set(ra.files) & set(rb.files)):
        x, y = ra[key].astype(np.float64), rb[key].astype(np.float64)
        worst[key] = float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)) if x.shape == y.shape else float("inf")
    ca, cb = (json.loads((p / "calibration.json").read_text()) for p in (a, b))
    differing = {k: v for k, v in worst.items() if v > 0}
    print(f"bundles: {len(worst)} reference arrays, {len(worst) - len(differing)} bit-identical", end="")
    if differing:
        key = max(differing, key=differing.get)
        print(f"; largest relative difference {differing[key]:.2e} ({key})", end="")
    print(f"; threshold {ca['threshold']:.6f} vs {cb['threshold']:.6f}")


# ---------------------------------------------------------------------------------------------
def _absolute(text: str) -> Path:
    """A path argument made absolute: the workers and fits run with their checkout as working directory."""
    return Path(text).resolve()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=_absolute, help="bundle for both checkouts (default: --fit's bundles)")
    parser.add_argument("--baseline-model", type=_absolute, help="the baseline's own bundle (default: --model)")
    parser.add_argument("--images", type=_absolute, help="folder of frames (searched recursively)")
    parser.add_argument("--frames", type=int, default=10, help="frames per run (spread over the sorted list)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="commit of the baseline (default %(default)s)")
    parser.add_argument("--baseline-dir", type=_absolute, help="an existing checkout to use as the baseline")
    parser.add_argument("--no-baseline", action="store_true", help="this checkout only")
    parser.add_argument("--floor-repeats", type=int, default=10)
    parser.add_argument("--sessions", action="store_true", help="ONNX Runtime session options table")
    parser.add_argument("--nodes", action="store_true", help="ONNX Runtime's profiler: time per op type, one tile")
    parser.add_argument("--daemon", action="store_true", help="both daemons at --load of their bare rate")
    parser.add_argument("--daemon-frames", type=int, default=30)
    parser.add_argument(
        "--daemon-blocks",
        type=int,
        default=3,
        help="the frames in this many blocks, bare predict timed before, between and after them (default 3)",
    )
    parser.add_argument(
        "--daemon-transport",
        nargs="+",
        choices=("tcp", "ipc", "shm"),
        default=["tcp"],
        help="how frames and decisions travel: loopback TCP (default), ipc (a Unix socket: a grabber on the same "
        "host) and/or shm (ipc, the frames in the daemon's shared-memory slots; checkouts that have them); each "
        "runs in every run, interleaved",
    )
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--daemon-rate", type=float, help="one frame rate (Hz) for both daemons instead of --load")
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        type=_variant,
        metavar="LABEL:NAME=VALUE,...",
        help="a daemon variant: these environment variables (repeatable; 'LABEL:' alone is the daemon as it is); "
        "every variant of every checkout runs in each run, interleaved",
    )
    parser.add_argument("--fit", type=_absolute, help="a dataset to fit under each checkout (time, memory)")
    parser.add_argument("--workdir", type=_absolute, help="bundles, logs, the baseline (default: temporary)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--maps", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image-list", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.image_list, args.maps)
        return 0
    if args.images is None or (args.model is None and args.fit is None):
        parser.error("give --images and --model (or --fit)")
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="frame_path-")))
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; {_cores()} cores")
        checkouts = {}
        if not args.no_baseline:
            checkouts["baseline"] = stack.enter_context(baseline_checkout(args, args.workdir))
        checkouts["new"] = REPO
        models = run_fits(args, checkouts) if args.fit else {}
        if args.model:
            models = {"baseline": args.baseline_model or args.model, "new": args.model}
        images = pick_images(args.images, args.frames)
        from engines.decode import read_image

        floors = measure_floors(read_image(images[0]), args.floor_repeats)
        workers: dict[str, Worker] = {}
        for name, checkout in checkouts.items():
            maps = args.workdir / f"maps-{name}"
            maps.mkdir(exist_ok=True)
            workers[name] = stack.enter_context(contextlib.closing(Worker(name, checkout, models[name], images, maps)))
        names = ", ".join(p.relative_to(args.images).as_posix() for p in images)
        print(f"{len(images)} frames x {args.runs} runs: {names}")
        samples, identity = run_frames(workers, len(images), args.runs)
        floors_after = measure_floors(read_image(images[0]), args.floor_repeats)
        floors = {k: statistics.median([floors[k], floors_after[k]]) for k in floors}
        print_floors(floors)
        print_stage_table(samples, floors, list(workers))
        ok = print_identity(identity) if identity else True
        memory = {name: w.ask(op="peak") for name, w in workers.items()}
        print("resident memory of the frame-path workers, peak (loading and activation included) / after the frames: ")
        print("  " + ", ".join(f"{k} {v['peak_mb']:.0f} / {v['now_mb']:.0f} MB" for k, v in memory.items()))
        if args.nodes:
            print_nodes({name: w.ask(op="nodes", repeats=20)["ops"] for name, w in workers.items()})
        if args.sessions:
            print_sessions(workers["new"].ask(op="sessions", repeats=max(3, args.runs))["rows"])
        if args.daemon:
            run_daemons(args, workers, checkouts, models)
        for w in workers.values():
            w.close()
        print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0 if ok else 1


if __name__ == "__main__":
    threading.current_thread().name = "frame_path"
    sys.exit(main())
