"""pytest plugin: record the TensorRT and pycuda names the GPU modules use while the emulated suites run.

    INSPECTD_BINDINGS_RECORD=calls.json python -m pytest -p tests.bindings.recorder tests/test_backends.py ...

The emulated ``tensorrt`` and ``pycuda.driver`` report every public attribute read on their modules,
classes and instances (``tests.emulation.observe``). This recorder keeps those made from one of the
GPU modules (``sites.gpu_modules()``) as "get" records (with the type of what was read, unless it is
a function or method), and hands back functions and methods
wrapped so that their calls are recorded as well: the argument descriptors (``calls.describe``: type,
enum class and member, TensorRT class, value of a number), the keyword names, and what came back
or was raised. Making an instance through an emulated class (``trt.Builder(logger)``) is a call
of that class. One record per distinct (module, TensorRT major, owner, name, argument signature),
with every place (file:line) it happened; written as JSON when the session ends.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.bindings import calls, sites
from tests.emulation import observe

ENV = "INSPECTD_BINDINGS_RECORD"
_ROUTINES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.BuiltinMethodType)


def returned(value: Any) -> str:
    """The type name a caller received, as the real bindings' signatures spell return types."""
    if value is None:
        return "None"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__}[{returned(value[0]) if value else ''}]"
    if isinstance(value, type):
        return "type"
    if isinstance(value, enum.Enum) or calls.is_emulated(type(value)):
        return type(value).__qualname__
    return type(value).__name__


class Recorder:
    """An ``observe.Observer`` that keeps what the watched files read and call."""

    def __init__(self, watched: Iterable[Path], root: Path = sites.ROOT) -> None:
        self.watched = {str(path): path.relative_to(root).as_posix() for path in watched}
        self.records: dict[tuple, dict[str, Any]] = {}
        self.lock = threading.Lock()

    # -- observe.Observer ------------------------------------------------------------
    def seen(self, owner: Any, name: str, value: Any, frame: types.FrameType) -> Any:
        place = self._place(frame)
        if place is None:
            return value
        module, major, qualname = self._owner(owner)
        got = None if isinstance(value, _ROUTINES) else returned(value)
        self._add({"kind": "get", "module": module, "major": major, "owner": qualname, "name": name}, place, got)
        if isinstance(value, _ROUTINES):
            static = isinstance(owner, type) and not isinstance(value, types.MethodType)
            entry = {"module": module, "major": major, "owner": qualname, "name": name, "static": static}
            return self._wrap(value, entry)
        return value

    def constructed(self, cls: type, args: tuple, kwargs: dict, frame: types.FrameType, make: Callable) -> Any:
        place = self._place(frame)
        if place is None:
            return make()
        module, major, _ = self._owner(cls)
        entry = {"module": module, "major": major, "owner": "", "name": cls.__name__}
        return self._call(entry, make, args, kwargs, place)

    # -- recording --------------------------------------------------------------------
    def _place(self, frame: types.FrameType) -> str | None:
        relative = self.watched.get(frame.f_code.co_filename)
        return None if relative is None else f"{relative}:{frame.f_lineno}"

    def _owner(self, owner: Any) -> tuple[str, int | None, str]:
        """(emulated module name, TensorRT major or None, owner's qualified name; "" for a module)."""
        if isinstance(owner, types.ModuleType):
            return owner.__name__, getattr(owner, "_major", None), ""
        cls = owner if isinstance(owner, type) else type(owner)
        module = calls.EMULATION_MODULES.get(cls.__module__, cls.__module__)
        major = getattr(cls, "_major", None)
        if module == "tensorrt" and major is None:  # Dims and IHostMemory are shared by both majors
            major = getattr(sys.modules.get("tensorrt"), "_major", None)
        return module, major, cls.__qualname__

    def _wrap(self, function: Callable, entry: dict[str, Any]) -> Callable:
        @functools.wraps(function)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            place = self._place(sys._getframe(1))
            if place is None:
                return function(*args, **kwargs)
            return self._call(entry, lambda: function(*args, **kwargs), args, kwargs, place)

        return recorded

    def _call(self, entry: dict[str, Any], run: Callable, args: tuple, kwargs: dict, place: str) -> Any:
        call = {
            "kind": "call",
            **entry,
            "args": [calls.describe(a) for a in args],
            "kwargs": {key: calls.describe(value) for key, value in kwargs.items()},
        }
        try:
            result = run()
        except Exception as exc:
            self._add(call, place, f"raises {type(exc).__name__}")
            raise
        self._add(call, place, returned(result))
        return result

    def _add(self, entry: dict[str, Any], place: str, outcome: str | None = None) -> None:
        key = (
            entry["module"],
            entry["major"],
            entry["kind"],
            entry["owner"],
            entry["name"],
            tuple(calls.signature(a) for a in entry.get("args", ())),
            tuple(sorted((k, calls.signature(a)) for k, a in entry.get("kwargs", {}).items())),
        )
        with self.lock:
            record = self.records.setdefault(key, {**entry, "sites": set(), "outcomes": set()})
            record["sites"].add(place)
            if outcome is not None:
                record["outcomes"].add(outcome)

    def export(self) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {**record, "sites": sorted(record["sites"]), "outcomes": sorted(record["outcomes"])}
                for record in self.records.values()
            ]


# -- pytest plugin -------------------------------------------------------------------------
_recorder: Recorder | None = None


def pytest_configure(config: Any) -> None:
    global _recorder
    if os.environ.get(ENV):
        _recorder = Recorder(sites.gpu_modules())
        observe.set_observer(_recorder)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if _recorder is None:
        return
    observe.set_observer(None)
    report = {
        "exitstatus": int(exitstatus),
        "collected": session.testscollected,
        "failed": session.testsfailed,
        "watched": sorted(_recorder.watched.values()),
        "records": _recorder.export(),
    }
    Path(os.environ[ENV]).write_text(json.dumps(report, indent=1, sort_keys=True))
