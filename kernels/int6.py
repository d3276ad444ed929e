"""The int6 format of an output head on the CPU: group-wise symmetric int6 with bf16 scales.

The logits are the one place where a 4-bit matrix's error reaches the sampler unfiltered, so
llama.cpp keeps `output.weight` at 6 bits in its 4-bit files (Q6_K in Q4_K_M and Q4_0). int6 is
offload's counterpart: 6.5 bits per weight, read by the same integer-dot block kernel as int4
(`kernels.q8`), whose 4-bit half it shares byte for byte.

Layout of E matrices of shape [out, in] (`Int6Weights`), codes u = q + 32 with q in [-32, 31]:

    GROUP = 32 consecutive input columns share one scale (per row);
    BLOCK = 32 consecutive output rows are stored together, four columns (a quad) at a time.

    packed  uint8  [E, out // 32, in // 4, 96]
            Row block b, quad k (input columns 4k .. 4k + 3) is packed[e, b, k]:
            bytes 16j + r (column 4k + j, r < 16): u & 15 of row r (low nibble) and of row
                16 + r (high nibble) -- the int4 layout of those four columns;
            bytes 64 + 16h + r (h < 2, r < 16): u >> 4 of (row r, column h) in bits 0-1,
                (row r, column h + 2) in bits 2-3, (row 16 + r, column h) in bits 4-5,
                (row 16 + r, column h + 2) in bits 6-7.
    scales  uint16 [E, out // 32, (in // 32) * 32], as `kernels.int4`.

    weight[e, 32b + r, c] = q * scales[e, b, 32(c // 32) + r]

The two high bits of a row land beside its nibble with one shift and one mask per field. `packed` is 4-dimensional so a block ([in // 4, 96]) tells the kernels its format by
its type. Both dimensions must be multiples of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from offload.kernels.int4 import (BLOCK, GROUP, _as_float32, _bf16_to_float, _bf16_value, _quantize_group, check_layout,
                                  check_shape, reference_codes, scales_float32)

OFFSET = 32  # u = q + 32
QUAD_BYTES = 96
# candidate divisors of the signed absmax; the sign decides whether it maps to -32 or to +31
SCALE_CANDIDATES = np.array([-32.5, -32.0, -31.5, 31.0, 31.5, 32.0], dtype=np.float32)


@dataclass
class Int6Weights:
    """E int6 matrices of shape [out, in]; see the module docstring for the layout."""

    packed: np.ndarray  # uint8 [E, out // 32, in // 4, 96]
    scales: np.ndarray  # uint16 (bf16 bits) [E, out // 32, in]
    shape: tuple[int, int, int]  # (E, out, in)

    bits_per_weight = 6 + 16 / GROUP

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def __post_init__(self):
        experts, out_features, in_features = self.shape
        check_layout("int6", self, (experts, out_features // BLOCK, in_features // 4, QUAD_BYTES), np.uint8)


@njit(cache=True, inline="always")
def _pack_quad(codes, first, quad):
    """codes int32 [32 columns, 32 rows] of one group, columns first .. first + 3 -> quad uint8 [96]."""
    for j in range(4):
        for r in range(16):
            low, high = codes[first + j, r] + OFFSET, codes[first + j, r + 16] + OFFSET
            quad[16 * j + r] = np.uint8((low & 15) | ((high & 15) << 4))
    for h in range(2):
        for r in range(16):
            quad[64 + 16 * h + r] = np.uint8(((codes[first + h, r] + OFFSET) >> 4)
                                             | (((codes[first + h + 2, r] + OFFSET) >> 4) << 2)
                                             | (((codes[first + h, r + 16] + OFFSET) >> 4) << 4)
                                             | (((codes[first + h + 2, r + 16] + OFFSET) >> 4) << 6))


@njit(parallel=True, cache=True)
def _quantize_kernel(w, candidates, packed, scales):
    experts, out_features, in_features = w.shape
    blocks = out_features // BLOCK
    for task in prange(experts * blocks):
        e = task // blocks
        b = task % blocks
        block = np.ascontiguousarray(w[e, b * BLOCK:(b + 1) * BLOCK].T)  # [in, 32]
        codes = np.empty((GROUP, BLOCK), dtype=np.int32)
        trial = np.empty((GROUP, BLOCK), dtype=np.float32)
        rows = np.empty((6, BLOCK), dtype=np.float32)
        for g in range(in_features // GROUP):
            _quantize_group(block, g, candidates, np.float32(-OFFSET), np.float32(OFFSET - 1), codes, trial, rows,
                            scales[e, b, g * GROUP:(g + 1) * GROUP])
            for k in range(GROUP // 4):
                _pack_quad(codes, 4 * k, packed[e, b, g * GROUP // 4 + k])


def quantize(w: np.ndarray) -> Int6Weights:
    """[E, out, in] (or [out, in]) float32 / float16 / bf16-bits -> Int6Weights."""
    w = _as_float32(np.asarray(w))
    if w.ndim == 2:
        w = w[None]
    experts, out_features, in_features = w.shape
    check_shape("int6", out_features, in_features)
    packed = np.zeros((experts, out_features // BLOCK, in_features // 4, QUAD_BYTES), dtype=np.uint8)
    scales = np.zeros((experts, out_features // BLOCK, in_features), dtype=np.uint16)
    _quantize_kernel(np.ascontiguousarray(w), SCALE_CANDIDATES, packed, scales)
    return Int6Weights(packed, scales, (experts, out_features, in_features))


def unpack_codes(q: Int6Weights) -> np.ndarray:
    """int8 [E, out, in] codes in [-32, 31] (NumPy; the layout's one unpacking reference)."""
    experts, out_features, in_features = q.shape
    nibbles, high = q.packed[..., :64].reshape(*q.packed.shape[:3], 4, 16), q.packed[..., 64:]
    low = np.concatenate([nibbles & 15, nibbles >> 4], axis=4)  # [E, blocks, quads, column j, row]
    top = np.empty_like(low)
    for h in range(2):
        part = high[..., 16 * h:16 * (h + 1)]
        top[..., h, :16], top[..., h + 2, :16] = part & 3, (part >> 2) & 3
        top[..., h, 16:], top[..., h + 2, 16:] = (part >> 4) & 3, part >> 6
    codes = (low | (top << 4)).astype(np.int8) - OFFSET  # [E, blocks, quads, 4, 32]
    codes = codes.reshape(experts, out_features // BLOCK, in_features, BLOCK)
    return codes.transpose(0, 1, 3, 2).reshape(experts, out_features, in_features)


def dequantize(q: Int6Weights) -> np.ndarray:
    """Int6Weights -> float32 [E, out, in]."""
    return unpack_codes(q).astype(np.float32) * np.repeat(scales_float32(q), GROUP, axis=2)


def quantize_reference(w: np.ndarray) -> np.ndarray:
    """NumPy reference of `quantize`'s rounding: float32 [E, out, in] as `dequantize` gives it
    (same candidates, least-squares scales and tie-breaking)."""
    w = _as_float32(np.asarray(w))
    w = w[None] if w.ndim == 2 else w
    codes, bits = reference_codes(w, SCALE_CANDIDATES, -OFFSET, OFFSET - 1)
    return codes.astype(np.float32) * np.repeat(_bf16_to_float(bits), GROUP, axis=2)


@njit(parallel=True, nogil=True, cache=True)
def dequantize_tile(packed, scales, first_block, tile):
    """tile float32 [in, 32 n] = W[32 first_block : 32 (first_block + n)].T of one int6 matrix
    (packed [1, blocks, in // 4, 96]): the exact kernels' prefill and decode (`kernels.linear`)."""
    for i in prange(tile.shape[1] // BLOCK):
        b = first_block + i
        for k in range(tile.shape[0] // 4):
            quad = packed[0, b, k]
            for j in range(4):
                c = 4 * k + j
                group = c // GROUP * GROUP
                shift = 2 * (j // 2)
                for r in range(16):
                    top = quad[64 + 16 * (j % 2) + r]
                    low = np.int32(quad[16 * j + r] & 15) | (np.int32((top >> shift) & 3) << 4)
                    high = np.int32(quad[16 * j + r] >> 4) | (np.int32((top >> (shift + 4)) & 3) << 4)
                    tile[c, BLOCK * i + r] = np.float32(low - OFFSET) * _bf16_value(scales[0, b, group + r])
                    tile[c, BLOCK * i + 16 + r] = np.float32(high - OFFSET) * _bf16_value(scales[0, b, group + 16 + r])


