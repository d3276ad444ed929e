"""RAM read bandwidth, measured the way the expert kernels read: a parallel streaming sum."""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from kernels.threads import kernel_threads

SUM_BLOCK = 1 << 16  # a compile-time constant: LLVM unrolls and vectorises the inner sum fully


@njit(parallel=True, fastmath=True, cache=True)
def _sum_blocks(values):
    partial = np.zeros(values.shape[0] // SUM_BLOCK, np.float32)
    for b in prange(values.shape[0] // SUM_BLOCK):
        total = np.float32(0.0)
        for i in range(b * SUM_BLOCK, (b + 1) * SUM_BLOCK):
            total += values[i]
        partial[b] = total
    return partial.sum()


def read_bandwidth(values: np.ndarray, threads: int, runs: int = 5) -> float:
    """Best bytes/s of a parallel read of `values` (float32; make it far larger than the caches,
    >= 4 GiB, or this measures cache)."""
    with kernel_threads(threads):
        _sum_blocks(values[: 1 << 20])
        best = 0.0
        for _ in range(runs):
            start = time.perf_counter()
            _sum_blocks(values)
            best = max(best, values.nbytes / (time.perf_counter() - start))
    return best
