"""Real-GPU checks of the TensorRT path (``pytest -m gpu tests/gpu``); skipped without a GPU.

Accuracy contract, FP16 plan against ONNX Runtime on the FP32 graph, same inputs:
relative error ||trt - ort||_2 / ||ort||_2 <= 1e-2, and max absolute error
<= 1e-2 * max(|ort|) + 1e-3 (both are printed). A bundle (8-bit; any detector) is tested when
INSPECTD_GPU_BUNDLE names a fitted bundle directory, through two Inspectors on the same
prepared frames: its reference mean with noise, and with a bright 6x6 px dot.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engines.onnxruntime_backend import OnnxRuntimeBackend
from tests.emulation import fake_tensorrt, toy_expected, toy_inputs, write_toy_graph

pytestmark = pytest.mark.gpu
REL_TOL = 1e-2


def cuda_or_skip():
    """pycuda.driver with at least one CUDA device, else skip."""
    cuda = pytest.importorskip("pycuda.driver")
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        pytest.skip(f"no usable CUDA driver: {exc}")
    if count < 1:
        pytest.skip("no CUDA device")
    return cuda


@pytest.fixture
def real_trt():
    """The real tensorrt module on a machine with a CUDA device."""
    trt = pytest.importorskip("tensorrt")
    cuda_or_skip()
    return trt


def compare(trt_out: np.ndarray, ort_out: np.ndarray) -> tuple[float, float]:
    """(max abs error, relative L2 error) of the TensorRT output against the FP32 reference."""
    diff = trt_out.astype(np.float64) - ort_out.astype(np.float64)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ort_out.astype(np.float64)), 1e-12))
    return float(np.abs(diff).max()), rel


def assert_accurate(trt_out: np.ndarray, ort_out: np.ndarray) -> None:
    max_abs, rel = compare(trt_out, ort_out)
    print(f"max abs error {max_abs:.4g}, relative error {rel:.4g}")
    assert rel <= REL_TOL
    assert max_abs <= REL_TOL * float(np.abs(ort_out).max()) + 1e-3


def run_both(plan: Path, graph_fp32: Path, resident: dict, batches: list) -> tuple[list, list]:
    from engines.tensorrt_backend import TensorRTBackend

    with TensorRTBackend(plan) as gpu, OnnxRuntimeBackend(graph_fp32) as cpu:
        gpu.activate(resident)
        cpu.activate(resident)
        got = gpu.infer_many(batches)
        print("timings (ms):", {k: round(v, 3) for k, v in gpu.last_timings_ms.items()})
        want = [cpu.infer(feeds, tiles) for feeds, tiles in batches]
    return got, want


def test_toy_engine_matches_onnxruntime_fp32(real_trt, tmp_path) -> None:
    """An FP16 engine built from the toy graph agrees with ONNX Runtime FP32 within 1e-2."""
    from engines.trt_build import build_engine

    fp16 = write_toy_graph(tmp_path / "graph_fp16.onnx")
    fp32 = write_toy_graph(tmp_path / "graph_fp32.onnx", fp16=False)
    build_engine(fp16, tmp_path / "toy.plan", max_batch=4, workspace_mb=256, timing_cache=None)
    data = toy_inputs(np.random.default_rng(0), 10, 10)
    batches = [({k: data[k][s : s + 4] for k in ("image", "photo")}, range(s, min(s + 4, 10))) for s in (0, 4, 8)]
    got, want = run_both(tmp_path / "toy.plan", fp32, {"reference": data["reference"]}, batches)
    for g, w in zip(got, want, strict=True):
        assert_accurate(g["anomaly"], w["anomaly"])


def test_bundle_engine_matches_onnxruntime_fp32(real_trt, tmp_path) -> None:
    """Near the reference, the bundle's FP16 engine gives ONNX Runtime's FP32 map within 1e-2, and its verdict."""
    from engines.bundle import Bundle
    from engines.inspector import Inspector
    from engines.tensorrt_backend import TensorRTBackend
    from engines.trt_build import build_engine

    bundle_dir = os.environ.get("INSPECTD_GPU_BUNDLE")
    if not bundle_dir:
        pytest.skip("set INSPECTD_GPU_BUNDLE to a fitted bundle directory")
    bundle = Bundle.load(Path(bundle_dir))
    plan = tmp_path / "bundle.plan"
    build_engine(bundle.file("graph_fp16.onnx"), plan, max_batch=4, workspace_mb=2048, timing_cache=None)
    mean = bundle.reference()["mu"].astype(np.float32)
    image = mean[0] if mean.shape[0] == 1 else np.moveaxis(mean, 0, -1)
    rng = np.random.default_rng(1)
    frames = [image + rng.normal(0, 2, image.shape), image]
    frames[1][image.shape[0] // 2 : image.shape[0] // 2 + 6, image.shape[1] // 3 : image.shape[1] // 3 + 6] += 60
    with (
        Inspector(bundle, TensorRTBackend(plan), batch=4) as gpu,
        Inspector(bundle, OnnxRuntimeBackend(bundle.file("graph_fp32.onnx"))) as cpu,
    ):
        for frame in frames:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            prepared = cpu.prepare(frame)
            got, want = gpu.infer(prepared), cpu.infer(prepared)
            assert_accurate(got, want)
            assert gpu.decide(prepared, got).verdict == cpu.decide(prepared, want).verdict


class RealPycudaDevice:
    """Lets the TensorRT *emulation* run on real pycuda memory: every enqueue waits for the device."""

    def __init__(self, cuda) -> None:
        self.cuda = cuda

    def require_context(self, what: str) -> None:
        if self.cuda.Context.get_current() is None:
            raise self.cuda.LogicError(f"{what}: no current CUDA context")

    def enqueue(self, stream_handle: int, job) -> None:
        self.cuda.Context.synchronize()  # pycuda has no host callbacks: run now, after queued copies
        job()

    def read(self, pointer: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        self.cuda.memcpy_dtoh(out, pointer)
        return out

    def write(self, pointer: int, data: np.ndarray) -> None:
        self.cuda.memcpy_htod(pointer, np.ascontiguousarray(data))


def test_pipeline_on_real_pycuda_with_emulated_tensorrt(monkeypatch, tmp_path) -> None:
    """Real pycuda (context, pinned and device buffers, streams, events) under the emulated TensorRT."""
    check_pipeline(cuda_or_skip(), monkeypatch, tmp_path)


def check_pipeline(cuda, monkeypatch, tmp_path) -> None:
    """Build, activate twice, run batches and deactivate on ``cuda`` (real, or the emulated driver on a CPU)."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module(11, device=RealPycudaDevice(cuda)))
    from engines.tensorrt_backend import TensorRTBackend
    from engines.trt_build import build_engine

    graph = write_toy_graph(tmp_path / "graph_fp16.onnx")
    meta = build_engine(graph, tmp_path / "e.plan", max_batch=4, workspace_mb=64, timing_cache=None)
    assert meta["gpu_name"] == cuda.Device(0).name()
    data = toy_inputs(np.random.default_rng(3), 11, 11)
    ranges = [range(s, min(s + 4, 11)) for s in range(0, 11, 4)]
    batches = [({k: data[k][r.start : r.stop] for k in ("image", "photo")}, r) for r in ranges]
    backend = TensorRTBackend(tmp_path / "e.plan")
    for _ in range(2):  # activation is repeatable
        backend.activate({"reference": data["reference"]})
        outs = backend.infer_many(batches)
        for (feeds, tiles), out in zip(batches, outs, strict=True):
            want = toy_expected(**feeds, reference=data["reference"][tiles.start : tiles.stop])
            np.testing.assert_allclose(out["anomaly"].astype(np.float64), want, rtol=2e-3, atol=0.5)
        print("timings (ms):", {k: round(v, 3) for k, v in backend.last_timings_ms.items()})
        backend.deactivate()
        assert cuda.Context.get_current() is None
