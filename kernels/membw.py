"""RAM read bandwidth: a parallel streaming sum, cross-checked against NumPy's own sum.

A probe that reads slower than NumPy's sum of the same array measures its own loop, not RAM
(a sum with a single dependent accumulator runs at one add per cycle latency, a fraction of
what RAM delivers), and a bound computed from it would sit below speeds the kernels reach. So
the result is the faster of the two.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, prange

from offload.kernels.threads import kernel_threads

SUM_BLOCK = 1 << 16  # floats per task of the parallel sum


@njit(parallel=True, fastmath=True, cache=True)
def _sum_blocks(values):
    partial = np.zeros(values.shape[0] // SUM_BLOCK, np.float32)
    for b in prange(values.shape[0] // SUM_BLOCK):
        partial[b] = values[b * SUM_BLOCK:(b + 1) * SUM_BLOCK].sum()  # vectorised, several accumulators
    return partial.sum()


def _best_rate(read, nbytes: int, runs: int) -> float:
    best = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        read()
        best = max(best, nbytes / (time.perf_counter() - start))
    return best


def numpy_read_bandwidth(values: np.ndarray, threads: int, runs: int = 5) -> float:
    """Best bytes/s of NumPy sums of `values` split over `threads` Python threads (the sum
    releases the GIL)."""
    parts = np.array_split(values, threads)
    with ThreadPoolExecutor(threads) as pool:
        return _best_rate(lambda: list(pool.map(np.sum, parts)), values.nbytes, runs)


def read_bandwidth(values: np.ndarray, threads: int, runs: int = 5) -> float:
    """Best bytes/s of a parallel read of `values` (float32; make it far larger than the caches,
    >= 4 GiB, or this measures cache): the faster of the Numba sum and NumPy's."""
    with kernel_threads(threads):
        _sum_blocks(values[: 1 << 20])
        numba_rate = _best_rate(lambda: _sum_blocks(values), values.nbytes, runs)
    return max(numba_rate, numpy_read_bandwidth(values, threads, runs))


@njit(inline="always", nogil=True, cache=True)
def _words(codes, scales):
    """The 32-bit words of two contiguous arrays summed (modulo 2^32), the codes then the scales."""
    acc = np.uint32(0)
    for word in codes.view(np.uint32):
        acc += word
    for word in scales.view(np.uint32):
        acc += word
    return acc


@njit(parallel=True, nogil=True, cache=True)
def read_blocks(packed, scales):
    """Sum the 32-bit words of a block layout's matrix (`kernels.int4`: packed uint8 [1, blocks, n],
    scales uint16 [1, blocks, m]) block after block, each block's codes then its scales, the blocks
    shared among the threads as the dense kernels share them: what reading the bytes a kernel
    reads, in its order and nothing else, costs (the ceiling of a kernel on those bytes). -> the
    words' sum modulo 2^32 (which callers ignore)."""
    total = np.uint32(0)
    for b in prange(packed.shape[1]):
        total += _words(packed[0, b], scales[0, b])
    return total & 0xFFFFFFFF


@njit(parallel=True, nogil=True, cache=True)
def read_experts(ids, gu_packed, gu_scales, dn_packed, dn_scales):
    """`read_blocks` for the experts `ids` (int64) of an int4 expert pool: each one's gate_up and
    its down read whole, a task each, shared among the threads. -> their words' sum modulo 2^32."""
    total = np.uint32(0)
    for task in prange(2 * ids.shape[0]):
        e = ids[task // 2]
        if task % 2 == 0:
            total += _words(gu_packed[e].reshape(-1), gu_scales[e].reshape(-1))
        else:
            total += _words(dn_packed[e].reshape(-1), dn_scales[e].reshape(-1))
    return total & 0xFFFFFFFF


@njit(nogil=True, cache=True)
def touch(data, step):
    """Read one byte every `step` bytes of `data` (uint8): a memory-mapped file's pages faulted in,
    without Python's lock (a fault from disk takes milliseconds). Returns their sum."""
    total = 0
    for i in range(0, data.size, step):
        total += data[i]
    return total
