"""How many threads the kernels use: set by the caller, restored afterwards.

Numba's thread count is per calling thread, so a worker thread that runs kernels sets it itself.
"""

from __future__ import annotations

import functools
import os
import threading

import numba
import psutil


@functools.cache  # psutil reads /sys on every call, and this runs per layer per token
def physical_cores() -> int:
    """The default thread count: one per physical core (SMT siblings share the FMA units)."""
    return min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS)


_held = threading.local()  # .count: what the innermost `kernel_threads` on this thread set


class kernel_threads:
    """`with kernel_threads(count):` runs the kernels called inside with `count` threads (default:
    physical cores) and restores the previous count after; `as` gives the count. A class rather
    than a generator: this runs per layer per token, and most often changes nothing. Inside another
    `kernel_threads` of the same count on the same thread it asks Numba nothing (its count is
    Numba's there: only `kernel_threads` sets it): a decode step's per-kernel `with`s, nested in
    the step's own, then cost an attribute read each."""

    __slots__ = ("count", "previous", "held")

    def __init__(self, count: int | None = None):
        self.count = min(count or physical_cores(), numba.config.NUMBA_NUM_THREADS)
        self.previous: int | None = None
        self.held: int | None = None

    def __enter__(self) -> int:
        if self.previous is not None:
            raise RuntimeError("a kernel_threads is entered once at a time: make one per `with`")
        self.held = getattr(_held, "count", None)
        if self.held == self.count:
            self.previous = self.count
            return self.count
        self.previous = numba.get_num_threads()
        if self.previous != self.count:
            numba.set_num_threads(self.count)
        _held.count = self.count
        return self.count

    def __exit__(self, *exc) -> None:
        previous, self.previous = self.previous, None
        if previous != self.count:
            numba.set_num_threads(previous)
        _held.count = self.held


def current_threads() -> int:
    """The kernels' thread count on this thread now: what the innermost `kernel_threads` set, without
    asking Numba, or Numba's count outside any."""
    held = getattr(_held, "count", None)
    return held if held is not None else numba.get_num_threads()
