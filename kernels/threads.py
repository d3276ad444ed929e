"""How many threads the kernels use: set by the caller, restored afterwards.

Numba's thread count is per calling thread, so a worker thread that runs kernels sets it itself.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator

import numba
import psutil


@functools.cache  # psutil reads /sys on every call, and this runs per layer per token
def physical_cores() -> int:
    """The default thread count: one per physical core (SMT siblings share the FMA units)."""
    return min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS)


@contextmanager
def kernel_threads(count: int | None = None) -> Iterator[int]:
    """Run the kernels called inside with `count` threads (default: physical cores)."""
    count = min(count or physical_cores(), numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    if previous == count:  # the usual case: nothing to change (this runs per layer per token)
        yield count
        return
    numba.set_num_threads(count)
    try:
        yield count
    finally:
        numba.set_num_threads(previous)
