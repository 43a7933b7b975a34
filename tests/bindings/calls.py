"""Recorded calls as data: argument descriptors, and how to replay one against a tensorrt module.

A descriptor keeps what pybind11's argument conversion looks at: the type, the enum class and
member, the class of a TensorRT object, the value of a number or string (an address may be too
large for a parameter), the length of a buffer. ``materialise`` turns it back into a value of
the *given* module (the real bindings or the emulation), so the same record replays on both.
Loaded by the replay subprocess too: it imports nothing from the project and nothing heavy.
"""

from __future__ import annotations

import enum
import re
from typing import Any

EMULATION_MODULES = {"tests.emulation.fake_tensorrt": "tensorrt", "tests.emulation.fake_pycuda": "pycuda.driver"}
INCOMPATIBLE = re.compile(r"incompatible (function|constructor) arguments")


class Missing(Exception):
    """A name the record needs does not exist in the module it is replayed against."""


class Unreplayable(Exception):
    """The recorder met an argument type it cannot describe; teach ``describe`` about it."""


def is_emulated(cls: type) -> bool:
    return getattr(cls, "__module__", "") in EMULATION_MODULES or getattr(cls, "__module__", "") == "tensorrt"


def describe(value: Any) -> dict[str, Any]:
    """A JSON-able descriptor of one argument as pybind11 would see it."""
    cls = type(value)
    if value is None:
        return {"t": "None"}
    if isinstance(value, enum.Enum):
        return {"t": "enum", "cls": cls.__qualname__, "name": value.name}
    if is_emulated(cls):
        if cls.__name__ == "Dims":
            return {"t": "Dims", "items": [describe(int(d)) for d in value]}
        return {"t": "obj", "cls": cls.__qualname__}
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return {"t": kind.__name__, "v": kind(value)}
    for kind in (bytes, bytearray, memoryview):
        if isinstance(value, kind):
            return {"t": kind.__name__, "n": len(value)}
    if isinstance(value, type):
        return {"t": "type", "cls": f"{value.__module__}.{value.__qualname__}"}
    if cls.__module__.split(".")[0] == "numpy":
        import numpy as np

        if isinstance(value, np.dtype):
            return {"t": "dtype", "v": str(value)}
        if isinstance(value, np.ndarray):
            return {"t": "ndarray", "dtype": str(value.dtype), "shape": list(value.shape)}
        if isinstance(value, np.generic):
            return {"t": "numpy", "dtype": str(value.dtype), "v": value.item()}
    if isinstance(value, tuple | list):
        return {"t": "tuple" if isinstance(value, tuple) else "list", "items": [describe(v) for v in value]}
    return {"t": "other", "cls": f"{cls.__module__}.{cls.__qualname__}"}


def signature(descriptor: dict[str, Any]) -> str:
    """What matters for conversion, without incidental values (addresses bucketed by range)."""
    kind = descriptor["t"]
    if kind == "int":
        value = descriptor["v"]
        return "int:" + ("<0" if value < 0 else "<2^31" if value < 2**31 else "<2^32" if value < 2**32 else ">=2^32")
    if kind in ("tuple", "list", "Dims"):
        return f"{kind}[{','.join(signature(item) for item in descriptor['items'])}]"
    if kind == "enum":
        return f"{descriptor['cls']}.{descriptor['name']}"
    if kind == "obj":
        return descriptor["cls"]
    if kind in ("ndarray", "numpy"):
        return f"{kind}:{descriptor['dtype']}"
    if kind == "dtype":
        return f"dtype:{descriptor['v']}"
    if kind in ("other", "type"):
        return f"{kind}:{descriptor['cls']}"
    return kind


def resolve(module: Any, dotted: str) -> Any:
    """``module.A.B`` for "A.B", or Missing."""
    target = module
    for part in dotted.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise Missing(f"{dotted} does not exist") from None
    return target


def materialise(descriptor: dict[str, Any], module: Any) -> Any:
    """The value a descriptor stands for, built from ``module``'s own classes and enums."""
    kind = descriptor["t"]
    if kind == "None":
        return None
    if kind in ("bool", "int", "float", "str"):
        return descriptor["v"]
    if kind in ("bytes", "bytearray", "memoryview"):
        data = bytes(min(descriptor["n"], 64))
        return {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data)}[kind]
    if kind == "enum":
        return resolve(module, f"{descriptor['cls']}.{descriptor['name']}")
    if kind == "Dims":
        return resolve(module, "Dims")(tuple(materialise(item, module) for item in descriptor["items"]))
    if kind == "obj":
        cls = resolve(module, descriptor["cls"])
        return cls.__new__(cls)  # no C++ object behind it: conversion still checks the type
    if kind in ("tuple", "list"):
        items = [materialise(item, module) for item in descriptor["items"]]
        return tuple(items) if kind == "tuple" else items
    if kind in ("ndarray", "numpy"):
        import numpy as np

        if kind == "ndarray":
            return np.zeros(descriptor["shape"], descriptor["dtype"])
        return np.dtype(descriptor["dtype"]).type(descriptor["v"])
    raise Unreplayable(f"cannot rebuild an argument of type {descriptor.get('cls', kind)}")


def invoke(call: dict[str, Any], module: Any) -> Any:
    """Perform a recorded call (or read) on ``module``; methods run on an instance without a C++ object."""
    owner, name = call["owner"], call["name"]
    if call["kind"] == "get":
        target = resolve(module, owner) if owner else module
        if not hasattr(target, name):
            raise Missing(f"{owner + '.' if owner else ''}{name} does not exist")
        return None
    args = [materialise(a, module) for a in call["args"]]
    kwargs = {key: materialise(a, module) for key, a in call["kwargs"].items()}
    if not owner:
        return resolve(module, name)(*args, **kwargs)
    cls = resolve(module, owner)
    if not hasattr(cls, name):
        raise Missing(f"{owner}.{name} does not exist")
    if call.get("static"):
        return getattr(cls, name)(*args, **kwargs)
    return getattr(cls.__new__(cls), name)(*args, **kwargs)


def _call(owner: str, name: str, *args: dict, **kwargs: dict) -> dict[str, Any]:
    return {"kind": "call", "owner": owner, "name": name, "args": list(args), "kwargs": kwargs}


def _v(kind: str, value: Any = None) -> dict[str, Any]:
    return {"t": kind} if kind == "None" else {"t": kind, "v": value}


def _enum(cls: str, name: str) -> dict[str, Any]:
    return {"t": "enum", "cls": cls, "name": name}


def _obj(cls: str) -> dict[str, Any]:
    return {"t": "obj", "cls": cls}


def _tuple(*values: Any) -> dict[str, Any]:
    return {"t": "tuple", "items": [_v(type(v).__name__, v) for v in values]}


NONE, NAME, FALSE = _v("None"), _v("str", "x"), _v("bool", False)
WORKSPACE, CONFIG = _enum("MemoryPoolType", "WORKSPACE"), _obj("IBuilderConfig")

# Calls that the real bindings must refuse (pybind11: incompatible arguments). If one were accepted,
# the check could not tell a wrong argument type from a right one; the emulation must refuse them too.
CONTROLS: list[tuple[str, dict[str, Any]]] = [
    ("a severity as a plain int", _call("", "Logger", _v("int", 2))),
    ("a pool as a plain int", _call("IBuilderConfig", "set_memory_pool_limit", _v("int", 0), _v("int", 1 << 20))),
    ("a negative pool size", _call("IBuilderConfig", "set_memory_pool_limit", WORKSPACE, _v("int", -1))),
    ("a flag as a plain int", _call("IBuilderConfig", "set_flag", _v("int", 0))),
    ("network flags beyond 32 bits", _call("Builder", "create_network", _v("int", 1 << 40))),
    ("profile shapes as ints", _call("IOptimizationProfile", "set_shape", NAME, *[_v("int", 1)] * 3)),
    ("a float in a shape", _call("IOptimizationProfile", "set_shape", NAME, _tuple(1.5), _tuple(1), _tuple(1))),
    ("an ONNX model as str", _call("OnnxParser", "parse", _v("str", "graph"))),
    ("a negative tensor address", _call("IExecutionContext", "set_tensor_address", NAME, _v("int", -1))),
    ("no stream handle", _call("IExecutionContext", "execute_async_v3", NONE)),
    ("a missing profile index", _call("ICudaEngine", "get_tensor_profile_shape", NAME)),
    ("a tensor index for a name", _call("ICudaEngine", "get_tensor_shape", _v("int", 0))),
    ("no timing cache", _call("IBuilderConfig", "set_timing_cache", NONE, FALSE)),
    ("a wrong keyword", _call("IBuilderConfig", "set_timing_cache", _obj("ITimingCache"), ignore=FALSE)),
    ("config and network swapped", _call("Builder", "build_serialized_network", CONFIG, _obj("INetworkDefinition"))),
    ("a plan as str", _call("Runtime", "deserialize_cuda_engine", _v("str", "plan"))),
    ("a parser without a logger", _call("", "OnnxParser", _obj("INetworkDefinition"), NONE)),
]  # fmt: skip
