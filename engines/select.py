"""Choose the inference backend: ``tensorrt`` (GPU), ``onnxruntime`` (CPU) or ``auto``.

``auto`` prefers TensorRT and falls back to ONNX Runtime on the FP32 graph, logging
why (packages missing, no GPU, no plan, or a plan built for another TensorRT, GPU or
graph). ``tensorrt`` never falls back: it raises BackendError with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from engines.backend import Backend, BackendError
from engines.owner_thread import OwnerThreadBackend

KINDS = ("auto", "onnxruntime", "tensorrt")


def gpu_available() -> tuple[bool, str]:
    """(True, "GPU name (compute capability x.y)") or (False, why not), without raising."""
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as exc:
        return False, f"pycuda is not importable ({exc})"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return False, "the CUDA driver reports no device"
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        return True, f"{device.name()} (compute capability {major}.{minor})"
    except cuda.Error as exc:
        return False, f"CUDA driver: {exc}"


def create_backend(kind: str, graph_fp32: Path, graph_fp16: Path, plan: Path | None = None, log: Any = None) -> Backend:
    """A backend of ``kind``; ``plan`` defaults to the bundle's plan for this TensorRT and GPU."""
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(KINDS)}")
    log = log or structlog.get_logger("inspectd.engines")
    if kind != "onnxruntime":
        try:
            backend = _tensorrt(Path(graph_fp16), plan)
        except BackendError as exc:
            if kind == "tensorrt":
                raise
            log.warning("backend_fallback", wanted="tensorrt", using="onnxruntime", reason=str(exc))
        else:
            log.info("backend_selected", backend="tensorrt", plan=str(backend.graph_path))
            return backend
    from engines.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(Path(graph_fp32))


def _tensorrt(graph_fp16: Path, plan: Path | None) -> Backend:
    from engines.tensorrt_backend import TensorRTBackend, import_gpu_modules
    from engines.trt_build import check_plan, default_plan_path

    import_gpu_modules()
    ok, why = gpu_available()
    if not ok:
        raise BackendError(f"tensorrt backend needs a CUDA GPU: {why}")
    plan = Path(plan) if plan is not None else default_plan_path(graph_fp16.parent)
    check_plan(plan, graph_fp16)
    # Built and driven on one private thread, whichever threads load the model and run frames.
    return OwnerThreadBackend(lambda: TensorRTBackend(plan))
