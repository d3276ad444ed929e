"""A dense linear layer from int4, int6 or int8 with fp32 activations (the exact kernels): y = W x
for W in the `kernels.int4` / `kernels.int6` / `kernels.int8` layout.

The same `_block_dot` inner loop as the experts (a dense matrix is one always-active expert).
Few tokens (decode): tasks are 32-row blocks; each applies its block (hot in L1/L2 after the
first token) to every token, so the matrix is read from RAM once per call. Many tokens
(prefill, >= GEMM_MIN_TOKENS): that would cost a code conversion per weight per token, so the
matrix is instead dequantised tile by tile (TILE_WEIGHTS fp32, about 4 MB, L3-resident) and
each tile multiplied by BLAS sgemm through NumPy, at several times the FMA rate. int6 blocks go
through the int4 block kernel, which decodes their high bits beside the nibbles.

Shapes: x float32 [T, in], weight Int4Weights or Int8Weights [1, out, in], out float32 [T, out] (overwritten),
x_sums float32 [>= T, in // 32] scratch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from offload.kernels import int4, int6, int8
from offload.kernels.gemv import _block_dot, _block_dot8, _group_sums
from offload.kernels.int4 import BLOCK, GROUP, Int4Weights, _bf16_value
from offload.kernels.int6 import Int6Weights
from offload.kernels.int8 import Int8Weights

GEMM_MIN_TOKENS = 8  # from this many tokens on, dequantise + sgemm beats the per-token kernel
TILE_WEIGHTS = 1 << 24  # weights dequantised at a time for sgemm


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


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_tile4(packed, scales, first_block, tile):
    """tile float32 [in, 32 n] = W[32 first_block : 32 (first_block + n)].T of an int4 matrix."""
    for i in prange(tile.shape[1] // BLOCK):
        b = first_block + i
        for c in range(tile.shape[0]):
            group = c // GROUP * GROUP
            for k in range(16):
                byte = packed[0, b, 16 * c + k]
                low = _bf16_value(scales[0, b, group + k])
                high = _bf16_value(scales[0, b, group + 16 + k])
                tile[c, BLOCK * i + k] = np.float32(np.int32(byte & 15) - 8) * low
                tile[c, BLOCK * i + 16 + k] = np.float32(np.int32(byte >> 4) - 8) * high


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_tile8(packed, scales, first_block, tile):
    """`_dequantize_tile4` for an int8 matrix."""
    for i in prange(tile.shape[1] // BLOCK):
        b = first_block + i
        for c in range(tile.shape[0]):
            group = c // GROUP * GROUP
            for r in range(BLOCK):
                scale = _bf16_value(scales[0, b, group + r])
                tile[c, BLOCK * i + r] = np.float32(packed[0, b, BLOCK * c + r]) * scale


def _linear_gemm(x: np.ndarray, weight: Int4Weights | Int6Weights | Int8Weights, out: np.ndarray) -> None:
    _, out_features, in_features = weight.shape
    rows = min(out_features, max(BLOCK, TILE_WEIGHTS // in_features // BLOCK * BLOCK))
    dequantize_tile = {Int8Weights: _dequantize_tile8, Int6Weights: int6.dequantize_tile}.get(type(weight),
                                                                                         _dequantize_tile4)
    tile = np.empty((in_features, rows), np.float32)
    product = np.empty((x.shape[0], rows), np.float32)
    for begin in range(0, out_features, rows):
        count = min(rows, out_features - begin)
        dequantize_tile(weight.packed, weight.scales, begin // BLOCK, tile[:, :count])
        np.matmul(x, tile[:, :count], out=product[:, :count])
        out[:, begin:begin + count] = product[:, :count]


def linear(x: np.ndarray, weight: Int4Weights | Int6Weights | Int8Weights, out: np.ndarray,
           x_sums: np.ndarray) -> np.ndarray:
    """out = x @ W.T; returns `out`."""
    if weight.shape[0] != 1:
        raise ValueError(f"linear takes one matrix, got {weight.shape[0]}")
    _, out_features, in_features = weight.shape
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != in_features or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [T, {in_features}]")
    if out.shape != (x.shape[0], out_features) or x_sums.shape[0] < x.shape[0] or x_sums.shape[1] != in_features // GROUP:
        raise ValueError("out must be [T, out] and x_sums [>= T, in // 32]")
    if x.shape[0] >= GEMM_MIN_TOKENS:
        _linear_gemm(x, weight, out)
    elif isinstance(weight, Int8Weights):
        _linear8(x, weight.packed, weight.scales, out)
    else:
        _linear(x, weight.packed, weight.scales, out, x_sums)
    return out


def linear_reference(x: np.ndarray, weight: Int4Weights | Int6Weights | Int8Weights, out: np.ndarray,
                     x_sums=None) -> np.ndarray:
    dequantize = {Int8Weights: int8.dequantize, Int6Weights: int6.dequantize}.get(type(weight), int4.dequantize)
    out[:] = x @ dequantize(weight)[0].T
    return out
