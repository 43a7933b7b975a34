"""The C heap's settings for serving: frame-sized blocks stay in the heap and are reused.

glibc gives a block above its mmap threshold its own mapping and frees it back to the kernel;
the threshold rises (up to 32 MB) as such blocks are freed, but only in the arena that freed
them, and free memory at the top of a heap above the trim threshold is handed back too. The
daemon prepares frames on two pool threads (two arenas) and frees their frame-sized
temporaries (the registered frame, the padded frame: 26-27 MB each at 5120 px) on other
threads, so those blocks kept coming back as fresh pages: about 3000 page faults and 17 ms of
system CPU per 5120 px frame on the prepare threads, against 800 faults for the same work in
bare predict (``benchmarks/frame_path.py --daemon``, per-thread table). A fixed threshold at
glibc's own maximum keeps every frame-sized block in the heap, and a high trim threshold keeps
the freed ones for the next frame (700 faults, 4 ms). The fit does the opposite on purpose
(``calibration.fit_pipeline.release_free_heap``): it wants its peak low, not its pages warm.
"""

from __future__ import annotations

from typing import Any

from engines.libc import glibc

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 256 * 1024 * 1024  # free heap kept for reuse: a few frames' temporaries


def keep_frame_blocks(libc: Any = None) -> bool:
    """Set the thresholds above (glibc only; True when both were accepted, False elsewhere)."""
    libc = libc if libc is not None else glibc("mallopt")
    if libc is None:
        return False
    accepted = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    accepted &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(accepted)
