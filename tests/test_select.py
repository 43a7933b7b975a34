"""Backend selection: clear failures without TensorRT, and the ``auto`` fallback (emulated GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines.backend import BackendError
from engines.onnxruntime_backend import OnnxRuntimeBackend
from engines.owner_thread import OwnerThreadBackend
from engines.tensorrt_backend import INSTALL_HINT
from tests.emulation import hide, install, write_toy_graph


class RecordingLog:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.records.append(("warning", event, fields))

    def info(self, event: str, **fields) -> None:
        self.records.append(("info", event, fields))


@pytest.fixture
def graphs(tmp_path) -> tuple[Path, Path]:
    """The FP32 and FP16 toy graphs in one bundle-like directory."""
    return write_toy_graph(tmp_path / "graph_fp32.onnx", fp16=False), write_toy_graph(tmp_path / "graph_fp16.onnx")


def test_tensorrt_without_packages_fails_clearly(monkeypatch, graphs) -> None:
    """kind=tensorrt without tensorrt/pycuda raises the install hint, nothing else."""
    from engines.select import create_backend

    hide(monkeypatch)
    with pytest.raises(BackendError) as caught:
        create_backend("tensorrt", *graphs)
    assert str(caught.value) == INSTALL_HINT


def test_tensorrt_backend_constructor_without_packages_fails_clearly(monkeypatch, tmp_path) -> None:
    """Constructing TensorRTBackend without the packages raises the install hint."""
    from engines.tensorrt_backend import TensorRTBackend

    hide(monkeypatch)
    with pytest.raises(BackendError, match=r"pip install 'inspectd\[tensorrt\]'"):
        TensorRTBackend(tmp_path / "engine.plan")


def test_auto_falls_back_to_onnxruntime_and_logs_why(monkeypatch, graphs) -> None:
    """kind=auto without TensorRT returns ONNX Runtime on the FP32 graph and logs the reason."""
    from engines.select import create_backend

    hide(monkeypatch)
    log = RecordingLog()
    backend = create_backend("auto", *graphs, log=log)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.graph_path == graphs[0]
    ((level, event, fields),) = log.records
    assert (level, event, fields["using"]) == ("warning", "backend_fallback", "onnxruntime")
    assert "pip install" in fields["reason"]


def test_auto_without_gpu_falls_back(monkeypatch, graphs) -> None:
    """With the packages but no CUDA device, auto falls back and says so."""
    from engines.select import create_backend, gpu_available

    install(monkeypatch, device_count=0)
    assert gpu_available() == (False, "the CUDA driver reports no device")
    log = RecordingLog()
    assert isinstance(create_backend("auto", *graphs, log=log), OnnxRuntimeBackend)
    assert "needs a CUDA GPU" in log.records[0][2]["reason"]


def test_tensorrt_without_plan_says_how_to_build(monkeypatch, graphs) -> None:
    """kind=tensorrt with no plan in the bundle points at inspectd build-engine."""
    from engines.select import create_backend

    install(monkeypatch)
    with pytest.raises(BackendError, match="no TensorRT plan; build one with: inspectd build-engine"):
        create_backend("tensorrt", *graphs)


def test_tensorrt_with_default_plan_is_chosen(monkeypatch, graphs) -> None:
    """With a plan at the default path built for this machine, both tensorrt and auto use it."""
    from engines.select import create_backend
    from engines.tensorrt_backend import TensorRTBackend
    from engines.trt_build import build_engine, default_plan_path

    install(monkeypatch)
    build_engine(graphs[1], default_plan_path(graphs[1].parent), max_batch=2, workspace_mb=64, timing_cache=None)
    chosen = create_backend("tensorrt", *graphs)
    assert isinstance(chosen, OwnerThreadBackend) and isinstance(chosen.inner, TensorRTBackend)
    log = RecordingLog()
    assert isinstance(create_backend("auto", *graphs, log=log).inner, TensorRTBackend)
    assert log.records[0][1] == "backend_selected"


def test_mismatched_plan_is_refused_or_skipped(monkeypatch, graphs, tmp_path) -> None:
    """A plan for another GPU fails kind=tensorrt and makes auto fall back, naming the GPU."""
    from engines.select import create_backend
    from engines.trt_build import build_engine

    install(monkeypatch)
    plan = tmp_path / "other.plan"
    build_engine(graphs[1], plan, max_batch=2, workspace_mb=64, timing_cache=None)
    sidecar = Path(f"{plan}.json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "gpu_name": "Jetson Orin"}))
    with pytest.raises(BackendError, match="GPU: plan has Jetson Orin"):
        create_backend("tensorrt", *graphs, plan=plan)
    log = RecordingLog()
    assert isinstance(create_backend("auto", *graphs, plan=plan, log=log), OnnxRuntimeBackend)
    assert "Jetson Orin" in log.records[0][2]["reason"]


def test_unknown_kind_is_refused(graphs) -> None:
    """An unknown backend name raises BackendError listing the valid ones."""
    from engines.select import create_backend

    with pytest.raises(BackendError, match="auto, onnxruntime, tensorrt"):
        create_backend("cuda", *graphs)


def test_gpu_available_without_pycuda(monkeypatch) -> None:
    """gpu_available() reports False with a reason instead of raising."""
    from engines.select import gpu_available

    hide(monkeypatch)
    ok, why = gpu_available()
    assert not ok and "pycuda" in why


def test_every_engines_module_imports_without_tensorrt() -> None:
    """Each engines module imports in a fresh interpreter where tensorrt and pycuda cannot load."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules.update({'tensorrt': None, 'pycuda': None, 'pycuda.driver': None})\n"
        "import engines\n"
        "for info in pkgutil.iter_modules(engines.__path__):\n"
        "    importlib.import_module('engines.' + info.name)\n"
        "assert 'torch' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
