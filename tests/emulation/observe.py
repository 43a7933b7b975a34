"""Observation points of the emulated ``tensorrt`` and ``pycuda.driver`` (tests only).

Every public attribute read on an emulated module, class or instance passes through
``seen``. Normally no observer is set and that costs one comparison. The real-binding
check (``tests/bindings/recorder.py``) sets one while the emulated suites run: it records
which names the engine code reads and calls, with the argument types, and hands back a
recording wrapper for functions and methods. Class instantiation passes through
``ObservedType.__call__`` the same way, so ``trt.Builder(logger)`` is seen as a call.
"""

from __future__ import annotations

import enum
import sys
import types
from typing import Any, Protocol


class Observer(Protocol):
    def seen(self, owner: Any, name: str, value: Any, frame: types.FrameType) -> Any:
        """A public attribute ``name`` of ``owner`` was read from ``frame``; return what the reader gets."""

    def constructed(self, cls: type, args: tuple, kwargs: dict, frame: types.FrameType, make: Any) -> Any:
        """``cls(*args, **kwargs)`` was called from ``frame``; ``make()`` builds the instance."""


_observer: Observer | None = None


def set_observer(observer: Observer | None) -> None:
    global _observer
    _observer = observer


def notify(owner: Any, name: str, value: Any, frame: types.FrameType) -> Any:
    """For emulated objects that cannot use the classes below: report a read of ``owner.name``."""
    if _observer is None or name[:1] == "_":
        return value
    return _observer.seen(owner, name, value, frame)


class Observed:
    """Base of emulated classes whose instance attribute reads are observable."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _observer is None or name[:1] == "_":
            return value
        return _observer.seen(self, name, value, sys._getframe(1))


class ObservedType(type):
    """Metaclass of emulated classes: class attribute reads and instantiation are observable."""

    def __getattribute__(cls, name: str) -> Any:
        value = type.__getattribute__(cls, name)
        if _observer is None or name[:1] == "_":
            return value
        return _observer.seen(cls, name, value, sys._getframe(1))

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if _observer is None:
            return type.__call__(cls, *args, **kwargs)
        return _observer.constructed(cls, args, kwargs, sys._getframe(1), lambda: type.__call__(cls, *args, **kwargs))


class ObservedEnumType(enum.EnumMeta):
    """Metaclass of emulated enums: member look-ups are observable and counted in ``touched``."""

    def __getattribute__(cls, name: str) -> Any:
        value = super().__getattribute__(name)
        if name[:1] == "_":
            return value
        touched = type.__getattribute__(cls, "__dict__").get("_touched")
        if touched is not None and isinstance(value, cls):
            touched.add(f"{type.__getattribute__(cls, '__qualname__')}.{name}")
        if _observer is None:
            return value
        return _observer.seen(cls, name, value, sys._getframe(1))


class ObservedModule(types.ModuleType):
    """An emulated module whose public attribute reads are observable."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _observer is None or name[:1] == "_":
            return value
        return _observer.seen(self, name, value, sys._getframe(1))
