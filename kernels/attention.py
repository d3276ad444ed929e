"""Decode attention on the CPU over a KV cache in its stored format: fp32, bf16 or int8.

At depth a decode step's attention reads every cached key and value once per layer, so its time
is the cache's bytes over the RAM bandwidth, if nothing else costs more; with several query heads
per KV head the arithmetic costs more on a few cores. Two kernels, neither copying the cache:
`attend_decode_tiled` for keys stored in tiles (every CPU cache of the usual shapes; see "keys in
tiles" below), and `attend_decode`, which widens stored rows to fp32 four at a time in L1 (int8
caches whose groups do not tile). Work is split like flash-decoding: tasks are (KV head, span of
positions); each keeps a running max, sum and weighted value sum for the queries of its head
group, and a second pass merges the spans.

The shapes below are `attend_decode`'s; `attend_decode_tiled` documents its own.

Shapes: Hkv KV heads, L cached positions (max_len), Dh head dim, R queries per KV head (the
group's query heads x the step's tokens), S spans per head, B = BLOCK positions.
    query        float32 [Hkv, R, Dh]  pre-scaled by the softmax scale
    limits       int64 [R]  the last position each query sees (causal)
    window       int        positions a query sees at most (sliding window), or 0 for all
    keys/values  one stored form, the other two empty:
                 float32 [Hkv, L, Dh]            "f32"
                 uint16 [Hkv, L, Dh]             "bf16": the top 16 bits of an fp32
                 int8 [Hkv, L, Dh] + float32 [Hkv, L, Dh / G] scales   "int8": value = code x scale
    part_max, part_sum  float32 [Hkv, S, R]   per span: running max and sum of exp
    part_out     float32 [Hkv, S, R, Dh]      per span: sum of exp x value
    scores       float32 [Hkv * S, R, B]      scratch, one slice per task
    rows         uint32 [Hkv * S, 4, Dh]      scratch: the four rows being widened
    out          float32 [Hkv, R, Dh]
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from offload.kernels import isa as paths
from offload.kernels.q8 import dot4

BLOCK = 64  # positions whose scores a task holds at once: [R, 64] fp32 stays in L1
F32, BF16, INT8 = 0, 1, 2  # stored forms


@njit(cache=True, inline="always")
def _widen(kind, as_f32, as_bf16, as_int8, scales, head, position, group, bits, row):
    """Row `position` of `head`, as fp32, into `row` (a float32 view of `bits`)."""
    width = row.shape[0]
    if kind == BF16:
        source = as_bf16[head, position]
        for d in range(width):
            bits[d] = np.uint32(source[d]) << np.uint32(16)
    elif kind == INT8:
        codes, scale = as_int8[head, position], scales[head, position]
        for g in range(width // group):
            s = scale[g]
            base = g * group
            for d in range(group):
                row[base + d] = np.float32(codes[base + d]) * s
    else:
        source = as_f32[head, position]
        for d in range(width):
            row[d] = source[d]


@njit(cache=True, inline="always")
def _score(score, j, count, block, limit, window, d0, d1, d2, d3):
    """Store the dot products of positions block + j .. + 3 (those below `count`), masked."""
    for i in range(min(4, count - j)):
        dot = d0 if i == 0 else d1 if i == 1 else d2 if i == 2 else d3
        position = block + j + i
        hidden = position > limit or (window > 0 and position <= limit - window)
        score[j + i] = -np.inf if hidden else dot


# Keys and values are taken four rows at a time and queries two at a time: each loaded element of a
# row serves two queries, each query element four rows, each output element four updates (loads
# and the dot products' horizontal sums, not multiply-adds, bound these loops; four queries at a
# time spill registers and run at half the speed).
# Infinities are meaningful here (masked scores are -inf), so fastmath is limited to reassociation
# and contraction, which let the dot products vectorise.
@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "contract"})
def attend_decode(query, limits, window, kind, group,
                  keys_f32, keys_bf16, keys_int8, key_scales,
                  values_f32, values_bf16, values_int8, value_scales,
                  part_max, part_sum, part_out, scores, rows, out):
    kv_heads, queries, width = query.shape
    spans = part_max.shape[1]
    length = 0
    lowest = limits[0]
    for r in range(queries):
        length = max(length, limits[r] + 1)
        lowest = min(lowest, limits[r])
    first = max(0, lowest - window + 1) if window > 0 else 0
    span = (length - first + spans - 1) // spans
    span = (span + 3) // 4 * 4
    for task in prange(kv_heads * spans):
        head, part = task // spans, task % spans
        begin = first + part * span
        end = min(length, begin + span)
        best, total, acc = part_max[head, part], part_sum[head, part], part_out[head, part]
        best[:] = -np.inf
        total[:] = 0.0
        acc[:] = 0.0
        score, bits = scores[task], rows[task]  # bits: [4, Dh]
        four = bits.view(np.float32)
        r0, r1, r2, r3 = four[0], four[1], four[2], four[3]
        for block in range(begin, end, BLOCK):
            count = min(BLOCK, end - block)
            for j in range(0, count, 4):
                for i in range(4):
                    position = min(block + j + i, end - 1)  # a short last quad repeats its last row
                    _widen(kind, keys_f32, keys_bf16, keys_int8, key_scales, head, position, group, bits[i], four[i])
                for r in range(0, queries - 1, 2):
                    q, u = query[head, r], query[head, r + 1]
                    d0 = d1 = d2 = d3 = e0 = e1 = e2 = e3 = np.float32(0.0)
                    for d in range(width):
                        x, y = q[d], u[d]
                        k0, k1, k2, k3 = r0[d], r1[d], r2[d], r3[d]
                        d0 += x * k0
                        d1 += x * k1
                        d2 += x * k2
                        d3 += x * k3
                        e0 += y * k0
                        e1 += y * k1
                        e2 += y * k2
                        e3 += y * k3
                    _score(score[r], j, count, block, limits[r], window, d0, d1, d2, d3)
                    _score(score[r + 1], j, count, block, limits[r + 1], window, e0, e1, e2, e3)
                if queries % 2:
                    r = queries - 1
                    q = query[head, r]
                    d0 = d1 = d2 = d3 = np.float32(0.0)
                    for d in range(width):
                        x = q[d]
                        d0 += x * r0[d]
                        d1 += x * r1[d]
                        d2 += x * r2[d]
                        d3 += x * r3[d]
                    _score(score[r], j, count, block, limits[r], window, d0, d1, d2, d3)
            for r in range(queries):
                top = -np.inf
                for j in range(count):
                    top = max(top, score[r, j])
                if top == -np.inf:  # nothing this query sees in the block
                    for j in range(count):
                        score[r, j] = 0.0
                    continue
                new_best = max(best[r], top)
                if new_best > best[r]:
                    shrink = np.float32(math.exp(best[r] - new_best))
                    total[r] *= shrink
                    for d in range(width):
                        acc[r, d] *= shrink
                    best[r] = new_best
                added = np.float32(0.0)
                for j in range(count):
                    p = np.float32(math.exp(score[r, j] - new_best))
                    score[r, j] = p
                    added += p
                total[r] += added
            for j in range(count, (count + 3) // 4 * 4):
                for r in range(queries):
                    score[r, j] = 0.0  # the short last quad's repeated rows weigh nothing
            for j in range(0, count, 4):
                for i in range(4):
                    position = min(block + j + i, end - 1)
                    _widen(kind, values_f32, values_bf16, values_int8, value_scales, head, position, group,
                           bits[i], four[i])
                for r in range(0, queries - 1, 2):
                    p0, p1, p2, p3 = score[r, j], score[r, j + 1], score[r, j + 2], score[r, j + 3]
                    s0, s1, s2, s3 = score[r + 1, j], score[r + 1, j + 1], score[r + 1, j + 2], score[r + 1, j + 3]
                    a, b = acc[r], acc[r + 1]
                    for d in range(width):
                        k0, k1, k2, k3 = r0[d], r1[d], r2[d], r3[d]
                        a[d] += p0 * k0 + p1 * k1 + p2 * k2 + p3 * k3
                        b[d] += s0 * k0 + s1 * k1 + s2 * k2 + s3 * k3
                if queries % 2:
                    r = queries - 1
                    p0, p1, p2, p3 = score[r, j], score[r, j + 1], score[r, j + 2], score[r, j + 3]
                    a = acc[r]
                    for d in range(width):
                        a[d] += p0 * r0[d] + p1 * r1[d] + p2 * r2[d] + p3 * r3[d]
    for task in prange(kv_heads * queries):
        head, r = task // queries, task % queries
        best = -np.inf
        for part in range(spans):
            best = max(best, part_max[head, part, r])
        total = np.float32(0.0)
        result = out[head, r]
        result[:] = 0.0
        for part in range(spans):
            if part_sum[head, part, r] == 0.0:
                continue
            weight = np.float32(math.exp(part_max[head, part, r] - best))
            total += weight * part_sum[head, part, r]
            source = part_out[head, part, r]
            for d in range(width):
                result[d] += weight * source[d]
        for d in range(width):
            result[d] /= total


_SMALLEST = np.float32(1.1754944e-38)  # the least normal float32: an all-zero group's divisor


@njit(cache=True, inline="always")
def _group_scale(row, begin, end):
    """max |row[begin:end]| / 127: the scale of one int8 group."""
    peak = np.float32(0.0)
    for d in range(begin, end):
        peak = max(peak, abs(row[d]))
    return peak / np.float32(127.0)


@njit(cache=True, inline="always")
def _code(value, scale):
    """round(value / scale) in [-127, 127], as the cache's torch quantiser rounds it."""
    return min(max(np.rint(value / max(scale, _SMALLEST)), np.float32(-127.0)), np.float32(127.0))


@njit(cache=True, nogil=True)
def write_int8_tiled(keys, values, start, key_tiles, key_scales, value_codes, value_scales):
    """Store keys and values float32 [Hkv, T, Dh] at positions start..start+T of an int8 cache:
    per position, head and group of G channels a scale max |x| / 127 and codes round(x / scale)
    in [-127, 127] (the cache's own quantiser, to the bit); keys biased by 128 into their tiles,
    key_tiles uint8 [Hkv, tiles, Dh / 4, TILE, 4]; value_codes int8 [Hkv, L, Dh]; key_scales,
    value_scales float32 [Hkv, L, Dh / G]."""
    kv_heads, tokens, width = keys.shape
    group = width // key_scales.shape[2]
    tile_length = key_tiles.shape[3]
    for h in range(kv_heads):
        for t in range(tokens):
            position = start + t
            tile, lane = position // tile_length, position % tile_length
            for begin in range(0, width, group):
                key_scale = _group_scale(keys[h, t], begin, begin + group)
                value_scale = _group_scale(values[h, t], begin, begin + group)
                key_scales[h, position, begin // group] = key_scale
                value_scales[h, position, begin // group] = value_scale
                for d in range(begin, begin + group):
                    key_tiles[h, tile, d // 4, lane, d % 4] = np.uint8(np.int32(_code(keys[h, t, d], key_scale)) + 128)
                    value_codes[h, position, d] = np.int8(_code(values[h, t, d], value_scale))


def spans_for(kv_heads: int, length: int, threads: int) -> int:
    """Spans per KV head: enough tasks for every thread (four each, for balance), none shorter than
    256 positions (below that the merge costs more than it spreads)."""
    return max(1, min(-(-4 * threads // kv_heads), length // 256))


def quantize_rows(rows: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., Dh] -> (int8 codes [..., Dh], float32 scales [..., Dh / group]): symmetric,
    scale = max |x| / 127 per group (NumPy reference of the cache's int8 writes)."""
    grouped = rows.reshape(*rows.shape[:-1], -1, group)
    scales = np.abs(grouped).max(axis=-1) / 127
    safe = np.where(scales > 0, scales, 1)
    codes = np.clip(np.rint(grouped / safe[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(rows.shape), scales.astype(np.float32)


def attend_reference(query: np.ndarray, keys: np.ndarray, values: np.ndarray, limits: np.ndarray,
                     window: int) -> np.ndarray:
    """NumPy reference of `attend_decode` on fp32 keys and values [Hkv, L, Dh] (query pre-scaled)."""
    positions = np.arange(keys.shape[1])
    visible = positions[None, :] <= limits[:, None]
    if window > 0:
        visible &= positions[None, :] > limits[:, None] - window
    scores = np.einsum("grd,gld->grl", query.astype(np.float64), keys.astype(np.float64))
    scores = np.where(visible[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("grl,gld->grd", weights, values.astype(np.float64)).astype(np.float32)


# --- keys in tiles: sixteen positions scored at once -----------------------------------------------
#
# A CPU cache stores its keys in tiles of TILE positions, position-minor, so that one vector load is
# one or four channels of sixteen positions, one lane per position, and a query's channel
# broadcast to every lane scores sixteen positions at once: no horizontal sums.
#     f32   float32 [Hkv, L / TILE, Dh, TILE]          one channel of sixteen positions per load
#     bf16  uint16 [Hkv, L / TILE, Dh, TILE]            the same, widened by a shift
#     int8  uint8 [Hkv, L / TILE, Dh / 4, TILE, 4]      four channels: integer dot products
# (NumPy views: [Hkv, L / TILE, Dh * TILE]). With int8 keys the scores come from the CPU's
# dot-product instructions (`kernels.isa`'s paths: 64 byte products per instruction on
# AVX512-VNNI), the query quantised to int8 once per step with one scale per group of the keys'
# channels. The instructions multiply unsigned by signed bytes, so int8 keys are stored biased
# (code + 128) and the bias comes back out exactly: sum (k + 128) q = sum k q + 128 sum q.
# Values stay rows [Hkv, L, Dh]; each is widened once per block and added into every query's
# output (a vector of sixteen channels per query in registers). Scores are kept in base 2 (the
# query carries log2 e) and exponentiated sixteen at a time by a polynomial.

TILE = 16  # positions of keys per tile
LOG2E = 1.4426950408889634
# 2^f = sum (ln 2)^k / k! f^k on [-1/2, 1/2]: the first term left out is below 1.2e-7 relative
_EXP2_TAYLOR = [math.log(2) ** k / math.factorial(k) for k in range(7)]


def tiled(kind: int, head_dim: int, group: int) -> bool:
    """Whether keys of this stored form and shape take tiles (and `attend_decode_tiled`): sixteen
    channels at a time must stay inside an int8 scale group."""
    return head_dim % TILE == 0 and (kind != INT8 or group % TILE == 0)


def tile_keys(keys: np.ndarray) -> np.ndarray:
    """Keys [Hkv, L, Dh] (L a multiple of TILE) -> stored tiles [Hkv, L / TILE, Dh * TILE]: float32
    or bf16 bits (uint16) as they are, int8 codes biased to uint8."""
    kv_heads, length, width = keys.shape
    if keys.dtype == np.int8:
        biased = (keys.astype(np.int16) + 128).astype(np.uint8)
        tiles = biased.reshape(kv_heads, length // TILE, TILE, width // 4, 4).transpose(0, 1, 3, 2, 4)
    else:
        tiles = keys.reshape(kv_heads, length // TILE, TILE, width).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(tiles).reshape(kv_heads, length // TILE, width * TILE)


def _i(bits: int) -> ir.IntType:
    return ir.IntType(bits)


_F32 = ir.FloatType()
_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_i(32), 16)


def _splat(builder, scalar, vector_type):
    lanes = vector_type.count
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_i(32), 0))
    return builder.shuffle_vector(single, single, ir.Constant(ir.VectorType(_i(32), lanes), [0] * lanes))


class _Array:
    """An array argument of an intrinsic: typed element addresses from its data pointer and strides."""

    def __init__(self, context, builder, numba_type, value):
        self.builder = builder
        self.struct = context.make_array(numba_type)(context, builder, value)
        self.element = context.get_data_type(numba_type.dtype)

    def shape(self, axis: int):
        return self.builder.extract_value(self.struct.shape, axis)

    def at(self, *index, as_type=None):
        """Address of element `index` (i64 values), as a pointer to `as_type` (default: the element)."""
        builder = self.builder
        offset = ir.Constant(_i(64), 0)
        for axis, i in enumerate(index):
            offset = builder.add(offset, builder.mul(i, builder.extract_value(self.struct.strides, axis)))
        address = builder.gep(builder.bitcast(self.struct.data, _i(8).as_pointer()), [offset])
        return builder.bitcast(address, (as_type or self.element).as_pointer())


def _const(value: int):
    return ir.Constant(_i(64), value)


def _widened(builder, kind: int, pointer):
    """Sixteen fp32 values from 16 stored ones at `pointer`: f32, bf16 bits (uint16) or int8."""
    if kind == F32:
        return builder.load(builder.bitcast(pointer, _V16F.as_pointer()), align=4)
    if kind == BF16:
        bits = builder.load(builder.bitcast(pointer, ir.VectorType(_i(16), 16).as_pointer()), align=2)
        return builder.bitcast(builder.shl(builder.zext(bits, _V16I), ir.Constant(_V16I, [16] * 16)), _V16F)
    codes = builder.load(builder.bitcast(pointer, ir.VectorType(_i(8), 16).as_pointer()), align=1)
    return builder.sitofp(builder.sext(codes, _V16I), _V16F)


def _score_tile_codegen(path: int, kind: int, rows: int):
    def codegen(context, builder, sig, args):
        tile, codes, factors, biases, scales, out = (_Array(context, builder, t, a)
                                                     for t, a in zip(sig.args[3:], args[3:]))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
        zero_f, zero_i = ir.Constant(_V16F, [0.0] * 16), ir.Constant(_V16I, [0] * 16)
        totals = [cgutils.alloca_once_value(builder, zero_f) for _ in range(rows)]
        if kind != INT8:  # one channel of sixteen positions, times each query's channel
            with cgutils.for_range(builder, factors.shape(1)) as by_channel:
                d = by_channel.index
                keys = _widened(builder, kind, tile.at(builder.mul(d, _const(TILE))))
                for r, total in enumerate(totals):
                    query = _splat(builder, builder.load(factors.at(_const(r), d)), _V16F)
                    builder.store(builder.call(fma, [query, keys, builder.load(total)]), total)
        else:
            _score_int8(builder, path, tile, codes, factors, biases, scales, totals, fma)
        for r, total in enumerate(totals):
            builder.store(builder.load(total), out.at(_const(r), _const(0), as_type=_V16F), align=4)
        return context.get_dummy_value()

    return codegen


def _score_int8(builder, path, tile, codes, factors, biases, scales, totals, fma):
    """totals[r] += the scores of a tile of int8 keys for query r: per group, integer dot products of
    four channels at a time, then (dot - bias) x key scale x query factor."""
    v64i8 = ir.VectorType(_i(8), 64)
    zero_i = ir.Constant(_V16I, [0] * 16)
    width, groups = codes.shape(1), factors.shape(1)
    chunks = builder.udiv(builder.udiv(width, groups), _const(4))  # of four channels, per group
    dots = [cgutils.alloca_once_value(builder, zero_i) for _ in totals]
    with cgutils.for_range(builder, groups) as by_group:
        g = by_group.index
        for dot in dots:
            builder.store(zero_i, dot)
        with cgutils.for_range(builder, chunks) as by_chunk:
            chunk = builder.add(builder.mul(g, chunks), by_chunk.index)
            keys = builder.load(tile.at(builder.mul(chunk, _const(64)), as_type=v64i8), align=1)
            for r, dot in enumerate(dots):
                four = builder.load(codes.at(_const(r), builder.mul(chunk, _const(4)), as_type=_i(32)), align=1)
                query = builder.bitcast(_splat(builder, four, _V16I), v64i8)
                builder.store(dot4(builder, path, builder.load(dot), keys, query), dot)
        key_scale = ir.Constant(_V16F, ir.Undefined)
        for p in range(TILE):
            key_scale = builder.insert_element(key_scale, builder.load(scales.at(_const(p), g)),
                                               ir.Constant(_i(32), p))
        for r, (dot, total) in enumerate(zip(dots, totals)):
            exact = builder.sub(builder.load(dot), _splat(builder, builder.load(biases.at(_const(r), g)), _V16I))
            scale = builder.fmul(key_scale, _splat(builder, builder.load(factors.at(_const(r), g)), _V16F))
            builder.store(builder.call(fma, [builder.sitofp(exact, _V16F), scale, builder.load(total)]), total)


@intrinsic
def _score_tile(typingctx, path, kind, rows, tile, codes, factors, biases, scales, out):
    """out[r, 0:16] = scores (base 2) of TILE positions for `rows` queries.

    path, kind (stored form) and rows (1, 2, 4 or 8): compile-time literals. tile: one tile of keys
    [Dh * TILE]; out float32 [rows, >= TILE]. f32 / bf16: factors float32 [rows, Dh] is the query
    (x log2 e); codes, biases, scales unused. int8: codes int8 [rows, Dh], factors float32 [rows, G]
    (query scale x log2 e), biases int32 [rows, G] (128 x the group's code sum), scales float32
    [TILE, G] (the keys')."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (path, kind, rows)):
        return None
    # AVX2's 16-bit pair sums would saturate on biased keys (255 x 127 x 2): the portable IR instead
    chosen = paths.PORTABLE if path.literal_value == paths.AVX2 else path.literal_value
    return (types.void(path, kind, rows, tile, codes, factors, biases, scales, out),
            _score_tile_codegen(chosen, kind.literal_value, rows.literal_value))


def _exp2_block_codegen(context, builder, sig, args):
    row, best = _Array(context, builder, sig.args[0], args[0]), args[1]
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F]), "llvm.rint.v16f32")
    floor = ir.Constant(_V16F, [-126.0] * 16)
    total = ir.Constant(_V16F, [0.0] * 16)
    for k in range(BLOCK // 16):
        address = row.at(_const(16 * k), as_type=_V16F)
        x = builder.fsub(builder.load(address, align=4), _splat(builder, best, _V16F))
        hidden = builder.fcmp_ordered("<", x, floor)  # -inf (masked) among them: exactly 0
        x = builder.select(hidden, floor, x)
        whole = builder.call(rint, [x])
        fraction = builder.fsub(x, whole)
        power = ir.Constant(_V16F, [_EXP2_TAYLOR[-1]] * 16)
        for c in reversed(_EXP2_TAYLOR[:-1]):
            power = builder.call(fma, [power, fraction, ir.Constant(_V16F, [c] * 16)])
        exponent = builder.shl(builder.add(builder.fptosi(whole, _V16I), ir.Constant(_V16I, [127] * 16)),
                               ir.Constant(_V16I, [23] * 16))
        value = builder.fmul(power, builder.bitcast(exponent, _V16F))
        value = builder.select(hidden, ir.Constant(_V16F, [0.0] * 16), value)
        builder.store(value, address, align=4)
        total = builder.fadd(total, value)
    result = builder.extract_element(total, ir.Constant(_i(32), 0))
    for lane in range(1, 16):
        result = builder.fadd(result, builder.extract_element(total, ir.Constant(_i(32), lane)))
    return result


def _block_max_codegen(context, builder, sig, args):
    row = _Array(context, builder, sig.args[0], args[0])
    top = None
    for k in range(BLOCK // 16):
        x = builder.load(row.at(_const(16 * k), as_type=_V16F), align=4)
        top = x if top is None else builder.select(builder.fcmp_ordered(">", x, top), x, top)
    result = builder.extract_element(top, ir.Constant(_i(32), 0))
    for lane in range(1, 16):
        x = builder.extract_element(top, ir.Constant(_i(32), lane))
        result = builder.select(builder.fcmp_ordered(">", x, result), x, result)
    return result


@intrinsic
def _block_max(typingctx, row):
    """The largest of BLOCK scores (float32 [BLOCK]; -inf if all are)."""
    return types.float32(row), _block_max_codegen


@intrinsic
def _exp2_block(typingctx, row, best):
    """row[:] = 2^(row - best) for BLOCK scores (float32 [BLOCK], -inf for masked ones, which give
    exactly 0); returns their sum."""
    return types.float32(row, best), _exp2_block_codegen


def _add_values_codegen(kind: int, rows: int):
    def codegen(context, builder, sig, args):
        values, scales, weights, acc = (_Array(context, builder, t, a) for t, a in zip(sig.args[2:], args[2:]))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
        count, width = values.shape(0), values.shape(1)
        totals = [cgutils.alloca_once(builder, _V16F) for _ in range(rows)]
        # the weights' rows are BLOCK apart (C-contiguous, checked at typing): every row's weight
        # of position j is one base and index away, a constant displacement per row; through the
        # strides each row's pointer was a variable of its own, spilled and stepped on the stack
        first_weight = builder.bitcast(weights.struct.data, _F32.as_pointer())
        with cgutils.for_range(builder, builder.udiv(width, _const(16))) as by_chunk:
            channel = builder.mul(by_chunk.index, _const(16))
            for r, total in enumerate(totals):
                builder.store(builder.load(acc.at(_const(r), channel, as_type=_V16F), align=4), total)
            with cgutils.for_range(builder, count) as by_position:
                j = by_position.index
                row = _widened(builder, kind, values.at(j, channel))
                if kind == INT8:
                    g = builder.udiv(channel, builder.udiv(width, scales.shape(1)))
                    row = builder.fmul(row, _splat(builder, builder.load(scales.at(j, g)), _V16F))
                for r, total in enumerate(totals):
                    address = builder.gep(first_weight, [builder.add(j, _const(r * BLOCK))])
                    weight = _splat(builder, builder.load(address, align=4), _V16F)
                    builder.store(builder.call(fma, [weight, row, builder.load(total)]), total)
            for r, total in enumerate(totals):
                builder.store(builder.load(total), acc.at(_const(r), channel, as_type=_V16F), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _add_values(typingctx, kind, rows, values, scales, weights, acc):
    """acc[r] += sum_j weights[r, j] x values[j] for `rows` queries. kind (stored form) and rows (1,
    2, 4 or 8): literals. values [n, Dh] as stored (bf16 as uint16 bits), with scales float32
    [n, G] for int8 (unused otherwise); weights float32 [rows, BLOCK], C-contiguous (n <= BLOCK);
    acc float32 [rows, Dh]."""
    if not isinstance(kind, types.IntegerLiteral) or not isinstance(rows, types.IntegerLiteral) \
            or weights.layout != "C" or weights.dtype != types.float32:
        return None
    return types.void(kind, rows, values, scales, weights, acc), _add_values_codegen(kind.literal_value,
                                                                                    rows.literal_value)


@njit(cache=True, inline="always")
def _by_rows(queries, r):
    """How many query rows the next intrinsic call takes from row r on: 8, 4, 2 or 1."""
    left = queries - r
    return 8 if left >= 8 else 4 if left >= 4 else 2 if left >= 2 else 1


@njit(cache=True, nogil=True)
def quantize_queries(query, codes, factors, biases):
    """query float32 [Hkv, R, Dh] (pre-scaled) -> codes int8, factors float32 [Hkv, R, G] (scale x
    log2 e), biases int32 [Hkv, R, G] (128 x the code sum): `quantize_rows` per group."""
    kv_heads, queries, width = query.shape
    groups = factors.shape[2]
    group = width // groups
    for h in range(kv_heads):
        for r in range(queries):
            for g in range(groups):
                base = g * group
                amax = np.float32(0.0)
                for d in range(group):
                    amax = max(amax, abs(query[h, r, base + d]))
                scale = amax / np.float32(127.0)
                total = 0
                for d in range(group):
                    code = 0 if scale == 0 else int(min(max(np.rint(query[h, r, base + d] / scale), -127.0), 127.0))
                    codes[h, r, base + d] = code
                    total += code
                factors[h, r, g] = scale * np.float32(LOG2E)
                biases[h, r, g] = 128 * total


@njit(cache=True, nogil=True)
def _base2_queries(query, factors):
    """factors float32 [Hkv, R, Dh] = query x log2 e (f32 and bf16 keys)."""
    for h in range(query.shape[0]):
        for r in range(query.shape[1]):
            for d in range(query.shape[2]):
                factors[h, r, d] = query[h, r, d] * np.float32(LOG2E)


@njit(parallel=True, nogil=True, cache=True)
def _attend_tiled(path, kind, query, limits, window, keys, key_scales, values, value_scales,
                  codes, factors, biases, part_max, part_sum, part_out, scores, out):
    literally(path)
    literally(kind)
    kv_heads, queries, width = query.shape
    spans = part_max.shape[1]
    if kind == INT8:
        quantize_queries(query, codes, factors, biases)
    else:
        _base2_queries(query, factors)
    length = 0
    lowest, highest = limits[0], limits[0]
    for r in range(queries):
        length = max(length, limits[r] + 1)
        lowest, highest = min(lowest, limits[r]), max(highest, limits[r])
    first = max(0, lowest - window + 1) // TILE * TILE if window > 0 else 0
    span = (length - first + spans - 1) // spans
    span = (span + TILE - 1) // TILE * TILE
    for task in prange(kv_heads * spans):
        head, part = task // spans, task % spans
        begin = first + part * span
        end = min(length, begin + span)
        best, total, acc = part_max[head, part], part_sum[head, part], part_out[head, part]
        best[:] = -np.inf
        total[:] = 0.0
        acc[:] = 0.0
        score = scores[task]
        for block in range(begin, end, BLOCK):
            count = min(BLOCK, end - block)
            covered = (count + TILE - 1) // TILE * TILE
            for t in range(covered // TILE):
                position = block + t * TILE
                tile, key_scale = keys[head, position // TILE], key_scales[head, position:position + TILE]
                r = 0
                while r < queries:
                    n = _by_rows(queries, r)
                    rows = slice(r, r + n)
                    if n == 8:
                        _score_tile(path, kind, 8, tile, codes[head, rows], factors[head, rows], biases[head, rows],
                                    key_scale, score[rows, t * TILE:])
                    elif n == 4:
                        _score_tile(path, kind, 4, tile, codes[head, rows], factors[head, rows], biases[head, rows],
                                    key_scale, score[rows, t * TILE:])
                    elif n == 2:
                        _score_tile(path, kind, 2, tile, codes[head, rows], factors[head, rows], biases[head, rows],
                                    key_scale, score[rows, t * TILE:])
                    else:
                        _score_tile(path, kind, 1, tile, codes[head, rows], factors[head, rows], biases[head, rows],
                                    key_scale, score[rows, t * TILE:])
                    r += n
            seen_by_all = block + count - 1 <= lowest and (window == 0 or block > highest - window)
            for r in range(queries):
                if not seen_by_all:
                    for j in range(count):
                        position = block + j
                        if position > limits[r] or (window > 0 and position <= limits[r] - window):
                            score[r, j] = -np.inf
                for j in range(count, BLOCK):
                    score[r, j] = -np.inf  # past the span, or past the last tile
                top = _block_max(score[r])
                if top == -np.inf:  # nothing this query sees in the block
                    score[r, :count] = 0.0
                    continue
                if top > best[r]:
                    shrink = np.float32(2.0) ** (best[r] - top)
                    total[r] *= shrink
                    for d in range(width):
                        acc[r, d] *= shrink
                    best[r] = top
                total[r] += _exp2_block(score[r], best[r])
            block_values, block_scales = values[head, block:block + count], value_scales[head, block:block + count]
            r = 0
            while r < queries:
                n = _by_rows(queries, r)
                rows = slice(r, r + n)
                if n == 8:
                    _add_values(kind, 8, block_values, block_scales, score[rows], acc[rows])
                elif n == 4:
                    _add_values(kind, 4, block_values, block_scales, score[rows], acc[rows])
                elif n == 2:
                    _add_values(kind, 2, block_values, block_scales, score[rows], acc[rows])
                else:
                    _add_values(kind, 1, block_values, block_scales, score[rows], acc[rows])
                r += n
    for task in prange(kv_heads * queries):
        head, r = task // queries, task % queries
        best = -np.inf
        for part in range(spans):
            best = max(best, part_max[head, part, r])
        total = np.float32(0.0)
        result = out[head, r]
        result[:] = 0.0
        for part in range(spans):
            if part_sum[head, part, r] == 0.0:
                continue
            weight = np.float32(2.0) ** (part_max[head, part, r] - best)
            total += weight * part_sum[head, part, r]
            source = part_out[head, part, r]
            for d in range(width):
                result[d] += weight * source[d]
        for d in range(width):
            result[d] /= total


# one compiled entry per (path, stored form): global constants are compile-time literals
_VNNI512, _AVXVNNI, _PORTABLE = paths.VNNI512, paths.AVXVNNI, paths.PORTABLE
_F32_KIND, _BF16_KIND, _INT8_KIND = F32, BF16, INT8


@njit(nogil=True, cache=True)
def _f32_tiled(query, limits, window, keys, key_scales, values, value_scales, codes, factors, biases,
               part_max, part_sum, part_out, scores, out):
    _attend_tiled(_PORTABLE, _F32_KIND, query, limits, window, keys, key_scales, values, value_scales, codes,
                  factors, biases, part_max, part_sum, part_out, scores, out)


@njit(nogil=True, cache=True)
def _bf16_tiled(query, limits, window, keys, key_scales, values, value_scales, codes, factors, biases,
                part_max, part_sum, part_out, scores, out):
    _attend_tiled(_PORTABLE, _BF16_KIND, query, limits, window, keys, key_scales, values, value_scales, codes,
                  factors, biases, part_max, part_sum, part_out, scores, out)


@njit(nogil=True, cache=True)
def _int8_vnni512(query, limits, window, keys, key_scales, values, value_scales, codes, factors, biases,
                  part_max, part_sum, part_out, scores, out):
    _attend_tiled(_VNNI512, _INT8_KIND, query, limits, window, keys, key_scales, values, value_scales, codes,
                  factors, biases, part_max, part_sum, part_out, scores, out)


@njit(nogil=True, cache=True)
def _int8_avxvnni(query, limits, window, keys, key_scales, values, value_scales, codes, factors, biases,
                  part_max, part_sum, part_out, scores, out):
    _attend_tiled(_AVXVNNI, _INT8_KIND, query, limits, window, keys, key_scales, values, value_scales, codes,
                  factors, biases, part_max, part_sum, part_out, scores, out)


@njit(nogil=True, cache=True)
def _int8_portable(query, limits, window, keys, key_scales, values, value_scales, codes, factors, biases,
                   part_max, part_sum, part_out, scores, out):
    _attend_tiled(_PORTABLE, _INT8_KIND, query, limits, window, keys, key_scales, values, value_scales, codes,
                  factors, biases, part_max, part_sum, part_out, scores, out)


_INT8_ENTRIES = {paths.VNNI512: _int8_vnni512, paths.AVXVNNI: _int8_avxvnni, paths.AVX2: _int8_portable,
                 paths.PORTABLE: _int8_portable}


def attend_decode_tiled(path: int, kind: int, query, limits, window: int, keys, key_scales, values, value_scales,
                        codes, factors, biases, part_max, part_sum, part_out, scores, out) -> None:
    """`attend_decode` over keys in tiles (see above) of stored form `kind`; int8 scores by integer
    dot products on `path` (a `kernels.isa` path this CPU runs; AVX2 takes the portable IR).

    keys [Hkv, L / TILE, Dh * TILE] as stored (float32, uint16 bf16 bits, biased uint8), values
    [Hkv, L, Dh] as stored (int8 codes); int8: key_scales, value_scales float32 [Hkv, L, G] (any
    arrays otherwise). Scratch for the query: int8 codes int8 [Hkv, R, Dh], factors float32 /
    biases int32 [Hkv, R, G]; f32 and bf16: factors float32 [Hkv, R, Dh] (codes and biases unused).
    The rest as `attend_decode`, part_max in base 2."""
    if scores.shape[-1] != BLOCK or not scores.flags.c_contiguous:
        raise ValueError(f"scores must be C-contiguous float32 [tasks, R, {BLOCK}], got {scores.shape}")
    entry = _INT8_ENTRIES[path] if kind == INT8 else _f32_tiled if kind == F32 else _bf16_tiled
    entry(query, limits, window, keys, key_scales, values, value_scales, codes, factors, biases,
          part_max, part_sum, part_out, scores, out)

