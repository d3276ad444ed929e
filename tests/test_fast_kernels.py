"""The fast kernels (int8 activations, integer dot products): every instruction path this CPU has
against the NumPy reference of the same arithmetic, the paths against each other, the choice of
path, and the accuracy they cost on real weights and activations."""

from __future__ import annotations

import numpy as np
import pytest

from offload.kernels import int4, isa, q8
from conftest import load_bench
from test_kernels import make_experts, routing

PATHS = isa.available()


def test_activation_quantisation_matches_reference_exactly():
    rng = np.random.default_rng(30)
    x = rng.standard_normal((3, 128)).astype(np.float32) * 4
    x[0, :32] = 0  # an all-zero group
    x[1, 32:64] *= 1000  # a group of large values
    x[2, 70] = -50  # an outlier: it sets its group's scale and lands on -127
    q, scales, sums = np.empty((3, 128), np.int8), np.empty((3, 4), np.float32), np.empty((3, 4), np.int32)
    q8.quantize_activations(x, q, scales, sums)
    expected_q, expected_scales, expected_sums = q8.quantize_activations_reference(x)
    assert np.array_equal(q, expected_q) and np.array_equal(scales, expected_scales)
    assert np.array_equal(sums, expected_sums)
    assert np.all(q[0, :32] == 0) and scales[0, 0] == 0 and q[2, 70] == -127
    restored = (q.reshape(3, 4, 32) * scales[..., None]).reshape(x.shape)
    assert np.abs(restored - x).max() <= scales.max() / 2 * 1.0001  # within half a step


@pytest.mark.parametrize("experts, top_k, tokens", [(5, 1, 1), (9, 3, 4), (13, 4, 37), (12, 2, 64)])
def test_every_path_matches_the_reference_and_each_other(experts, top_k, tokens):
    rng = np.random.default_rng(experts * tokens)
    hidden, intermediate = 128, 96
    gate_up, down = make_experts(rng, experts, hidden, intermediate)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, top_k, skip_last=top_k < experts)  # some experts idle
    expected = q8.moe_reference_fast(x, ids, weights, gate_up, down)
    scratch = q8.FastScratch(64, top_k, hidden, intermediate)
    decoded, prefilled = {}, {}
    for path in PATHS:
        kernel = q8.moe_decode_fast if tokens <= 8 else q8.moe_prefill_fast  # as the executor chooses
        decoded[path] = q8.moe_decode_fast(x[:8], ids[:8], weights[:8], gate_up, down,
                                           np.full_like(x[:8], np.nan), scratch, path).copy()
        prefilled[path] = kernel(x, ids, weights, gate_up, down, np.full_like(x, np.nan), scratch, path).copy()
        # integer sums are exact; only a hidden value rounding to the other int8 step moves a result
        assert np.abs(prefilled[path] - expected).max() <= 1e-3 * np.abs(expected).max()
        assert np.abs(decoded[path] - expected[:8]).max() <= 1e-3 * np.abs(expected).max()
    for path in PATHS:  # the same float code after exact integer sums: the same bits on every path
        assert np.array_equal(decoded[path], decoded[PATHS[0]])
        assert np.array_equal(prefilled[path], prefilled[PATHS[0]])


@pytest.mark.parametrize("top_k, tokens", [(3, 1), (2, 4), (4, 8)])
def test_a_shared_expert_runs_as_one_more_pick(top_k, tokens):
    """A shared expert run beside the routed ones is each token's expert top_k with its gate as
    weight: the same bits as the kernel given it as one more routed expert, on every path."""
    rng = np.random.default_rng(40 + tokens)
    experts, hidden, intermediate = 6, 128, 64
    gate_up, down = make_experts(rng, experts + 1, hidden, intermediate)  # the last one is the shared expert
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, top_k)
    gates = rng.uniform(0.1, 0.9, tokens).astype(np.float32)
    routed = int4.Int4Weights(gate_up.packed[:experts], gate_up.scales[:experts], (experts, 2 * intermediate, hidden))
    routed_down = int4.Int4Weights(down.packed[:experts], down.scales[:experts], (experts, hidden, intermediate))
    shared = q8.SharedExpert(int4.Int4Weights(gate_up.packed[experts:], gate_up.scales[experts:],
                                              (1, 2 * intermediate, hidden)),
                             int4.Int4Weights(down.packed[experts:], down.scales[experts:], (1, hidden, intermediate)),
                             gates)
    more_ids = np.concatenate([ids, np.full((tokens, 1), experts)], axis=1)
    more_weights = np.concatenate([weights, gates[:, None]], axis=1)
    expected = q8.moe_reference_fast(x, more_ids, more_weights, gate_up, down)
    for path in PATHS:
        as_routed = q8.moe_decode_fast(x, more_ids, more_weights, gate_up, down, np.full_like(x, np.nan),
                                       q8.FastScratch(8, top_k + 1, hidden, intermediate), path)
        beside = q8.moe_decode_fast(x, ids, weights, routed, routed_down, np.full_like(x, np.nan),
                                    q8.FastScratch(8, top_k, hidden, intermediate, shared=True), path, shared)
        assert np.array_equal(beside, as_routed)
        assert np.abs(beside - expected).max() <= 1e-3 * np.abs(expected).max()
    with pytest.raises(ValueError, match="shared"):  # a scratch without its room
        q8.moe_decode_fast(x, ids, weights, routed, routed_down, np.empty_like(x),
                           q8.FastScratch(8, top_k, hidden, intermediate), shared=shared)
    two = q8.SharedExpert(routed, routed_down, gates)  # more than one expert: not a shared one
    with pytest.raises(ValueError, match="shared expert must be"):
        q8.moe_decode_fast(x, ids, weights, routed, routed_down, np.empty_like(x),
                           q8.FastScratch(8, top_k, hidden, intermediate, shared=True), shared=two)


def test_the_decode_tasks_share_out_evenly():
    assert q8._parts(10, 16, 2) == 1  # ten routed experts on two threads: five each
    assert q8._parts(11, 16, 2) == 2  # and a shared one: halves, eleven each, not six and five
    assert q8._parts(1, 16, 2) == 4  # one expert: two tasks a thread
    assert q8._parts(11, 1, 2) == 1  # one block: no halves to cut


def test_fast_is_close_to_exact():
    from offload.kernels import gemv

    rng = np.random.default_rng(31)
    gate_up, down = make_experts(rng, 8, 256, 128)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    ids, weights = routing(rng, 4, 8, 3)
    exact = gemv.moe_reference(x, ids, weights, gate_up, down, np.zeros_like(x))
    fast = q8.moe_decode_fast(x, ids, weights, gate_up, down, np.empty_like(x), q8.FastScratch(4, 3, 256, 128))
    relative = np.sqrt(((fast - exact) ** 2).sum() / (exact ** 2).sum())
    assert 1e-4 < relative < 0.02  # int8 activations: ~1% on Gaussian data, and not nothing


def test_paths_are_chosen_from_cpu_features():
    zen4 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
    assert isa.supported(zen4) == [isa.VNNI512, isa.AVXVNNI, isa.AVX2, isa.PORTABLE]
    assert isa.supported({"avx2", "avxvnni"}) == [isa.AVXVNNI, isa.AVX2, isa.PORTABLE]  # Alder Lake
    assert isa.supported({"avx2", "fma"}) == [isa.AVX2, isa.PORTABLE]  # Zen 3
    assert isa.supported({"avx512f", "avx512vnni"}) == [isa.PORTABLE]  # neither BW nor VL, nor AVX2
    assert isa.supported(set()) == [isa.PORTABLE]
    assert isa.available() == isa.supported(set(isa.host_features()))


def test_the_path_can_be_forced_and_a_wrong_one_is_refused(monkeypatch):
    assert isa.best() == PATHS[0]
    monkeypatch.setenv("OFFLOAD_ISA", "portable")
    assert isa.best() == isa.PORTABLE
    monkeypatch.setenv("OFFLOAD_ISA", "sse9")
    with pytest.raises(ValueError, match="not a path this CPU runs"):
        isa.best()
    missing = [p for p in (isa.VNNI512, isa.AVXVNNI, isa.AVX2) if p not in PATHS]
    if missing:
        monkeypatch.setenv("OFFLOAD_ISA", isa.NAMES[missing[0]])
        with pytest.raises(ValueError, match="not a path this CPU runs"):
            isa.best()


def test_int8_activations_cost_almost_nothing_on_real_weights_and_activations():
    """all-MiniLM-L6-v2's FFN matrices on the activations real sentences produce: the int8
    activations' extra error over fp32 activations (both with int4 weights) is within 10%."""
    exact, fast = load_bench("kernel_rates").activation_quality()
    assert 0.03 < exact < 0.1  # int4 weights really are in use
    assert fast <= 1.10 * exact


@pytest.mark.parametrize("fmt_name", ["int4", "int6", "int8"])
@pytest.mark.parametrize("tokens", [1, 3, 70])  # 70: a second tile of tokens, odd
def test_dense_linear_every_path_matches_the_reference(fmt_name, tokens):
    from offload.kernels import int4, int6, int8

    fmt = {"int4": int4, "int6": int6, "int8": int8}[fmt_name]
    rng = np.random.default_rng(tokens)
    weight = fmt.quantize((rng.standard_normal((96, 160)) * 0.05).astype(np.float32))
    x = rng.standard_normal((tokens, 160)).astype(np.float32)
    x[0, :32] = 0  # a zero group
    expected = q8.linear_reference_fast(x, weight)
    activations = q8.Activations(128, 160)
    results = {path: q8.linear_fast(x, weight, np.full((tokens, 96), np.nan, np.float32), activations, path).copy()
               for path in PATHS}
    for path, result in results.items():
        assert np.abs(result - expected).max() <= 1e-5 * np.abs(expected).max(), isa.NAMES[path]
        assert np.array_equal(result, results[PATHS[0]])
    exact = x @ fmt.dequantize(weight)[0].T
    assert np.sqrt(((results[PATHS[0]] - exact) ** 2).sum() / (exact ** 2).sum()) < 0.02


@pytest.mark.parametrize("fmt_name", ["int4", "int6"])
def test_the_largest_codes_against_the_largest_activations_do_not_overflow(fmt_name):
    """Every code at its maximum (15, 63) against activations of +-127 over several groups: the
    partial sums some paths keep in 16 bits (AVX2) reach their largest values, which random
    weights almost never do; a path that widened them too late would wrap."""
    from offload.kernels import int4, int6

    fmt = {"int4": int4, "int6": int6}[fmt_name]
    out_features, in_features = 64, 128
    packed_shape = ((1, out_features // 32, in_features * 16) if fmt is int4
                    else (1, out_features // 32, in_features // 4, int6.QUAD_BYTES))
    scales = np.full((1, out_features // 32, in_features), 0x3F80, np.uint16)  # bf16 1.0
    weight = (fmt.Int4Weights if fmt is int4 else fmt.Int6Weights)(
        np.full(packed_shape, 0xFF, np.uint8), scales, (1, out_features, in_features))
    signs = np.array([1, -1, 1, -1, -1, 1, 1], np.float32)[:, None]
    x = np.ones((7, in_features), np.float32) * signs  # quantised to exactly +-127
    x[1, ::3] *= -1  # and one token of mixed signs
    activations = q8.Activations(8, in_features)
    for tokens in (1, 2, 3, 4, 7):  # single, pair, pair + single, quad, quad + pair + single
        expected = q8.linear_reference_fast(x[:tokens], weight)
        for path in PATHS:
            result = q8.linear_fast(x[:tokens], weight, np.full((tokens, out_features), np.nan, np.float32),
                                    activations, path)
            assert np.array_equal(result, expected), (isa.NAMES[path], tokens)


@pytest.mark.parametrize("fmt", ["int4", "int6", "int8"])
@pytest.mark.parametrize("exact", [False, True])
def test_layers_reading_one_input_run_as_one_call_over_their_joined_rows(fmt, exact):
    """`QuantizedLinear.joined`: the same rows as the pieces (whose weights become views of the
    joined arrays: no memory added); `JoinedMLP` (gate and up in one call, silu in NumPy) is the
    model's MLP over the same layers."""
    import torch

    from offload.dense import JoinedMLP, QuantizedLinear
    from offload.models.moe import MLP

    torch.manual_seed(33)
    mlp = MLP(128, 96)
    x = torch.randn(3, 128)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, QuantizedLinear(getattr(mlp, name), fmt, 2, exact=exact))
        apart = (mlp.gate_proj(x), mlp.up_proj(x))
        expected = mlp(x)
        joined = JoinedMLP.of(mlp)
        assert joined is not None and joined.gate_up.out_features == 192
        gate_up = torch.from_numpy(joined.gate_up.rows(x.numpy()))
        assert torch.equal(gate_up, torch.cat(apart, dim=1))
        assert np.shares_memory(mlp.gate_proj.weight.packed, joined.gate_up.weight.packed)
        assert torch.equal(mlp.gate_proj(x), apart[0]) and torch.equal(mlp.up_proj(x), apart[1])  # views read right
        # silu in NumPy and torch may differ by an ulp, which can move one int8 activation of down's
        # input across a rounding step in the fast kernels: a real mix-up of rows is O(1)
        tolerance = 1e-5 if exact else 1e-2
        assert (joined(x) - expected).abs().max().item() <= tolerance * expected.abs().max().item() + 1e-6
    bias = torch.nn.Linear(128, 32, bias=True)
    assert QuantizedLinear.joined([mlp.gate_proj, QuantizedLinear(bias, fmt, 2, exact=exact)]) is None


def test_quantized_linear_is_fast_by_default_and_exact_on_request():
    import torch

    from offload.kernels import int4
    from offload.dense import QuantizedLinear

    torch.manual_seed(32)
    source = torch.nn.Linear(128, 64, bias=True)
    x = torch.randn(5, 128)
    fast, exact = QuantizedLinear(source, "int4", 2), QuantizedLinear(source, "int4", 2, exact=True)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, torch.from_numpy(int4.dequantize(exact.weight)[0]), source.bias)
    assert torch.allclose(exact(x), reference, atol=1e-5)
    moved = ((fast(x) - reference).norm() / reference.norm()).item()
    assert 1e-5 < moved < 0.02  # int8 activations


def test_a_deltanet_step_runs_its_input_projections_as_one_call():
    """`FusedDeltaNet` joins in_proj_qkvz and in_proj_ba when both are quantised alike: the same
    decode step, bit for bit, as with the two calls apart."""
    import torch

    fused, caches = quantised_deltanet(seed=34)
    assert fused.in_proj is not None and fused.in_proj.out_features == 1280 + 32
    in_proj = fused.in_proj
    for step in range(3):
        x = torch.randn(1, 256)
        joined = fused(x, caches[0])
        object.__setattr__(fused, "in_proj", None)  # the two calls apart
        apart = fused(x, caches[1])
        object.__setattr__(fused, "in_proj", in_proj)
        assert torch.equal(joined, apart) and torch.equal(caches[0].recurrent_state, caches[1].recurrent_state)


def test_a_short_deltanet_call_is_its_tokens_stepped_one_by_one():
    """A call of a few tokens (a short prompt) runs the fused step token after token, its
    projections computed for all of them at once: what the same tokens give one call each."""
    import torch

    from offload.config import DELTANET_STEP_MAX_TOKENS

    fused, caches = quantised_deltanet(seed=35)
    x = torch.randn(DELTANET_STEP_MAX_TOKENS, 256)
    together = fused(x, caches[0])
    one_by_one = torch.cat([fused(x[t:t + 1], caches[1]) for t in range(x.shape[0])])
    assert (together - one_by_one).abs().max().item() <= 1e-6 * one_by_one.abs().max().item()
    assert torch.allclose(caches[0].recurrent_state, caches[1].recurrent_state, rtol=0, atol=1e-7)
    assert torch.equal(caches[0].conv_state, caches[1].conv_state)


def quantised_deltanet(seed: int):
    """A small Gated DeltaNet (16 value heads: in_proj_ba has 32 rows, so it quantises) with int4
    projections, as `FusedDeltaNet`, and two fresh caches for it."""
    import torch

    from offload.config import args_from_dict
    from offload.deltanet import FusedDeltaNet
    from offload.dense import QuantizedLinear
    from offload.models.cache import LinearAttentionCache
    from offload.models.qwen3_next import GatedDeltaNet
    from offload.synthetic import preset_config

    config = preset_config("qwen3-next-80b-a3b", layers=1, experts=4)
    config.update(hidden_size=256, linear_num_key_heads=4, linear_key_head_dim=32, linear_num_value_heads=16,
                  linear_value_head_dim=32)
    args = args_from_dict(config)
    torch.manual_seed(seed)
    mixer = GatedDeltaNet(args).float()
    with torch.no_grad():
        for name in ("in_proj_qkvz", "in_proj_ba", "out_proj"):
            setattr(mixer, name, QuantizedLinear(getattr(mixer, name), "int4", 2))
    fused = FusedDeltaNet(mixer)
    caches = [LinearAttentionCache(mixer.conv_dim, args.linear_conv_kernel_dim, 16, 32, 32, torch.float32)
              for _ in range(2)]
    return fused, caches
