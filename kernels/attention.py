"""Decode attention on the CPU over a KV cache in its stored format: fp32, bf16 or int8.

At depth a decode step's attention reads every cached key and value once per layer, so its time
is the cache's bytes over the RAM bandwidth, if nothing else costs more: the stored rows are
widened to fp32 one at a time (in L1), never copied whole. Work is split like flash-decoding: tasks
are (KV head, span of positions); each keeps a running max, sum and weighted value sum for the
queries of its head group, and a second pass merges the spans.

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
from numba import njit, prange

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
