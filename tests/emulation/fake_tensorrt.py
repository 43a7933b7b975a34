"""EMULATION of the ``tensorrt`` names inspectd calls, backed by ONNX Runtime and numpy.

This is not TensorRT and proves nothing about a GPU, TensorRT's parser, its kernels,
FP16 accuracy or speed. It exists so that the build and run code paths (flags,
profiles, timing cache, name-based I/O, tensor addresses, enqueue order) are
exercised on machines without a GPU, for both TensorRT 10.x and 11.x.

It is a subset of the official Python bindings, ``tensorrt-cu12-bindings 10.13.3.9``
and ``tensorrt-cu13-bindings 11.4.0.106``, with their class names, method and parameter
names, enum tables (every member, with its value, per major version) and return types:
``Logger(min_severity)`` with ``ILogger.Severity`` members (also ``Logger.WARNING`` ...);
``Builder(logger)``: ``create_network(flags)``, ``create_builder_config()``,
``create_optimization_profile()``, ``build_serialized_network(network, config)`` (an
``IHostMemory``, None on failure); ``INetworkDefinition``: ``num_inputs``, ``get_input(i)``
(an ``ITensor``: ``name``, ``shape`` as ``Dims``, ``dtype``); ``OnnxParser(network,
logger)``: ``parse(model, path=None)``, ``num_errors``, ``get_error(i)`` (a ``ParserError``
with ``desc()``); ``IBuilderConfig``: ``set_memory_pool_limit(pool, pool_size)``,
``set_flag(flag)``, ``add_optimization_profile(profile)``,
``create_timing_cache(serialized_timing_cache)``, ``set_timing_cache(cache,
ignore_mismatch)``, ``get_timing_cache()``; ``ITimingCache.serialize()``;
``IOptimizationProfile.set_shape(input, min, opt, max)``; ``Runtime(logger)``:
``deserialize_cuda_engine(serialized_engine)`` (None on failure); ``ICudaEngine``:
``num_io_tensors``, ``num_optimization_profiles``, ``device_memory_size_v2`` (and
``device_memory_size`` in 10.x only), ``get_tensor_name``, ``get_tensor_mode``,
``get_tensor_dtype``, ``get_tensor_shape`` (``Dims``), ``get_tensor_profile_shape(name,
profile_index)`` ([min, opt, max] as ``Dims``), ``create_execution_context()``;
``IExecutionContext``: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3(stream_handle)`` (bool); ``Dims``; ``nptype`` (TypeError for a type
numpy cannot hold). 11.x mode has no ``BuilderFlag.FP16`` / ``INT8``, no
``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` and no ``ICudaEngine.device_memory_size``,
as in 11.4. Arguments are refused as pybind11 refuses them in the real bindings (a
``TypeError`` naming incompatible function arguments, before anything runs) for the
parameter types listed above: an int where an enum member is expected
(``Logger(2)``), a negative size, ints where ``Dims`` are expected, a ``str`` model. Like
pybind11, an enum member is accepted where an int is expected (``create_network(flag)``
passes both: only ``1 << int(flag)`` is the right bit mask). ``tests/test_real_bindings.py``
checks all of this against the real compiled bindings.

What still differs from the real modules (that test fails on any other difference in names,
kinds, signatures, enum values, return types or refusals):

* ``IHostMemory`` is a ``bytes`` subclass (pure Python offers the buffer protocol no
  other way), so it also has ``bytes``' methods.
* The emulated enums are Python ``enum.Enum`` classes: same names, values, ``int()``,
  ``==`` and repr, but no ordering (``<``) between members.
* ``Logger`` keeps its messages instead of printing them; ``ParserError``'s text is
  approximate.
* Behaviour: a "plan" is a small header (version, profile, strongly typed flag) followed by
  the ONNX bytes; the "parser" is ONNX's checker; ``execute_async_v3`` queues, on the
  emulated stream, a run of that ONNX graph through ONNX Runtime that reads its inputs
  from, and writes its outputs to, the device addresses given with ``set_tensor_address``.
  Memory and streams come from a *device* object (default: ``fake_pycuda``), so the same
  emulation can also drive real pycuda memory on a GPU machine that lacks TensorRT.

Test-only state (build counts, flags and profiles used, enum members looked up) is
``state(trt)``, never an attribute of an emulated public class.
"""

from __future__ import annotations

import enum
import hashlib
import json
import operator
import struct
import types
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from tests.emulation import fake_pycuda, observe

VERSIONS = {10: "10.13.3.9", 11: "11.4.0.106"}
# Emulated classes that must subclass a builtin (listed above as a difference): its members are not compared.
BUILTIN_BASES = {"IHostMemory": bytes}
_PLAN_MAGIC = b"FAKETRTPLAN1"
_CACHE_MAGIC = b"FAKETRTCACHE1"

# Every member and value of the emulated enums, as compiled into the real bindings of each major.
_DATA_TYPE = {
    "FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
    "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11,
}  # fmt: skip
_COMMON_ENUMS = {
    "DataType": _DATA_TYPE,
    "TensorIOMode": {"NONE": 0, "INPUT": 1, "OUTPUT": 2},
    "MemoryPoolType": {
        "WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3,
        "TACTIC_DRAM": 4, "TACTIC_SHARED_MEMORY": 5,
    },
    "ILogger.Severity": {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4},
}  # fmt: skip
ENUMS: dict[int, dict[str, dict[str, int]]] = {
    10: {
        **_COMMON_ENUMS,
        "NetworkDefinitionCreationFlag": {
            "EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3,
        },
        "BuilderFlag": {
            "FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
            "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9,
            "PREFER_PRECISION_CONSTRAINTS": 10, "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12,
            "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16,
            "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "WEIGHTLESS": 19, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20,
            "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23, "STRICT_NANS": 24, "MONITOR_MEMORY": 25,
            "FP4": 26, "EDITABLE_TIMING_CACHE": 27, "DISTRIBUTIVE_INDEPENDENCE": 28,
        },
    },
    11: {
        **_COMMON_ENUMS,
        "NetworkDefinitionCreationFlag": {
            "STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2,
        },
        "BuilderFlag": {
            "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
            "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
            "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18,
            "REFIT_IDENTICAL": 19, "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23,
            "MONITOR_MEMORY": 24, "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27,
        },
    },
}  # fmt: skip

_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "HALF",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
}
# What the real nptype maps (FP8, BF16, INT4, FP4 and E8M0 have no numpy type: TypeError).
_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


# -- the pieces every emulated module shares ------------------------------------------------
class _Emulated(observe.Observed, metaclass=observe.ObservedType):
    """Base of the emulated classes (their attribute reads are observable; see ``observe``)."""

    __slots__ = ()


class _TrtEnum(enum.Enum, metaclass=observe.ObservedEnumType):
    """A pybind11 enum: ``int()``, ``operator.index``, ``==`` among members, repr ``<Kind.NAME: v>``."""

    def __int__(self) -> int:
        return self.value

    __index__ = __int__


def _integer(value: Any, low: int, high: int) -> bool:
    if isinstance(value, float) or not hasattr(type(value), "__index__"):
        return False
    return low <= operator.index(value) <= high


def _is_buffer(value: Any) -> bool:
    try:
        memoryview(value)
    except TypeError:
        return False
    return True


def _is_dims(value: Any) -> bool:
    if isinstance(value, Dims):
        return True
    return isinstance(value, tuple | list | np.ndarray) and all(_integer(d, -(2**63), 2**63 - 1) for d in value)


# pybind11's casters as the real bindings use them: what each parameter type accepts.
_ACCEPTS = {
    "int32": lambda v: _integer(v, -(2**31), 2**31 - 1),
    "uint32": lambda v: _integer(v, 0, 2**32 - 1),
    "size": lambda v: _integer(v, 0, 2**64 - 1),
    "str": lambda v: isinstance(v, str | bytes),
    "optional str": lambda v: v is None or isinstance(v, str | bytes),
    "bool": lambda v: v is None or isinstance(v, bool | int | float | np.bool_ | np.number),
    "buffer": _is_buffer,
    "dims": _is_dims,
}


def _expect(function: str, **arguments: tuple[Any, Any]) -> None:
    """Raise pybind11's TypeError unless each ``name=(value, kind)`` fits; ``kind`` is a class or an _ACCEPTS key."""
    for name, (value, kind) in arguments.items():
        fits = _ACCEPTS[kind](value) if isinstance(kind, str) else isinstance(value, kind)
        if not fits:
            wanted = kind if isinstance(kind, str) else kind.__qualname__
            raise TypeError(
                f"{function}(): incompatible function arguments (emulated: {name} must be {wanted}, "
                f"got {type(value).__name__})"
            )


class Dims(_Emulated):
    """``tensorrt.Dims``: a sequence of ints, equal to tuples and lists (not to another Dims), unhashable."""

    MAX_DIMS = 8
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: Any = ()) -> None:
        _expect("__init__", shape=(shape, "dims"))
        self._dims = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._dims[index]
        try:
            return self._dims[index]
        except IndexError:
            raise IndexError("Out of bounds") from None

    def __eq__(self, other: object) -> bool:
        _expect("__eq__", other=(other, tuple | list))
        return self._dims == tuple(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return repr(self._dims)


class IHostMemory(_Emulated, bytes):
    """``tensorrt.IHostMemory``: a buffer (``memoryview(x)`` works) with ``nbytes``."""

    @property
    def nbytes(self) -> int:
        return len(self)


def state(trt: types.ModuleType) -> dict[str, Any]:
    """Test-only state of an emulated module: build and timing-cache counts, flags, pools, profiles, enum look-ups."""
    return trt._state


def make_module(major: int = 11, device: Any = fake_pycuda) -> types.ModuleType:
    """A fresh emulated ``tensorrt`` module for TensorRT ``major`` (10 or 11)."""
    if major not in VERSIONS:
        raise ValueError(f"emulated TensorRT major must be one of {sorted(VERSIONS)}")
    trt = observe.ObservedModule("tensorrt", f"EMULATED tensorrt {VERSIONS[major]} (tests only)")
    touched: set[str] = set()
    trt._state = {
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
    trt._major = major
    trt.__version__ = VERSIONS[major]
    for qualname, members in ENUMS[major].items():
        kind = _TrtEnum(qualname.rsplit(".", 1)[-1], members, qualname=qualname, module="tensorrt")
        kind._touched, kind._major = touched, major
        if "." not in qualname:
            setattr(trt, qualname, kind)
    trt.Dims, trt.IHostMemory = Dims, IHostMemory
    trt.nptype = _nptype(trt)
    _install_logger(trt, ENUMS[major]["ILogger.Severity"], touched)
    _install_classes(trt, trt._state, device)
    return trt


def _nptype(trt: types.ModuleType) -> Any:
    def nptype(trt_type: Any) -> type:
        """The numpy type of a DataType member; TypeError for types numpy cannot hold (as the real one)."""
        if isinstance(trt_type, trt.DataType) and trt_type.name in _NUMPY:
            return _NUMPY[trt_type.name]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    return nptype


def _install_logger(trt: types.ModuleType, severities: dict[str, int], touched: set[str]) -> None:
    severity = _TrtEnum("Severity", severities, qualname="ILogger.Severity", module="tensorrt")
    severity._touched, severity._major = touched, trt._major

    class ILogger(_Emulated):
        Severity = severity

        def log(self, severity: Any, msg: str) -> None:
            raise NotImplementedError("ILogger.log is abstract")

    class Logger(ILogger):
        def __init__(self, min_severity: Any = severity.WARNING) -> None:
            _expect("__init__", min_severity=(min_severity, severity))
            self._min_severity = min_severity
            self._messages: list[str] = []

        @property
        def min_severity(self) -> Any:
            return self._min_severity

        def log(self, severity: Any, msg: str) -> None:
            _expect("log", severity=(severity, ILogger.Severity), msg=(msg, "str"))
            self._messages.append(msg)

    for member in severity:
        setattr(ILogger, member.name, member)
    for cls in (ILogger, Logger):
        cls._major, cls.__qualname__ = trt._major, cls.__name__
    trt.ILogger, trt.Logger = ILogger, Logger


def _install_classes(trt: types.ModuleType, state: dict, device: Any) -> None:
    """Builder, parser, runtime, engine and context, closed over this module's state."""
    ILogger = trt.ILogger

    class ITensor(_Emulated):
        @classmethod
        def _make(cls, name: str, shape: tuple[int, ...], dtype: Any) -> ITensor:
            tensor = object.__new__(cls)
            tensor._name, tensor._shape, tensor._dtype = name, tuple(shape), dtype
            return tensor

        @property
        def name(self) -> str:
            return self._name

        @property
        def shape(self) -> Dims:
            return Dims(self._shape)

        @property
        def dtype(self) -> Any:
            return self._dtype

    class INetworkDefinition(_Emulated):
        @classmethod
        def _make(cls, flags: int) -> INetworkDefinition:
            network = object.__new__(cls)
            network._flags = flags
            network._inputs, network._outputs, network._onnx = [], [], b""
            return network

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        def get_input(self, index: int) -> ITensor:
            _expect("get_input", index=(index, "int32"))
            return self._inputs[index]

    class ParserError(_Emulated):
        @classmethod
        def _make(cls, desc: str) -> ParserError:
            error = object.__new__(cls)
            error._desc = desc
            return error

        def desc(self) -> str:
            return self._desc

        def __str__(self) -> str:
            return f"In node -1 (parse): {self._desc}"

    class OnnxParser(_Emulated):
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            _expect("__init__", network=(network, INetworkDefinition), logger=(logger, ILogger))
            self._network, self._errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            _expect("get_error", index=(index, "int32"))
            return self._errors[index]

        def parse(self, model: Any, path: str | None = None) -> bool:
            _expect("parse", model=(model, "buffer"), path=(path, "optional str"))
            try:
                proto = onnx.load_model_from_string(bytes(model))
                onnx.checker.check_model(proto)
                _describe(proto, self._network._inputs, self._network._outputs, trt, ITensor._make)
            except Exception as exc:
                self._errors.append(ParserError._make(f"{type(exc).__name__}: {exc}"))
                return False
            self._network._onnx = bytes(model)
            return True

    class IOptimizationProfile(_Emulated):
        @classmethod
        def _make(cls) -> IOptimizationProfile:
            profile = object.__new__(cls)
            profile._shapes = {}
            return profile

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            _expect("set_shape", input=(input, "str"), min=(min, "dims"), opt=(opt, "dims"), max=(max, "dims"))
            self._shapes[input] = [tuple(int(d) for d in s) for s in (min, opt, max)]

    class ITimingCache(_Emulated):
        @classmethod
        def _make(cls, entries: dict[str, str], device_name: str) -> ITimingCache:
            cache = object.__new__(cls)
            cache._entries, cache._device_name = entries, device_name
            return cache

        def serialize(self) -> IHostMemory:
            body = json.dumps({"device": self._device_name, "entries": self._entries}).encode()
            return IHostMemory(_CACHE_MAGIC + body)

    class IBuilderConfig(_Emulated):
        @classmethod
        def _make(cls) -> IBuilderConfig:
            config = object.__new__(cls)
            config._profiles, config._cache = [], None
            return config

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            _expect("set_memory_pool_limit", pool=(pool, trt.MemoryPoolType), pool_size=(pool_size, "size"))
            state["pool_limits"][pool.name] = pool_size

        def set_flag(self, flag: Any) -> None:
            _expect("set_flag", flag=(flag, trt.BuilderFlag))
            state["config_flags"].append(flag.name)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            _expect("add_optimization_profile", profile=(profile, IOptimizationProfile))
            self._profiles.append(profile)
            state["profiles"].append(profile._shapes)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
            _expect("create_timing_cache", serialized_timing_cache=(serialized_timing_cache, "buffer"))
            blob = bytes(serialized_timing_cache)
            if not blob:
                return ITimingCache._make({}, "Emulated GPU (numpy)")
            if not blob.startswith(_CACHE_MAGIC):
                raise RuntimeError("emulated: corrupt timing cache")
            data = json.loads(blob[len(_CACHE_MAGIC) :])
            return ITimingCache._make(dict(data["entries"]), data["device"])

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            _expect("set_timing_cache", cache=(cache, ITimingCache), ignore_mismatch=(ignore_mismatch, "bool"))
            if cache._device_name != "Emulated GPU (numpy)" and not ignore_mismatch:
                return False
            self._cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

    class Builder(_Emulated):
        def __init__(self, logger: Any) -> None:
            _expect("__init__", logger=(logger, ILogger))
            self._logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            _expect("create_network", flags=(flags, "uint32"))
            state["network_flags"].append(flags)
            return INetworkDefinition._make(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig._make()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile._make()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
            _expect("build_serialized_network", network=(network, INetworkDefinition), config=(config, IBuilderConfig))
            problem = _build_problem(network, config)
            if problem:
                self._logger.log(trt.Logger.ERROR, problem)
                return None
            state["builds"] += 1
            _touch_cache(config, network, state)
            strongly = bool(network._flags >> int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) & 1)
            header = {
                "version": trt.__version__,
                "strongly_typed": strongly,
                "profile": {k: [list(s) for s in v] for k, v in config._profiles[0]._shapes.items()},
            }
            body = json.dumps(header).encode()
            return IHostMemory(_PLAN_MAGIC + struct.pack("<Q", len(body)) + body + network._onnx)

    class Runtime(_Emulated):
        def __init__(self, logger: Any) -> None:
            _expect("__init__", logger=(logger, ILogger))
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
            _expect("deserialize_cuda_engine", serialized_engine=(serialized_engine, "buffer"))
            blob = bytes(serialized_engine)
            if not blob.startswith(_PLAN_MAGIC):
                self._logger.log(trt.Logger.ERROR, "emulated: not a plan")
                return None
            (size,) = struct.unpack_from("<Q", blob, len(_PLAN_MAGIC))
            start = len(_PLAN_MAGIC) + 8
            header = json.loads(blob[start : start + size])
            if header["version"] != trt.__version__:
                self._logger.log(trt.Logger.ERROR, "emulated: plan from another TensorRT version")
                return None
            return _make_engine(trt, header, blob[start + size :])

    classes = (ITensor, INetworkDefinition, ParserError, OnnxParser, IOptimizationProfile, ITimingCache)
    for cls in (*classes, IBuilderConfig, Builder, Runtime):
        cls._major, cls.__qualname__ = state["major"], cls.__name__
        setattr(trt, cls.__name__, cls)
    _install_engine_classes(trt, device, state["major"])


def _describe(proto: onnx.ModelProto, inputs: list, outputs: list, trt: types.ModuleType, tensor_type: Any) -> None:
    """Fill the network's inputs/outputs from the ONNX graph, as TensorRT's parser does."""
    initialisers = {init.name for init in proto.graph.initializer}
    for values, target in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        for value in values:
            if value.name in initialisers:
                continue
            kind = _ONNX_TO_TRT.get(value.type.tensor_type.elem_type)
            if kind is None:
                raise TypeError(f"{value.name}: unsupported ONNX element type {value.type.tensor_type.elem_type}")
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            target.append(tensor_type(value.name, dims, trt.DataType[kind]))


def _build_problem(network: Any, config: Any) -> str | None:
    if not network._onnx:
        return "emulated: empty network (nothing parsed)"
    dynamic = [t for t in network._inputs if -1 in tuple(t.shape)]
    if dynamic and len(config._profiles) != 1:
        return "emulated: dynamic inputs need exactly one optimisation profile here"
    for tensor in dynamic:
        shapes = config._profiles[0]._shapes.get(tensor.name)
        if shapes is None:
            return f"emulated: no profile shape for {tensor.name}"
        low, opt, high = shapes
        want_shape = tuple(tensor.shape)
        fits = all(len(s) == len(want_shape) for s in shapes) and all(
            want in (-1, a) and want in (-1, b) and want in (-1, c) and a <= b <= c
            for want, a, b, c in zip(want_shape, low, opt, high, strict=True)
        )
        if not fits:
            return f"emulated: invalid profile {shapes} for {tensor.name} {want_shape}"
    return None


def _touch_cache(config: Any, network: Any, state: dict) -> None:
    if config._cache is None:
        return
    key = hashlib.sha256(network._onnx + json.dumps(config._profiles[0]._shapes).encode()).hexdigest()
    if key in config._cache._entries:
        state["cache_hits"] += 1
    else:
        state["cache_misses"] += 1
        config._cache._entries[key] = "tactics"


def _make_engine(trt: types.ModuleType, header: dict, onnx_bytes: bytes) -> Any:
    """An emulated ICudaEngine for a deserialised plan: ONNX Runtime runs its graph."""
    inputs: list = []
    outputs: list = []
    proto = onnx.load_model_from_string(onnx_bytes)
    _describe(proto, inputs, outputs, trt, lambda name, shape, dtype: (name, shape, dtype))
    io = [(n, s, d, trt.TensorIOMode.INPUT) for n, s, d in inputs]
    io += [(n, s, d, trt.TensorIOMode.OUTPUT) for n, s, d in outputs]
    profile = {name: [tuple(s) for s in shapes] for name, shapes in header["profile"].items()}
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return trt.ICudaEngine._make(io, len(inputs), profile, session)


def _install_engine_classes(trt: types.ModuleType, device: Any, major: int) -> None:
    """ICudaEngine and IExecutionContext of this module; no public constructors, as in the real bindings."""

    class IExecutionContext(_Emulated):
        @classmethod
        def _make(cls, engine: Any) -> IExecutionContext:
            device.require_context("createExecutionContext")
            context = object.__new__(cls)
            context._engine = engine
            context._shapes: dict[str, tuple[int, ...]] = {}
            context._addresses: dict[str, int] = {}
            context._enqueued = context._completed = 0  # one context = one scratch area: runs must stay ordered
            return context

        def set_input_shape(self, name: str, shape: Any) -> bool:
            _expect("set_input_shape", name=(name, "str"), shape=(shape, "dims"))
            io, profile = self._engine._io, self._engine._profile
            spec = next((s for n, s, _, m in io if n == name and m == trt.TensorIOMode.INPUT), None)
            shape = tuple(int(d) for d in shape)
            if spec is None or len(shape) != len(spec):
                return False
            low, _, high = profile.get(name, [spec, spec, spec])
            if not all(a <= x <= b for a, x, b in zip(low, shape, high, strict=True)):
                return False
            self._shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            _expect("set_tensor_address", name=(name, "str"), memory=(memory, "size"))
            if all(n != name for n, *_ in self._engine._io):
                return False
            self._addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            _expect("execute_async_v3", stream_handle=(stream_handle, "size"))
            device.require_context("enqueueV3")
            try:
                job = self._job()
            except (KeyError, ValueError):
                return False
            device.enqueue(stream_handle, job)
            return True

        def _job(self) -> Any:
            """Snapshot shapes and addresses now: TensorRT consumes them at enqueue."""
            io, session = self._engine._io, self._engine._session
            batch = {self._shapes[n][0] for n, *_ in io[: self._engine._n_inputs]}
            if len(batch) != 1:
                raise ValueError("inputs disagree on the batch")
            (n_batch,) = batch
            feeds_at = [
                (n, self._shapes[n], trt.nptype(d), self._addresses[n])
                for n, _, d, m in io
                if m == trt.TensorIOMode.INPUT
            ]
            outputs_at = [
                (n, (n_batch, *s[1:]), trt.nptype(d), self._addresses[n])
                for n, s, d, m in io
                if m == trt.TensorIOMode.OUTPUT
            ]
            sequence, self._enqueued = self._enqueued, self._enqueued + 1

            def run() -> None:
                if self._completed != sequence:
                    raise fake_pycuda.LogicError(
                        "emulated race: an execute_async_v3 ran before an earlier one of the same execution "
                        "context (enqueues on different streams need an event dependency)"
                    )
                self._completed += 1
                feeds = {}
                for name, shape, dtype, address in feeds_at:
                    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    feeds[name] = device.read(address, nbytes).view(dtype).reshape(shape)
                values = session.run([o[0] for o in outputs_at], feeds)
                for (_, _shape, dtype, address), value in zip(outputs_at, values, strict=True):
                    data = np.ascontiguousarray(value.astype(dtype, copy=False)).reshape(-1).view(np.uint8)
                    device.write(address, data)

            return run

    class ICudaEngine(_Emulated):
        @classmethod
        def _make(cls, io: list, n_inputs: int, profile: dict, session: Any) -> ICudaEngine:
            engine = object.__new__(cls)
            engine._io, engine._n_inputs, engine._profile, engine._session = io, n_inputs, profile, session
            return engine

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        @property
        def num_optimization_profiles(self) -> int:
            return 1

        @property
        def device_memory_size_v2(self) -> int:
            return 1 << 20

        def get_tensor_name(self, index: int) -> str:
            _expect("get_tensor_name", index=(index, "int32"))
            return self._io[index][0]

        def _find(self, function: str, name: str) -> tuple:
            _expect(function, name=(name, "str"))
            return next(entry for entry in self._io if entry[0] == name)

        def get_tensor_mode(self, name: str) -> Any:
            return self._find("get_tensor_mode", name)[3]

        def get_tensor_dtype(self, name: str) -> Any:
            return self._find("get_tensor_dtype", name)[2]

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self._find("get_tensor_shape", name)[1])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
            _expect("get_tensor_profile_shape", name=(name, "str"), profile_index=(profile_index, "int32"))
            return [Dims(shape) for shape in self._profile.get(name, [])]

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext._make(self)

    if major == 10:
        ICudaEngine.device_memory_size = property(lambda self: 1 << 20)
    for cls in (ICudaEngine, IExecutionContext):
        cls._major, cls.__qualname__ = major, cls.__name__
        setattr(trt, cls.__name__, cls)
