"""The small pieces of a decode step between the matrix kernels, fused: norms (with the residual
add before them), the MoE router, an attention layer's inputs (per-head norms, rotary, the output
gate) and its rotary tables, SwiGLU's silu(gate) * up and the sum of a MoE block's outputs into the residual stream.

In torch each RMSNorm is ~8 operations and a MoE block's routing (router logits, softmax, top-k,
renormalisation, the shared expert's sigmoid gate) another ~8, each a few microseconds of
dispatch on a vector of a few thousand floats. Here each is one call: a norm is one pass over
the row; routing is one parallel pass over the router's rows (the only part that reads
memory: [E, D], 1-4 MB a layer in fp32, half that as bf16) and a short serial tail per token.

Shapes: T tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from offload.kernels.int4 import _bf16_value


@njit(nogil=True, cache=True, inline="always", fastmath={"reassoc", "contract"})
def _normed(row, scale, eps, out):
    """out = row / sqrt(mean(row^2) + eps) * scale, one float32 row."""
    width = row.shape[0]
    square = np.float32(0.0)
    for d in range(width):
        square += row[d] * row[d]
    inverse = np.float32(1.0) / np.sqrt(square / np.float32(width) + eps)
    for d in range(width):
        out[d] = row[d] * inverse * scale[d]


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def rms_norm(x, scale, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * scale, float32 [T, D] (scale [D]: the norm's
    effective weight, `1 + w` for a zero-centred norm)."""
    for t in range(x.shape[0]):
        _normed(x[t], scale, eps, out[t])


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def add_rms_norm(x, delta, scale, eps, out):
    """x += delta (the residual stream takes a mixer's output), then out = rms_norm(x): the
    same values as the two apart, in one pass over the rows. float32 [T, D]."""
    for t in range(x.shape[0]):
        row = x[t]
        for d in range(row.shape[0]):
            row[d] += delta[t, d]
        _normed(row, scale, eps, out[t])


@njit(nogil=True, cache=True)
def silu_mul(gate_up, hidden):
    """hidden[t] = silu(gate) * up for gate_up[t] = [gate (I), up (I)], I = hidden.shape[1]:
    silu(g) = g / (1 + e^-g), -0 where e^-g overflows (g < -88), as torch's. float32."""
    width = hidden.shape[1]
    for t in range(hidden.shape[0]):
        for i in range(width):
            g = gate_up[t, i]
            hidden[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, width + i]


@njit(nogil=True, cache=True)
def add_moe_output(x, routed, shared, gate):
    """x[t] += routed[t] + gate[t] * shared[t]: a MoE block's output into the residual stream
    (shared [0, D] without a shared expert). float32 [T, D], gate [T]."""
    with_shared = shared.shape[0] > 0
    for t in range(x.shape[0]):
        for d in range(x.shape[1]):
            total = routed[t, d]
            if with_shared:
                total += gate[t] * shared[t, d]
            x[t, d] += total


def widened(value):
    """A weight as float32: bf16 bit patterns (uint16) widened exactly, float32 as it is."""


@overload(widened, inline="always")
def _widened(value):
    if value == types.uint16:
        return lambda value: _bf16_value(value)
    if value == types.float32:
        return lambda value: value
    raise TypingError(f"widened takes float32 or bf16 bits (uint16), not {value}")


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "contract"})
def router_logits(h, router, shared_gate, logits):
    """logits[t, :E] = router @ h[t]; with a shared-expert gate [1, D], logits[t, E] = its logit.
    h float32 [T, D], router [E, D] float32 or bf16 bits (uint16: a bf16 checkpoint's router as
    stored, half the bytes a token reads, the same values), shared_gate float32 [G, D] (G = 0 or
    1), logits float32 [T, E + G]. Parallel over the router's rows: each is read once for all tokens."""
    tokens, width = h.shape
    experts, gates = router.shape[0], shared_gate.shape[0]
    for e in prange(experts + gates):
        for t in range(tokens):
            total = np.float32(0.0)
            if e < experts:
                for d in range(width):
                    total += widened(router[e, d]) * h[t, d]
            else:
                for d in range(width):
                    total += shared_gate[e - experts, d] * h[t, d]
            logits[t, e] = total


@njit(nogil=True, cache=True, inline="always")
def _taken(ids, count, e):
    for k in range(count):
        if ids[k] == e:
            return True
    return False


@njit(nogil=True, cache=True, fastmath={"contract"})
def top_k_softmax(logits, experts, normalise, weights, expert_ids, shared_gate):
    """From `router_logits`' output: per token the K largest of softmax(logits[t, :experts])
    (ties to the lower index, as torch.topk), renormalised to sum to 1 if `normalise`, into
    weights float32 [T, K] and expert_ids int64 [T, K]; with a gate logit at logits[t, experts],
    shared_gate[t] = sigmoid of it."""
    tokens, top_k = weights.shape
    for t in range(tokens):
        row = logits[t]
        peak = row[0]
        for e in range(1, experts):
            peak = max(peak, row[e])
        total = np.float32(0.0)
        for e in range(experts):
            total += np.exp(row[e] - peak)
        picked_sum = np.float32(0.0)
        for k in range(top_k):  # K passes of an argmax over E: K * E is a few thousand compares
            best = -1  # the first expert not yet taken, then any larger (NaN logits: still a valid id)
            for e in range(experts):
                if not _taken(expert_ids[t], k, e) and (best < 0 or row[e] > row[best]):
                    best = e
            expert_ids[t, k] = best
            weights[t, k] = np.exp(row[best] - peak) / total
            picked_sum += weights[t, k]
        if normalise:
            for k in range(top_k):
                weights[t, k] /= picked_sum
        if logits.shape[1] > experts:
            shared_gate[t] = np.float32(1.0) / (np.float32(1.0) + np.exp(-row[experts]))


@njit(nogil=True, cache=True)
def rotary_tables(inv_freq, scale, start, cos, sin):
    """cos, sin float32 [T, 2 F] of positions start..start+T for inverse frequencies float32 [F]:
    angle = position * inv_freq[i] in float32 at channels i and i + F, times `scale` (YaRN's
    factor, 1 without), as `models.attention.RotaryEmbedding` makes them."""
    half = inv_freq.shape[0]
    factor = np.float32(scale)
    for t in range(cos.shape[0]):
        position = np.float32(start + t)
        for i in range(half):
            angle = position * inv_freq[i]
            cos[t, i] = cos[t, i + half] = np.cos(angle) * factor
            sin[t, i] = sin[t, i + half] = np.sin(angle) * factor


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def attention_inputs(rows, gated, q_scale, k_scale, eps, cos, sin, query, keys, values, gate):
    """An attention layer's projections to what the cache and the kernel take, for T tokens.

    rows    float32 [T, Q + 2 Hkv Dh]  q_proj's rows, then k_proj's, then v_proj's; q_proj's are per
                                       head [query (Dh), gate (Dh)] when `gated`, else [query]
    q_scale, k_scale float32 [Dh]      the per-head norms' effective weights; eps their epsilon
    cos, sin float32 [T, R]            rotary tables: channels [0, R) turn in half-split pairs
    query   float32 [H, T, Dh]         out: normed, rotated
    keys    float32 [Hkv, T, Dh]       out: normed, rotated
    values  float32 [Hkv, T, Dh]       out
    gate    float32 [T, H Dh]          out: sigmoid of the gate rows (when `gated`)
    """
    heads, tokens, width = query.shape
    kv_heads = keys.shape[0]
    half = cos.shape[1] // 2
    q_stride = 2 * width if gated else width
    key_base = heads * q_stride
    value_base = key_base + kv_heads * width
    for t in range(tokens):
        for h in range(heads + kv_heads):
            if h < heads:
                base, scale, target = h * q_stride, q_scale, query[h, t]
            else:
                base, scale, target = key_base + (h - heads) * width, k_scale, keys[h - heads, t]
            _normed(rows[t, base:base + width], scale, eps, target)
            for d in range(half):
                first, second = target[d], target[d + half]
                target[d] = first * cos[t, d] - second * sin[t, d]
                target[d + half] = second * cos[t, d + half] + first * sin[t, d + half]
            if gated and h < heads:
                for d in range(width):
                    gate[t, h * width + d] = np.float32(1.0) / (np.float32(1.0) + np.exp(-rows[t, base + width + d]))
        for h in range(kv_heads):
            for d in range(width):
                values[h, t, d] = rows[t, value_base + h * width + d]
