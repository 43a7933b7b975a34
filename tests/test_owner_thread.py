"""OwnerThreadBackend: whichever threads call it, the wrapped backend works on one private thread.

The TensorRT case runs against the in-process TensorRT/pycuda emulation (tests/emulation), which
checks the CUDA-context thread rule like the real backend does; it proves nothing about a GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engines.backend import Backend, BackendError, TensorSpec
from engines.owner_thread import OwnerThreadBackend
from tests.emulation import install, toy_expected, toy_inputs, write_toy_graph


class RecordingBackend(Backend):
    """A trivial backend that records the thread of every call it receives."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(Path("recording.onnx"))
        self.threads: list[int] = [threading.get_ident()]
        self._inputs = {"x": TensorSpec("x", np.dtype(np.float32), (-1, 2))}
        self._outputs = {"y": TensorSpec("y", np.dtype(np.float32), (-1, 2))}

    def _activate_impl(self, resident: dict[str, np.ndarray]) -> None:
        self.threads.append(threading.get_ident())

    def _infer_impl(self, feeds, tiles):
        self.threads.append(threading.get_ident())
        if not np.all(np.isfinite(feeds["x"])):
            raise BackendError("recording: non-finite input")
        return {"y": feeds["x"] * 2}

    def _deactivate_impl(self) -> None:
        self.threads.append(threading.get_ident())


def test_every_call_runs_on_one_private_thread() -> None:
    """Construction, activation, inference from two caller threads and deactivation share one thread."""
    proxy = OwnerThreadBackend(RecordingBackend)
    proxy.activate()
    results = []
    callers = [threading.Thread(target=lambda: results.append(proxy.infer({"x": np.ones((1, 2), np.float32)})))]
    callers.append(threading.Thread(target=lambda: results.append(proxy.infer({"x": np.ones((3, 2), np.float32)}))))
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    proxy.close()
    inner = proxy.inner
    assert len(set(inner.threads)) == 1 and inner.threads[0] != threading.get_ident()
    assert len(inner.threads) == 5 and sorted(len(r["y"]) for r in results) == [1, 3]


def test_errors_reach_the_caller() -> None:
    """An exception raised on the owner thread is raised in the calling thread, and the proxy stays usable."""
    proxy = OwnerThreadBackend(RecordingBackend)
    proxy.activate()
    with pytest.raises(BackendError, match="non-finite"):
        proxy.infer({"x": np.full((1, 2), np.nan, np.float32)})
    assert proxy.infer({"x": np.ones((1, 2), np.float32)})["y"].tolist() == [[2.0, 2.0]]
    proxy.close()


def emulated_plan(monkeypatch, tmp_path: Path) -> Path:
    """Install the TensorRT 11 emulation and build a plan of the toy FP16 graph (max batch 4)."""
    install(monkeypatch, major=11)
    from engines.trt_build import build_engine

    graph = write_toy_graph(tmp_path / "graph_fp16.onnx", fp16=True)
    plan = tmp_path / "engine.plan"
    build_engine(graph, plan, max_batch=4, workspace_mb=64, timing_cache=None)
    return plan


def test_emulated_tensorrt_loaded_on_one_thread_and_run_from_another(monkeypatch, tmp_path) -> None:
    """A TensorRT backend activated from a loader thread serves infer_many from an engine thread."""
    plan = emulated_plan(monkeypatch, tmp_path)
    from engines.tensorrt_backend import TensorRTBackend

    data = toy_inputs(np.random.default_rng(3), 6, 6)
    box: dict[str, OwnerThreadBackend] = {}

    def load() -> None:
        box["backend"] = OwnerThreadBackend(lambda: TensorRTBackend(plan))
        box["backend"].activate({"reference": data["reference"]})

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    backend = box["backend"]
    jobs = [({"image": data["image"][a:b], "photo": data["photo"][a:b]}, range(a, b)) for a, b in ((0, 4), (4, 6))]
    out: list = []
    engine_thread = threading.Thread(target=lambda: out.extend(backend.infer_many(jobs)))
    engine_thread.start()
    engine_thread.join()
    backend.close()
    for (feeds, tiles), result in zip(jobs, out, strict=True):
        wanted = toy_expected(**feeds, reference=data["reference"][tiles.start : tiles.stop])
        np.testing.assert_allclose(result["anomaly"].astype(np.float64), wanted, rtol=2e-3, atol=0.5)


def test_bare_tensorrt_backend_refuses_a_foreign_thread(monkeypatch, tmp_path) -> None:
    """Without the proxy, the (emulated) TensorRT backend refuses work from a thread that did not create it."""
    plan = emulated_plan(monkeypatch, tmp_path)
    from engines.tensorrt_backend import TensorRTBackend

    data = toy_inputs(np.random.default_rng(3), 4, 4)
    box: dict[str, TensorRTBackend] = {}
    loader = threading.Thread(target=lambda: box.setdefault("backend", TensorRTBackend(plan)))
    loader.start()
    loader.join()
    with pytest.raises(BackendError, match="thread"):
        box["backend"].activate({"reference": data["reference"]})
