"""The int4 format of the routed experts: group-wise symmetric int4 with bf16 scales.

Layout of E matrices of shape [out, in] (`Int4Weights`):

    GROUP = 32 consecutive input columns share one scale (per row);
    BLOCK = 32 consecutive output rows are stored together, column by column.

    packed  uint8  [E, out // 32, in * 16]
            Row block b, input column c occupies bytes [16c, 16c + 16) of packed[e, b].
            Byte k (0..15) holds row 32b + k in its low nibble and row 32b + 16 + k in its
            high nibble, each as q + 8 with q in [-8, 7].
    scales  uint16 [E, out // 32, (in // 32) * 32]
            bf16 bit patterns; scales[e, b, 32g + r] is the scale of row 32b + r over input
            columns [32g, 32g + 32).

    weight[e, 32b + r, c] = q * scale = (nibble - 8) * scales[e, b, 32(c // 32) + r]

4 bits + 16 bits / 32 = 4.5 bits per weight. A column of a block is 16 contiguous bytes that
unpack (zero-extend, and/shift) into 32 lanes, one per row: the decode kernel's inner loop
runs across rows with no horizontal sums. Both dimensions must be multiples of 32.

Scales are chosen per (row, group) to minimise the squared error: a few candidate scales
around max|w| / 8 are tried, each refined by least squares for its rounded codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

GROUP = 32  # input columns per scale
BLOCK = 32  # output rows per block
# candidate divisors of the signed absmax; the sign decides whether it maps to -8 or to +7
SCALE_CANDIDATES = np.array([-8.5, -8.0, -7.5, -7.0, 7.0, 7.5, 8.0], dtype=np.float32)


@dataclass(frozen=True)
class Int4Format:
    group_size: int = GROUP
    block_rows: int = BLOCK
    scale_dtype: str = "bfloat16"

    @property
    def bits_per_weight(self) -> float:
        return 4 + 16 / self.group_size

    def check_shape(self, out_features: int, in_features: int) -> None:
        check_shape("int4", out_features, in_features)


FORMAT = Int4Format()


def check_shape(fmt: str, out_features: int, in_features: int) -> None:
    """The block layouts' rule, shared by `kernels.int6` and `kernels.int8`."""
    if out_features % BLOCK or in_features % GROUP:
        raise ValueError(f"{fmt} needs out ({out_features}) to be a multiple of {BLOCK} "
                         f"and in ({in_features}) a multiple of {GROUP}")


def check_layout(fmt: str, weights, packed_shape: tuple[int, ...], packed_dtype) -> None:
    """A block layout's arrays: `packed` of `packed_shape` and `packed_dtype`, scales uint16 (bf16
    bits) [E, out // 32, in], both C-contiguous."""
    experts, out_features, in_features = weights.shape
    check_shape(fmt, out_features, in_features)
    expected = {"packed": packed_shape, "scales": (experts, out_features // BLOCK, in_features)}
    for name, shape in expected.items():
        array = getattr(weights, name)
        if array.shape != shape or not array.flags.c_contiguous:
            raise ValueError(f"{fmt} {name} must be C-contiguous {shape}, got {array.shape}")
    if weights.packed.dtype != packed_dtype or weights.scales.dtype != np.uint16:
        raise ValueError(f"{fmt} packed must be {np.dtype(packed_dtype).name} and scales uint16 (bf16 bits)")


@dataclass
class Int4Weights:
    """E int4 matrices of shape [out, in]; see the module docstring for the layout."""

    packed: np.ndarray  # uint8 [E, out // 32, in * 16]
    scales: np.ndarray  # uint16 (bf16 bits) [E, out // 32, in]
    shape: tuple[int, int, int]  # (E, out, in)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    @property
    def format(self) -> Int4Format:
        return FORMAT

    def __post_init__(self):
        experts, out_features, in_features = self.shape
        check_layout("int4", self, (experts, out_features // BLOCK, in_features * 16), np.uint8)


def _as_float32(w: np.ndarray) -> np.ndarray:
    """float32 / float16 as they are; uint16 is read as bf16 bit patterns (on all cores, in one
    pass: NumPy's two passes through a uint32 copy took 5 s for a 311M-weight lm_head)."""
    if w.dtype == np.uint16:
        out = np.empty(w.shape, np.float32)
        _widen_bf16(np.ascontiguousarray(w).reshape(-1), out.reshape(-1))
        return out
    if w.dtype not in (np.float32, np.float16):
        raise ValueError(f"quantize takes float32, float16 or bf16 bits (uint16), got {w.dtype}")
    return w.astype(np.float32, copy=False)


@intrinsic
def _float_bits(typingctx, value):
    """float32 -> its bit pattern as uint32 (no allocation)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, bits):
    """uint32 bit pattern -> float32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(parallel=True, nogil=True, cache=True)
def _widen_bf16(bits, out):
    """out float32 [n] = the bf16 values whose bit patterns are bits uint16 [n]."""
    for i in prange(bits.shape[0]):
        out[i] = _bits_float(np.uint32(bits[i]) << np.uint32(16))


@njit(cache=True, inline="always")
def _round_bf16(value):
    """float32 -> bf16 bits, round to nearest even."""
    bits = _float_bits(np.float32(value))
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, inline="always")
def _bf16_value(bits):
    return _bits_float(np.uint32(bits) << np.uint32(16))


@njit(cache=True, inline="always")
def _quantize_group(block, g, candidates, lowest, highest, codes, trial, rows, scales_out):
    """Choose the scales of the 32 rows of one block over group g, all rows at once, for codes in
    [lowest, highest] (float32: -8, 7 here; `kernels.int6` shares this).

    block float32 [in, 32] (the block transposed: a column's 32 rows are contiguous, so every
    loop below runs across rows and vectorises); codes int32 [32, 32] receives the chosen codes
    [column, row]; trial [32, 32] and rows [6, 32] are scratch; scales_out uint16 [32].
    """
    peak, best_error, dot, norm, scale, scale_bits = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]
    first = g * GROUP
    for r in range(BLOCK):
        peak[r] = 0.0
        best_error[r] = np.inf
        scales_out[r] = 0
    for c in range(GROUP):
        for r in range(BLOCK):
            value = block[first + c, r]
            if abs(value) > abs(peak[r]):
                peak[r] = value
    for r in range(BLOCK):
        for c in range(GROUP):
            codes[c, r] = 0
    for divisor in candidates:
        for r in range(BLOCK):  # a first scale from the peak, as its inverse
            first_scale = _bf16_value(_round_bf16(peak[r] / divisor))
            scale[r] = np.float32(1.0) / first_scale if first_scale != 0 else np.float32(0.0)
            dot[r] = 0.0
            norm[r] = 0.0
        for c in range(GROUP):
            for r in range(BLOCK):
                value = block[first + c, r]
                q = min(max(np.floor(value * scale[r] + np.float32(0.5)), lowest), highest)
                trial[c, r] = q
                dot[r] += q * value
                norm[r] += q * q
        for r in range(BLOCK):  # the least-squares scale for these codes; NaN where unusable
            usable = peak[r] != 0 and scale[r] != 0 and norm[r] != 0
            bits = _round_bf16(dot[r] / norm[r]) if usable else np.uint16(0)
            scale_bits[r] = np.float32(bits)  # < 2^16: exact in float32
            scale[r] = _bf16_value(bits) if usable else np.float32(np.nan)
            norm[r] = 0.0  # reused: the squared error of this candidate
        for c in range(GROUP):
            for r in range(BLOCK):
                diff = block[first + c, r] - trial[c, r] * scale[r]
                norm[r] += diff * diff
        for r in range(BLOCK):
            if norm[r] < best_error[r]:  # NaN never compares smaller
                best_error[r] = norm[r]
                scales_out[r] = np.uint16(scale_bits[r])
                for c in range(GROUP):
                    codes[c, r] = np.int32(trial[c, r])


@njit(parallel=True, cache=True)
def _quantize_kernel(w, candidates, packed, scales):
    """w float32 [E, out, in] -> packed, scales (see layout)."""
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
            _quantize_group(block, g, candidates, np.float32(-8.0), np.float32(7.0), codes, trial, rows,
                            scales[e, b, g * GROUP:(g + 1) * GROUP])
            for c in range(GROUP):
                column = (g * GROUP + c) * 16
                for k in range(16):
                    packed[e, b, column + k] = np.uint8((codes[c, k] + 8) | ((codes[c, k + 16] + 8) << 4))


def _prepared(w: np.ndarray) -> np.ndarray:
    """float32 [E, out, in] from [E, out, in] or [out, in] float32 / float16 / bf16 bits."""
    w = _as_float32(np.asarray(w))
    if w.ndim == 2:
        w = w[None]
    FORMAT.check_shape(w.shape[1], w.shape[2])
    return np.ascontiguousarray(w)


def quantize(w: np.ndarray) -> Int4Weights:
    """[E, out, in] (or [out, in]) float32 / float16 / bf16-bits -> Int4Weights."""
    w = _prepared(w)
    experts, out_features, in_features = w.shape
    packed = np.zeros((experts, out_features // BLOCK, in_features * 16), dtype=np.uint8)
    scales = np.zeros((experts, out_features // BLOCK, in_features), dtype=np.uint16)
    _quantize_kernel(np.ascontiguousarray(w), SCALE_CANDIDATES, packed, scales)
    return Int4Weights(packed, scales, (experts, out_features, in_features))


def unpack_codes(q: Int4Weights) -> np.ndarray:
    """int8 [E, out, in] codes in [-8, 7] (NumPy; the layout's one unpacking reference)."""
    experts, out_features, in_features = q.shape
    blocks = q.packed.reshape(experts, out_features // BLOCK, in_features, 16)
    low = (blocks & 0x0F).astype(np.int8) - 8  # rows 0..15 of each block
    high = (blocks >> 4).astype(np.int8) - 8  # rows 16..31
    codes = np.concatenate([low, high], axis=3)  # [E, blocks, in, 32]
    return codes.transpose(0, 1, 3, 2).reshape(experts, out_features, in_features)


def scales_float32(q: Int4Weights) -> np.ndarray:
    """float32 [E, out, in // 32]."""
    experts, out_features, in_features = q.shape
    scales = (q.scales.astype(np.uint32) << 16).view(np.float32)
    scales = scales.reshape(experts, out_features // BLOCK, in_features // GROUP, BLOCK)
    return scales.transpose(0, 1, 3, 2).reshape(experts, out_features, in_features // GROUP)


def dequantize(q: Int4Weights) -> np.ndarray:
    """Int4Weights -> float32 [E, out, in]."""
    scales = np.repeat(scales_float32(q), GROUP, axis=2)
    return unpack_codes(q).astype(np.float32) * scales


def pack(codes: np.ndarray, scale_bits: np.ndarray) -> Int4Weights:
    """Codes int [E, out, in] in [-8, 7] and bf16 scale bits [E, out, in // 32] -> Int4Weights."""
    experts, out_features, in_features = codes.shape
    FORMAT.check_shape(out_features, in_features)
    nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
    nibbles = nibbles.reshape(experts, out_features // BLOCK, BLOCK, in_features).transpose(0, 1, 3, 2)
    packed = nibbles[..., :16] | (nibbles[..., 16:] << 4)  # [E, blocks, in, 16]
    scales = scale_bits.reshape(experts, out_features // BLOCK, BLOCK, in_features // GROUP)
    scales = scales.transpose(0, 1, 3, 2)
    return Int4Weights(np.ascontiguousarray(packed.reshape(experts, out_features // BLOCK, -1)),
                       np.ascontiguousarray(scales.reshape(experts, out_features // BLOCK, -1)).astype(np.uint16),
                       (experts, out_features, in_features))


def quantize_reference(w: np.ndarray) -> Int4Weights:
    """NumPy reference of `quantize` (same candidates, rounding and tie-breaking)."""
    w = _prepared(w)
    codes, bits = reference_codes(w, SCALE_CANDIDATES, -8, 7)
    return pack(codes, bits)


def reference_codes(w: np.ndarray, candidates: np.ndarray, lowest: int, highest: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of `_quantize_group` for codes in [lowest, highest]: (codes int32 [E, out,
    in], bf16 scale bits [E, out, in // 32]) of w float32 [E, out, in]."""
    experts, out_features, in_features = w.shape
    groups = w.reshape(-1, GROUP)
    peak = groups[np.arange(len(groups)), np.abs(groups).argmax(axis=1)]
    best_error = np.full(len(groups), np.inf, dtype=np.float32)
    best_bits = np.zeros(len(groups), dtype=np.uint16)
    best_codes = np.zeros(groups.shape, dtype=np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for divisor in candidates:
            scale = _bf16_to_float(_float_to_bf16(peak / divisor))
            usable = scale != 0
            inverse = np.where(usable, np.float32(1.0) / scale, 0).astype(np.float32)
            codes = np.clip(np.floor(groups * inverse[:, None] + np.float32(0.5)), lowest, highest).astype(np.float32)
            dot = (codes * groups).sum(axis=1, dtype=np.float32)
            norm = (codes * codes).sum(axis=1, dtype=np.float32)
            usable &= norm != 0
            bits = _float_to_bf16(np.where(usable, dot / np.where(usable, norm, 1), 0).astype(np.float32))
            diff = groups - codes * _bf16_to_float(bits)[:, None]
            error = (diff * diff).sum(axis=1, dtype=np.float32)
            better = usable & (error < best_error)
            best_error[better] = error[better]
            best_bits[better] = bits[better]
            best_codes[better] = codes[better]
    return best_codes.reshape(w.shape), best_bits.reshape(experts, out_features, in_features // GROUP)


def _float_to_bf16(values: np.ndarray) -> np.ndarray:
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
