"""A dense linear layer from int4 or int8: y = W x for W in the `kernels.int4` / `kernels.int8`
layout.

The same `_block_dot` inner loop as the experts (a dense matrix is one always-active expert).
Tasks are 32-row blocks; each applies its block (hot in L1/L2 after the first token) to every
token, so the matrix is read from RAM once per call.

Shapes: x float32 [T, in], weight Int4Weights or Int8Weights [1, out, in], out float32 [T, out] (overwritten),
x_sums float32 [>= T, in // 32] scratch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import int4, int8
from kernels.gemv import _block_dot, _block_dot8, _group_sums
from kernels.int4 import BLOCK, GROUP, Int4Weights
from kernels.int8 import Int8Weights


@njit(parallel=True, nogil=True, cache=True)
def _linear(x, packed, scales, out, x_sums):
    tokens = x.shape[0]
    _group_sums(x, x_sums)
    for b in prange(packed.shape[1]):
        for t in range(tokens):
            rows = out[t, b * BLOCK:(b + 1) * BLOCK]
            rows[:] = 0
            _block_dot(packed[0, b], scales[0, b], x[t], x_sums[t], np.float32(1.0), rows)


@njit(parallel=True, nogil=True, cache=True)
def _linear8(x, packed, scales, out):
    for b in prange(packed.shape[1]):
        for t in range(x.shape[0]):
            rows = out[t, b * BLOCK:(b + 1) * BLOCK]
            rows[:] = 0
            _block_dot8(packed[0, b], scales[0, b], x[t], x[t], np.float32(1.0), rows)


def linear(x: np.ndarray, weight: Int4Weights | Int8Weights, out: np.ndarray, x_sums: np.ndarray) -> np.ndarray:
    """out = x @ W.T; returns `out`."""
    if weight.shape[0] != 1:
        raise ValueError(f"linear takes one matrix, got {weight.shape[0]}")
    _, out_features, in_features = weight.shape
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != in_features or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [T, {in_features}]")
    if out.shape != (x.shape[0], out_features) or x_sums.shape[0] < x.shape[0] or x_sums.shape[1] != in_features // GROUP:
        raise ValueError("out must be [T, out] and x_sums [>= T, in // 32]")
    if isinstance(weight, Int8Weights):
        _linear8(x, weight.packed, weight.scales, out)
    else:
        _linear(x, weight.packed, weight.scales, out, x_sums)
    return out


def linear_reference(x: np.ndarray, weight: Int4Weights | Int8Weights, out: np.ndarray, x_sums=None) -> np.ndarray:
    dequantize = int8.dequantize if isinstance(weight, Int8Weights) else int4.dequantize
    out[:] = x @ dequantize(weight)[0].T
    return out
