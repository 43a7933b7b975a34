"""One conformance suite for every backend: ONNX Runtime, and TensorRT 10.x / 11.x *emulated*.

The TensorRT rows run the real ``engines.tensorrt_backend`` code against the in-process
emulation in ``tests.emulation`` (ONNX Runtime + numpy behind TensorRT's and pycuda's
names). They check the backend's logic, not a GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engines.backend import Backend, BackendError
from engines.onnxruntime_backend import OnnxRuntimeBackend
from tests.emulation import fake_pycuda, install, toy_expected, toy_inputs, write_toy_graph

MAX_BATCH = 4
N_TILES = 10
KINDS = ["onnxruntime", "tensorrt10", "tensorrt11"]


@pytest.fixture(params=KINDS)
def kind(request, monkeypatch) -> str:
    """Each backend kind; the TensorRT kinds install the matching emulation."""
    if request.param.startswith("tensorrt"):
        install(monkeypatch, major=int(request.param.removeprefix("tensorrt")))
    return request.param


def make_backend(kind: str, tmp_path: Path, **options) -> Backend:
    """The backend of ``kind`` on the toy graph (FP16 plan for TensorRT, FP32 graph for ORT)."""
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(write_toy_graph(tmp_path / "graph_fp32.onnx", fp16=False), threads=1)
    from engines.tensorrt_backend import TensorRTBackend
    from engines.trt_build import build_engine

    graph = write_toy_graph(tmp_path / "graph_fp16.onnx", fp16=True)
    plan = tmp_path / "engine.plan"
    build_engine(graph, plan, max_batch=MAX_BATCH, workspace_mb=64, timing_cache=None)
    return TensorRTBackend(plan, **options)


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    """Per-frame feeds for every tile plus the resident reference."""
    return toy_inputs(np.random.default_rng(7), N_TILES, N_TILES)


def frame(data: dict[str, np.ndarray], tiles: range) -> dict[str, np.ndarray]:
    return {"image": data["image"][tiles.start : tiles.stop], "photo": data["photo"][tiles.start : tiles.stop]}


def expected(data: dict[str, np.ndarray], tiles: range) -> np.ndarray:
    return toy_expected(**frame(data, tiles), reference=data["reference"][tiles.start : tiles.stop])


def assert_close(actual: np.ndarray, wanted: np.ndarray) -> None:
    np.testing.assert_allclose(actual.astype(np.float64), wanted, rtol=2e-3, atol=0.5)


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_outputs_have_declared_shape_dtype_and_values(kind, tmp_path, data, batch) -> None:
    """Batch 1 and the maximum batch give outputs of the declared dtype and shape, with correct values."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        tiles = range(2, 2 + batch)
        out = backend.infer(frame(data, tiles), tiles)
        spec = backend.outputs["anomaly"]
        assert set(out) == {"anomaly"}
        assert out["anomaly"].dtype == spec.dtype
        assert out["anomaly"].shape == (batch, *spec.shape[1:])
        assert_close(out["anomaly"], expected(data, tiles))


def test_batch_above_maximum_is_refused(kind, tmp_path, data) -> None:
    """A batch over the plan's maximum raises BackendError; unbounded backends accept it."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        tiles = range(0, MAX_BATCH + 1)
        if backend.max_batch:
            assert backend.max_batch == MAX_BATCH
            with pytest.raises(BackendError, match="exceeds the maximum"):
                backend.infer(frame(data, tiles), tiles)
        else:
            assert_close(backend.infer(frame(data, tiles), tiles)["anomaly"], expected(data, tiles))


def test_resident_inputs_are_served_per_tile_range(kind, tmp_path, data) -> None:
    """Every batch reads the resident rows of its own tile range, including the last partial batch."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        for start in range(0, N_TILES, 3):
            tiles = range(start, min(start + 3, N_TILES))
            assert_close(backend.infer(frame(data, tiles), tiles)["anomaly"], expected(data, tiles))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {**f, "image": f["image"].astype(np.float32)}, "expected uint8"),
        (lambda f: {**f, "image": f["image"][:, :, :4]}, "has shape"),
        (lambda f: {"image": f["image"]}, "missing"),
        (lambda f: {**f, "extra": f["photo"]}, "unexpected"),
        (lambda f: {**f, "photo": f["photo"][:1]}, "disagree"),
    ],
    ids=["dtype", "shape", "missing", "extra", "batch-mismatch"],
)
def test_bad_feeds_are_refused(kind, tmp_path, data, change, message) -> None:
    """Wrong dtype, wrong shape, missing, unexpected or inconsistent feeds raise BackendError."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        with pytest.raises(BackendError, match=message):
            backend.infer(change(frame(data, range(2))), range(2))


def test_tile_range_outside_resident_rows_is_refused(kind, tmp_path, data) -> None:
    """A tile range beyond the resident tile count raises BackendError."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        with pytest.raises(BackendError, match="outside"):
            backend.infer(frame(data, range(2)), range(N_TILES - 1, N_TILES + 1))


def test_infer_before_activate_is_refused(kind, tmp_path, data) -> None:
    """infer() on an inactive backend raises BackendError."""
    backend = make_backend(kind, tmp_path)
    with pytest.raises(BackendError, match="before activate"):
        backend.infer(frame(data, range(1)), range(1))


def test_activate_twice_is_refused(kind, tmp_path, data) -> None:
    """A second activate() raises and leaves the first activation usable."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        with pytest.raises(BackendError, match="already active"):
            backend.activate({"reference": data["reference"]})
        assert_close(backend.infer(frame(data, range(2)), range(2))["anomaly"], expected(data, range(2)))


def test_deactivate_frees_everything_and_reactivation_works(kind, tmp_path, data) -> None:
    """deactivate() frees every emulated allocation and balances the context stack; activate() works again."""
    backend = make_backend(kind, tmp_path)
    for _ in range(2):
        backend.activate({"reference": data["reference"]})
        assert_close(backend.infer(frame(data, range(3)), range(3))["anomaly"], expected(data, range(3)))
        backend.deactivate()
        assert not backend.is_active
        if kind != "onnxruntime":
            assert fake_pycuda.live_device_allocations() == 0
            assert fake_pycuda.live_pinned_allocations() == 0
            assert fake_pycuda.context_depth() == 0


def test_infer_many_gives_every_batch_in_order(kind, tmp_path, data) -> None:
    """A frame's batches through infer_many equal one infer per batch, in the order given (every backend)."""
    ranges = [range(s, min(s + 3, N_TILES)) for s in range(0, N_TILES, 3)]
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        results = backend.infer_many([(frame(data, r), r) for r in ranges])
        assert len(results) == len(ranges)
        for tiles, out in zip(ranges, results, strict=True):
            assert_close(out["anomaly"], expected(data, tiles))
            np.testing.assert_array_equal(out["anomaly"], backend.infer(frame(data, tiles), tiles)["anomaly"])


def test_infer_many_refuses_a_bad_batch_before_running_any(kind, tmp_path, data) -> None:
    """A bad batch anywhere in the list is refused before any runs; an inactive backend runs none (all backends)."""
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        good = (frame(data, range(2)), range(2))
        with pytest.raises(BackendError, match="tile range"):
            backend.infer_many([good, (frame(data, range(2)), range(5, 8))])
        backend.deactivate()
        with pytest.raises(BackendError, match="before activate"):
            backend.infer_many([good])


def test_a_tile_given_as_a_strided_view_runs_as_its_copy(kind, tmp_path, data) -> None:
    """A frame input that is a view into a larger array (how the inspector hands a tile of the padded frame
    over) gives the outputs of the same values contiguous (every backend)."""
    tiles = range(3, 4)
    contiguous = frame(data, tiles)
    image = contiguous["image"]
    wide = np.zeros((*image.shape[:-1], image.shape[-1] * 2 + 5), image.dtype)
    wide[..., 5::2] = image  # every second column: a view with a stride over the last axis
    view = {**contiguous, "image": wide[..., 5::2]}
    assert not view["image"].flags.c_contiguous
    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        got = backend.infer_many([(view, tiles)])[0]["anomaly"].copy()
        np.testing.assert_array_equal(got, backend.infer(contiguous, tiles)["anomaly"])
        assert_close(got, expected(data, tiles))


def test_infer_each_hands_every_batch_over_once(kind, tmp_path, data) -> None:
    """infer_each gives consume each batch's outputs exactly once, equal to infer_many's (every backend)."""
    ranges = [range(i, i + 1) for i in range(N_TILES)]
    batches = [(frame(data, r), r) for r in ranges]
    got: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def consume(index: int, outputs: dict[str, np.ndarray]) -> None:
        with lock:
            assert index not in got
            got[index] = outputs["anomaly"].copy()

    with make_backend(kind, tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        backend.infer_each(batches, consume)
        assert sorted(got) == list(range(N_TILES))
        for index, out in enumerate(backend.infer_many(batches)):
            np.testing.assert_array_equal(got[index], out["anomaly"])


# -- ONNX Runtime only: tiles side by side ------------------------------------------------
def test_onnxruntime_consumes_each_tile_on_its_worker_and_finishes_all_before_an_error(tmp_path, data) -> None:
    """Outputs are consumed by the worker that ran the tile; a failing consume is raised after every tile ran."""
    backend = OnnxRuntimeBackend(write_toy_graph(tmp_path / "graph_fp32.onnx", fp16=False), threads=2)
    threads: set[str] = set()
    done: list[int] = []

    def consume(index: int, outputs: dict[str, np.ndarray]) -> None:
        threads.add(threading.current_thread().name)
        done.append(index)
        if index == 1:
            raise ValueError("consumer failed")

    with backend:
        backend.activate({"reference": data["reference"]})
        batches = [(frame(data, range(i, i + 1)), range(i, i + 1)) for i in range(N_TILES)]
        with pytest.raises(ValueError, match="consumer failed"):
            backend.infer_each(batches, consume)
        assert sorted(done) == list(range(N_TILES))
        assert all(name.startswith("inspectd-tile") for name in threads)


def test_onnxruntime_runs_tiles_side_by_side_on_single_threaded_sessions(tmp_path, data) -> None:
    """With more tiles than threads, each run is single-threaded and the tiles run on the backend's workers."""
    (tmp_path / "g").mkdir()
    backend = OnnxRuntimeBackend(write_toy_graph(tmp_path / "g" / "graph_fp32.onnx", fp16=False), threads=2)
    seen: set[str] = set()
    run = backend._infer_impl

    def spy(feeds, tiles):
        seen.add(threading.current_thread().name)
        return run(feeds, tiles)

    backend._infer_impl = spy
    with backend:
        backend.activate({"reference": data["reference"]})
        assert backend._session.get_session_options().intra_op_num_threads == 1
        ranges = [range(i, i + 1) for i in range(N_TILES)]
        results = backend.infer_many([(frame(data, r), r) for r in ranges])
        for tiles, out in zip(ranges, results, strict=True):
            assert_close(out["anomaly"], expected(data, tiles))
        assert seen and all(name.startswith("inspectd-tile") for name in seen)
    assert backend._pool is None, "deactivate stops the workers"


def test_onnxruntime_splits_the_nodes_when_there_are_fewer_tiles_than_threads(tmp_path, data) -> None:
    """A one-tile plan cannot run tiles side by side: its session uses the threads inside each node instead."""
    backend = OnnxRuntimeBackend(write_toy_graph(tmp_path / "graph_fp32.onnx", fp16=False), threads=2)
    with backend:
        backend.activate({"reference": data["reference"][:1]})
        assert backend._session.get_session_options().intra_op_num_threads == 2
        assert backend._pool is None
        out = backend.infer_many([(frame(data, range(1)), range(1))])
        assert_close(out[0]["anomaly"], expected(data, range(1)))
        backend.deactivate()
        backend.activate({"reference": data["reference"]})
        assert backend._session.get_session_options().intra_op_num_threads == 1 and backend._pool is not None


# -- TensorRT only: pipelining, threads, failures ---------------------------------------
@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def trt_backend(request, monkeypatch, tmp_path, data):
    """An activated emulated TensorRT backend (10.x and 11.x), deactivated afterwards."""
    install(monkeypatch, major=request.param)
    backend = make_backend("tensorrt", tmp_path)
    backend.activate({"reference": data["reference"]})
    yield backend
    backend.deactivate()


def test_infer_many_matches_infer_and_reports_timings(trt_backend, data) -> None:
    """A pipelined frame gives the per-batch results in order and fills last_timings_ms."""
    ranges = [range(s, min(s + MAX_BATCH, N_TILES)) for s in range(0, N_TILES, MAX_BATCH)]
    results = trt_backend.infer_many([(frame(data, r), r) for r in ranges])
    assert len(results) == len(ranges)
    for tiles, out in zip(ranges, results, strict=True):
        assert_close(out["anomaly"], expected(data, tiles))
    timings = trt_backend.last_timings_ms
    assert {"h2d", "compute", "d2h", "gpu_span", "overlap", "host_total", "batches"} <= set(timings)
    assert timings["batches"] == len(ranges)
    assert min(timings["h2d"], timings["compute"], timings["d2h"]) >= 0


def test_infer_many_validates_every_batch(trt_backend, data) -> None:
    """infer_many refuses a bad batch anywhere in the list before running any of them."""
    good = (frame(data, range(2)), range(2))
    bad = (frame(data, range(2)), range(5, 8))
    with pytest.raises(BackendError, match="tile range"):
        trt_backend.infer_many([good, bad])


def test_use_from_another_thread_is_refused(trt_backend, data) -> None:
    """Only the thread that owns the CUDA context may run inference."""
    errors: list[Exception] = []

    def run() -> None:
        try:
            trt_backend.infer(frame(data, range(1)), range(1))
        except BackendError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert errors and "thread" in str(errors[0])


def test_failed_activation_frees_buffers_and_pops_context(monkeypatch, tmp_path, data) -> None:
    """A CUDA error half-way through activate() leaves no allocation behind and the stack balanced."""
    install(monkeypatch, major=11)
    backend = make_backend("tensorrt", tmp_path)
    real_alloc, calls = fake_pycuda.mem_alloc, []

    def failing_alloc(nbytes: int):
        calls.append(nbytes)
        if len(calls) == 3:
            raise fake_pycuda.MemoryError("cuMemAlloc failed: out of memory")
        return real_alloc(nbytes)

    monkeypatch.setattr(fake_pycuda, "mem_alloc", failing_alloc)
    with pytest.raises(BackendError, match="out of memory"):
        backend.activate({"reference": data["reference"]})
    assert not backend.is_active
    assert fake_pycuda.live_device_allocations() == 0
    assert fake_pycuda.live_pinned_allocations() == 0
    assert fake_pycuda.context_depth() == 0


def test_failed_enqueue_drains_the_streams_and_the_backend_recovers(monkeypatch, tmp_path, data) -> None:
    """An enqueue refused mid-frame raises BackendError with no copy left queued; the next frame is right."""
    trt, _ = install(monkeypatch, major=11)
    enqueue, refusals = trt.IExecutionContext.execute_async_v3, []

    def refuse_second(self, stream_handle: int) -> bool:
        refusals.append(stream_handle)
        return len(refusals) != 2 and enqueue(self, stream_handle)

    ranges = [range(s, min(s + MAX_BATCH, N_TILES)) for s in range(0, N_TILES, MAX_BATCH)]
    batches = [(frame(data, r), r) for r in ranges]
    with make_backend("tensorrt", tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        monkeypatch.setattr(trt.IExecutionContext, "execute_async_v3", refuse_second)
        with pytest.raises(BackendError, match="execute_async_v3 failed"):
            backend.infer_many(batches)
        assert fake_pycuda.pending_operations() == 0  # nothing still queued against the lanes' buffers
        for tiles, out in zip(ranges, backend.infer_many(batches), strict=True):
            assert_close(out["anomaly"], expected(data, tiles))


def test_failed_capture_falls_back_to_plain_enqueue(monkeypatch, tmp_path, data) -> None:
    """When the CUDA-graph capture hook fails, inference still runs through execute_async_v3."""
    install(monkeypatch, major=11)
    from engines.tensorrt_backend import TensorRTBackend

    def broken_capture(self, lane):
        raise RuntimeError("capture not supported")

    monkeypatch.setattr(TensorRTBackend, "_capture", broken_capture)
    with make_backend("tensorrt", tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        assert_close(backend.infer(frame(data, range(3)), range(3))["anomaly"], expected(data, range(3)))
        assert backend._graph_for(backend._lanes[0], (0, 0, 3)) is None


def test_unaligned_resident_rows_are_copied_on_device(monkeypatch, tmp_path, data) -> None:
    """When a resident tile stride breaks the address alignment, rows are copied device-to-device."""
    install(monkeypatch, major=10)
    import engines.tensorrt_backend as module

    monkeypatch.setattr(module, "ALIGNMENT", 1024)  # the toy's 512-byte rows become "unaligned"
    with make_backend("tensorrt", tmp_path) as backend:
        backend.activate({"reference": data["reference"]})
        assert all(lane.dev_resident for lane in backend._lanes)
        ranges = [range(s, min(s + MAX_BATCH, N_TILES)) for s in range(0, N_TILES, MAX_BATCH)]
        for tiles, out in zip(ranges, backend.infer_many([(frame(data, r), r) for r in ranges]), strict=True):
            assert_close(out["anomaly"], expected(data, tiles))


def test_emulation_catches_reading_before_synchronise(monkeypatch) -> None:
    """The emulated driver leaves a download's bytes unwritten until its stream is waited for."""
    install(monkeypatch)
    cuda = fake_pycuda
    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        stream = cuda.Stream()
        host = cuda.pagelocked_empty((4,), np.float32)
        host[:] = [1, 2, 3, 4]
        device = cuda.mem_alloc(host.nbytes)
        cuda.memcpy_htod_async(device, host, stream)
        out = cuda.pagelocked_empty((4,), np.float32)
        cuda.memcpy_dtoh_async(out, device, stream)
        assert not np.array_equal(out, host)  # still poison: nothing ran yet
        stream.synchronize()
        np.testing.assert_array_equal(out, host)
        with pytest.raises(cuda.LogicError, match="page-locked"):
            cuda.memcpy_htod_async(device, np.ones(4, np.float32), stream)
        device.free()
        host.base.free()
        out.base.free()
    finally:
        cuda.Context.pop()
