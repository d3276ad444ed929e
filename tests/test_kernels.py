"""The int4 format and the expert kernels against their NumPy references."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

from offload.kernels import deltanet, gemm, gemv, int4, int6, int8
from offload.kernels.threads import current_threads, kernel_threads


def random_experts(rng, experts, out_features, in_features, scale=0.05):
    return (rng.standard_normal((experts, out_features, in_features)) * scale).astype(np.float32)


def test_quantize_matches_reference_exactly():
    rng = np.random.default_rng(0)
    w = random_experts(rng, 3, 64, 96)
    w[0, 5, 32:64] = 0  # an all-zero group
    w[1, 7, :32] = 1e-30  # a group whose scale underflows bf16's useful range
    w[2, 9] *= 100  # a row of large values
    q, expected = int4.quantize(w), int4.quantize_reference(w)
    assert np.array_equal(q.packed, expected.packed) and np.array_equal(q.scales, expected.scales)
    assert q.packed.shape == (3, 2, 96 * 16) and q.scales.shape == (3, 2, 96)
    assert np.all(int4.dequantize(q)[0, 5, 32:64] == 0)


def test_round_trip_error_and_bits():
    rng = np.random.default_rng(1)
    w = random_experts(rng, 2, 128, 256)
    restored = int4.dequantize(int4.quantize(w))
    assert restored.dtype == np.float32 and restored.shape == w.shape
    relative = np.sqrt(((restored - w) ** 2).sum() / (w ** 2).sum())
    assert 0.02 < relative < 0.1  # 4-bit, Gaussian weights: ~8%
    q = int4.quantize(w)
    assert int4.FORMAT.bits_per_weight == 4.5
    assert q.nbytes * 8 / w.size == pytest.approx(4.5)


def test_pack_and_unpack_are_inverse():
    rng = np.random.default_rng(2)
    codes = rng.integers(-8, 8, (2, 64, 64))
    bits = rng.integers(0x3C00, 0x3E00, (2, 64, 2)).astype(np.uint16)
    q = int4.pack(codes, bits)
    assert np.array_equal(int4.unpack_codes(q), codes)
    # the documented layout: byte k of column c in block b holds rows 32b + k and 32b + 16 + k
    byte = q.packed[1, 1, 5 * 16 + 3]
    assert byte & 0x0F == codes[1, 32 + 3, 5] + 8 and byte >> 4 == codes[1, 32 + 16 + 3, 5] + 8
    assert q.scales[1, 1, 32 + 7] == bits[1, 32 + 7, 1]


def test_bf16_and_fp16_inputs():
    rng = np.random.default_rng(3)
    w = random_experts(rng, 1, 32, 64)
    bf16_bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    from_bits = int4.quantize(bf16_bits)
    assert np.array_equal(from_bits.packed, int4.quantize((bf16_bits.astype(np.uint32) << 16).view(np.float32)).packed)
    assert int4.quantize(w.astype(np.float16)).shape == (1, 32, 64)
    with pytest.raises(ValueError, match="quantize takes float32, float16 or bf16 bits"):
        int4.quantize(w.astype(np.float64))


def test_layout_constraints_are_explained():
    with pytest.raises(ValueError, match=r"int4 needs out \(40\) to be a multiple of 32 and in \(64\)"):
        int4.quantize(np.zeros((40, 64), np.float32))
    with pytest.raises(ValueError, match=r"in \(48\) a multiple of 32"):
        int4.quantize(np.zeros((32, 48), np.float32))
    with pytest.raises(ValueError, match="int4 packed must be C-contiguous"):
        int4.Int4Weights(np.zeros((1, 1, 10), np.uint8), np.zeros((1, 1, 32), np.uint16), (1, 32, 32))


def make_experts(rng, experts, hidden, intermediate):
    gate_up = int4.quantize(random_experts(rng, experts, 2 * intermediate, hidden, 0.1))
    down = int4.quantize(random_experts(rng, experts, hidden, intermediate, 0.1))
    return gate_up, down


def routing(rng, tokens, experts, top_k, skip_last=False):
    choices = experts - 1 if skip_last else experts
    ids = np.stack([rng.choice(choices, top_k, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, top_k)).astype(np.float32)
    return ids, weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("experts, hidden, intermediate, top_k, tokens", [
    (5, 64, 32, 1, 1), (7, 96, 64, 3, 2), (13, 128, 96, 10, 4), (16, 64, 32, 10, 8), (11, 32, 32, 4, 3),
])
def test_decode_matches_reference(experts, hidden, intermediate, top_k, tokens):
    rng = np.random.default_rng(experts * 100 + top_k)
    gate_up, down = make_experts(rng, experts, hidden, intermediate)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, top_k)
    expected = gemv.moe_reference(x, ids, weights, gate_up, down, np.zeros_like(x))
    scratch = gemv.DecodeScratch(8, top_k, hidden, intermediate)
    out = gemv.moe_decode(x, ids, weights, gate_up, down, np.full_like(x, np.nan), scratch)
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1


@pytest.mark.parametrize("experts, top_k, tokens", [(5, 1, 1), (7, 3, 17), (13, 10, 64), (33, 8, 40), (12, 2, 64)])
def test_prefill_matches_reference(experts, top_k, tokens):
    rng = np.random.default_rng(experts + tokens)
    hidden, intermediate = 96, 64
    gate_up, down = make_experts(rng, experts, hidden, intermediate)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, top_k, skip_last=top_k < experts)  # some experts idle
    expected = gemv.moe_reference(x, ids, weights, gate_up, down, np.zeros_like(x))
    scratch = gemm.PrefillScratch(64, top_k, hidden, intermediate)
    out = gemm.moe_prefill(x, ids, weights, gate_up, down, np.full_like(x, np.nan), scratch)
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_paired_block_dot_is_bit_identical_to_two_single_ones():
    """The prefill kernel decodes each int4 column once for two tokens; every row still sums its
    columns in the one-token kernel's order, so the results are the same bits."""
    from numba import njit

    from offload.kernels.gemv import _block_dot, _block_dot_pair

    @njit
    def single_and_paired(packed, scales, x, sums, single, paired):
        one = np.float32(1.0)
        _block_dot(packed, scales, x[0], sums[0], one, single[0])
        _block_dot(packed, scales, x[1], sums[1], one, single[1])
        _block_dot_pair(packed, scales, x[0], x[1], sums[0], sums[1], one, one, paired[0], paired[1])

    rng = np.random.default_rng(9)
    q = int4.quantize(random_experts(rng, 1, 32, 512))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    sums = x.reshape(2, -1, int4.GROUP).sum(axis=-1)
    single, paired = np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32)
    single_and_paired(q.packed[0, 0], q.scales[0, 0], x, sums, single, paired)
    assert np.abs(single).min() > 0 and np.array_equal(single, paired)


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(5)
    gate_up, down = make_experts(rng, 6, 64, 64)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ids, weights = routing(rng, 3, 6, 4)
    scratch = gemv.DecodeScratch(3, 4, 64, 64)
    results = []
    for count in (1, 2):
        with kernel_threads(count) as used:
            assert used == count
            results.append(gemv.moe_decode(x, ids, weights, gate_up, down, np.zeros_like(x), scratch).copy())
    assert np.array_equal(results[0], results[1])


def test_a_thread_count_is_restored_and_entered_once():
    before = numba.get_num_threads()
    guard = kernel_threads(1)
    with guard:
        assert numba.get_num_threads() == 1
        with pytest.raises(RuntimeError, match="entered once"):
            guard.__enter__()
    assert numba.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        with kernel_threads(1):
            1 / 0
    assert numba.get_num_threads() == before


def test_nested_thread_counts_restore_each_other():
    """An inner `kernel_threads` of the outer's count asks Numba nothing; of another count it sets and
    restores it; a thread of its own is not taken for held by another thread's."""
    before = numba.get_num_threads()
    assert current_threads() == before
    with kernel_threads(1):
        with kernel_threads(1):
            assert numba.get_num_threads() == current_threads() == 1
        assert numba.get_num_threads() == 1
        if numba.config.NUMBA_NUM_THREADS > 1:
            with kernel_threads(2):
                assert numba.get_num_threads() == current_threads() == 2
                with kernel_threads(2):
                    assert numba.get_num_threads() == 2
                assert numba.get_num_threads() == 2
            assert numba.get_num_threads() == 1
        seen = []

        def worker():
            with kernel_threads(1):
                seen.append(numba.get_num_threads())

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen == [1]
    assert numba.get_num_threads() == current_threads() == before


def test_bad_kernel_inputs_are_explained():
    rng = np.random.default_rng(6)
    gate_up, down = make_experts(rng, 4, 64, 32)
    x = np.zeros((1, 64), np.float32)
    scratch = gemv.DecodeScratch(1, 2, 64, 32)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        gemv.moe_decode(x, np.array([[0, 4]]), np.ones((1, 2), np.float32), gate_up, down, x.copy(), scratch)
    with pytest.raises(ValueError, match="scratch is for 1 tokens x 2 experts, got 2 x 2"):
        gemv.moe_decode(np.zeros((2, 64), np.float32), np.zeros((2, 2), int), np.ones((2, 2), np.float32),
                        gate_up, down, np.zeros((2, 64), np.float32), scratch)
    with pytest.raises(ValueError, match=r"x must be C-contiguous float32 \[T, 64\]"):
        gemv.moe_decode(x.astype(np.float64), np.zeros((1, 2), int), np.ones((1, 2), np.float32),
                        gate_up, down, x.copy(), scratch)


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("fmt", [int4, int6, int8])
def test_dense_linear_matches_reference(tokens, fmt, monkeypatch):
    from offload.kernels import linear

    monkeypatch.setattr(linear, "TILE_WEIGHTS", 64 * 160)  # prefill: tiles of 64 rows, the last one short
    rng = np.random.default_rng(tokens)
    weight = fmt.quantize(random_experts(rng, 1, 96, 160, 0.1))
    x = rng.standard_normal((tokens, 160)).astype(np.float32)
    expected = linear.linear_reference(x, weight, np.zeros((tokens, 96), np.float32))
    out = linear.linear(x, weight, np.full((tokens, 96), np.nan, np.float32), np.zeros((64, 5), np.float32))
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("key_heads, value_heads, key_dim, value_dim, taps",
                         [(2, 4, 16, 8, 4), (3, 3, 8, 16, 4), (1, 2, 32, 32, 2)])
def test_deltanet_step_matches_reference(key_heads, value_heads, key_dim, value_dim, taps):
    rng = np.random.default_rng(key_heads * 100 + value_dim)
    per_key_head = value_heads // key_heads
    channels = 2 * key_heads * key_dim + value_heads * value_dim

    def f32(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = (f32(channels, taps), f32(value_heads), f32(value_heads), f32(value_dim), np.float32(1e-6))
    runs = []
    for step in (deltanet.deltanet_step, deltanet.deltanet_step_reference):
        conv_state, state = f32(channels, taps - 1), f32(value_heads, key_dim, value_dim, scale=0.3)
        conv_state[:], state[:] = np.random.default_rng(0).standard_normal(conv_state.shape), 0.1
        inputs = np.random.default_rng(1)
        outs = []
        for _ in range(3):  # steps continue from the updated states
            qkvz = inputs.standard_normal((key_heads, 2 * key_dim + 2 * per_key_head * value_dim)).astype(np.float32)
            ba = (inputs.standard_normal((key_heads, 2 * per_key_head)) * 3).astype(np.float32)
            out = np.zeros((value_heads, value_dim), np.float32)
            step(qkvz, ba, conv_state, *weights, state, np.empty(channels, np.float32), out)
            outs.append(out)
        runs.append((np.stack(outs), conv_state, state))
    for got, expected in zip(*runs):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(runs[0][0]).max() > 0.1


def test_int8_round_trip_layout_and_chunks(monkeypatch):
    rng = np.random.default_rng(8)
    w = random_experts(rng, 2, 96, 64, 0.05)
    w[0, 5, 32:64] = 0  # an all-zero group
    monkeypatch.setattr(int8, "CHUNK_WEIGHTS", 32 * 64)  # several chunks per matrix
    q = int8.quantize(w)
    assert q.packed.shape == (2, 3, 64 * 32) and q.bits_per_weight == 8.5
    back = int8.dequantize(q)
    error = np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean())
    assert error < 0.007  # rounding alone: (max|w| / 127) / sqrt(12) ~ 0.5% of a gaussian RMS
    assert np.all(back[0, 5, 32:64] == 0)
    # the layout: row 32b + r of column c is byte 32c + r of block b
    codes = q.packed.astype(np.float32)
    scale = int4._bf16_to_float(q.scales[1, 2, 32 * 1 + 7])  # block 2, group 1, row 7
    assert back[1, 64 + 7, 40] == codes[1, 2, 32 * 40 + 7] * scale
    # bf16 input gives the same codes as its float32 value
    bits = int4._float_to_bf16(w)
    assert np.array_equal(int8.quantize(bits).packed, int8.quantize(int4._bf16_to_float(bits)).packed)
    with pytest.raises(ValueError, match="multiple of 32"):
        int8.quantize(np.zeros((40, 64), np.float32))
    # the Numba quantiser against the NumPy reference: the same codes, scales within a bf16 ulp
    # (float32 sums in a different order)
    reference = int8.quantize_reference(w)
    assert np.array_equal(q.packed, reference.packed)
    assert np.abs(q.scales.astype(np.int32) - reference.scales.astype(np.int32)).max() <= 1


def test_int6_round_trip_layout_and_reference():
    rng = np.random.default_rng(6)
    w = random_experts(rng, 2, 64, 96)
    w[0, 5, 32:64] = 0  # an all-zero group
    w[1, 9] *= 100  # a row of large values
    q = int6.quantize(w)
    assert q.packed.shape == (2, 2, 24, 96) and q.nbytes * 8 / w.size == pytest.approx(6.5)
    back = int6.dequantize(q)
    assert np.array_equal(back, int6.quantize_reference(w))  # same candidates, scales and ties
    assert np.all(back[0, 5, 32:64] == 0)
    error = np.sqrt(((back - w) ** 2).sum() / (w ** 2).sum())
    int4_error = np.sqrt(((int4.dequantize(int4.quantize(w)) - w) ** 2).sum() / (w ** 2).sum())
    assert error < int4_error / 3  # two more bits: ~4x less error
    codes = int6.unpack_codes(q)
    assert codes.min() == -32 and codes.max() <= 31
    # the documented layout: quad k, column j, row r < 16: nibble in byte 16j + r, the high bits
    # in byte 64 + 16 (j % 2) + r, field j // 2 (rows 16-31: fields 2 + j // 2)
    b, k, j, r = 1, 7, 3, 4
    quad = q.packed[1, b, k].astype(np.int32)
    for row, nibble, field in ((r, quad[16 * j + r] & 15, j // 2), (16 + r, quad[16 * j + r] >> 4, 2 + j // 2)):
        high = (quad[64 + 16 * (j % 2) + r] >> (2 * field)) & 3
        assert nibble | (high << 4) == codes[1, 32 * b + row, 4 * k + j] + 32
    with pytest.raises(ValueError, match="multiple of 32"):
        int6.quantize(np.zeros((40, 64), np.float32))


def test_bandwidth_probe_reads_every_value():
    from offload.kernels.membw import SUM_BLOCK, _sum_blocks

    values = np.random.default_rng(10).random(8 * SUM_BLOCK, dtype=np.float32)
    assert np.isclose(_sum_blocks(values), values.sum(dtype=np.float64), rtol=1e-4)


def test_reading_a_block_layout_reads_every_byte():
    from offload.kernels.membw import read_blocks, read_experts

    def words(*arrays) -> int:
        return int(sum(array.view(np.uint32).sum(dtype=np.uint64) for array in arrays) % 2**32)

    rng = np.random.default_rng(11)
    weights = int4.quantize(rng.standard_normal((96, 256), dtype=np.float32))
    assert read_blocks(weights.packed, weights.scales) == words(weights.packed, weights.scales)
    gate_up = int4.quantize(rng.standard_normal((6, 64, 96), dtype=np.float32))
    down = int4.quantize(rng.standard_normal((6, 96, 32), dtype=np.float32))
    ids = np.array([4, 1, 5], np.int64)
    assert read_experts(ids, gate_up.packed, gate_up.scales, down.packed, down.scales) == words(
        gate_up.packed[ids], gate_up.scales[ids], down.packed[ids], down.scales[ids])
