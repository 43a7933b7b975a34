"""EMULATION of the few ``tensorrt`` names inspectd calls, backed by ONNX Runtime and numpy.

This is not TensorRT and proves nothing about a GPU, TensorRT's parser, its kernels,
FP16 accuracy or speed. It exists so that the build and run code paths (flags,
profiles, timing cache, name-based I/O, tensor addresses, enqueue order) are
exercised on machines without a GPU, for both TensorRT 10.x and 11.x.

Names follow the official Python bindings as compiled into ``tensorrt-cu12-bindings
10.13.3.9`` and ``tensorrt-cu13-bindings 11.4.0.106`` (read with ``strings`` on their
``tensorrt.so``): ``Logger(min_severity)``, ``Builder(logger).create_network(flags)``,
``create_builder_config()``, ``create_optimization_profile()``,
``build_serialized_network(network, config)`` (None on failure);
``OnnxParser(network, logger).parse(model, path=None)``, ``num_errors``,
``get_error(i)``; ``IBuilderConfig.set_memory_pool_limit(pool, size)``,
``add_optimization_profile``, ``create_timing_cache(bytes)``,
``set_timing_cache(cache, ignore_mismatch)``, ``get_timing_cache()``;
``ITimingCache.serialize()``; ``IOptimizationProfile.set_shape(name, min, opt, max)``;
``Runtime(logger).deserialize_cuda_engine(bytes)`` (None on failure); ``ICudaEngine``:
``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``,
``get_tensor_shape``, ``get_tensor_profile_shape(name, profile)`` ([min, opt, max]),
``create_execution_context()``, ``device_memory_size_v2`` (and ``device_memory_size``
in 10.x only); ``IExecutionContext``: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3(stream_handle)`` (bool); ``nptype``. 11.x mode has no
``BuilderFlag.FP16`` / ``INT8``, no ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``
and no ``ICudaEngine.device_memory_size``, as in 11.4.

A "plan" is a small header (version, profile, strongly typed flag) followed by the
ONNX bytes; ``execute_async_v3`` queues, on the emulated stream, a run of that ONNX
graph through ONNX Runtime that reads its inputs from, and writes its outputs to, the
emulated device addresses given with ``set_tensor_address``. Memory and streams come
from a *device* object (default: ``fake_pycuda``), so the same emulation can also
drive real pycuda memory on a GPU machine that lacks TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import struct
import types
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from tests.emulation import fake_pycuda

VERSIONS = {10: "10.13.3.9", 11: "11.4.0.106"}
_PLAN_MAGIC = b"FAKETRTPLAN1"
_CACHE_MAGIC = b"FAKETRTCACHE1"


class _Enum:
    """An enum value: int() and equality as TensorRT's pybind enums."""

    def __init__(self, kind: str, name: str, value: int) -> None:
        self.kind, self.name, self.value = kind, name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Enum) and (other.kind, other.value) == (self.kind, self.value)

    def __hash__(self) -> int:
        return hash((self.kind, self.value))

    def __repr__(self) -> str:
        return f"{self.kind}.{self.name}"


class _EnumType:
    """A namespace of enum values that records which names were looked up."""

    def __init__(self, kind: str, names: list[str], touched: set[str]) -> None:
        self._kind, self._touched = kind, touched
        for value, name in enumerate(names):
            object.__setattr__(self, name, _Enum(kind, name, value))

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            object.__getattribute__(self, "_touched").add(f"{object.__getattribute__(self, '_kind')}.{name}")
        return object.__getattribute__(self, name)


_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "HALF",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
}
_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


class _HostMemory(bytes):
    """IHostMemory: a buffer (``memoryview(x)`` works) with ``nbytes``."""

    @property
    def nbytes(self) -> int:
        return len(self)


def make_module(major: int = 11, device: Any = fake_pycuda) -> types.ModuleType:
    """A fresh emulated ``tensorrt`` module for TensorRT ``major`` (10 or 11)."""
    if major not in VERSIONS:
        raise ValueError(f"emulated TensorRT major must be one of {sorted(VERSIONS)}")
    trt = types.ModuleType("tensorrt", f"EMULATED tensorrt {VERSIONS[major]} (tests only)")
    touched: set[str] = set()
    state = {
        "builds": 0,
        "cache_hits": 0,
        "cache_misses": 0,
        "network_flags": [],
        "config_flags": [],
        "pool_limits": {},
        "profiles": [],
        "touched": touched,
        "major": major,
    }
    trt.__version__ = VERSIONS[major]
    trt.STATE = state
    trt.DataType = _EnumType("DataType", list(_NUMPY), touched)
    trt.TensorIOMode = _EnumType("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], touched)
    trt.MemoryPoolType = _EnumType("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM"], touched)
    network_flags = (
        ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if major == 10 else ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"]
    )
    trt.NetworkDefinitionCreationFlag = _EnumType("NetworkDefinitionCreationFlag", network_flags, touched)
    builder_flags = (
        ["FP16", "INT8", "DEBUG", "REFIT", "OBEY_PRECISION_CONSTRAINTS"] if major == 10 else ["DEBUG", "REFIT"]
    )
    trt.BuilderFlag = _EnumType("BuilderFlag", builder_flags, touched)
    trt.nptype = lambda dtype: _NUMPY[dtype.name]
    trt.Logger = _make_logger()
    _install_classes(trt, state, device)
    return trt


def _make_logger() -> type:
    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity
            self.messages: list[str] = []

        def log(self, severity: int, msg: str) -> None:
            self.messages.append(msg)

    return Logger


def _install_classes(trt: types.ModuleType, state: dict, device: Any) -> None:
    """Builder, parser, runtime, engine and context, closed over this module's state."""

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: _Enum) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class NetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.onnx: bytes = b""

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Tensor:
            return self.inputs[index]

    class ParserError:
        def __init__(self, desc: str) -> None:
            self._desc = desc

        def desc(self) -> str:
            return self._desc

        def __str__(self) -> str:
            return f"In node -1 (parse): {self._desc}"

    class OnnxParser:
        def __init__(self, network: NetworkDefinition, logger: Any) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def parse(self, model: bytes, path: str | None = None) -> bool:
            try:
                proto = onnx.load_model_from_string(bytes(model))
                onnx.checker.check_model(proto)
                _describe(proto, self.network, trt, Tensor)
            except Exception as exc:
                self.errors.append(ParserError(f"{type(exc).__name__}: {exc}"))
                return False
            self.network.onnx = bytes(model)
            return True

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[tuple[int, ...]]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            self.shapes[input] = [tuple(min), tuple(opt), tuple(max)]

    class TimingCache:
        def __init__(self, entries: dict[str, str], device_name: str) -> None:
            self.entries, self.device_name = entries, device_name

        def serialize(self) -> _HostMemory:
            body = json.dumps({"device": self.device_name, "entries": self.entries}).encode()
            return _HostMemory(_CACHE_MAGIC + body)

    class BuilderConfig:
        def __init__(self) -> None:
            self.profiles: list[OptimizationProfile] = []
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: _Enum, pool_size: int) -> None:
            state["pool_limits"][pool.name] = pool_size

        def set_flag(self, flag: _Enum) -> None:
            state["config_flags"].append(flag.name)

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            self.profiles.append(profile)
            state["profiles"].append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache:
            blob = bytes(serialized_timing_cache)
            if not blob:
                return TimingCache({}, "Emulated GPU (numpy)")
            if not blob.startswith(_CACHE_MAGIC):
                raise RuntimeError("emulated: corrupt timing cache")
            data = json.loads(blob[len(_CACHE_MAGIC) :])
            return TimingCache(dict(data["entries"]), data["device"])

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.device_name != "Emulated GPU (numpy)" and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> NetworkDefinition:
            state["network_flags"].append(flags)
            return NetworkDefinition(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: NetworkDefinition, config: BuilderConfig) -> _HostMemory | None:
            problem = _build_problem(network, config)
            if problem:
                self.logger.log(trt.Logger.ERROR, problem)
                return None
            state["builds"] += 1
            _touch_cache(config, network, state)
            strongly = bool(network.flags >> int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) & 1)
            header = {
                "version": trt.__version__,
                "strongly_typed": strongly,
                "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
            }
            body = json.dumps(header).encode()
            return _HostMemory(_PLAN_MAGIC + struct.pack("<Q", len(body)) + body + network.onnx)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> Any:
            blob = bytes(serialized_engine)
            if not blob.startswith(_PLAN_MAGIC):
                self.logger.log(trt.Logger.ERROR, "emulated: not a plan")
                return None
            (size,) = struct.unpack_from("<Q", blob, len(_PLAN_MAGIC))
            start = len(_PLAN_MAGIC) + 8
            header = json.loads(blob[start : start + size])
            if header["version"] != trt.__version__:
                self.logger.log(trt.Logger.ERROR, "emulated: plan from another TensorRT version")
                return None
            return _make_engine(trt, device, header, blob[start + size :], major=state["major"])

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime


def _describe(proto: onnx.ModelProto, network: Any, trt: types.ModuleType, tensor_type: type) -> None:
    """Fill the network's inputs/outputs from the ONNX graph, as TensorRT's parser does."""
    initialisers = {init.name for init in proto.graph.initializer}
    for values, target in ((proto.graph.input, network.inputs), (proto.graph.output, network.outputs)):
        for value in values:
            if value.name in initialisers:
                continue
            kind = _ONNX_TO_TRT.get(value.type.tensor_type.elem_type)
            if kind is None:
                raise TypeError(f"{value.name}: unsupported ONNX element type {value.type.tensor_type.elem_type}")
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            target.append(tensor_type(value.name, dims, getattr(trt.DataType, kind)))


def _build_problem(network: Any, config: Any) -> str | None:
    if not network.onnx:
        return "emulated: empty network (nothing parsed)"
    dynamic = [t for t in network.inputs if -1 in t.shape]
    if dynamic and len(config.profiles) != 1:
        return "emulated: dynamic inputs need exactly one optimisation profile here"
    for tensor in dynamic:
        shapes = config.profiles[0].shapes.get(tensor.name)
        if shapes is None:
            return f"emulated: no profile shape for {tensor.name}"
        low, opt, high = shapes
        fits = all(len(s) == len(tensor.shape) for s in shapes) and all(
            want in (-1, a) and want in (-1, b) and want in (-1, c) and a <= b <= c
            for want, a, b, c in zip(tensor.shape, low, opt, high, strict=True)
        )
        if not fits:
            return f"emulated: invalid profile {shapes} for {tensor.name} {tensor.shape}"
    return None


def _touch_cache(config: Any, network: Any, state: dict) -> None:
    if config.cache is None:
        return
    key = hashlib.sha256(network.onnx + json.dumps(config.profiles[0].shapes).encode()).hexdigest()
    if key in config.cache.entries:
        state["cache_hits"] += 1
    else:
        state["cache_misses"] += 1
        config.cache.entries[key] = "tactics"


def _make_engine(trt: types.ModuleType, device: Any, header: dict, onnx_bytes: bytes, major: int) -> Any:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    proto = onnx.load_model_from_string(onnx_bytes)
    network = types.SimpleNamespace(inputs=[], outputs=[])
    _describe(proto, network, trt, lambda name, shape, dtype: (name, shape, dtype))
    io = [(n, s, d, trt.TensorIOMode.INPUT) for n, s, d in network.inputs]
    io += [(n, s, d, trt.TensorIOMode.OUTPUT) for n, s, d in network.outputs]
    profile = {name: [tuple(s) for s in shapes] for name, shapes in header["profile"].items()}

    class ExecutionContext:
        def __init__(self) -> None:
            device.require_context("createExecutionContext")
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self.enqueued = self.completed = 0  # one context = one scratch area: runs must stay ordered

        def set_input_shape(self, name: str, shape: Any) -> bool:
            spec = next((s for n, s, _, m in io if n == name and m == trt.TensorIOMode.INPUT), None)
            shape = tuple(shape)
            if spec is None or len(shape) != len(spec):
                return False
            low, _, high = profile.get(name, [spec, spec, spec])
            if not all(a <= x <= b for a, x, b in zip(low, shape, high, strict=True)):
                return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if all(n != name for n, *_ in io):
                return False
            self.addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            device.require_context("enqueueV3")
            try:
                job = self._job()
            except (KeyError, ValueError):
                return False
            device.enqueue(stream_handle, job)
            return True

        def _job(self) -> Any:
            """Snapshot shapes and addresses now: TensorRT consumes them at enqueue."""
            batch = {self.shapes[n][0] for n, *_ in io[: len(network.inputs)]}
            if len(batch) != 1:
                raise ValueError("inputs disagree on the batch")
            (n_batch,) = batch
            inputs = [
                (n, self.shapes[n], trt.nptype(d), self.addresses[n])
                for n, _, d, m in io
                if m == trt.TensorIOMode.INPUT
            ]
            outputs = [
                (n, (n_batch, *s[1:]), trt.nptype(d), self.addresses[n])
                for n, s, d, m in io
                if m == trt.TensorIOMode.OUTPUT
            ]

            sequence, self.enqueued = self.enqueued, self.enqueued + 1

            def run() -> None:
                if self.completed != sequence:
                    raise fake_pycuda.LogicError(
                        "emulated race: an execute_async_v3 ran before an earlier one of the same execution "
                        "context (enqueues on different streams need an event dependency)"
                    )
                self.completed += 1
                feeds = {}
                for name, shape, dtype, address in inputs:
                    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    feeds[name] = device.read(address, nbytes).view(dtype).reshape(shape)
                values = session.run([o[0] for o in outputs], feeds)
                for (_, _shape, dtype, address), value in zip(outputs, values, strict=True):
                    data = np.ascontiguousarray(value.astype(dtype, copy=False)).reshape(-1).view(np.uint8)
                    device.write(address, data)

            return run

    class CudaEngine:
        num_io_tensors = len(io)
        num_optimization_profiles = 1
        device_memory_size_v2 = 1 << 20

        def get_tensor_name(self, index: int) -> str:
            return io[index][0]

        def _find(self, name: str) -> tuple:
            return next(entry for entry in io if entry[0] == name)

        def get_tensor_mode(self, name: str) -> _Enum:
            return self._find(name)[3]

        def get_tensor_dtype(self, name: str) -> _Enum:
            return self._find(name)[2]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._find(name)[1]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return list(profile.get(name, []))

        def create_execution_context(self) -> ExecutionContext:
            return ExecutionContext()

    if major == 10:
        CudaEngine.device_memory_size = 1 << 20
    return CudaEngine()
