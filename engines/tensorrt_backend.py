"""TensorRT backend: the GPU path (TensorRT 10.x and 11.x, pycuda for memory, streams and events).

Design, Polygraphy style, kept short:

* One thread owns all CUDA work. The backend is created, activated, used and
  deactivated from the thread that constructed it (checked). It retains the
  device's *primary* context (the one TensorRT and cudart use; never
  ``pycuda.autoinit``), pushes it at ``activate`` and pops it at ``deactivate``,
  balanced on every error path.
* Buffers are allocated once at ``activate``, sized for the plan's profile
  maximum batch: page-locked host staging buffers and device buffers. Resident
  inputs ([n_tiles, ...] constants) are uploaded once and stay on the device;
  a batch of tiles ``a..b`` reads them at ``base + a * bytes_per_tile``, no copy
  (when that stride keeps TensorRT's 256-byte address alignment; otherwise the rows
  are copied device-to-device into an aligned per-lane buffer, still no host copy).
* ``infer_many`` pipelines a frame's batches over two *lanes* (stream + buffer
  set each): the upload of batch k+1 overlaps the compute of batch k and the
  download of batch k-1. Compute is serialised across lanes with an event,
  because one execution context owns one scratch area. A lane's host buffers
  are reused only after its previous download event completed, so no host
  buffer is overwritten before its copy consumed it.
* CUDA graphs: the capture hook is ``_capture``. pycuda (2026.1) wraps no
  stream-capture API (no cuStreamBeginCapture in its driver wrapper), so the
  hook returns None and every batch is a plain ``execute_async_v3``. A capture
  would have to be keyed by (lane, first tile, batch size) because resident
  addresses differ per batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from engines.backend import Backend, BackendError, TensorSpec

INSTALL_HINT = (
    "tensorrt backend needs the tensorrt and pycuda packages: pip install 'inspectd[tensorrt]' "
    "(on Jetson: TensorRT from JetPack, pycuda built on the device)"
)

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
_EVENTS = ("start", "h2d", "compute_start", "compute", "d2h")
ALIGNMENT = 256  # TensorRT wants tensor addresses aligned to 256 bytes


def import_gpu_modules() -> tuple[ModuleType, ModuleType]:
    """Import tensorrt and pycuda.driver lazily, or raise BackendError with the install hint."""
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: libcuda / libnvinfer missing at load time
        raise BackendError(INSTALL_HINT) from exc
    return trt, cuda


@dataclass
class _Lane:
    """One stream with its own staging and device buffers."""

    index: int
    stream: Any
    events: dict[str, Any]
    host_in: dict[str, np.ndarray] = field(default_factory=dict)
    dev_in: dict[str, Any] = field(default_factory=dict)
    host_out: dict[str, np.ndarray] = field(default_factory=dict)
    dev_out: dict[str, Any] = field(default_factory=dict)
    dev_resident: dict[str, Any] = field(default_factory=dict)  # aligned copies of unaligned resident rows
    pending: tuple[int, int] | None = None  # (result slot, batch size) in flight


class TensorRTBackend(Backend):
    """Runs a serialised TensorRT plan; resident inputs live in device memory."""

    name = "tensorrt"

    def __init__(
        self,
        plan_path: Path,
        metadata: Mapping[str, Any] | None = None,
        device: int = 0,
        lanes: int = 2,
        cuda_graphs: bool = True,
    ) -> None:
        """Load ``plan_path`` (its ``<plan>.json`` sidecar unless ``metadata`` is given) on ``device``.

        Call from the thread that will own all CUDA work. ``lanes`` (>= 2) streams and buffer
        sets pipeline ``infer_many``; ``cuda_graphs`` enables the capture hook (see module doc).
        """
        super().__init__(plan_path)
        self._trt, self._cuda = import_gpu_modules()
        from engines.trt_build import plan_mismatches, read_metadata

        if not self.graph_path.is_file():
            raise BackendError(f"{self.graph_path}: TensorRT plan not found")
        self.metadata = dict(metadata) if metadata is not None else read_metadata(self.graph_path)
        problems = plan_mismatches(self.metadata, None, device)
        if problems:
            raise BackendError(f"{self.graph_path}: plan does not fit this machine: {'; '.join(problems)}")
        self._owner = threading.get_ident()
        self._n_lanes = max(2, lanes)
        self._cuda_graphs = cuda_graphs
        self._ctx = self._retain_context(device)
        with self._pushed():
            self._engine = self._deserialize()
        self._inputs, self._outputs, self._max_batch = self._discover()
        self._exec: Any = None
        self._lanes: list[_Lane] = []
        self._resident_dev: dict[str, tuple[int, int]] = {}  # name -> (base address, bytes per tile)
        self._device_allocs: list[Any] = []
        self._pinned: list[np.ndarray] = []
        self._graphs: dict[tuple[int, int, int], Any] = {}
        self._frame_start: Any = None
        self.last_timings_ms: dict[str, float] = {}

    # -- introspection --------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self._max_batch

    # -- construction helpers -------------------------------------------------
    def _retain_context(self, device: int) -> Any:
        cuda = self._cuda
        try:
            cuda.init()
            return cuda.Device(device).retain_primary_context()
        except cuda.Error as exc:
            raise BackendError(f"tensorrt: cannot open CUDA device {device}: {exc}") from exc

    @contextmanager
    def _pushed(self) -> Iterator[None]:
        """Make the primary context current for the duration (balanced push/pop)."""
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _deserialize(self) -> Any:
        trt = self._trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.graph_path.read_bytes())
        if engine is None:
            raise BackendError(
                f"{self.graph_path}: TensorRT {trt.__version__} cannot deserialise this plan "
                f"(built by TensorRT {self.metadata.get('tensorrt_version', '?')}); rebuild it with "
                f"inspectd build-engine MODEL"
            )
        self._runtime = runtime  # the engine must not outlive its runtime
        return engine

    def _discover(self) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec], int]:
        trt, engine = self._trt, self._engine
        inputs: dict[str, TensorSpec] = {}
        outputs: dict[str, TensorSpec] = {}
        limits = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if not shape or -1 in shape[1:]:
                raise BackendError(f"{self.graph_path}: tensor {name!r} {shape}: only the batch may be dynamic")
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError as exc:
                raise BackendError(f"{self.graph_path}: tensor {name!r} has a type numpy cannot hold") from exc
            spec = TensorSpec(name, dtype, shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs[name] = spec
                limits.append(int(engine.get_tensor_profile_shape(name, 0)[2][0]) if shape[0] == -1 else shape[0])
            else:
                outputs[name] = spec
        return inputs, outputs, min(limits, default=1)

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise BackendError(f"{self.name}: used from a thread that does not own its CUDA context")

    # -- lifecycle -------------------------------------------------------------
    def _activate_impl(self, resident: dict[str, np.ndarray]) -> None:
        self._check_thread()
        self._ctx.push()
        try:
            self._exec = self._engine.create_execution_context()
            if self._exec is None:
                raise BackendError(f"{self.graph_path}: TensorRT could not create an execution context")
            self._upload_resident(resident)
            self._lanes = [self._make_lane(index) for index in range(self._n_lanes)]
            self._frame_start = self._cuda.Event()
            self._warm_up()
        except self._cuda.Error as exc:
            self._release()
            raise BackendError(f"{self.name}: CUDA error during activation: {exc}") from exc
        except BaseException:
            self._release()
            raise

    def _deactivate_impl(self) -> None:
        self._check_thread()
        self._release()

    def _release(self) -> None:
        """Wait for in-flight work, free every buffer, drop the execution context, pop."""
        try:
            for lane in self._lanes:
                lane.stream.synchronize()
        finally:
            try:
                for alloc in self._device_allocs:
                    alloc.free()
                for array in self._pinned:
                    array.base.free()
            finally:
                self._device_allocs, self._pinned, self._lanes = [], [], []
                self._resident_dev, self._graphs, self._exec = {}, {}, None
                self._frame_start = None
                self._cuda.Context.pop()

    # -- buffers ---------------------------------------------------------------
    def _device(self, nbytes: int) -> Any:
        alloc = self._cuda.mem_alloc(max(nbytes, 1))
        self._device_allocs.append(alloc)
        return alloc

    def _pinned_batch(self, spec: TensorSpec) -> np.ndarray:
        array = self._cuda.pagelocked_empty((self._max_batch, *spec.shape[1:]), spec.dtype)
        self._pinned.append(array)
        return array

    def _upload_resident(self, resident: dict[str, np.ndarray]) -> None:
        for name, array in resident.items():
            array = np.ascontiguousarray(array)
            alloc = self._device(array.nbytes)
            self._cuda.memcpy_htod(alloc, array)  # once per activation: a synchronous copy is fine
            self._resident_dev[name] = (int(alloc), array.nbytes // max(array.shape[0], 1))

    def _make_lane(self, index: int) -> _Lane:
        cuda = self._cuda
        lane = _Lane(index, cuda.Stream(), {key: cuda.Event() for key in _EVENTS})
        for name in self._frame_input_names():
            lane.host_in[name] = self._pinned_batch(self._inputs[name])
            lane.dev_in[name] = self._device(lane.host_in[name].nbytes)
        for name, spec in self._outputs.items():
            lane.host_out[name] = self._pinned_batch(spec)
            lane.dev_out[name] = self._device(lane.host_out[name].nbytes)
        for name, (_, tile_bytes) in self._resident_dev.items():
            if tile_bytes % ALIGNMENT:
                lane.dev_resident[name] = self._device(self._max_batch * tile_bytes)
        return lane

    def _frame_input_names(self) -> list[str]:
        return [name for name in self._inputs if name not in self._resident_dev]

    def _warm_up(self) -> None:
        """One full batch so TensorRT's lazy initialisation is not paid by the first frame."""
        batch = min(self._max_batch, self._n_tiles or self._max_batch)
        feeds = {
            name: np.zeros((batch, *self._inputs[name].shape[1:]), self._inputs[name].dtype)
            for name in self._frame_input_names()
        }
        self._run([(feeds, range(batch))])

    # -- inference ---------------------------------------------------------------
    def infer_many(self, batches: Sequence[tuple[Feeds, range | None]]) -> list[Outputs]:
        """Run a whole frame's batches pipelined over the lanes; outputs in the order given.

        Each item is what ``infer`` takes: the per-frame feeds of one batch and its tile range
        (None = 0..batch). Validation matches ``infer``; ``last_timings_ms`` covers the call.
        """
        if not self._active:
            raise BackendError(f"{self.name}: infer() before activate()")
        self._check_thread()
        return self._run([(feeds, self._checked_tiles(feeds, tiles)) for feeds, tiles in batches])

    def _checked_tiles(self, feeds: Feeds, tiles: range | None) -> range:
        """The checks ``Backend.infer`` makes, for one batch of ``infer_many``."""
        batch = self._check_feeds(feeds)
        tiles = range(batch) if tiles is None else tiles
        if len(tiles) != batch or tiles.step != 1:
            raise BackendError(f"{self.name}: {batch} tiles fed but tile range {tiles} given")
        if self._n_tiles and (tiles.start < 0 or tiles.stop > self._n_tiles):
            raise BackendError(f"{self.name}: tile range {tiles} outside 0..{self._n_tiles}")
        if batch > self._max_batch:
            raise BackendError(f"{self.name}: batch {batch} exceeds the maximum {self._max_batch}")
        return tiles

    def _infer_impl(self, feeds: Feeds, tiles: range) -> Outputs:
        self._check_thread()
        return self._run([(feeds, tiles)])[0]

    def _run(self, batches: list[tuple[Feeds, range]]) -> list[Outputs]:
        results: list[Outputs] = [{} for _ in batches]
        totals = dict.fromkeys(("h2d", "compute", "d2h", "gpu_span"), 0.0)
        started = time.perf_counter()
        self._frame_start.record(self._lanes[0].stream)
        try:
            previous: _Lane | None = None
            for index, (feeds, tiles) in enumerate(batches):
                lane = self._lanes[index % len(self._lanes)]
                self._collect(lane, results, totals)  # frees this lane's buffers
                self._enqueue(lane, feeds, tiles, previous, index)
                previous = lane
            for lane in self._lanes:
                self._collect(lane, results, totals)
        except self._cuda.Error as exc:
            self._abandon()
            raise BackendError(f"{self.name}: CUDA error: {exc}") from exc
        except BaseException:
            self._abandon()
            raise
        self._record_timings(totals, started, len(batches))
        return results

    def _enqueue(self, lane: _Lane, feeds: Feeds, tiles: range, previous: _Lane | None, slot: int) -> None:
        cuda, events, batch = self._cuda, lane.events, len(tiles)
        events["start"].record(lane.stream)
        for name, array in feeds.items():
            staged = lane.host_in[name][:batch]
            np.copyto(staged, array)  # safe: _collect waited for this lane's previous upload
            cuda.memcpy_htod_async(lane.dev_in[name], staged, lane.stream)
            self._bind(name, int(lane.dev_in[name]), array.shape)
        for name, (base, tile_bytes) in self._resident_dev.items():
            address = base + tiles.start * tile_bytes
            if name in lane.dev_resident:
                cuda.memcpy_dtod_async(lane.dev_resident[name], address, batch * tile_bytes, lane.stream)
                address = int(lane.dev_resident[name])
            self._bind(name, address, (batch, *self._inputs[name].shape[1:]))
        for name in self._outputs:
            self._bind(name, int(lane.dev_out[name]), None)
        events["h2d"].record(lane.stream)
        if previous is not None and previous is not lane:
            lane.stream.wait_for_event(previous.events["compute"])  # one context, one scratch area
        events["compute_start"].record(lane.stream)
        self._launch(lane, (lane.index, tiles.start, batch))
        events["compute"].record(lane.stream)
        for name, host in lane.host_out.items():
            cuda.memcpy_dtoh_async(host[:batch], lane.dev_out[name], lane.stream)
        events["d2h"].record(lane.stream)
        lane.pending = (slot, batch)

    def _bind(self, name: str, address: int, shape: tuple[int, ...] | None) -> None:
        if shape is not None and not self._exec.set_input_shape(name, tuple(shape)):
            raise BackendError(f"{self.name}: TensorRT rejected shape {tuple(shape)} for {name!r}")
        if not self._exec.set_tensor_address(name, address):
            raise BackendError(f"{self.name}: TensorRT rejected the address of {name!r}")

    def _launch(self, lane: _Lane, key: tuple[int, int, int]) -> None:
        graph = self._graph_for(lane, key)
        if graph is not None:
            graph.launch(lane.stream)
        elif not self._exec.execute_async_v3(lane.stream.handle):
            raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _graph_for(self, lane: _Lane, key: tuple[int, int, int]) -> Any:
        """The captured graph for this (lane, first tile, batch), capturing once; None = plain enqueue."""
        if not self._cuda_graphs:
            return None
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(lane)
            except Exception:  # a failed capture must never fail inference: fall back for good
                self._graphs[key] = None
            if self._graphs[key] is None:
                self._cuda_graphs = False
        return self._graphs.get(key)

    def _capture(self, lane: _Lane) -> Any:
        """Capture one execute_async_v3 on ``lane.stream`` into a launchable graph, or return None.

        pycuda exposes no stream capture, so this is the isolated place where a capture
        through another binding (cuda-python's cuStreamBeginCapture/EndCapture) would go.
        """
        return None

    def _collect(self, lane: _Lane, results: list[Outputs], totals: dict[str, float]) -> None:
        if lane.pending is None:
            return
        slot, batch = lane.pending
        events = lane.events
        events["d2h"].synchronize()  # earlier events on this stream are complete as well
        results[slot] = {name: host[:batch].copy() for name, host in lane.host_out.items()}
        totals["h2d"] += events["h2d"].time_since(events["start"])
        totals["compute"] += events["compute"].time_since(events["compute_start"])
        totals["d2h"] += events["d2h"].time_since(events["compute"])
        totals["gpu_span"] = max(totals["gpu_span"], events["d2h"].time_since(self._frame_start))
        lane.pending = None

    def _abandon(self) -> None:
        """After an error: let queued work finish so no buffer is reused while in flight."""
        for lane in self._lanes:
            lane.stream.synchronize()
            lane.pending = None

    def _record_timings(self, totals: dict[str, float], started: float, batches: int) -> None:
        busy = totals["h2d"] + totals["compute"] + totals["d2h"]
        span = totals["gpu_span"] or busy
        self.last_timings_ms = {
            **totals,
            "gpu_span": span,
            # share of the serial copy + compute time hidden by running stages concurrently
            "overlap": max(0.0, 1.0 - span / busy) if busy > 0 else 0.0,
            "host_total": (time.perf_counter() - started) * 1e3,
            "batches": float(batches),
        }
