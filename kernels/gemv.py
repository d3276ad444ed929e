"""Decode: the routed-expert MLP for a few tokens, straight from int4.

    y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = expert_ids[t, j]

Where the time goes: reading int4 weights. Per token that is K experts x 3 x hidden x
intermediate weights (Qwen3-Next: 31M weights, 17.7 MB at 4.5 bits), so the inner loop must
keep up with RAM: `_block_dot` is written as LLVM vector code (Numba's auto-vectorizer keeps
its accumulators in memory) and turns each 16-byte column of a 32-row block into 32 fp32 FMAs
with no horizontal reductions. Two parallel passes: all (token, expert, row block) products of
gate_up, then all (token, output block) rows of down summed over the token's experts. Every
thread writes its own slice; nothing is allocated per call.

Shapes: T tokens, K experts per token, D hidden, I expert intermediate, E experts.
    x        float32 [T, D]          expert_ids int64 [T, K]     weights float32 [T, K]
    gate_up  Int4Weights [E, 2I, D]  (rows 0..I the gate projection, I..2I the up projection)
    down     Int4Weights [E, D, I]
    out      float32 [T, D]          overwritten
    scratch  DecodeScratch(T, K, D, I), reused across calls
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from offload.kernels.int4 import BLOCK, GROUP, Int4Weights, dequantize

PREFETCH_BYTES = 1024  # how far ahead of the current group `_block_dot` prefetches packed weights


def _block_dot_codegen(bits: int, tokens: int = 1):
    """LLVM code of `_block_dot` (bits=4, packed uint8; bits=6, `kernels.int6`), `_block_dot8`
    (bits=8, packed int8) or, with tokens=2, `_block_dot_pair` (two tokens per decoded column).

    Arguments: packed, scales, then per token x, then per token x_group_sums, then per token
    alpha, then per token out. Eight FMA chains either way."""
    column_bytes = BLOCK * bits // 8

    def codegen(context, builder, sig, args):
        def data(index):
            return context.make_array(sig.args[index])(context, builder, args[index]).data

        packed_ptr, scales_ptr = data(0), data(1)
        x_ptrs = [data(2 + t) for t in range(tokens)]
        sums_ptrs = [data(2 + tokens + t) for t in range(tokens)]
        alphas = [args[2 + 2 * tokens + t] for t in range(tokens)]
        out_ptrs = [data(2 + 3 * tokens + t) for t in range(tokens)]
        in_features = builder.extract_value(context.make_array(sig.args[2])(context, builder, args[2]).shape, 0)

        i64, i32, i16, i8, f32 = (ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8),
                                  ir.FloatType())
        v8f, v8i32 = ir.VectorType(f32, 8), ir.VectorType(i32, 8)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3),
                                             "llvm.fma.v8f32")
        zero = ir.Constant(v8f, [0.0] * 8)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8")

        def const(value):
            return ir.Constant(i64, value)

        def splat(scalar):
            vec = builder.insert_element(ir.Constant(v8f, ir.Undefined), scalar, ir.Constant(i32, 0))
            return builder.shuffle_vector(vec, vec, ir.Constant(v8i32, [0] * 8))

        def load_vector(pointer, index, element, align):
            address = builder.bitcast(builder.gep(pointer, [index]), ir.VectorType(element, 8).as_pointer())
            return builder.load(address, align=align)

        def column_rows(col, octets):
            """Codes of column `col` as float vectors of 8 rows, for `octets` (0: rows 0-7, 1: 8-15,
            2: 16-23, 3: 24-31). int4 byte k holds rows k (low nibble) and 16 + k (high); int6
            adds two high bits from the quad's plane (`kernels.int6`)."""
            if bits == 6:
                return int6_rows(col, octets)
            first = builder.mul(col, const(column_bytes))
            if bits == 8:
                return {octet: builder.sitofp(builder.sext(load_vector(packed_ptr, builder.add(first, const(8 * octet)),
                                                                       i8, 1), v8i32), v8f)
                        for octet in octets}
            rows = {}
            for half in sorted({octet % 2 for octet in octets}):  # bytes 0-7: rows 0-7 | 16-23; 8-15: 8-15 | 24-31
                wide = builder.zext(load_vector(packed_ptr, builder.add(first, const(8 * half)), i8, 1), v8i32)
                rows[half] = builder.uitofp(builder.and_(wide, ir.Constant(v8i32, [15] * 8)), v8f)
                rows[2 + half] = builder.uitofp(builder.lshr(wide, ir.Constant(v8i32, [4] * 8)), v8f)
            return rows

        def int6_rows(col, octets):
            j = builder.and_(col, const(3))
            quad = builder.mul(builder.lshr(col, const(2)), const(4 * column_bytes))
            nibbles = builder.add(quad, builder.mul(j, const(16)))
            tops = builder.add(quad, builder.add(const(64), builder.mul(builder.and_(j, const(1)), const(16))))
            shift = builder.trunc(builder.mul(builder.lshr(j, const(1)), const(2)), i32)
            shifts = [builder.shuffle_vector(vector, vector, ir.Constant(v8i32, [0] * 8)) for vector in
                      (builder.insert_element(ir.Constant(v8i32, ir.Undefined), builder.add(shift, ir.Constant(i32, extra)),
                                              ir.Constant(i32, 0)) for extra in (0, 4))]
            three, fifteen = ir.Constant(v8i32, [3] * 8), ir.Constant(v8i32, [15] * 8)
            rows = {}
            for half in sorted({octet % 2 for octet in octets}):
                wide = builder.zext(load_vector(packed_ptr, builder.add(nibbles, const(8 * half)), i8, 1), v8i32)
                top = builder.zext(load_vector(packed_ptr, builder.add(tops, const(8 * half)), i8, 1), v8i32)
                for which, nibble in ((half, builder.and_(wide, fifteen)),
                                      (2 + half, builder.lshr(wide, ir.Constant(v8i32, [4] * 8)))):
                    high = builder.and_(builder.lshr(top, shifts[which // 2]), three)
                    code = builder.or_(nibble, builder.shl(high, ir.Constant(v8i32, [4] * 8)))
                    rows[which] = builder.uitofp(code, v8f)
            return rows

        def emit_pass(octets, groups):
            """for g in range(groups): totals[t][rows] += scale[g, rows] * (sum_c code[c, rows] x_t[c] - offset),
            then out_t[rows] += alpha_t * totals[t][rows], for the rows of `octets`."""
            function = builder.function
            entry = builder.block
            group_head, group_body = function.append_basic_block("group_head"), function.append_basic_block("group_body")
            column_body, group_tail = function.append_basic_block("column_body"), function.append_basic_block("group_tail")
            done = function.append_basic_block("done")
            builder.branch(group_head)
            slots = [(t, octet) for t in range(tokens) for octet in octets]

            builder.position_at_end(group_head)
            group = builder.phi(i64)
            totals = {slot: builder.phi(v8f) for slot in slots}
            group.add_incoming(const(0), entry)
            for total in totals.values():
                total.add_incoming(zero, entry)
            builder.cbranch(builder.icmp_unsigned("<", group, groups), group_body, done)

            builder.position_at_end(group_body)
            first_column = builder.mul(group, const(GROUP))
            # a group is 8 (int4) or 16 (int8) cache lines; ask for the lines PREFETCH_BYTES ahead now,
            # so the short streams of a block (8-64 KB) do not wait for the hardware prefetcher
            ahead = builder.add(builder.mul(first_column, const(column_bytes)), const(PREFETCH_BYTES))
            for line in range(GROUP * column_bytes // 64):
                address = builder.gep(packed_ptr, [builder.add(ahead, const(64 * line))])
                builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            builder.branch(column_body)

            # two columns per iteration (two partial sums per row), each decoded once for every token
            builder.position_at_end(column_body)
            column = builder.phi(i64)
            partials = {(u, slot): builder.phi(v8f) for u in range(2) for slot in slots}
            column.add_incoming(const(0), group_body)
            for partial in partials.values():
                partial.add_incoming(zero, group_body)
            updated = {}
            for u in range(2):
                col = builder.add(first_column, builder.add(column, const(u)))
                rows = column_rows(col, octets)
                for t in range(tokens):
                    x_col = splat(builder.load(builder.gep(x_ptrs[t], [col])))
                    for octet in octets:
                        key = (u, (t, octet))
                        updated[key] = builder.call(fma, [rows[octet], x_col, partials[key]])
            next_column = builder.add(column, const(2))
            column.add_incoming(next_column, column_body)
            for key, partial in partials.items():
                partial.add_incoming(updated[key], column_body)
            builder.cbranch(builder.icmp_unsigned("<", next_column, const(GROUP)), column_body, group_tail)

            builder.position_at_end(group_tail)
            scales = {}
            for octet in octets:
                scale_bits = load_vector(scales_ptr, builder.add(first_column, const(8 * octet)), i16, 2)
                scales[octet] = builder.bitcast(builder.shl(builder.zext(scale_bits, v8i32), ir.Constant(v8i32, [16] * 8)), v8f)
            corrections = {}
            if bits != 8:  # codes are q + 8 (int6: q + 32): subtract 8 (32) * sum(x over the group)
                for t in range(tokens):
                    group_sum = builder.load(builder.gep(sums_ptrs[t], [group]))
                    corrections[t] = splat(builder.fmul(group_sum, ir.Constant(f32, 8.0 if bits == 4 else 32.0)))
            for slot in slots:
                row_sum = builder.fadd(updated[(0, slot)], updated[(1, slot)])
                if bits != 8:
                    row_sum = builder.fsub(row_sum, corrections[slot[0]])
                totals[slot].add_incoming(builder.call(fma, [scales[slot[1]], row_sum, totals[slot]]), group_tail)
            group.add_incoming(builder.add(group, const(1)), group_tail)
            builder.branch(group_head)

            builder.position_at_end(done)
            for t, octet in slots:
                address = builder.bitcast(builder.gep(out_ptrs[t], [const(8 * octet)]), v8f.as_pointer())
                result = builder.call(fma, [splat(alphas[t]), totals[(t, octet)], builder.load(address, align=4)])
                builder.store(result, address, align=4)

        groups = builder.udiv(in_features, const(GROUP))
        # One token: one pass over the block, all 4 octets. Two tokens: a pass per byte half (2
        # octets each), so that 2 columns x 2 tokens x 2 octets is again 8 accumulators (16 would
        # spill) and every row sums its columns exactly as the one-token kernel does.
        for octets in ([(0, 1, 2, 3)] if tokens == 1 else [(0, 2), (1, 3)]):
            emit_pass(octets, groups)
        return context.get_dummy_value()

    return codegen
    return codegen


@intrinsic
def _block_dot(typingctx, packed, scales, x, x_group_sums, alpha, out):
    """out[0:32] += alpha * (W_block @ x) for one 32-row int4 block, or int6 (`kernels.int6`,
    whose blocks are 2-dimensional: packed uint8 [in // 4, 96]).

    packed uint8 [in * 16], scales uint16 [in] (one block's slices of Int4Weights),
    x float32 [in], x_group_sums float32 [in // 32] (sums of x over each group), out float32 [32].
    Codes are stored as q + 8 (int6: q + 32), so each group's sum is corrected by 8 (32) times
    sum(x over the group).
    """
    return types.void(packed, scales, x, x_group_sums, alpha, out), _block_dot_codegen(6 if packed.ndim == 2 else 4)


@intrinsic
def _block_dot_pair(typingctx, packed, scales, x0, x1, sums0, sums1, alpha0, alpha1, out0, out1):
    """`_block_dot` for two tokens at once: each column's codes are decoded once and used twice,
    which halves the decoding work per multiply-add (prefill, where an expert serves many tokens)."""
    signature = types.void(packed, scales, x0, x1, sums0, sums1, alpha0, alpha1, out0, out1)
    return signature, _block_dot_codegen(4, tokens=2)


@intrinsic
def _block_dot8(typingctx, packed, scales, x, x_group_sums, alpha, out):
    """`_block_dot` for one 32-row block of `kernels.int8` (packed int8 [in * 32]; x_group_sums
    is not read: int8 codes are signed)."""
    return types.void(packed, scales, x, x_group_sums, alpha, out), _block_dot_codegen(8)


@njit(cache=True)
def _group_sums(x, sums):
    """sums[t, g] = sum of x[t] over group g, summed in a fixed order (so results do not depend
    on the thread count, as a parallel array reduction would)."""
    for t in range(x.shape[0]):
        for g in range(x.shape[1] // GROUP):
            total = np.float32(0.0)
            for c in range(g * GROUP, (g + 1) * GROUP):
                total += x[t, c]
            sums[t, g] = total


@njit(cache=True, inline="always")
def _silu(v):
    return v / (np.float32(1.0) + np.exp(-v))


@njit(parallel=True, nogil=True, cache=True)
def _moe_decode(x, expert_ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out,
                x_sums, gate_up, hidden, hidden_sums):
    tokens, top_k = expert_ids.shape
    gate_blocks = gu_packed.shape[1] // 2  # I / 32
    out_blocks = dn_packed.shape[1]  # D / 32
    _group_sums(x, x_sums)

    # gate_up for every (token, expert, row block); h = silu(gate) * up
    for task in prange(tokens * top_k * gate_blocks):
        t = task // (top_k * gate_blocks)
        j = (task // gate_blocks) % top_k
        b = task % gate_blocks
        e = expert_ids[t, j]
        gate = gate_up[t, j, 0]
        up = gate_up[t, j, 1]
        gate[b * BLOCK:(b + 1) * BLOCK] = 0
        up[b * BLOCK:(b + 1) * BLOCK] = 0
        _block_dot(gu_packed[e, b], gu_scales[e, b], x[t], x_sums[t], np.float32(1.0),
                   gate[b * BLOCK:(b + 1) * BLOCK])
        _block_dot(gu_packed[e, gate_blocks + b], gu_scales[e, gate_blocks + b], x[t], x_sums[t],
                   np.float32(1.0), up[b * BLOCK:(b + 1) * BLOCK])
        total = np.float32(0.0)
        for r in range(b * BLOCK, (b + 1) * BLOCK):
            h = _silu(gate[r]) * up[r]
            hidden[t, j, r] = h
            total += h
        hidden_sums[t, j, b] = total  # a block of h rows is exactly one group of down's input

    # down for every (token, output block), summed over the token's experts
    for task in prange(tokens * out_blocks):
        t = task // out_blocks
        b = task % out_blocks
        rows = out[t, b * BLOCK:(b + 1) * BLOCK]
        rows[:] = 0
        for j in range(top_k):
            e = expert_ids[t, j]
            _block_dot(dn_packed[e, b], dn_scales[e, b], hidden[t, j], hidden_sums[t, j],
                       np.float32(weights[t, j]), rows)


class DecodeScratch:
    """Working buffers for `moe_decode` with up to `tokens` tokens; allocate once, reuse."""

    def __init__(self, tokens: int, top_k: int, hidden_size: int, intermediate_size: int):
        self.x_sums = np.zeros((tokens, hidden_size // GROUP), np.float32)
        self.gate_up = np.zeros((tokens, top_k, 2, intermediate_size), np.float32)
        self.hidden = np.zeros((tokens, top_k, intermediate_size), np.float32)
        self.hidden_sums = np.zeros((tokens, top_k, intermediate_size // GROUP), np.float32)


def _check(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights, out) -> None:
    experts, double_intermediate, hidden_size = gate_up.shape
    if down.shape != (experts, hidden_size, double_intermediate // 2):
        raise ValueError(f"down {down.shape} does not match gate_up {gate_up.shape}")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != hidden_size or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [T, {hidden_size}]")
    if out.shape != x.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {x.shape}")
    if expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
        raise ValueError("expert_ids and weights must both be [T, K]")
    if not _ids_within(expert_ids.reshape(-1), experts):
        raise ValueError(f"expert ids must be in [0, {experts})")


@njit(nogil=True, cache=True)
def _ids_within(ids, experts) -> bool:
    """Whether every id is in [0, experts): one pass, where NumPy's min and max are two calls."""
    for i in range(ids.shape[0]):
        if not 0 <= ids[i] < experts:
            return False
    return True


def moe_decode(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights, out,
               scratch: DecodeScratch) -> np.ndarray:
    """Routed-expert MLP of a few tokens (see module docstring); returns `out`."""
    _check(x, expert_ids, weights, gate_up, down, out)
    tokens, top_k = expert_ids.shape
    if scratch.hidden.shape[0] < tokens or scratch.hidden.shape[1] != top_k:
        raise ValueError(f"scratch is for {scratch.hidden.shape[0]} tokens x {scratch.hidden.shape[1]} "
                         f"experts, got {tokens} x {top_k}")
    _moe_decode(x, expert_ids.astype(np.int64, copy=False), weights.astype(np.float32, copy=False),
                gate_up.packed, gate_up.scales, down.packed, down.scales, out,
                scratch.x_sums, scratch.gate_up, scratch.hidden, scratch.hidden_sums)
    return out


def moe_reference(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights, out,
                  scratch=None) -> np.ndarray:
    """NumPy reference of `moe_decode` / `moe_prefill` (dequantises the experts it needs)."""
    intermediate = gate_up.shape[1] // 2
    out[:] = 0
    for expert in np.unique(expert_ids):
        tokens, slots = np.nonzero(expert_ids == expert)
        w_gate_up = dequantize(_one_expert(gate_up, expert))[0]
        w_down = dequantize(_one_expert(down, expert))[0]
        projected = x[tokens] @ w_gate_up.T
        gate, up = projected[:, :intermediate], projected[:, intermediate:]
        hidden = gate / (1 + np.exp(-gate)) * up
        np.add.at(out, tokens, (hidden @ w_down.T) * weights[tokens, slots, None])
    return out


def _one_expert(q: Int4Weights, expert: int) -> Int4Weights:
    return Int4Weights(q.packed[expert:expert + 1], q.scales[expert:expert + 1], (1, *q.shape[1:]))
