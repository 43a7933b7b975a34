"""ONNX Runtime backend: the CPU path, and the reference the other backends are checked against.

A frame is many tiles, and the tiles are independent, so the cores are used by running tiles
side by side (``infer_many``: one tile per worker, each worker taking the next tile when it is
done), each run single-threaded. ONNX Runtime's own intra-op parallelism splits every one of the
graph's ~60 nodes across the cores and waits at each node for the slowest thread: on a machine
whose cores are shared (with the daemon's other stages, or other processes) one descheduled
thread stalls the node, and with spinning enabled the waiting threads burn the very core the
stalled one needs (measured on 2 busy cores: twice the CPU time for the same tiles; see
``benchmarks/frame_path.py --sessions``). Intra-op threads are used only where there are fewer
tiles than cores.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.backend import Backend, BackendError, TensorSpec

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
}


def _spec(arg: ort.NodeArg) -> TensorSpec:
    if arg.type not in _ORT_TYPES:
        raise BackendError(f"unsupported tensor type {arg.type} for {arg.name}")
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES[arg.type], shape)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's), at most 8."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, 8))


def session_options(intra_threads: int) -> ort.SessionOptions:
    """The CPU session options (chosen by measurement, ``benchmarks/frame_path.py --sessions``).

    Full graph optimisation, the memory arena and memory patterns on (each measured neutral or
    better); threads never spin: a thread that waits yields its core instead of keeping it busy.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend(Backend):
    """Runs the graph with ONNX Runtime's CPU provider; resident inputs stay in host memory."""

    name = "onnxruntime"

    def __init__(self, graph_path: Path, threads: int | None = None) -> None:
        super().__init__(graph_path)
        if not self.graph_path.is_file():
            raise BackendError(f"{self.graph_path}: graph file not found")
        self._threads = threads or available_cores()
        self._intra = 1
        self._session = self._open(self._intra)
        self._inputs = {a.name: _spec(a) for a in self._session.get_inputs()}
        self._outputs = {a.name: _spec(a) for a in self._session.get_outputs()}
        self._resident: dict[str, np.ndarray] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def threads(self) -> int:
        return self._threads

    def _open(self, intra_threads: int) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.graph_path), sess_options=session_options(intra_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception zoo
            raise BackendError(f"{self.graph_path}: ONNX Runtime cannot load the graph: {exc}") from exc

    def _activate_impl(self, resident: dict[str, np.ndarray]) -> None:
        # Contiguous once here, so each batch below is a zero-copy slice.
        self._resident = {k: np.ascontiguousarray(v) for k, v in resident.items()}
        tile_parallel = self._threads > 1 and (self._n_tiles == 0 or self._n_tiles >= self._threads)
        intra = 1 if tile_parallel or self._threads == 1 else self._threads  # fewer tiles than cores: split nodes
        if intra != self._intra:
            self._session, self._intra = self._open(intra), intra
        if tile_parallel:
            # Created here, started by the first frame's thread, whose priority they inherit (daemon.scheduler).
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="inspectd-tile")

    def _infer_impl(self, feeds: Mapping[str, np.ndarray], tiles: range) -> dict[str, np.ndarray]:
        run_feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        for name, array in self._resident.items():
            run_feeds[name] = array[tiles.start : tiles.stop]
        names = list(self._outputs)
        try:
            values = self._session.run(names, run_feeds)
        except Exception as exc:
            raise BackendError(f"{self.graph_path}: ONNX Runtime failed: {exc}") from exc
        return dict(zip(names, values, strict=True))

    def _infer_many_impl(self, batches: list[tuple[Mapping[str, np.ndarray], range]]) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = [{} for _ in batches]
        self._run_each(batches, results.__setitem__)
        return results

    def infer_each(
        self,
        batches: Sequence[tuple[Mapping[str, np.ndarray], range | None]],
        consume: Callable[[int, dict[str, np.ndarray]], None],
    ) -> None:
        """Each tile's outputs are consumed by the worker that ran it, while they are still in its cache."""
        self._run_each(self._check_batches(batches), consume)

    def _run_each(
        self,
        batches: list[tuple[Mapping[str, np.ndarray], range]],
        consume: Callable[[int, dict[str, np.ndarray]], None],
    ) -> None:
        if self._pool is None or len(batches) < 2:
            for index, (feeds, tiles) in enumerate(batches):
                consume(index, self._infer_impl(feeds, tiles))
            return
        # One loop per worker taking the next batch when done, not one future per batch: a frame of 100 tiles
        # then costs two hand-offs between threads instead of a hundred.
        taken = itertools.count()  # next() of a count is atomic under the GIL
        errors: list[tuple[int, BaseException]] = []

        def work() -> None:
            while (index := next(taken)) < len(batches):
                feeds, tiles = batches[index]
                try:
                    consume(index, self._infer_impl(feeds, tiles))
                except Exception as exc:  # the other batches still run: none runs on unseen
                    errors.append((index, exc))

        loops = [self._pool.submit(work) for _ in range(self._threads)]
        wait(loops)
        for loop in loops:
            loop.result()  # what escaped a loop (not an Exception): raised as it was
        if errors:
            raise min(errors, key=lambda e: e[0])[1]

    def _deactivate_impl(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._resident = {}
