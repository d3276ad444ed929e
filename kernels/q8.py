"""Fast kernels: activations quantised to int8, int4 / int8 weights times them by integer dot products.

The exact kernels (`gemv`, `gemm`, `linear`) turn every weight into an fp32 FMA. Here each
activation vector is quantised once to int8 and the weights' codes are multiplied by it with the CPU's
integer dot-product instructions (`kernels.isa`: AVX512-VNNI, AVX-VNNI, AVX2 or portable), four
products per 32-bit lane: 4x the multiply-adds per instruction, as llama.cpp does.

Activation format (`quantize_activations`), per token, D a multiple of 32:
    q       int8    [D]        round(x / scale), per group of 32 values
    scales  float32 [D // 32]  max|x| / 127 over the group (0 for an all-zero group)
    sums    int32   [D // 32]  sum of q over the group (cancels the int4 codes' offset of 8)

One 32-row int4 block times one token (`_q8_block_dot`), group g by group: the 64 bytes of each
4-column quad (column c: 16 bytes, low nibbles rows 0-15, high nibbles rows 16-31; see
`kernels.int4`) are split into nibbles and transposed so each 32-bit lane holds one row's four
codes, then dotted with the four activations broadcast to every lane. 16 dot instructions per
group on zmm; the group's integer sums become floats once:
    out[r] += alpha * sum_g (dot_g[r] - 8 sums[g]) * w_scale[r, g] * scales[g]
Integer sums are exact, and the float part is the same code on every path, so all paths give
the same bits. On AVX2 an int4 / int6 block skips the transpose (`_ColumnDots`: columns j and
j + 2 interleaved, so that each 16-bit sum is one row's two products), for one or two tokens at
a time, in a loop over pairs of quads (Zen 3, a matrix streamed from RAM, against the transposed
form: int4 1.3x with one token, 1.8x with two; int6 1.1x, 1.5x).

Decode (`moe_decode_fast`) is `gemv.moe_decode` with these blocks: gate_up per (token, expert,
row block), whose 32 rows of silu(gate) * up are one group of down's input and are quantised
right there; then down per (token, output block) over the token's experts. Prefill
(`moe_prefill_fast`) is `gemm.moe_prefill` likewise, tokens grouped by expert, a block applied
to four tokens at a time (`_q8_block_dot_quad`, then a pair and a single for the rest). A dense
matrix (`linear_fast`: int4, int6 or `kernels.int8`, whose signed codes enter as |w| times
x sign(w)) is one always-active expert: 32-row blocks over tiles of TOKEN_TILE tokens, the same
code from one token to a whole prompt chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from offload.kernels import isa as paths
from offload.kernels.gemm import group_by_expert
from offload.kernels.gemv import _check, _silu
from offload.kernels.int4 import BLOCK, GROUP, Int4Weights
from offload.kernels.threads import current_threads

QUADS = GROUP // 4  # 4-column quads per group
PREFETCH_AHEAD = 4096  # bytes ahead of the current group that a block dot asks for (a 1024-byte lead left
# the int6 output head, 240 MB read once a token, at 80% of a parallel read's rate; 4096 reached 93%;
# routed experts' decode was the same at both, within noise)
TOKEN_TILE = 64  # tokens per pass of a dense matrix (`linear_fast`): their int8 activations stay in L2
# lane r*4 + j of a transposed quad <- byte j*16 + r of the packed quad (row r, column j)
_TRANSPOSE = [j * 16 + r for r in range(16) for j in range(4)]
# int8 weights: a quad is 128 bytes (column j: 32 bytes, row r at byte 32j + r); rows 0-15, 16-31
_TRANSPOSE8 = [[j * 32 + half * 16 + r for r in range(16) for j in range(4)] for half in (0, 1)]


# --- activations ----------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _quantize_group(values, q, scales, sums, g):
    """values float32 [32] -> q int8 [32], scales[g], sums[g]."""
    amax = np.float32(0.0)
    for v in values:
        amax = max(amax, abs(v))
    scale = amax / np.float32(127.0)
    total = 0
    for i in range(GROUP):
        code = 0 if scale == 0 else int(min(max(np.rint(values[i] / scale), -127.0), 127.0))
        q[i] = code
        total += code
    scales[g] = scale
    sums[g] = total


@njit(cache=True, nogil=True)
def quantize_activations(x, q, scales, sums):
    """x float32 [T, D] -> q int8 [T, D], scales float32 [T, D/32], sums int32 [T, D/32]."""
    for t in range(x.shape[0]):
        for g in range(x.shape[1] // GROUP):
            _quantize_group(x[t, g * GROUP:(g + 1) * GROUP], q[t, g * GROUP:(g + 1) * GROUP], scales[t], sums[t], g)


@njit(parallel=True, nogil=True, cache=True)
def _quantize_tokens(x, q, scales, sums):
    """`quantize_activations`, a token per task when there are enough tokens to share."""
    if x.shape[0] < 16:
        quantize_activations(x, q, scales, sums)
        return
    for t in prange(x.shape[0]):
        quantize_activations(x[t:t + 1], q[t:t + 1], scales[t:t + 1], sums[t:t + 1])


def quantize_activations_reference(x: np.ndarray):
    """NumPy `quantize_activations`: (q, scales, sums)."""
    groups = x.reshape(x.shape[0], -1, GROUP)
    scales = np.abs(groups).max(axis=2) / np.float32(127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scales[..., None] == 0, 0, np.clip(np.rint(groups / scales[..., None]), -127, 127))
    q = q.astype(np.int8)
    return q.reshape(x.shape), scales.astype(np.float32), q.astype(np.int32).sum(axis=2).astype(np.int32)


# --- the block kernel ---------------------------------------------------------------------------------

def dot4(builder, path: int, acc, weights, activations):
    """acc <16 x i32> + per lane sum of 4 products of weights (<64 x i8>, unsigned) and
    activations (<64 x i8>, signed)."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    v8i32, v16i32 = ir.VectorType(i32, 8), ir.VectorType(i32, 16)
    module = builder.module
    if path == paths.VNNI512:
        dot = cgutils.get_or_insert_function(module, ir.FunctionType(v16i32, [v16i32] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(dot, [acc, builder.bitcast(weights, v16i32), builder.bitcast(activations, v16i32)])
    if path == paths.PORTABLE:
        v64i32, v32i32 = ir.VectorType(i32, 64), ir.VectorType(i32, 32)
        products = builder.mul(builder.zext(weights, v64i32), builder.sext(activations, v64i32))
        pairs = builder.add(builder.shuffle_vector(products, products, ir.Constant(v32i32, list(range(0, 64, 2)))),
                            builder.shuffle_vector(products, products, ir.Constant(v32i32, list(range(1, 64, 2)))))
        quads = builder.add(builder.shuffle_vector(pairs, pairs, ir.Constant(v16i32, list(range(0, 32, 2)))),
                            builder.shuffle_vector(pairs, pairs, ir.Constant(v16i32, list(range(1, 32, 2)))))
        return builder.add(acc, quads)

    def half(vector, which, lanes):
        return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(i32, lanes),
                                                                  list(range(which * lanes, (which + 1) * lanes))))

    v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
    results = []
    for which in (0, 1):
        acc_half = half(acc, which, 8)
        w_half, x_half = half(weights, which, 32), half(activations, which, 32)
        if path == paths.AVXVNNI:
            dot = cgutils.get_or_insert_function(module, ir.FunctionType(v8i32, [v8i32] * 3),
                                                 "llvm.x86.avx512.vpdpbusd.256")
            results.append(builder.call(dot, [acc_half, builder.bitcast(w_half, v8i32), builder.bitcast(x_half, v8i32)]))
        else:  # AVX2: u8 x s8 pairs to i16 (at most 2 x 15 x 127: no saturation), then pairs to i32
            pairs = cgutils.get_or_insert_function(module, ir.FunctionType(v16i16, [v32i8, v32i8]),
                                                   "llvm.x86.avx2.pmadd.ub.sw")
            widen = cgutils.get_or_insert_function(module, ir.FunctionType(v8i32, [v16i16, v16i16]),
                                                   "llvm.x86.avx2.pmadd.wd")
            summed = builder.call(widen, [builder.call(pairs, [w_half, x_half]), ir.Constant(v16i16, [1] * 16)])
            results.append(builder.add(acc_half, summed))
    return builder.shuffle_vector(results[0], results[1], ir.Constant(v16i32, list(range(16))))


class _ColumnDots:
    """AVX2's dot of int4 / int6 codes with one or two tokens, without transposing the codes
    (`_block_dot_codegen`).

    A quad's codes come column by column (byte j*16 + r: column j, row r), and `vpmaddubsw` adds
    the products of neighbouring bytes: a row's four products would first need a transpose (on
    256-bit registers, eight shuffles a quad). Interleaving the bytes of columns 0-1 with those of
    columns 2-3 instead (`vpunpcklbw` / `vpunpckhbw`, within 128-bit lanes) makes neighbours one
    row's codes in columns j and j + 2, lane j holding column pair (j, j + 2): against the
    activations (x_j, x_j+2) repeated over lane j, one instruction sums two products a row. Rows
    0-7, 8-15, 16-23 and 24-31 each accumulate in one register as 16-bit sums, lane 0's column
    pair beside lane 1's; the lanes are widened and added once a group (int4) or after each pair
    of quads (int6), before a sum can overflow (a pair of products is at most 2 x 15 x 127, int6
    2 x 63 x 127). The same integer dots as the transposed form, so the same bits. One token's
    sums and values stay in the 16 registers; int6 with two tokens spills a few."""

    def __init__(self, builder, bits: int, tokens: int):
        i8, i32 = ir.IntType(8), ir.IntType(32)
        self.builder = builder
        self.v32i8, self.v16i16, self.v8i32 = ir.VectorType(i8, 32), ir.VectorType(ir.IntType(16), 16), \
            ir.VectorType(i32, 8)
        module = builder.module
        self.pshufb = cgutils.get_or_insert_function(module, ir.FunctionType(self.v32i8, [self.v32i8] * 2),
                                                     "llvm.x86.avx2.pshuf.b")
        self.maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(self.v16i16, [self.v32i8] * 2),
                                                      "llvm.x86.avx2.pmadd.ub.sw")
        # the broadcast quad of activations -> (x0, x2) over lane 0, (x1, x3) over lane 1
        self.control = ir.Constant(self.v32i8, [0, 2] * 8 + [1, 3] * 8)
        # a plane (<64 x i8>: columns 0, 1 | 2, 3) -> rows 0-7, then rows 8-15, as pairs (column j,
        # column j + 2) in lane j: the two 256-bit halves' bytes interleaved within 128-bit lanes
        self.interleave = [ir.Constant(ir.VectorType(i32, 32),
                                       [index for lane in (0, 1) for i in range(8)
                                        for index in (16 * lane + 8 * half + i, 32 + 16 * lane + 8 * half + i)])
                           for half in (0, 1)]
        # widened: int4 once a group (QUADS = 8: 16 products of at most 15 x 127 a sum), int6 after
        # each pair of quads (4 of at most 63 x 127)
        assert QUADS <= 8
        self.flush_each_pair = bits == 6
        self.tokens = tokens
        self.zero16 = ir.Constant(self.v16i16, [0] * 16)
        self.zero32 = ir.Constant(self.v8i32, [0] * 8)
        self.narrow = [[self.zero16] * 4 for _ in range(tokens)]  # [token][row octet] 16-bit sums
        self.wide = [[self.zero32] * 4 for _ in range(tokens)]  # [token][row octet] 32-bit sums

    def values(self) -> list:
        """The running sums, for the phis of a loop over quads."""
        return [v for t in range(self.tokens) for v in self.narrow[t] + self.wide[t]]

    def set_values(self, values: list) -> None:
        self.narrow = [list(values[8 * t:8 * t + 4]) for t in range(self.tokens)]
        self.wide = [list(values[8 * t + 4:8 * t + 8]) for t in range(self.tokens)]

    def _pick(self, a, b, indices):
        return self.builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(indices)), indices))

    def add_quad(self, planes, quad_xs) -> None:
        """planes: the quad's two nibble planes (<64 x i8>, rows 0-15 and 16-31, column-major);
        quad_xs: per token, the quad's four int8 activations as one i32."""
        b = self.builder
        pairs = [b.shuffle_vector(codes, codes, self.interleave[half]) for codes in planes for half in (0, 1)]
        for t, quad_x in enumerate(quad_xs):
            broadcast = b.shuffle_vector(b.insert_element(ir.Constant(self.v8i32, ir.Undefined), quad_x,
                                                          ir.Constant(ir.IntType(32), 0)),
                                         ir.Constant(self.v8i32, ir.Undefined), ir.Constant(self.v8i32, [0] * 8))
            x = b.call(self.pshufb, [b.bitcast(broadcast, self.v32i8), self.control])
            for octet, codes in enumerate(pairs):
                self.narrow[t][octet] = self._kept(b.add(self.narrow[t][octet], b.call(self.maddubs, [codes, x])))

    def _kept(self, value):
        """value, which the optimiser may no longer reassociate: summed quad after quad, the sums
        keep four registers a token; regrouped across quads (as LLVM would), their inputs spill."""
        return self.builder.asm(ir.FunctionType(value.type, [value.type]), "", "=x,0", [value], False)

    def flush(self) -> None:
        """Widen the 16-bit sums (both lanes: the same rows) into the 32-bit ones."""
        b = self.builder
        for t in range(self.tokens):
            for octet, sums in enumerate(self.narrow[t]):
                for lane in (0, 1):
                    part = b.sext(self._pick(sums, sums, list(range(8 * lane, 8 * lane + 8))), self.v8i32)
                    self.wide[t][octet] = b.add(self.wide[t][octet], part)
                self.narrow[t][octet] = self.zero16

    def dots(self) -> list:
        """Per token, the group's <16 x i32> dots of rows 0-15 and 16-31."""
        return [[self._pick(self.wide[t][2 * plane], self.wide[t][2 * plane + 1], list(range(16)))
                 for plane in (0, 1)] for t in range(self.tokens)]

    def group(self, function, planes_at, group_bytes, first_column, column_bytes: int, xq_ptrs) -> list:
        """One group's dots (`dots`) as an IR loop over its pairs of quads, whose values die in
        their iteration. planes_at(byte offset) gives a quad's nibble planes; xq_ptrs point at the
        tokens' int8 activations."""
        b = self.builder
        i32, i64 = ir.IntType(32), ir.IntType(64)
        head, body, done = (function.append_basic_block(name) for name in ("pair_head", "pair_body", "pair_done"))
        before = b.block
        b.branch(head)
        b.position_at_end(head)
        pair = b.phi(i64)
        pair.add_incoming(ir.Constant(i64, 0), before)
        state = [b.phi(value.type) for value in self.values()]
        for phi, value in zip(state, self.values()):
            phi.add_incoming(value, before)
        self.set_values(state)
        b.cbranch(b.icmp_unsigned("<", pair, ir.Constant(i64, QUADS // 2)), body, done)
        b.position_at_end(body)
        for step in (0, 1):
            quad = b.add(b.mul(pair, ir.Constant(i64, 2)), ir.Constant(i64, step))
            codes = planes_at(b.add(group_bytes, b.mul(quad, ir.Constant(i64, 4 * column_bytes))))
            column = b.add(first_column, b.mul(quad, ir.Constant(i64, 4)))
            self.add_quad(codes, [b.load(b.bitcast(b.gep(xq_ptr, [column]), i32.as_pointer()), align=1)
                                  for xq_ptr in xq_ptrs])
        if self.flush_each_pair:
            self.flush()
        for phi, value in zip(state, self.values()):
            phi.add_incoming(value, b.block)
        pair.add_incoming(b.add(pair, ir.Constant(i64, 1)), b.block)
        b.branch(head)
        b.position_at_end(done)
        self.set_values(state)
        if not self.flush_each_pair:
            self.flush()
        return self.dots()


def _block_dot_codegen(path: int, tokens: int = 1, bits: int = 4):
    """LLVM code of `_q8_block_dot` (tokens=1), `_q8_block_dot_pair` (tokens=2: each quad's
    codes are prepared once for both tokens) or `_q8_block_dot_quad` (tokens=4; AVX2's int4
    column pairs: two passes of two tokens), for int4 (bits=4), int6 or int8 weights.
    Arguments: path, packed, scales, then per token (xq, x_scales, x_sums), then per token
    alpha, then per token out.

    int8 weights are signed, and the dot instructions multiply unsigned by signed bytes: each
    product w x is taken as |w| (x sign(w)), as llama.cpp does (|w| <= 127, so AVX2's 16-bit pair
    sums cannot saturate either); x_sums are not needed."""

    def codegen(context, builder, sig, args):
        def data(index):
            return context.make_array(sig.args[index])(context, builder, args[index]).data

        packed_ptr, scales_ptr = data(1), data(2)
        xq_ptrs = [data(3 + 3 * t) for t in range(tokens)]
        x_scales_ptrs = [data(4 + 3 * t) for t in range(tokens)]
        x_sums_ptrs = [data(5 + 3 * t) for t in range(tokens)]
        alphas = [args[3 + 3 * tokens + t] for t in range(tokens)]
        out_ptrs = [data(3 + 4 * tokens + t) for t in range(tokens)]
        in_features = builder.extract_value(context.make_array(sig.args[3])(context, builder, args[3]).shape, 0)

        i8, i16, i32, i64, f32 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType())
        v16i32, v16f, v64i8 = ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(i8, 64)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0i8")
        zero_f, zero_i = ir.Constant(v16f, [0.0] * 16), ir.Constant(v16i32, [0] * 16)

        def const(value):
            return ir.Constant(i64, value)

        def splat(scalar, vector_type):
            vec = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(i32, 0))
            return builder.shuffle_vector(vec, vec, ir.Constant(v16i32, [0] * 16))

        def load(pointer, offset, vector_type, align):
            return builder.load(builder.bitcast(builder.gep(pointer, [offset]), vector_type.as_pointer()), align=align)

        function = builder.function
        column_bytes = BLOCK * bits // 8
        low_mask, shift = ir.Constant(v64i8, [15] * 64), ir.Constant(v64i8, [4] * 64)
        transpose = ir.Constant(ir.VectorType(i32, 64), _TRANSPOSE)
        zero_b = ir.Constant(v64i8, [0] * 64)
        joined = ir.Constant(ir.VectorType(i32, 64), list(range(64)))  # two <32 x i8> as one <64 x i8>
        # `_ColumnDots` instead of the transpose; four tokens of int6 stay transposed (two passes of
        # column pairs, which spill at int6, were no faster)
        column_pairs = path == paths.AVX2 and (bits == 4 or bits == 6 and tokens <= 2)

        def planes_at(quad_bytes):
            """The int4 / int6 codes of the quad at byte `quad_bytes` (an i64) as two planes of
            <64 x i8> (rows 0-15 and 16-31), column-major as stored."""
            codes = load(packed_ptr, quad_bytes, v64i8, 1)
            nibbles = [builder.and_(codes, low_mask), builder.lshr(codes, shift)]
            if bits == 6:  # the high bits, to the left of the nibbles: byte j*16 + r of a plane takes
                # field f of top byte 16 (j % 2) + r, moved to bits 4-5 (plane h, columns 0-1: field 2h;
                # columns 2-3: field 2h + 1)
                v32i8 = ir.VectorType(i8, 32)
                top = load(packed_ptr, builder.add(quad_bytes, const(64)), v32i8, 1)

                def field(f):
                    moved = (builder.shl(top, ir.Constant(v32i8, [4 - 2 * f] * 32)) if f < 2 else
                             builder.lshr(top, ir.Constant(v32i8, [2 * f - 4] * 32)) if f > 2 else top)
                    return builder.and_(moved, ir.Constant(v32i8, [0x30] * 32))

                nibbles = [builder.or_(part, builder.shuffle_vector(field(2 * h), field(2 * h + 1), joined))
                           for h, part in enumerate(nibbles)]
            return nibbles

        def transposed_dots(chosen, group_bytes, first_column) -> list:
            """Per token in `chosen`, the group's <16 x i32> dots of rows 0-15 and 16-31: each quad's
            codes transposed so that a 32-bit lane holds one row's four, then `dot4`."""
            dots = [[zero_i, zero_i] for _ in chosen]
            for quad in range(QUADS):
                if bits in (4, 6):
                    rows = [builder.shuffle_vector(part, part, transpose)
                            for part in planes_at(builder.add(group_bytes, const(4 * column_bytes * quad)))]
                else:
                    codes = load(packed_ptr, builder.add(group_bytes, const(128 * quad)), ir.VectorType(i8, 128), 1)
                    rows = [builder.shuffle_vector(codes, codes, ir.Constant(ir.VectorType(i32, 64), indices))
                            for indices in _TRANSPOSE8]
                    negative = [builder.icmp_signed("<", row, zero_b) for row in rows]
                    empty = [builder.icmp_signed("==", row, zero_b) for row in rows]
                    magnitudes = [builder.select(n, builder.sub(zero_b, row), row) for n, row in zip(negative, rows)]
                for i, t in enumerate(chosen):
                    column = builder.add(first_column, const(4 * quad))
                    quad_x = builder.load(builder.bitcast(builder.gep(xq_ptrs[t], [column]), i32.as_pointer()), align=1)
                    activations = builder.bitcast(splat(quad_x, v16i32), v64i8)
                    for half in (0, 1):
                        if bits != 8:
                            dots[i][half] = dot4(builder, path, dots[i][half], rows[half], activations)
                            continue
                        signed = builder.select(negative[half], builder.sub(zero_b, activations), activations)
                        signed = builder.select(empty[half], zero_b, signed)
                        dots[i][half] = dot4(builder, path, dots[i][half], magnitudes[half], signed)
            return dots

        def block_loop(chosen, prefetch_ahead: bool):
            """The loop over the block's groups for the tokens `chosen`; adds their rows to out."""
            entry = builder.block
            head, body, done = (function.append_basic_block(name) for name in ("group_head", "group_body", "done"))
            groups = builder.udiv(in_features, const(GROUP))
            builder.branch(head)

            builder.position_at_end(head)
            group = builder.phi(i64)
            totals = [[builder.phi(v16f), builder.phi(v16f)] for _ in chosen]  # rows 0-15, rows 16-31
            group.add_incoming(const(0), entry)
            for total in (total for per_token in totals for total in per_token):
                total.add_incoming(zero_f, entry)
            builder.cbranch(builder.icmp_unsigned("<", group, groups), body, done)

            builder.position_at_end(body)
            first_column = builder.mul(group, const(GROUP))
            group_bytes = builder.mul(first_column, const(column_bytes))
            for line in range(GROUP * column_bytes // 64) if prefetch_ahead else ():  # this group's lines
                address = builder.gep(packed_ptr, [builder.add(group_bytes, const(PREFETCH_AHEAD + 64 * line))])
                builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            if column_pairs:
                dots = _ColumnDots(builder, bits, len(chosen)).group(function, planes_at, group_bytes, first_column,
                                                                     column_bytes, [xq_ptrs[t] for t in chosen])
            else:
                dots = transposed_dots(chosen, group_bytes, first_column)
            w_scales = []
            for half in (0, 1):
                scale_bits = load(scales_ptr, builder.add(first_column, const(16 * half)), ir.VectorType(i16, 16), 2)
                w_scales.append(builder.bitcast(builder.shl(builder.zext(scale_bits, v16i32),
                                                            ir.Constant(v16i32, [16] * 16)), v16f))
            for i, t in enumerate(chosen):
                if bits in (4, 6):  # codes are q + 8 (q + 32): subtract 8 (32) x the activations' group sum
                    offset = builder.mul(builder.load(builder.gep(x_sums_ptrs[t], [group])),
                                         ir.Constant(i32, 8 if bits == 4 else 32))
                    for half in (0, 1):
                        dots[i][half] = builder.sub(dots[i][half], splat(offset, v16i32))
                x_scale = splat(builder.load(builder.gep(x_scales_ptrs[t], [group])), v16f)
                for half in (0, 1):
                    exact = builder.sitofp(dots[i][half], v16f)
                    value = builder.call(fma, [exact, builder.fmul(w_scales[half], x_scale), totals[i][half]])
                    totals[i][half].add_incoming(value, builder.block)
            group.add_incoming(builder.add(group, const(1)), builder.block)
            builder.branch(head)

            builder.position_at_end(done)
            for i, t in enumerate(chosen):
                for half in (0, 1):
                    address = builder.bitcast(builder.gep(out_ptrs[t], [const(16 * half)]), v16f.as_pointer())
                    result = builder.call(fma, [splat(alphas[t], v16f), totals[i][half],
                                                builder.load(address, align=4)])
                    builder.store(result, address, align=4)

        # AVX2's column pairs hold two tokens' sums in its 16 registers: four tokens take two passes
        # over the block (the second from cache, so it asks for nothing ahead)
        passes = 2 if column_pairs and tokens == 4 else 1
        for first in range(0, tokens, tokens // passes):
            block_loop(list(range(first, first + tokens // passes)), prefetch_ahead=first == 0)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _q8_block_dot(typingctx, path, packed, scales, xq, x_scales, x_sums, alpha, out):
    """out[0:32] += alpha * (W_block @ x) for one 32-row block and one int8 token.

    path: a `kernels.isa` path, a compile-time literal. packed: uint8 [in * 16] for int4 weights
    (one block of Int4Weights) or int8 [in * 32] for int8 ones (`kernels.int8`); scales uint16
    [in]; xq int8 [in], x_scales float32 [in // 32], x_sums int32 [in // 32]
    (`quantize_activations`); out float32 [32]."""
    if not isinstance(path, types.IntegerLiteral):
        return None
    return (types.void(path, packed, scales, xq, x_scales, x_sums, alpha, out),
            _block_dot_codegen(path.literal_value, bits=_bits(packed)))


@intrinsic
def _q8_block_dot_pair(typingctx, path, packed, scales, xq0, x_scales0, x_sums0, xq1, x_scales1, x_sums1,
                       alpha0, alpha1, out0, out1):
    """`_q8_block_dot` for two tokens: each quad's codes are prepared once for both; each token's
    result is the same bits as `_q8_block_dot` gives it."""
    if not isinstance(path, types.IntegerLiteral):
        return None
    signature = types.void(path, packed, scales, xq0, x_scales0, x_sums0, xq1, x_scales1, x_sums1,
                           alpha0, alpha1, out0, out1)
    return signature, _block_dot_codegen(path.literal_value, tokens=2, bits=_bits(packed))


@intrinsic
def _q8_block_dot_quad(typingctx, path, packed, scales, xq0, x_scales0, x_sums0, xq1, x_scales1, x_sums1,
                       xq2, x_scales2, x_sums2, xq3, x_scales3, x_sums3, alpha0, alpha1, alpha2, alpha3,
                       out0, out1, out2, out3):
    """`_q8_block_dot` for four tokens (prefill: a block applied to its tokens four at a time), the
    same bits per token; AVX2's int4 blocks take two passes of two tokens (`_ColumnDots`)."""
    if not isinstance(path, types.IntegerLiteral):
        return None
    signature = types.void(path, packed, scales, xq0, x_scales0, x_sums0, xq1, x_scales1, x_sums1,
                           xq2, x_scales2, x_sums2, xq3, x_scales3, x_sums3, alpha0, alpha1, alpha2, alpha3,
                           out0, out1, out2, out3)
    return signature, _block_dot_codegen(path.literal_value, tokens=4, bits=_bits(packed))


def _bits(packed) -> int:
    """4 for int4 weights (a block is uint8 [in * 16]), 6 for int6 ones (uint8 [in // 4, 96]), 8
    for int8 ones (int8 [in * 32])."""
    return 8 if packed.dtype == types.int8 else 6 if packed.ndim == 2 else 4


# --- decode -------------------------------------------------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def _moe_decode_fast(path, x, expert_ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed,
                     sh_gu_scales, sh_dn_packed, sh_dn_scales, sh_weights, out, xq, x_scales, x_sums, gate_up, hq,
                     h_scales, h_sums, parts, runs):
    literally(path)
    tokens, top_k = expert_ids.shape
    # a shared expert of the routed experts' shape (sh_*: [1, ...], else [0, ...]) is each token's
    # pick top_k, weighted by sh_weights[t]: its rows among the routed ones' in the same passes
    picks = top_k + sh_gu_packed.shape[0]
    gate_blocks = gu_packed.shape[1] // 2  # I / 32
    out_blocks = dn_packed.shape[1]  # D / 32
    quantize_activations(x, xq, x_scales, x_sums)

    # gate_up for every (token, expert, part of its rows): the part's gate rows, then its up rows,
    # each one run of the expert's bytes in order (a gate block and an up block in turn broke every
    # run in two: 0.47 -> 0.39 ms a layer on Zen 4); then h = silu(gate) * up, quantised per block.
    # `parts`: enough per expert for every thread to have work (1 when the experts already do)
    for task in prange(tokens * picks * parts):
        t = task // (picks * parts)
        j = (task // parts) % picks
        first = (task % parts) * gate_blocks // parts
        last = (task % parts + 1) * gate_blocks // parts
        for half in range(2):  # gate rows, then up rows
            for b in range(first, last):
                rows = gate_up[t, j, half, b * BLOCK:(b + 1) * BLOCK]
                rows[:] = 0
                block = half * gate_blocks + b
                if j < top_k:
                    e = expert_ids[t, j]
                    _q8_block_dot(path, gu_packed[e, block], gu_scales[e, block], xq[t], x_scales[t], x_sums[t],
                                  np.float32(1.0), rows)
                else:
                    _q8_block_dot(path, sh_gu_packed[0, block], sh_gu_scales[0, block], xq[t], x_scales[t],
                                  x_sums[t], np.float32(1.0), rows)
        for b in range(first, last):
            gate = gate_up[t, j, 0, b * BLOCK:(b + 1) * BLOCK]
            up = gate_up[t, j, 1, b * BLOCK:(b + 1) * BLOCK]
            for r in range(BLOCK):
                gate[r] = _silu(gate[r]) * up[r]  # gate now holds h
            _quantize_group(gate, hq[t, j, b * BLOCK:(b + 1) * BLOCK], h_scales[t, j], h_sums[t, j], b)

    # down for every token, summed over its experts: each thread takes a run of output blocks and
    # reads every expert's rows for it in order, one expert after another (long runs the prefetch
    # leads, rather than top_k scattered 8 KiB blocks a task); each block still sums its experts in
    # the token's order, so the result is the same bits. `runs`: the threads' number, given by the
    # caller (numba.get_num_threads inside a kernel would keep it out of the cache)
    for task in prange(tokens * runs):
        t = task // runs
        first = (task % runs) * out_blocks // runs
        last = (task % runs + 1) * out_blocks // runs
        out[t, first * BLOCK:last * BLOCK] = 0
        for j in range(picks):
            for b in range(first, last):
                if j < top_k:
                    e = expert_ids[t, j]
                    _q8_block_dot(path, dn_packed[e, b], dn_scales[e, b], hq[t, j], h_scales[t, j], h_sums[t, j],
                                  np.float32(weights[t, j]), out[t, b * BLOCK:(b + 1) * BLOCK])
                else:
                    _q8_block_dot(path, sh_dn_packed[0, b], sh_dn_scales[0, b], hq[t, j], h_scales[t, j],
                                  h_sums[t, j], np.float32(sh_weights[t]), out[t, b * BLOCK:(b + 1) * BLOCK])


# --- prefill ------------------------------------------------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def _moe_prefill_fast(path, x, expert_ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out,
                      xq, x_scales, x_sums, order, offsets, active, gate_up, hq, h_scales, h_sums):
    literally(path)
    tokens, top_k = expert_ids.shape
    gate_blocks = gu_packed.shape[1] // 2
    out_blocks = dn_packed.shape[1]
    _quantize_tokens(x, xq, x_scales, x_sums)
    one = np.float32(1.0)

    # gate_up: task = (active expert, row block) over that expert's tokens, four at a time; rows of
    # gate_up / hq are indexed by sorted slot: slot s of expert e is order[offsets[e] + i]
    for task in prange(active.shape[0] * gate_blocks):
        e = active[task // gate_blocks]
        b = task % gate_blocks
        rows = slice(b * BLOCK, (b + 1) * BLOCK)
        first, end = offsets[e], offsets[e + 1]
        for position in range(first, end):
            gate_up[position, :, rows] = 0
        for half in (0, 1):  # gate rows, then up rows
            packed, scales = gu_packed[e, half * gate_blocks + b], gu_scales[e, half * gate_blocks + b]
            quads_end = first + (end - first) // 4 * 4
            for p in range(first, quads_end, 4):
                t0, t1, t2, t3 = order[p] // top_k, order[p + 1] // top_k, order[p + 2] // top_k, order[p + 3] // top_k
                _q8_block_dot_quad(path, packed, scales, xq[t0], x_scales[t0], x_sums[t0], xq[t1], x_scales[t1],
                                   x_sums[t1], xq[t2], x_scales[t2], x_sums[t2], xq[t3], x_scales[t3], x_sums[t3],
                                   one, one, one, one, gate_up[p, half, rows], gate_up[p + 1, half, rows],
                                   gate_up[p + 2, half, rows], gate_up[p + 3, half, rows])
            for position in range(quads_end, end - 1, 2):
                t0, t1 = order[position] // top_k, order[position + 1] // top_k
                _q8_block_dot_pair(path, packed, scales, xq[t0], x_scales[t0], x_sums[t0], xq[t1], x_scales[t1],
                                   x_sums[t1], one, one, gate_up[position, half, rows], gate_up[position + 1, half, rows])
            if (end - quads_end) % 2:
                t = order[end - 1] // top_k
                _q8_block_dot(path, packed, scales, xq[t], x_scales[t], x_sums[t], one, gate_up[end - 1, half, rows])
        for position in range(first, end):
            gate = gate_up[position, 0, rows]
            for r in range(BLOCK):
                gate[r] = _silu(gate[r]) * gate_up[position, 1, b * BLOCK + r]  # gate now holds h
            _quantize_group(gate, hq[position, rows], h_scales[position], h_sums[position], b)

    # down: task = output row block over every (expert, token) pair; a token's rows are written
    # only by the task that owns the block, so experts accumulate without races
    for b in prange(out_blocks):
        rows = slice(b * BLOCK, (b + 1) * BLOCK)
        for t in range(tokens):
            out[t, rows] = 0
        for i in range(active.shape[0]):
            e = active[i]
            first, end = offsets[e], offsets[e + 1]
            quads_end = first + (end - first) // 4 * 4
            for p in range(first, quads_end, 4):
                s0, s1, s2, s3 = order[p], order[p + 1], order[p + 2], order[p + 3]
                _q8_block_dot_quad(path, dn_packed[e, b], dn_scales[e, b], hq[p], h_scales[p], h_sums[p], hq[p + 1],
                                   h_scales[p + 1], h_sums[p + 1], hq[p + 2], h_scales[p + 2], h_sums[p + 2], hq[p + 3],
                                   h_scales[p + 3], h_sums[p + 3], np.float32(weights[s0 // top_k, s0 % top_k]),
                                   np.float32(weights[s1 // top_k, s1 % top_k]),
                                   np.float32(weights[s2 // top_k, s2 % top_k]),
                                   np.float32(weights[s3 // top_k, s3 % top_k]), out[s0 // top_k, rows],
                                   out[s1 // top_k, rows], out[s2 // top_k, rows], out[s3 // top_k, rows])
            for position in range(quads_end, end - 1, 2):
                s0, s1 = order[position], order[position + 1]
                _q8_block_dot_pair(path, dn_packed[e, b], dn_scales[e, b], hq[position], h_scales[position],
                                   h_sums[position], hq[position + 1], h_scales[position + 1], h_sums[position + 1],
                                   np.float32(weights[s0 // top_k, s0 % top_k]),
                                   np.float32(weights[s1 // top_k, s1 % top_k]), out[s0 // top_k, rows],
                                   out[s1 // top_k, rows])
            if (end - quads_end) % 2:
                s = order[end - 1]
                _q8_block_dot(path, dn_packed[e, b], dn_scales[e, b], hq[end - 1], h_scales[end - 1], h_sums[end - 1],
                              np.float32(weights[s // top_k, s % top_k]), out[s // top_k, rows])


# --- dense ----------------------------------------------------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def _linear_fast(path, x, packed, scales, out, xq, x_scales, x_sums):
    literally(path)
    tokens = x.shape[0]
    _quantize_tokens(x, xq, x_scales, x_sums)
    one = np.float32(1.0)
    # tiles of TOKEN_TILE tokens, so that a tile's activations stay in L2 while every block of the
    # matrix passes; task = 32-row block over the tile's tokens, four at a time
    for first in range(0, tokens, TOKEN_TILE):
        end = min(first + TOKEN_TILE, tokens)
        for b in prange(packed.shape[1]):
            rows = slice(b * BLOCK, (b + 1) * BLOCK)
            for t in range(first, end):
                out[t, rows] = 0
            quads_end = first + (end - first) // 4 * 4
            for t in range(first, quads_end, 4):
                _q8_block_dot_quad(path, packed[0, b], scales[0, b], xq[t], x_scales[t], x_sums[t], xq[t + 1],
                                   x_scales[t + 1], x_sums[t + 1], xq[t + 2], x_scales[t + 2], x_sums[t + 2],
                                   xq[t + 3], x_scales[t + 3], x_sums[t + 3], one, one, one, one,
                                   out[t, rows], out[t + 1, rows], out[t + 2, rows], out[t + 3, rows])
            for t in range(quads_end, end - 1, 2):
                _q8_block_dot_pair(path, packed[0, b], scales[0, b], xq[t], x_scales[t], x_sums[t], xq[t + 1],
                                   x_scales[t + 1], x_sums[t + 1], one, one, out[t, rows], out[t + 1, rows])
            if (end - quads_end) % 2:
                t = end - 1
                _q8_block_dot(path, packed[0, b], scales[0, b], xq[t], x_scales[t], x_sums[t], one, out[t, rows])


# --- one compiled entry per path: a global constant is a compile-time literal for the kernels -------------

_VNNI512, _AVXVNNI, _AVX2, _PORTABLE = paths.VNNI512, paths.AVXVNNI, paths.AVX2, paths.PORTABLE


@njit(nogil=True, cache=True)
def _decode_vnni512(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                    sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs):
    _moe_decode_fast(_VNNI512, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                     sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs)


@njit(nogil=True, cache=True)
def _decode_avxvnni(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                    sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs):
    _moe_decode_fast(_AVXVNNI, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                     sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs)


@njit(nogil=True, cache=True)
def _decode_avx2(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                 sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs):
    _moe_decode_fast(_AVX2, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                     sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs)


@njit(nogil=True, cache=True)
def _decode_portable(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                     sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs):
    _moe_decode_fast(_PORTABLE, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, sh_gu_packed, sh_gu_scales,
                     sh_dn_packed, sh_dn_scales, sh_weights, out, xq, xs, xsum, gate_up, hq, hs, hsum, parts, runs)


@njit(nogil=True, cache=True)
def _prefill_vnni512(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order, offsets,
                     active, gate_up, hq, hs, hsum):
    _moe_prefill_fast(_VNNI512, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order,
                      offsets, active, gate_up, hq, hs, hsum)


@njit(nogil=True, cache=True)
def _prefill_avxvnni(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order, offsets,
                     active, gate_up, hq, hs, hsum):
    _moe_prefill_fast(_AVXVNNI, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order,
                      offsets, active, gate_up, hq, hs, hsum)


@njit(nogil=True, cache=True)
def _prefill_avx2(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order, offsets,
                  active, gate_up, hq, hs, hsum):
    _moe_prefill_fast(_AVX2, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order,
                      offsets, active, gate_up, hq, hs, hsum)


@njit(nogil=True, cache=True)
def _prefill_portable(x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order, offsets,
                      active, gate_up, hq, hs, hsum):
    _moe_prefill_fast(_PORTABLE, x, ids, weights, gu_packed, gu_scales, dn_packed, dn_scales, out, xq, xs, xsum, order,
                      offsets, active, gate_up, hq, hs, hsum)


@njit(nogil=True, cache=True)
def _linear_vnni512(x, packed, scales, out, xq, xs, xsum):
    _linear_fast(_VNNI512, x, packed, scales, out, xq, xs, xsum)


@njit(nogil=True, cache=True)
def _linear_avxvnni(x, packed, scales, out, xq, xs, xsum):
    _linear_fast(_AVXVNNI, x, packed, scales, out, xq, xs, xsum)


@njit(nogil=True, cache=True)
def _linear_avx2(x, packed, scales, out, xq, xs, xsum):
    _linear_fast(_AVX2, x, packed, scales, out, xq, xs, xsum)


@njit(nogil=True, cache=True)
def _linear_portable(x, packed, scales, out, xq, xs, xsum):
    _linear_fast(_PORTABLE, x, packed, scales, out, xq, xs, xsum)


_DECODE = {paths.VNNI512: _decode_vnni512, paths.AVXVNNI: _decode_avxvnni, paths.AVX2: _decode_avx2,
           paths.PORTABLE: _decode_portable}
_PREFILL = {paths.VNNI512: _prefill_vnni512, paths.AVXVNNI: _prefill_avxvnni, paths.AVX2: _prefill_avx2,
            paths.PORTABLE: _prefill_portable}
_LINEAR = {paths.VNNI512: _linear_vnni512, paths.AVXVNNI: _linear_avxvnni, paths.AVX2: _linear_avx2,
           paths.PORTABLE: _linear_portable}


# --- the Python API ---------------------------------------------------------------------------------------

class FastScratch:
    """Buffers of `moe_decode_fast` and `moe_prefill_fast` for up to `tokens` tokens (one slot per
    token and routed expert, and per token for a `shared` expert run beside them); allocate once,
    reuse."""

    def __init__(self, tokens: int, top_k: int, hidden_size: int, intermediate_size: int, shared: bool = False):
        slots = tokens * (top_k + shared)
        self.top_k, self.shared = top_k, shared
        self.xq = np.zeros((tokens, hidden_size), np.int8)
        self.x_scales = np.zeros((tokens, hidden_size // GROUP), np.float32)
        self.x_sums = np.zeros((tokens, hidden_size // GROUP), np.int32)
        self.gate_up = np.zeros((slots, 2, intermediate_size), np.float32)
        self.hq = np.zeros((slots, intermediate_size), np.int8)
        self.h_scales = np.zeros((slots, intermediate_size // GROUP), np.float32)
        self.h_sums = np.zeros((slots, intermediate_size // GROUP), np.int32)
        self._decode_views: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def check(self, tokens: int, top_k: int, shared: bool = False) -> None:
        if self.xq.shape[0] < tokens or self.top_k != top_k or shared > self.shared:
            raise ValueError(f"scratch is for {self.xq.shape[0]} tokens x {self.top_k} experts"
                             f"{' + a shared one' if self.shared else ''}, got {tokens} x {top_k}"
                             f"{' + a shared one' if shared else ''}")

    def decode_views(self, tokens: int, picks: int) -> tuple[np.ndarray, ...]:
        """The decode kernel's buffers for `tokens` tokens of `picks` experts each (the routed ones,
        and a shared one), per (token, expert) slot; made once per shape (this runs per layer per
        token)."""
        if (tokens, picks) not in self._decode_views:
            slots = tokens * picks
            self._decode_views[tokens, picks] = (
                self.xq[:tokens], self.x_scales[:tokens], self.x_sums[:tokens],
                self.gate_up[:slots].reshape(tokens, picks, *self.gate_up.shape[1:]),
                self.hq[:slots].reshape(tokens, picks, -1), self.h_scales[:slots].reshape(tokens, picks, -1),
                self.h_sums[:slots].reshape(tokens, picks, -1))
        return self._decode_views[tokens, picks]


@functools.cache
def _default_path() -> int:
    return paths.best()  # read once: the kernels are called per layer per token


def _path(path: int | None) -> int:
    if path is None:
        return _default_path()
    if path not in paths.available():
        raise ValueError(f"this CPU cannot run the {paths.NAMES[path]} kernels")
    return path


@dataclass(frozen=True)
class SharedExpert:
    """A shared expert run by `moe_decode_fast` beside the routed ones: int4 gate_up [1, 2I, D]
    and down [1, D, I] of the routed experts' shapes, and its weight per token (float32 [T]: the
    sigmoid of its gate)."""

    gate_up: Int4Weights
    down: Int4Weights
    weights: np.ndarray


# no shared expert: empty arrays of the shared ones' kinds (the kernel's loops see none)
_NO_SHARED = (np.zeros((0, 1, 16), np.uint8), np.zeros((0, 1, 1), np.uint16), np.zeros((0, 1, 16), np.uint8),
              np.zeros((0, 1, 1), np.uint16), np.zeros(0, np.float32))


def moe_decode_fast(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights, out,
                    scratch: FastScratch, path: int | None = None, shared: SharedExpert | None = None) -> np.ndarray:
    """`gemv.moe_decode` with int8 activations and integer dot products (`path`: a `kernels.isa`
    path this CPU runs; default the best). With `shared`, out also holds each token's shared
    expert times its weight, computed in the same passes as the routed experts (the scratch made
    with shared=True). Returns `out`."""
    _check(x, expert_ids, weights, gate_up, down, out)
    tokens, top_k = expert_ids.shape
    scratch.check(tokens, top_k, shared is not None)
    if shared is None:
        extra = _NO_SHARED
    else:
        if shared.gate_up.shape != (1, *gate_up.shape[1:]) or shared.down.shape != (1, *down.shape[1:]) \
                or shared.weights.shape != (tokens,) or shared.weights.dtype != np.float32:
            raise ValueError(f"a shared expert must be int4 of the routed experts' shapes {gate_up.shape[1:]} and "
                             f"{down.shape[1:]} with float32 weights [{tokens}]")
        extra = (shared.gate_up.packed, shared.gate_up.scales, shared.down.packed, shared.down.scales, shared.weights)
    picks = top_k + (shared is not None)
    threads = current_threads()
    _DECODE[_path(path)](x, expert_ids.astype(np.int64, copy=False), weights.astype(np.float32, copy=False),
                         gate_up.packed, gate_up.scales, down.packed, down.scales, *extra, out,
                         *scratch.decode_views(tokens, picks), _parts(tokens * picks, gate_up.packed.shape[1] // 2,
                                                                      threads), threads)
    return out


def _parts(experts: int, blocks: int, threads: int) -> int:
    """Into how many runs of row blocks the decode kernel's gate_up pass cuts each of its `experts`
    (token, expert) pairs: enough for two tasks a thread, one when the pairs alone are that many
    (10 routed experts on 2 threads), and then, up to twice that, the fewest that share the tasks
    out evenly (11 on 2 threads: 2, else one thread does 6 while the other waits after 5)."""
    least = max(1, min(blocks, -(-2 * threads // experts)))
    return next((parts for parts in range(least, min(blocks, 2 * least) + 1) if experts * parts % threads == 0),
                least)


def moe_prefill_fast(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights, out,
                     scratch: FastScratch, path: int | None = None) -> np.ndarray:
    """`gemm.moe_prefill` with int8 activations and integer dot products: tokens grouped by
    expert, each (expert, row block) task applying its block to the expert's tokens two at a
    time. Returns `out`."""
    _check(x, expert_ids, weights, gate_up, down, out)
    tokens, top_k = expert_ids.shape
    scratch.check(tokens, top_k)
    order, offsets, active = group_by_expert(expert_ids, gate_up.shape[0])
    _PREFILL[_path(path)](x, expert_ids.astype(np.int64, copy=False), weights.astype(np.float32, copy=False),
                          gate_up.packed, gate_up.scales, down.packed, down.scales, out,
                          scratch.xq[:tokens], scratch.x_scales[:tokens], scratch.x_sums[:tokens],
                          order, offsets, active, scratch.gate_up, scratch.hq, scratch.h_scales, scratch.h_sums)
    return out


class Activations:
    """An activation buffer for `linear_fast`: up to `tokens` tokens of `features` values as int8,
    with their group scales and sums. Share one among all layers that read the same width."""

    def __init__(self, tokens: int, features: int):
        self.q = np.zeros((tokens, features), np.int8)
        self.scales = np.zeros((tokens, features // GROUP), np.float32)
        self.sums = np.zeros((tokens, features // GROUP), np.int32)


def linear_fast(x: np.ndarray, weight, out: np.ndarray, activations: Activations,
                path: int | None = None) -> np.ndarray:
    """out = x @ W.T for one int4, int6 or int8 matrix (`Int4Weights`, ...) [1, out, in]:
    x float32 [T, in] quantised to int8, integer dot products; the same code from one token to
    a whole prompt chunk (each 32-row block is read once and applied to every token). Returns
    `out` float32 [T, out] (overwritten)."""
    _, out_features, in_features = weight.shape
    tokens = x.shape[0]
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != in_features or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [T, {in_features}]")
    if out.shape != (tokens, out_features) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{tokens}, {out_features}]")
    if activations.q.shape[0] < tokens or activations.q.shape[1] != in_features:
        raise ValueError(f"activations hold {activations.q.shape[0]} x {activations.q.shape[1]}, "
                         f"need {tokens} x {in_features}")
    _LINEAR[_path(path)](x, weight.packed, weight.scales, out, activations.q[:tokens], activations.scales[:tokens],
                         activations.sums[:tokens])
    return out


def linear_reference_fast(x: np.ndarray, weight) -> np.ndarray:
    """NumPy reference of `linear_fast`: the int8 activations' exact integer group dots with the
    weights' codes, scaled, summed in float64."""
    from offload.kernels import int4

    if weight.packed.dtype == np.int8:  # kernels.int8: column c of block b is bytes [32c, 32c + 32)
        _, blocks, columns = weight.packed.shape
        codes = weight.packed[0].reshape(blocks, columns // BLOCK, BLOCK).transpose(0, 2, 1).reshape(blocks * BLOCK, -1)
        scales = _int8_scales(weight)
    elif weight.packed.ndim == 4:  # kernels.int6
        from offload.kernels import int6

        codes, scales = int6.unpack_codes(weight)[0], int4.scales_float32(weight)[0]
    else:
        codes, scales = int4.unpack_codes(weight)[0], int4.scales_float32(weight)[0]
    q, q_scales, _ = quantize_activations_reference(x)
    dots = (codes.astype(np.int64).reshape(codes.shape[0], 1, -1, GROUP)
            * q.astype(np.int64).reshape(1, x.shape[0], -1, GROUP)).sum(axis=3)  # [out, T, groups]
    return (dots * scales.astype(np.float64)[:, None, :] * q_scales[None]).sum(axis=2).T.astype(np.float32)


def _int8_scales(weight) -> np.ndarray:
    """float32 [out, in // 32] scales of an `Int8Weights` matrix."""
    _, blocks, columns = weight.scales.shape
    bits = weight.scales[0].astype(np.uint32) << 16
    per = bits.view(np.float32).reshape(blocks, columns // BLOCK, BLOCK)  # [blocks, groups, rows]
    return per.transpose(0, 2, 1).reshape(blocks * BLOCK, columns // BLOCK)


def moe_reference_fast(x, expert_ids, weights, gate_up: Int4Weights, down: Int4Weights) -> np.ndarray:
    """NumPy reference of `moe_decode_fast`: the same int8 arithmetic (quantised x, exact integer
    group dots, quantised hidden state), summed in float64."""
    from offload.kernels.int4 import scales_float32, unpack_codes

    codes_gu, codes_dn = unpack_codes(gate_up).astype(np.int64), unpack_codes(down).astype(np.int64)
    scales_gu, scales_dn = scales_float32(gate_up).astype(np.float64), scales_float32(down).astype(np.float64)
    xq, xs, _ = quantize_activations_reference(x)
    intermediate = gate_up.shape[1] // 2
    out = np.zeros(x.shape, np.float64)

    def product(codes, scales, q, q_scales):  # codes [rows, in], scales [rows, in/32], q [in] -> [rows]
        dots = (codes.reshape(codes.shape[0], -1, GROUP) * q.astype(np.int64).reshape(-1, GROUP)).sum(axis=2)
        return (dots * scales * q_scales).sum(axis=1)

    for t in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = expert_ids[t, j]
            projected = product(codes_gu[e], scales_gu[e], xq[t], xs[t]).astype(np.float32)
            gate, up = projected[:intermediate], projected[intermediate:]
            hq, hs, _ = quantize_activations_reference((gate / (np.float32(1) + np.exp(-gate)) * up)[None])
            out[t] += weights[t, j] * product(codes_dn[e], scales_dn[e], hq[0], hs[0])
    return out.astype(np.float32)
