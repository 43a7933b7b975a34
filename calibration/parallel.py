"""Work of one fit phase spread over the cores: items side by side, results in order.

Most of a fit's numpy and OpenCV calls use one core each (PNG decoding, registration, the
lighting fit, the statistics' sums); two at once use both cores of the small
machines a line runs on. More would add a frame's temporaries each for a core a 2-core machine
does not have.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

FIT_WORKERS = max(1, min(2, os.cpu_count() or 1))  # items (images, strips of rows) worked on at once

_Item = TypeVar("_Item")
_Out = TypeVar("_Out")


def in_order(fn: Callable[[_Item], _Out], items: Sequence[_Item]) -> Iterator[_Out]:
    """``map(fn, items)`` on FIT_WORKERS threads: results in the items' order, an item's exception raised at it.

    ``fn`` must write only what belongs to its item. Leaving the loop early (an exception) cancels the items
    not yet started and waits for the running ones, so no worker outlives the phase.
    """
    pool = ThreadPoolExecutor(FIT_WORKERS, thread_name_prefix="inspectd-fit")
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
