"""Prefill: the routed-expert MLP for many tokens, grouped by expert.

Tokens are sorted by expert. Work is split into (expert, 32-row block) tasks: a task reads its
block of int4 weights from RAM once (16 KB-32 KB, then hot in L1/L2) and applies it to every
token routed to that expert with the decode kernel's inner loop, two tokens per decoded column
(`_block_dot_pair`). So each expert's weights
cross the memory bus once per call however many tokens it serves, all in one Numba parallel
region (no BLAS thread pool competing with Numba's).

Where the time goes: with 512 tokens and top-10 of 512 experts an expert serves ~10 tokens, and
the cost is the fp32 FMAs (T x K x 3 x D x I of them), not the weight reads.

Shapes as in `kernels.gemv`: x float32 [T, D], expert_ids int [T, K], weights float32 [T, K],
gate_up Int4Weights [E, 2I, D], down Int4Weights [E, D, I], out float32 [T, D] (overwritten).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from offload.kernels.gemv import _block_dot, _block_dot_pair, _check, _group_sums, _silu
from offload.kernels.int4 import BLOCK, GROUP, Int4Weights


@njit(cache=True, inline="always")
def _swiglu_rows(gate_up, hidden, hidden_sums, position, b):
    """hidden[position, block b] = silu(gate) * up, and the block's sum (one group of down's input)."""
    total = np.float32(0.0)
    for r in range(BLOCK):
        h = _silu(gate_up[position, 0, b * BLOCK + r]) * gate_up[position, 1, b * BLOCK + r]
        hidden[position, b * BLOCK + r] = h
        total += h
    hidden_sums[position, b] = total


@njit(parallel=True, nogil=True, cache=True)
def _moe_prefill(x, expert_ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out,
                 x_sums, order, offsets, active, gate_up, hidden, hidden_sums):
    tokens, top_k = expert_ids.shape
    gate_blocks = gu_packed.shape[1] // 2
    out_blocks = dn_packed.shape[1]
    _group_sums(x, x_sums)
    one = np.float32(1.0)

    # gate_up: task = (active expert, row block), over all of that expert's tokens, two at a time.
    # hidden rows are indexed by sorted slot: slot s of expert e is order[offsets[e] + i].
    for task in prange(active.shape[0] * gate_blocks):
        e = active[task // gate_blocks]
        b = task % gate_blocks
        rows = slice(b * BLOCK, (b + 1) * BLOCK)
        first, end = offsets[e], offsets[e + 1]
        for position in range(first, end):
            gate_up[position, :, rows] = 0
        for half in (0, 1):  # gate rows, then up rows
            packed, scales = gu_packed[e, half * gate_blocks + b], gu_scales[e, half * gate_blocks + b]
            for position in range(first, end - 1, 2):
                t0, t1 = order[position] // top_k, order[position + 1] // top_k
                _block_dot_pair(packed, scales, x[t0], x[t1], x_sums[t0], x_sums[t1], one, one,
                                gate_up[position, half, rows], gate_up[position + 1, half, rows])
            if (end - first) % 2:
                t = order[end - 1] // top_k
                _block_dot(packed, scales, x[t], x_sums[t], one, gate_up[end - 1, half, rows])
        for position in range(first, end):
            _swiglu_rows(gate_up, hidden, hidden_sums, position, b)

    # down: task = output row block, over every (expert, token) pair; a token's rows are only
    # written by the task that owns the block, so experts accumulate without races.
    for b in prange(out_blocks):
        rows = slice(b * BLOCK, (b + 1) * BLOCK)
        for t in range(tokens):
            out[t, rows] = 0
        for i in range(active.shape[0]):
            e = active[i]
            first, end = offsets[e], offsets[e + 1]
            for position in range(first, end - 1, 2):
                s0, s1 = order[position], order[position + 1]
                _block_dot_pair(dn_packed[e, b], dn_scales[e, b], hidden[position], hidden[position + 1],
                                hidden_sums[position], hidden_sums[position + 1],
                                np.float32(weights[s0 // top_k, s0 % top_k]), np.float32(weights[s1 // top_k, s1 % top_k]),
                                out[s0 // top_k, rows], out[s1 // top_k, rows])
            if (end - first) % 2:
                s = order[end - 1]
                _block_dot(dn_packed[e, b], dn_scales[e, b], hidden[end - 1], hidden_sums[end - 1],
                           np.float32(weights[s // top_k, s % top_k]), out[s // top_k, rows])


class PrefillScratch:
    """Working buffers for `moe_prefill` with up to `tokens` tokens; allocate once, reuse."""

    def __init__(self, tokens: int, top_k: int, hidden_size: int, intermediate_size: int):
        slots = tokens * top_k
        self.x_sums = np.zeros((tokens, hidden_size // GROUP), np.float32)
        self.gate_up = np.zeros((slots, 2, intermediate_size), np.float32)
        self.hidden = np.zeros((slots, intermediate_size), np.float32)
        self.hidden_sums = np.zeros((slots, intermediate_size // GROUP), np.float32)


def moe_prefill(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights, out,
                scratch: PrefillScratch) -> np.ndarray:
    """Routed-expert MLP of many tokens (see module docstring); returns `out`."""
    _check(x, expert_ids, weights, gate_up, down, out)
    tokens, top_k = expert_ids.shape
    if scratch.hidden.shape[0] < tokens * top_k:
        raise ValueError(f"scratch holds {scratch.hidden.shape[0]} token-expert slots, "
                         f"need {tokens * top_k}")
    order, offsets, active = group_by_expert(expert_ids, gate_up.shape[0])
    _moe_prefill(x, expert_ids.astype(np.int64, copy=False), weights.astype(np.float32, copy=False),
                 gate_up.packed, gate_up.scales, down.packed, down.scales, out,
                 scratch.x_sums[:tokens], order, offsets, active,
                 scratch.gate_up, scratch.hidden, scratch.hidden_sums)
    return out


def group_by_expert(expert_ids: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (token, slot) pairs of expert_ids [T, K] sorted by expert: (order int64 [T K], flat
    slot indices, stable; offsets int64 [E + 1], expert e's slots are order[offsets[e]:offsets[e+1]];
    active int64, the experts with at least one slot)."""
    flat = expert_ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=experts)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets, np.flatnonzero(counts)
