"""Run inside a subprocess that imports the REAL TensorRT bindings (stub libraries behind them).

    python -m tests.bindings.replay REQUEST.json ANSWER.json

The request holds recorded calls and the negative controls. The answer holds the module's surface
(public names; per class its members, their kind and pybind11 signatures; every enum with its
values; what ``nptype`` makes of each DataType) and a verdict per call: "accepted" (pybind11
converted the arguments: the call then returned, raised something else, or died in C++ behind an
instance without a C++ object), "rejected" (``TypeError: incompatible function/constructor
arguments``) or "missing" (a name it needs does not exist). Each call runs in a forked child, so a
crash behind the uninitialised instance is contained and cannot be mistaken for a rejection.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from typing import Any

from tests.bindings.calls import INCOMPATIBLE, Missing, Unreplayable, invoke

_SIGNATURE = re.compile(r"^(?:\d+\. )?(?P<name>\w+)\((?P<params>.*)\) -> (?P<returns>.+)$")
_PROPERTY = re.compile(r"^\((?P<params>.*)\) -> (?P<returns>.+)$")


def normalise(annotation: str) -> str:
    """``tensorrt_bindings.tensorrt.Dims`` -> ``Dims``; ``List[X]`` -> ``list[X]``."""
    for prefix in ("tensorrt_bindings.tensorrt.", "tensorrt.", "typing_extensions.", "typing."):
        annotation = annotation.replace(prefix, "")
    return annotation.replace("List[", "list[").strip()


def _split_params(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(<":
            depth += 1
        elif char in "])>":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def parse_params(text: str) -> list[dict[str, Any]]:
    params = []
    for part in _split_params(text):
        name, _, rest = part.partition(":")
        annotation, has_default, _ = rest.partition(" = ")
        params.append({"name": name.strip(), "type": normalise(annotation), "default": bool(has_default)})
    return params


def signatures(doc: str | None, name: str) -> list[dict[str, Any]]:
    """Every overload pybind11 wrote into ``doc``: parameters (self first) and return type."""
    found = []
    for line in (doc or "").splitlines():
        match = _SIGNATURE.match(line.strip())
        if match and match["name"] == name and match["params"] != "*args, **kwargs":
            found.append({"params": parse_params(match["params"]), "returns": normalise(match["returns"])})
    return found


def _member(cls: type, attr: str) -> dict[str, Any]:
    raw = inspect.getattr_static(cls, attr)
    value = getattr(cls, attr, None)
    if isinstance(raw, property) and type(raw).__name__ == "pybind11_static_property":
        return {"kind": "data", "value": value if isinstance(value, int | float | str | bool) else None}
    if isinstance(raw, property):
        match = _PROPERTY.match((raw.fget.__doc__ or "").strip().splitlines()[0] if raw.fget.__doc__ else "")
        return {"kind": "property", "returns": normalise(match["returns"]) if match else None}
    if isinstance(raw, staticmethod):
        return {"kind": "static", "signatures": signatures(value.__doc__, attr)}
    if isinstance(value, type):
        return {"kind": "class"}
    if hasattr(type(value), "__members__") and isinstance(value, type(value)) and hasattr(value, "name"):
        return {"kind": "enum member", "enum": type(value).__qualname__, "value": int(value)}
    if callable(value):
        return {"kind": "method", "signatures": signatures(value.__doc__, attr)}
    return {"kind": "data", "value": value if isinstance(value, int | float | str | bool) else None}


def surface(trt: Any) -> dict[str, Any]:
    """Names, members, signatures and enums of the real module."""
    classes: dict[str, Any] = {}
    enums: dict[str, dict[str, int]] = {}

    def visit(cls: type, qualname: str) -> None:
        if hasattr(cls, "__members__"):
            enums[qualname] = {name: int(member) for name, member in cls.__members__.items()}
        members = {}
        for attr in dir(cls):
            if attr.startswith("_"):
                continue
            members[attr] = _member(cls, attr)
            nested = getattr(cls, attr, None)
            if isinstance(nested, type) and nested.__module__ == cls.__module__ and attr == nested.__name__:
                visit(nested, f"{qualname}.{attr}")
        init = signatures(getattr(cls.__init__, "__doc__", None), "__init__")
        classes[qualname] = {"members": members, "init": init, "bases": [b.__name__ for b in cls.__mro__[1:]]}

    module_names = {}
    for name in dir(trt):
        if name.startswith("_"):
            continue
        value = getattr(trt, name)
        module_names[name] = "class" if isinstance(value, type) else "function" if callable(value) else "data"
        if isinstance(value, type):
            visit(value, name)
    nptype = {}
    for name, member in trt.DataType.__members__.items():
        try:
            nptype[name] = trt.nptype(member).__name__
        except TypeError as exc:
            nptype[name] = f"TypeError: {exc}"
    return {"version": trt.__version__, "module": module_names, "classes": classes, "enums": enums, "nptype": nptype}


def trial(call: dict[str, Any], trt: Any) -> str:
    """The verdict on one call, made in a forked child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: convert, call, report, and leave without cleanup
        os.close(read)
        try:
            invoke(call, trt)
            verdict = "accepted: returned"
        except Missing as exc:
            verdict = f"missing: {exc}"
        except Unreplayable as exc:
            verdict = f"unreplayable: {exc}"
        except TypeError as exc:
            text = str(exc).splitlines()[0]
            verdict = f"rejected: {text}" if INCOMPATIBLE.search(str(exc)) else f"accepted: TypeError: {text}"
        except BaseException as exc:
            verdict = f"accepted: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        os.write(write, verdict.encode()[:2000])
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return b"".join(chunks).decode()
    return f"accepted: the C++ behind the bare instance died (signal {os.WTERMSIG(status)}) after conversion"


def main(request_path: str, answer_path: str) -> int:
    import tensorrt_bindings as trt

    sys.modules["tensorrt"] = trt  # what `import tensorrt` gives with the full packages installed
    with open(request_path) as stream:
        request = json.load(stream)
    answer = {
        "surface": surface(trt),
        "calls": [trial(call, trt) for call in request["calls"]],
        "controls": [trial(call, trt) for _, call in request["controls"]],
    }
    with open(answer_path, "w") as stream:
        json.dump(answer, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
