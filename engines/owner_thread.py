"""A backend proxy whose every call runs on one dedicated thread: the thread that owns the GPU.

The TensorRT backend must be created, activated, run and freed by one thread (its CUDA context
is current there). Callers are not so tidy: the daemon loads a model on a start-up or reload
thread and runs inference on its engine thread. Wrapping the backend in ``OwnerThreadBackend``
makes that safe: the wrapped backend is constructed on a private thread and every call is
handed to that thread and waited for, so "one thread owns all GPU work" holds by construction.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engines.backend import Backend

_STOP = object()
Feeds = Mapping[str, np.ndarray]


class OwnerThread:
    """One thread that runs the functions handed to it, in order, and returns their results."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the owner thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        done = threading.Event()
        box: dict[str, Any] = {}
        self._jobs.put((fn, args, done, box))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        self._jobs.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            fn, args, done, box = job
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed back to the caller, never lost here
                box["error"] = exc
            finally:
                done.set()


class OwnerThreadBackend(Backend):
    """Proxies a backend built by ``make`` so that all of its work happens on one private thread."""

    def __init__(self, make: Callable[[], Backend], thread_name: str = "inspectd-gpu") -> None:
        self._owner = OwnerThread(thread_name)
        try:
            self.inner: Backend = self._owner.call(make)
        except BaseException:
            self._owner.close()
            raise
        super().__init__(self.inner.graph_path)
        self.name = self.inner.name
        self._inputs = self.inner.inputs
        self._outputs = self.inner.outputs

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @property
    def last_timings_ms(self) -> dict[str, float]:
        return dict(getattr(self.inner, "last_timings_ms", {}))

    def _activate_impl(self, resident: dict[str, np.ndarray]) -> None:
        self._owner.call(self.inner.activate, resident)

    def _infer_impl(self, feeds: Mapping[str, np.ndarray], tiles: range) -> dict[str, np.ndarray]:
        return self._owner.call(self.inner.infer, feeds, tiles)

    def infer_many(
        self, batches: Sequence[tuple[Mapping[str, np.ndarray], range | None]]
    ) -> list[dict[str, np.ndarray]]:
        """A whole frame's batches, pipelined by the wrapped backend on its own thread."""
        run = getattr(self.inner, "infer_many", None)
        if run is None:
            return [self.infer(feeds, tiles) for feeds, tiles in batches]
        return self._owner.call(run, batches)

    def _deactivate_impl(self) -> None:
        self._owner.call(self.inner.deactivate)

    def close(self) -> None:
        """Deactivate if needed and stop the owner thread."""
        self.deactivate()
        self._owner.close()
