"""EMULATION of the few ``pycuda.driver`` names inspectd calls, in-process, with numpy.

This is not CUDA and proves nothing about a GPU, a driver or real timings. It exists
so that the TensorRT backend's bookkeeping can be tested on machines without a GPU:
context push/pop balance, buffer lifetimes, stream ordering, event dependencies.

``driver_module()`` is what ``tests.emulation.install`` puts in ``sys.modules`` as
``pycuda.driver``: it carries only ``DRIVER_API``, names and signatures of pycuda's driver
wrapper (src/wrapper/wrap_cudadrv.cpp, pycuda 2026.1): ``init(flags=0)``, ``Device(i)`` with
static ``count()``, ``name()``, ``compute_capability()``, ``retain_primary_context()``;
``Context.push()``, static ``Context.pop()``, ``Context.synchronize()`` and
``Context.get_current()``, ``detach()``; ``Stream(flags=0)`` with ``handle``,
``synchronize()``, ``is_done()``, ``wait_for_event(evt)``; ``Event(flags=0)`` with
``record(stream=None)`` (returns self), ``synchronize()`` (returns self), ``query()``,
``time_since(event)``; ``mem_alloc(bytes)`` returning a ``DeviceAllocation`` (``int()``,
``free()``); ``pagelocked_empty(shape, dtype, order="C", mem_flags=0)`` whose ``.base`` (a
``PagelockedHostAllocation``) has ``free()``; ``memcpy_htod(dest, src)``, ``memcpy_dtoh(dest,
src)``, ``memcpy_htod_async(dest, src, stream=None)``, ``memcpy_dtoh_async(dest, src,
stream=None)``, ``memcpy_dtod_async(dest, src, size, stream=None)``; exceptions ``Error`` >
``LogicError``, ``MemoryError``. The test-only helpers (``reset``, ``live_device_allocations``,
``context_depth``, ``pending_operations``, ``stats`` and the hooks the TensorRT emulation uses) are attributes of this
module, never of the emulated driver. ``tests/test_real_bindings.py`` checks the names and
arity of the emulated driver, and of every pycuda call inspectd makes, against the wrapper
sources of the pycuda source package.

What still differs from pycuda (deliberately, to catch misuse; the same test keeps this list
honest where names and arity are concerned):

* Device memory is numpy byte arrays addressed by fake integer pointers. Streams queue their
  operations and run them only when something waits (``synchronize``, an event's
  ``synchronize``/``query``, a ``wait_for_event`` dependency), so reading a host buffer before
  its copy was waited for returns stale bytes, and overwriting a staging buffer before its
  upload ran uploads the new bytes: both make results wrong and tests fail. Fresh memory is
  filled with a poison pattern for the same reason.
* An asynchronous copy from pageable (not page-locked) host memory is refused, and so is an
  asynchronous copy or an event record without a stream (pycuda would use the legacy default
  stream, which inspectd never wants).
* Event times come from the host clock (strictly increasing), not from the GPU.
* ``PagelockedHostAllocation`` is a ``bytearray`` (numpy needs a buffer), so it has
  ``bytearray``'s methods and constructor (pycuda's has none: ``pagelocked_empty`` makes them).
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.emulation import observe

# Emulated classes that must subclass a builtin (listed above as a difference): its members are not compared.
BUILTIN_BASES = {"PagelockedHostAllocation": bytearray}
POISON_DEVICE = 0xA5
POISON_HOST = 0x5A


class Error(Exception):
    """Base of the emulated driver errors (pycuda.driver.Error)."""


class LogicError(Error):
    """Misuse: no current context, bad pointer, unreached event."""


class MemoryError(Error):
    """Out of emulated memory."""


class _World:
    """All emulated driver state; ``reset()`` replaces it."""

    def __init__(self, device_count: int = 1) -> None:
        self.device_count = device_count
        self.initialised = False
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, tuple[int, PagelockedHostAllocation]] = {}  # address -> (nbytes, owner)
        self.streams: dict[int, Stream] = {}
        self.next_address = 0x7F00_0000_0000
        self.local = threading.local()
        self.primary: dict[int, Context] = {}
        self.stats = {"mem_alloc": 0, "pagelocked_empty": 0, "push": 0, "pop": 0}
        self.clock = 0.0

    def tick(self) -> float:
        """Host time for an event, strictly later than the previous one (elapsed times are never 0)."""
        self.clock = max(time.perf_counter(), self.clock + 1e-9)
        return self.clock

    def stack(self) -> list[Context]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def new_address(self, nbytes: int) -> int:
        address = self.next_address
        self.next_address += (nbytes + 511) // 256 * 256 + 256  # gaps catch overruns
        return address

    def view(self, pointer: int, nbytes: int) -> np.ndarray:
        for base, memory in self.device.items():
            if base <= pointer and pointer + nbytes <= base + memory.size:
                return memory[pointer - base : pointer - base + nbytes]
        raise LogicError(f"emulated cuMemcpy: [{pointer:#x}, +{nbytes}) is not inside a live device allocation")

    def stream(self, handle: int) -> Stream:
        try:
            return self.streams[handle]
        except KeyError:
            raise LogicError(f"emulated: unknown stream handle {handle:#x}") from None


_WORLD = _World()


def reset(device_count: int = 1) -> None:
    """Forget every allocation, stream and context (a fresh emulated driver)."""
    global _WORLD
    _WORLD = _World(device_count)


def live_device_allocations() -> int:
    return len(_WORLD.device)


def live_pinned_allocations() -> int:
    return len(_WORLD.pinned)


def context_depth() -> int:
    """Contexts pushed on the calling thread's stack."""
    return len(_WORLD.stack())


def pending_operations() -> int:
    """Operations queued on emulated streams that nothing has waited for yet."""
    return sum(len(stream._ops) for stream in _WORLD.streams.values())


def stats() -> dict[str, int]:
    return dict(_WORLD.stats)


def _require_context(what: str) -> None:
    if not _WORLD.stack():
        raise LogicError(f"{what} failed: invalid device context (no current context on this thread)")


def require_context(what: str) -> None:
    """For the TensorRT emulation: fail as CUDA does when no context is current."""
    _require_context(what)


def enqueue(handle: int, operation: Callable[[], None]) -> None:
    """For the TensorRT emulation: queue ``operation`` on the stream with this handle."""
    _WORLD.stream(handle)._enqueue(operation)


def read(pointer: int, nbytes: int) -> np.ndarray:
    """For the TensorRT emulation: a copy of the bytes behind a device pointer range."""
    return _WORLD.view(pointer, nbytes).copy()


def write(pointer: int, data: np.ndarray) -> None:
    """For the TensorRT emulation: store bytes at a device pointer."""
    _WORLD.view(pointer, data.size)[:] = data


# -- driver entry points ------------------------------------------------------------
def init(flags: int = 0) -> None:
    _WORLD.initialised = True


class Device(observe.Observed, metaclass=observe.ObservedType):
    def __init__(self, number: int) -> None:
        if not _WORLD.initialised:
            raise LogicError("cuInit has not been called")
        if not 0 <= number < _WORLD.device_count:
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal {number}")
        self._number = number

    @staticmethod
    def count() -> int:
        if not _WORLD.initialised:
            raise LogicError("cuInit has not been called")
        return _WORLD.device_count

    def name(self) -> str:
        return "Emulated GPU (numpy)"

    def compute_capability(self) -> tuple[int, int]:
        return (9, 0)

    def retain_primary_context(self) -> Context:
        return _WORLD.primary.setdefault(self._number, Context._make(self._number))


class Context(observe.Observed, metaclass=observe.ObservedType):
    @classmethod
    def _make(cls, device: int) -> Context:
        context = object.__new__(cls)  # like pycuda, no public constructor
        context._device = device
        return context

    def push(self) -> None:
        _WORLD.stack().append(self)
        _WORLD.stats["push"] += 1

    @staticmethod
    def pop() -> None:
        stack = _WORLD.stack()
        if not stack:
            raise LogicError("cuCtxPopCurrent failed: invalid device context (context stack is empty)")
        stack.pop()
        _WORLD.stats["pop"] += 1

    @staticmethod
    def synchronize() -> None:
        _require_context("cuCtxSynchronize")
        for stream in list(_WORLD.streams.values()):
            stream.synchronize()

    @staticmethod
    def get_current() -> Context | None:
        stack = _WORLD.stack()
        return stack[-1] if stack else None

    def detach(self) -> None:
        pass


class Stream(observe.Observed, metaclass=observe.ObservedType):
    def __init__(self, flags: int = 0) -> None:
        _require_context("cuStreamCreate")
        self.handle = _WORLD.new_address(0)
        self._ops: deque[Callable[[], None]] = deque()
        _WORLD.streams[self.handle] = self

    def _enqueue(self, operation: Callable[[], None]) -> None:
        self._ops.append(operation)

    def _run_until(self, done: Callable[[], bool]) -> None:
        while not done() and self._ops:
            self._ops.popleft()()

    def synchronize(self) -> None:
        self._run_until(lambda: False)

    def is_done(self) -> bool:
        self.synchronize()
        return True

    def wait_for_event(self, evt: Event) -> None:
        # Like cuStreamWaitEvent: waits for the event's record *as of now*, not a later re-record.
        mark, source = evt._mark, evt._stream
        if source is not None:
            self._enqueue(lambda: source._run_until(lambda: mark.time is not None))


class _Mark:
    """One recording of an event; ``time`` is set when the stream reaches it."""

    time: float | None = None


class Event(observe.Observed, metaclass=observe.ObservedType):
    def __init__(self, flags: int = 0) -> None:
        _require_context("cuEventCreate")
        self._stream: Stream | None = None
        self._mark = _Mark()

    def record(self, stream: Stream | None = None) -> Event:
        if stream is None:
            raise LogicError("emulation: inspectd always records on an explicit stream")
        mark = _Mark()
        self._stream, self._mark = stream, mark
        stream._enqueue(lambda: setattr(mark, "time", _WORLD.tick()))
        return self

    def synchronize(self) -> Event:
        if self._stream is not None:
            mark = self._mark
            self._stream._run_until(lambda: mark.time is not None)
        return self

    def query(self) -> bool:
        self.synchronize()
        return True

    def time_since(self, event: Event) -> float:
        if self._mark.time is None or event._mark.time is None:
            raise LogicError("cuEventElapsedTime failed: invalid value (event not reached yet)")
        return (self._mark.time - event._mark.time) * 1e3


class DeviceAllocation(observe.Observed, metaclass=observe.ObservedType):
    @classmethod
    def _make(cls, nbytes: int) -> DeviceAllocation:
        allocation = object.__new__(cls)  # like pycuda, no public constructor: mem_alloc makes them
        allocation._pointer = _WORLD.new_address(nbytes)
        _WORLD.device[allocation._pointer] = np.full(nbytes, POISON_DEVICE, np.uint8)
        return allocation

    def __int__(self) -> int:
        return self._pointer

    __index__ = __int__

    def free(self) -> None:
        if _WORLD.device.pop(self._pointer, None) is None:
            raise LogicError(f"cuMemFree: {self._pointer:#x} freed twice")


class PagelockedHostAllocation(observe.Observed, bytearray, metaclass=observe.ObservedType):
    """The ``.base`` of a page-locked array; ``free()`` releases it now."""

    def free(self) -> None:
        address = np.frombuffer(self, np.uint8).ctypes.data if len(self) else id(self)
        if _WORLD.pinned.pop(address, None) is None:
            raise LogicError("cuMemFreeHost: freed twice")


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _require_context("cuMemAlloc")
    if nbytes < 1:
        raise LogicError("cuMemAlloc failed: invalid value (0 bytes)")
    _WORLD.stats["mem_alloc"] += 1
    return DeviceAllocation._make(int(nbytes))


def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    _require_context("cuMemHostAlloc")
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    owner = PagelockedHostAllocation(bytes([POISON_HOST]) * nbytes)
    address = np.frombuffer(owner, np.uint8).ctypes.data if nbytes else id(owner)
    _WORLD.pinned[address] = (nbytes, owner)
    _WORLD.stats["pagelocked_empty"] += 1
    return np.ndarray(shape, dtype, buffer=owner, order=order)


def _host_bytes(array: np.ndarray, writable: bool) -> np.ndarray:
    array = np.asarray(array)
    if not array.flags.c_contiguous or (writable and not array.flags.writeable):
        raise LogicError("emulated memcpy: host buffer must be contiguous (and writable for a download)")
    return array.reshape(-1).view(np.uint8)


def _require_pinned(array: np.ndarray, what: str) -> None:
    start = array.ctypes.data
    for address, (nbytes, _owner) in _WORLD.pinned.items():
        if address <= start and start + array.nbytes <= address + nbytes:
            return
    raise LogicError(f"{what}: host buffer is not page-locked memory (use pagelocked_empty)")


def _stream_or_default(stream: Stream | None, what: str) -> Stream:
    if stream is None:
        raise LogicError(f"emulation: {what} without a stream would use the default stream")
    return stream


def memcpy_htod(dest: Any, src: np.ndarray) -> None:
    _require_context("cuMemcpyHtoD")
    Context.synchronize()  # a synchronous copy on the legacy default stream waits for all streams
    source = _host_bytes(src, writable=False)
    _WORLD.view(int(dest), source.size)[:] = source


def memcpy_dtoh(dest: np.ndarray, src: Any) -> None:
    _require_context("cuMemcpyDtoH")
    Context.synchronize()  # a synchronous copy on the legacy default stream waits for all streams
    target = _host_bytes(dest, writable=True)
    target[:] = _WORLD.view(int(src), target.size)


def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream | None = None) -> None:
    _require_context("cuMemcpyHtoDAsync")
    source = _host_bytes(src, writable=False)
    _require_pinned(source, "cuMemcpyHtoDAsync")
    target = _WORLD.view(int(dest), source.size)  # bounds are checked now, bytes move later
    _stream_or_default(stream, "memcpy_htod_async")._enqueue(lambda: target.__setitem__(slice(None), source))


def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream | None = None) -> None:
    _require_context("cuMemcpyDtoHAsync")
    target = _host_bytes(dest, writable=True)
    _require_pinned(target, "cuMemcpyDtoHAsync")
    source = _WORLD.view(int(src), target.size)
    _stream_or_default(stream, "memcpy_dtoh_async")._enqueue(lambda: target.__setitem__(slice(None), source))


def memcpy_dtod_async(dest: Any, src: Any, size: int, stream: Stream | None = None) -> None:
    _require_context("cuMemcpyDtoDAsync")
    target, source = _WORLD.view(int(dest), size), _WORLD.view(int(src), size)
    _stream_or_default(stream, "memcpy_dtod_async")._enqueue(lambda: target.__setitem__(slice(None), source))


# -- what ``import pycuda.driver`` gives ------------------------------------------------------
DRIVER_API = (
    "init", "Device", "Context", "Stream", "Event", "DeviceAllocation", "PagelockedHostAllocation",
    "mem_alloc", "pagelocked_empty", "memcpy_htod", "memcpy_dtoh", "memcpy_htod_async", "memcpy_dtoh_async",
    "memcpy_dtod_async", "Error", "LogicError", "MemoryError",
)  # fmt: skip
_THIS = sys.modules[__name__]


class _Driver(types.ModuleType):
    """The emulated ``pycuda.driver``: ``DRIVER_API`` only, looked up in this module at each read."""

    def __getattribute__(self, name: str) -> Any:
        if name in DRIVER_API:
            return observe.notify(self, name, getattr(_THIS, name), sys._getframe(1))
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted(DRIVER_API)


def driver_module() -> types.ModuleType:
    """A module object for ``sys.modules["pycuda.driver"]`` (monkeypatching this module still reaches it)."""
    return _Driver("pycuda.driver", "EMULATED pycuda.driver (tests only)")
