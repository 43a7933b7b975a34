"""ONNX Runtime backend: the CPU path, and the reference the other backends are checked against."""

from __future__ import annotations

import os
from collections.abc import Mapping
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


class OnnxRuntimeBackend(Backend):
    """Runs the graph with ONNX Runtime's CPU provider; resident inputs stay in host memory."""

    name = "onnxruntime"

    def __init__(self, graph_path: Path, threads: int | None = None) -> None:
        super().__init__(graph_path)
        if not self.graph_path.is_file():
            raise BackendError(f"{self.graph_path}: graph file not found")
        self._threads = threads or min(os.cpu_count() or 1, 8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(self.graph_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception zoo
            raise BackendError(f"{self.graph_path}: ONNX Runtime cannot load the graph: {exc}") from exc
        self._inputs = {a.name: _spec(a) for a in self._session.get_inputs()}
        self._outputs = {a.name: _spec(a) for a in self._session.get_outputs()}
        self._resident: dict[str, np.ndarray] = {}

    def _activate_impl(self, resident: dict[str, np.ndarray]) -> None:
        # Contiguous once here, so each batch below is a zero-copy slice.
        self._resident = {k: np.ascontiguousarray(v) for k, v in resident.items()}

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

    def _deactivate_impl(self) -> None:
        self._resident = {}
