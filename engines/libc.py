"""The C library, for the heap's knobs (glibc's ``mallopt``, ``malloc_trim``); None where it lacks them.

Both the daemon (``daemon/heap.py``: keep frame-sized blocks warm) and the fit
(``calibration.fit_pipeline.release_free_heap``: hand free memory back between phases) tune
glibc's heap; elsewhere (musl, macOS) the symbol is missing and they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def glibc(symbol: str) -> ctypes.CDLL | None:
    """The process's C library if it exports ``symbol``, else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, symbol) else None
