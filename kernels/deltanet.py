"""One decode step of a Gated DeltaNet mixer on the CPU, fused: conv, gates, delta rule, norm.

Between its two projections a DeltaNet layer does ~60 small tensor operations per token in
torch (conv shift, silu, L2 norms, sigmoid/softplus gates, four passes over the recurrent state,
gated RMSNorm). On the CPU each costs a few microseconds of dispatch and the state passes read
2 MB per layer four times; here they are one parallel region and the state is read and written
once: each value head's [Dk, Dv] state (64 KB) stays in L2 between its two passes.

Shapes: Hk / Hv key / value heads (r = Hv / Hk), Dk / Dv head dims, C = 2 Hk Dk + Hv Dv conv
channels, K conv kernel.
    qkvz        float32 [Hk, 2 Dk + 2 r Dv]  per key head: q (Dk), k (Dk), v (r Dv), z (r Dv)
    ba          float32 [Hk, 2 r]            per key head: b (r), a (r)
    conv_state  float32 [C, K-1]   last K-1 conv inputs, channels ordered q (all heads), k, v; updated
    conv_weight float32 [C, K]
    A_log, dt_bias, norm_weight  float32 [Hv], [Hv], [Dv]
    state       float32 [Hv, Dk, Dv]  updated in place
    mixed       float32 [C]           scratch
    out         float32 [Hv, Dv]      the normed, gated output (input of out_proj)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _silu(v):
    return v / (np.float32(1.0) + np.exp(-v))


@njit(cache=True, inline="always")
def _softplus(v):  # as torch: linear above 20
    return v if v > 20.0 else math.log1p(math.exp(v))


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract"})
def deltanet_step(qkvz, ba, conv_state, conv_weight, A_log, dt_bias, norm_weight, eps, state, mixed, out):
    key_heads, value_heads = qkvz.shape[0], state.shape[0]
    key_dim, value_dim = state.shape[1], state.shape[2]
    per_key_head = value_heads // key_heads
    taps = conv_weight.shape[1]
    value_width = per_key_head * value_dim

    # causal conv + silu, channel by channel, shifting the new input into the conv state
    for head in prange(key_heads):
        row = qkvz[head]
        for part in range(3):  # q, k, v of this key head
            width = value_width if part == 2 else key_dim
            source = part * key_dim
            channel = part * key_heads * key_dim + head * width
            for d in range(width):
                c = channel + d
                x = row[source + d]
                total = x * conv_weight[c, taps - 1]
                for k in range(taps - 1):
                    total += conv_state[c, k] * conv_weight[c, k]
                for k in range(taps - 2):
                    conv_state[c, k] = conv_state[c, k + 1]
                if taps > 1:
                    conv_state[c, taps - 2] = x
                mixed[c] = _silu(total)

    # per value head: gates, the delta rule (state read and written once), gated RMSNorm
    query_scale = np.float32(1.0 / math.sqrt(key_dim))
    for h in prange(value_heads):
        head = h // per_key_head
        sub = h % per_key_head
        q = mixed[head * key_dim:(head + 1) * key_dim]
        k = mixed[(key_heads + head) * key_dim:(key_heads + head + 1) * key_dim]
        v = mixed[2 * key_heads * key_dim + h * value_dim:2 * key_heads * key_dim + (h + 1) * value_dim]
        q_norm = np.float32(0.0)
        k_norm = np.float32(0.0)
        for d in range(key_dim):
            q_norm += q[d] * q[d]
            k_norm += k[d] * k[d]
        q_norm = np.float32(1.0) / np.sqrt(q_norm + np.float32(1e-6)) * query_scale
        k_norm = np.float32(1.0) / np.sqrt(k_norm + np.float32(1e-6))
        beta = np.float32(1.0) / (np.float32(1.0) + np.exp(-ba[head, sub]))
        decay = np.float32(math.exp(-math.exp(A_log[h]) * _softplus(ba[head, per_key_head + sub] + dt_bias[h])))

        s = state[h]
        # delta and o are kernel-local so LLVM knows they alias nothing and vectorises over j
        delta = np.zeros(value_dim, np.float32)  # S^T k first, then the correction
        for i in range(key_dim):
            ki = k[i] * k_norm * decay
            for j in range(value_dim):
                delta[j] += s[i, j] * ki
        for j in range(value_dim):
            delta[j] = (v[j] - delta[j]) * beta
        o = np.zeros(value_dim, np.float32)
        for i in range(key_dim):
            ki = k[i] * k_norm
            qi = q[i] * q_norm
            for j in range(value_dim):
                updated = s[i, j] * decay + ki * delta[j]
                s[i, j] = updated
                o[j] += updated * qi

        square = np.float32(0.0)
        for j in range(value_dim):
            square += o[j] * o[j]
        inverse_rms = np.float32(1.0) / np.sqrt(square / value_dim + eps)
        z = qkvz[head, 2 * key_dim + value_width + sub * value_dim:]
        for j in range(value_dim):
            out[h, j] = norm_weight[j] * (o[j] * inverse_rms) * _silu(z[j])
    return out


def deltanet_step_reference(qkvz, ba, conv_state, conv_weight, A_log, dt_bias, norm_weight, eps, state,
                            mixed, out):
    """`deltanet_step` in plain NumPy (same arguments, same updates)."""
    key_heads, value_heads, key_dim, value_dim = qkvz.shape[0], *state.shape
    per_key_head = value_heads // key_heads
    q, k, v, z = np.split(qkvz, np.cumsum([key_dim, key_dim, per_key_head * value_dim]), axis=1)
    inputs = np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)])  # [C]
    window = np.concatenate([conv_state, inputs[:, None]], axis=1)  # [C, K]
    mixed[:] = (window * conv_weight).sum(axis=1)
    mixed[:] = mixed / (1 + np.exp(-mixed))
    conv_state[:] = window[:, 1:]

    def l2_normed(x):
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    split = key_heads * key_dim
    query = np.repeat(l2_normed(mixed[:split].reshape(key_heads, key_dim)), per_key_head, 0) / np.sqrt(key_dim)
    key = np.repeat(l2_normed(mixed[split:2 * split].reshape(key_heads, key_dim)), per_key_head, 0)
    value = mixed[2 * split:].reshape(value_heads, value_dim)
    b, a = ba[:, :per_key_head].reshape(-1), ba[:, per_key_head:].reshape(-1)
    beta = 1 / (1 + np.exp(-b))
    raw = a + dt_bias
    decay = np.exp(-np.exp(A_log) * np.where(raw > 20, raw, np.log1p(np.exp(np.minimum(raw, 20)))))
    state *= decay[:, None, None]
    corrections = (value - np.einsum("hkv,hk->hv", state, key)) * beta[:, None]
    state += key[:, :, None] * corrections[:, None, :]
    o = np.einsum("hkv,hk->hv", state, query)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + eps)
    gate = z.reshape(value_heads, value_dim)
    out[:] = norm_weight * o * gate / (1 + np.exp(-gate))
    return out
