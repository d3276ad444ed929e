"""The int8 format of dense matrices on the CPU: group-wise symmetric int8 with bf16 scales.

Layout of E matrices of shape [out, in] (`Int8Weights`), the int4 layout with whole bytes:

    GROUP = 32 consecutive input columns share one scale (per row);
    BLOCK = 32 consecutive output rows are stored together, column by column.

    packed  int8   [E, out // 32, in * 32]
            Row block b, input column c occupies bytes [32c, 32c + 32) of packed[e, b]:
            byte r holds the code q in [-127, 127] of row 32b + r.
    scales  uint16 [E, out // 32, (in // 32) * 32]
            bf16 bit patterns; scales[e, b, 32g + r] is the scale of row 32b + r over input
            columns [32g, 32g + 32).

    weight[e, 32b + r, c] = q * scales[e, b, 32(c // 32) + r]

8 bits + 16 bits / 32 = 8.5 bits per weight (llama.cpp's Q8_0 has the same). A column of a
block is 32 contiguous bytes that sign-extend into 32 lanes, one per row, for `_block_dot8`.
Both dimensions must be multiples of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numba import njit, prange

from offload.kernels.int4 import (BLOCK, GROUP, _as_float32, _bf16_to_float, _bf16_value, _float_to_bf16, _round_bf16,
                                  check_layout, check_shape)

LIMIT = 127  # codes are in [-127, 127]: symmetric, so -128 is never used
CHUNK_WEIGHTS = 1 << 22  # weights quantised per step


@dataclass
class Int8Weights:
    """E int8 matrices of shape [out, in]; see the module docstring for the layout."""

    packed: np.ndarray  # int8 [E, out // 32, in * 32]
    scales: np.ndarray  # uint16 (bf16 bits) [E, out // 32, in]
    shape: tuple[int, int, int]  # (E, out, in)

    bits_per_weight = 8 + 16 / GROUP

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def __post_init__(self):
        experts, out_features, in_features = self.shape
        check_layout("int8", self, (experts, out_features // BLOCK, in_features * 32), np.int8)


@njit(parallel=True, nogil=True, cache=True)
def _quantize_rows(w, packed, scales):
    """w float32 [32 n, in] -> packed int8 [n, in * 32] and scales uint16 [n, in] (see `quantize`)."""
    in_features = w.shape[1]
    limit = np.float32(LIMIT)
    for b in prange(w.shape[0] // BLOCK):
        for r in range(BLOCK):
            row = w[b * BLOCK + r]
            for g in range(in_features // GROUP):
                peak = np.float32(0.0)
                for c in range(g * GROUP, (g + 1) * GROUP):
                    peak = max(peak, abs(row[c]))
                scale = _bf16_value(_round_bf16(peak / limit))
                inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
                dot = np.float32(0.0)
                norm = np.float32(0.0)
                for c in range(g * GROUP, (g + 1) * GROUP):
                    q = min(max(np.rint(row[c] * inverse), -limit), limit)
                    packed[b, BLOCK * c + r] = np.int8(q)
                    dot += q * row[c]
                    norm += q * q
                scales[b, g * GROUP + r] = _round_bf16(dot / norm if norm != 0 else np.float32(0.0))


def quantize(w: np.ndarray) -> Int8Weights:
    """[E, out, in] (or [out, in]) float32 / float16 / bf16-bits -> Int8Weights.

    Per (row, group): scale = max|w| / 127 rounded to bf16, codes rounded to nearest, then the
    scale refined by least squares for those codes (the bf16 rounding of the first scale would
    otherwise bias the whole group by up to 0.4%). Widens CHUNK_WEIGHTS at a time to float32, so
    a 150k x 2k lm_head needs tens of MB of temporaries, not gigabytes.
    """
    w = np.asarray(w)
    if w.ndim == 2:
        w = w[None]
    experts, out_features, in_features = w.shape
    check_shape("int8", out_features, in_features)
    packed = np.empty((experts, out_features // BLOCK, in_features * 32), np.int8)
    scales = np.empty((experts, out_features // BLOCK, in_features), np.uint16)
    rows = max(BLOCK, CHUNK_WEIGHTS // in_features // BLOCK * BLOCK)
    for e in range(experts):
        for begin in range(0, out_features, rows):
            part = np.ascontiguousarray(_as_float32(w[e, begin:begin + rows]))
            blocks = slice(begin // BLOCK, (begin + part.shape[0]) // BLOCK)
            _quantize_rows(part, packed[e, blocks], scales[e, blocks])
    return Int8Weights(packed, scales, (experts, out_features, in_features))


def quantize_reference(w: np.ndarray) -> Int8Weights:
    """NumPy reference of `quantize`: the same steps on the whole array at once."""
    w = _as_float32(np.asarray(w))
    if w.ndim == 2:
        w = w[None]
    experts, out_features, in_features = w.shape
    check_shape("int8", out_features, in_features)
    groups = w.reshape(-1, GROUP)
    scale = _bf16_to_float(_float_to_bf16(np.abs(groups).max(axis=1) / LIMIT))
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale != 0)
    codes = np.clip(np.rint(groups * inverse[:, None]), -LIMIT, LIMIT)
    norm = (codes * codes).sum(axis=1)
    fitted = np.divide((codes * groups).sum(axis=1), norm, out=np.zeros_like(norm), where=norm != 0)
    return pack(codes.reshape(w.shape).astype(np.int8),
                _float_to_bf16(fitted).reshape(experts, out_features, in_features // GROUP))


def pack(codes: np.ndarray, scale_bits: np.ndarray) -> Int8Weights:
    """Codes int8 [E, out, in] and bf16 scale bits [E, out, in // 32] -> Int8Weights."""
    experts, out_features, in_features = codes.shape
    blocks = out_features // BLOCK
    packed = codes.reshape(experts, blocks, BLOCK, in_features).transpose(0, 1, 3, 2)  # [E, blocks, in, 32]
    scales = scale_bits.reshape(experts, blocks, BLOCK, in_features // GROUP).transpose(0, 1, 3, 2)
    return Int8Weights(np.ascontiguousarray(packed.reshape(experts, blocks, -1)),
                       np.ascontiguousarray(scales.reshape(experts, blocks, -1)).astype(np.uint16),
                       (experts, out_features, in_features))


def dequantize(q: Int8Weights) -> np.ndarray:
    """Int8Weights -> float32 [E, out, in]."""
    experts, out_features, in_features = q.shape
    blocks = out_features // BLOCK
    codes = q.packed.reshape(experts, blocks, in_features, BLOCK).transpose(0, 1, 3, 2)
    scales = _bf16_to_float(q.scales).reshape(experts, blocks, in_features // GROUP, 1, BLOCK)
    scales = np.broadcast_to(scales, (experts, blocks, in_features // GROUP, GROUP, BLOCK))
    scales = scales.reshape(experts, blocks, in_features, BLOCK).transpose(0, 1, 3, 2)
    return (codes.astype(np.float32) * scales).reshape(experts, out_features, in_features)
