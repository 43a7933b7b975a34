"""Frame-sized output buffers reused from one frame to the next once nothing else holds them.

A 5120x5120 anomaly map is 100 MB. Allocated afresh per frame it comes from ``mmap`` and
the kernel faults in and zeroes every page of it as the tiles are stitched: 10-30 ms of
system CPU per frame on the 2-core machine, on the tile threads and so on the frame's
critical path, and the most variable part of it (zeroing competes for the memory bus with
whatever else runs: the next frame's preparation in the daemon). A buffer that is reused
is only written. ``benchmarks/frame_path.py --daemon`` shows the system time per thread.

A buffer is handed out again only when this pool holds the sole reference to it: a result,
a decision's evidence, a numpy view (its ``base``) or an exported buffer (a ZeroMQ frame
sent without a copy) all hold one, so a map still in use anywhere is never overwritten.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

# References to a pooled buffer that is free: the pool's list, the loop variable, getrefcount's argument.
_FREE_REFS = 3


class BufferPool:
    """Up to ``keep`` buffers of one shape and dtype, reused once free; more are allocated (and not kept)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type, keep: int = 2) -> None:
        self.shape, self.dtype, self.keep = tuple(shape), np.dtype(dtype), keep
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0  # how many times a buffer was handed out again (tests, benchmarks)

    def take(self) -> np.ndarray:
        """A buffer of the pool's shape with unspecified contents (as ``np.empty``): the caller writes all of it."""
        with self._lock:
            for buf in self._buffers:
                if sys.getrefcount(buf) == _FREE_REFS:
                    self.reused += 1
                    return buf
            buf = np.empty(self.shape, self.dtype)
            if len(self._buffers) < self.keep:
                self._buffers.append(buf)
            return buf

    def clear(self) -> None:
        """Forget the kept buffers (their memory goes back once their other holders drop them)."""
        with self._lock:
            self._buffers.clear()
