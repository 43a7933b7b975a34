"""The TensorRT and pycuda *emulation* itself, and the GPU-only code run on it (no GPU involved).

The GPU suite's pycuda helper and the GPU benchmark normally run only on a GPU machine; here they
run on the emulated driver, so their pycuda calls are exercised (and recorded by the real-binding
check, ``tests/test_real_bindings.py``) on every machine. The emulation's behaviour where it once
differed from the real bindings is pinned here too, so a regression shows without the wheels.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.emulation import fake_pycuda, install
from tests.emulation.fake_tensorrt import make_module
from tests.helpers import load_benchmark


def test_gpu_suite_pipeline_runs_on_the_emulated_driver(monkeypatch, tmp_path) -> None:
    """tests/gpu's pipeline check and its pycuda device (get_current, memcpy_dtoh) on the emulated driver."""
    from tests.gpu.test_tensorrt_gpu import RealPycudaDevice, check_pipeline, cuda_or_skip

    install(monkeypatch)
    cuda = cuda_or_skip()  # the emulated driver: import, init and device count as on a GPU machine
    check_pipeline(cuda, monkeypatch, tmp_path)
    with pytest.raises(cuda.LogicError, match="no current CUDA context"):
        RealPycudaDevice(cuda).require_context("enqueueV3")


def test_gpu_benchmark_runs_on_the_emulation(monkeypatch, capsys) -> None:
    """benchmarks/gpu.py on a small toy frame: the TensorRT rows and the pycuda pinned-copy row run (no speed)."""
    install(monkeypatch, major=10)
    module = load_benchmark("gpu", "gpu_benchmark")
    argv = ["--size", "48", "--core", "16", "--halo", "4", "--batches", "2", "--frames", "1", "--skip-cpu"]
    assert module.main(argv) == 0
    rows = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "not available" not in rows["tensorrt"], rows
    assert "pinned copies (pycuda)" in rows, rows


@pytest.mark.parametrize("major", [10, 11])
def test_emulated_tensorrt_refuses_what_pybind11_refuses(major) -> None:
    """An int severity, an int pool, ints for shapes: TypeError before anything runs, as in the real bindings."""
    trt = make_module(major)
    with pytest.raises(TypeError, match="incompatible"):
        trt.Logger(2)
    config = trt.IBuilderConfig.__new__(trt.IBuilderConfig)
    with pytest.raises(TypeError, match="incompatible"):
        config.set_memory_pool_limit(0, 1 << 20)
    profile = trt.IOptimizationProfile.__new__(trt.IOptimizationProfile)
    with pytest.raises(TypeError, match="incompatible"):
        profile.set_shape("x", 1, 2, 3)
    assert trt.Logger(trt.Logger.ERROR).min_severity is trt.ILogger.Severity.ERROR


@pytest.mark.parametrize("major", [10, 11])
def test_emulated_enums_carry_the_real_values(major) -> None:
    """Values as compiled into 10.13 and 11.4 (11.x renumbered the network flags and dropped FP16)."""
    trt = make_module(major)
    assert [int(trt.DataType[n]) for n in ("UINT8", "INT8", "INT32", "INT64", "BOOL")] == [5, 2, 3, 8, 4]
    assert int(trt.MemoryPoolType.TACTIC_DRAM) == 4
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == (1 if major == 10 else 0)
    assert hasattr(trt.BuilderFlag, "FP16") == (major == 10)
    assert trt.Logger.WARNING != 2  # a pybind11 enum member is not an int


def test_emulated_engine_returns_dims_and_nptype_raises_typeerror(monkeypatch, tmp_path) -> None:
    """get_tensor_shape gives Dims (equal to a tuple, not a tuple); nptype refuses BF16 with TypeError."""
    from engines.trt_build import build_engine
    from tests.emulation import write_toy_graph

    trt, _ = install(monkeypatch)
    build_engine(write_toy_graph(tmp_path / "g.onnx"), tmp_path / "a.plan", 2, 64, None)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine((tmp_path / "a.plan").read_bytes())
    shape = engine.get_tensor_shape("image")
    assert type(shape) is trt.Dims and shape == (-1, 1, 8, 8) and not isinstance(shape, tuple)
    profile = engine.get_tensor_profile_shape("image", 0)
    assert [type(d) for d in profile] == [trt.Dims] * 3 and profile[2][0] == 2
    assert trt.nptype(trt.DataType.HALF) is np.float16
    with pytest.raises(TypeError):
        trt.nptype(trt.DataType.BF16)


def test_driver_module_carries_only_the_driver_api(monkeypatch) -> None:
    """The installed pycuda.driver has pycuda's names; the emulation's test helpers stay on fake_pycuda."""
    _, cuda = install(monkeypatch)
    assert sorted(dir(cuda)) == sorted(fake_pycuda.DRIVER_API)
    assert not hasattr(cuda, "live_device_allocations")
    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    assert cuda.Context.get_current() is None
    context.push()
    try:
        assert cuda.Context.get_current() is context
        device = cuda.mem_alloc(4)
        cuda.memcpy_htod(device, np.arange(4, dtype=np.uint8))
        back = np.zeros(4, np.uint8)
        cuda.memcpy_dtoh(back, device)
        assert back.tolist() == [0, 1, 2, 3]
        device.free()
    finally:
        cuda.Context.pop()
