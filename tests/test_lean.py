"""The lean decode step (`offload.lean`): its kernels against torch, and a lean engine against the
model's own modules on the same quantised weights."""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import offload
from offload.config import Yarn
from offload.kernels.step import (add_moe_output, add_rms_norm, attention_inputs, rms_norm, rotary_tables,
                                  router_logits, silu_mul, top_k_softmax)
from offload.host import stored_array
from offload.lean import LeanAttention, LeanDecoder, LeanMoeBlock, LeanNorm, lean_off
from offload.models.attention import RotaryEmbedding, apply_rope
from offload.models.cache import KVCache
from offload.models import qwen3_moe, qwen3_next
from offload.models.moe import Router

EPS32 = float(np.finfo(np.float32).eps)
STAND_IN = dict(gpu_mem="8G", profile="rtx4060-ddr5", device="cpu")  # a GPU plan, the CPU standing in


@pytest.mark.parametrize("norm_class", [qwen3_next.RMSNorm, qwen3_moe.RMSNorm])
@pytest.mark.parametrize("tokens, width", [(1, 2048), (5, 96)])
def test_a_lean_norm_is_the_models_norm(norm_class, tokens, width):
    """Either norm form (zero-centred 1 + w, or w): the same values up to the order of one sum of
    `width` squares (relative rounding <= width * eps, far below a wrong scale's error)."""
    generator = torch.Generator().manual_seed(width)
    norm = norm_class(width, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=generator) * 0.5)
    x = torch.randn(tokens, width, generator=generator) * 3
    lean = LeanNorm(norm)
    torch.testing.assert_close(lean(x), norm(x), rtol=width * EPS32, atol=1e-6)
    bf16 = x.to(torch.bfloat16)  # not the lean path's input: the model's norm serves it
    assert torch.equal(lean(bf16), norm(bf16))


def test_the_residual_add_then_norm_is_the_two_apart():
    """x += delta as torch adds it (bit for bit), and the norm of the sum as the model's norm."""
    width = 2048
    generator = torch.Generator().manual_seed(1)
    norm = qwen3_next.RMSNorm(width, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=generator) * 0.5)
    x, delta = (torch.randn(3, width, generator=generator) * 4 for _ in range(2))
    residual, out = x.numpy().copy(), np.empty((3, width), np.float32)
    add_rms_norm(residual, delta.numpy(), norm.scale().detach().numpy(), np.float32(norm.eps), out)
    assert np.array_equal(residual, (x + delta).numpy())
    torch.testing.assert_close(torch.from_numpy(out), norm(x + delta), rtol=width * EPS32, atol=1e-6)


def test_silu_times_up_is_torchs_silu_times_up():
    """Within a few ulps of F.silu(gate) * up, at both ends of the exponential: -0 where e^-g
    overflows (g < -88), g itself for large g."""
    generator = torch.Generator().manual_seed(2)
    gate = torch.cat([torch.randn(2, 500, generator=generator) * 6, torch.tensor([[-1e4, -89.0, -87.0, 0.0, 90.0, 1e4]] * 2)],
                     dim=1)
    up = torch.randn(gate.shape, generator=generator)
    hidden = np.empty(gate.shape, np.float32)
    silu_mul(torch.cat([gate, up], dim=1).numpy(), hidden)
    torch.testing.assert_close(torch.from_numpy(hidden), F.silu(gate) * up, rtol=4 * EPS32, atol=1e-30)


@pytest.mark.parametrize("yarn", [None, Yarn(4.0, 4096, 1.2)])
def test_rotary_tables_are_the_models(yarn):
    """The same float32 angles as RotaryEmbedding (position * inverse frequency), so cos and sin
    agree to the last ulps of the two libraries' cos and sin, deep into a long context too."""
    rotary = RotaryEmbedding(64, 1e7, yarn)
    for start, tokens in [(0, 3), (200_000, 5)]:
        expected = rotary(torch.arange(start, start + tokens), torch.float32)
        cos, sin = (np.empty((tokens, 64), np.float32) for _ in range(2))
        rotary_tables(rotary.inv_freq.numpy(), rotary.scale, start, cos, sin)
        for ours, theirs in zip((cos, sin), expected):
            torch.testing.assert_close(torch.from_numpy(ours), theirs, rtol=0, atol=4 * EPS32)


@pytest.mark.parametrize("shared", [True, False])
def test_a_moe_blocks_sum_into_the_residual_is_torchs(shared):
    """x + (routed + gate * shared), in torch's order of operations: bit for bit."""
    generator = torch.Generator().manual_seed(3)
    x, routed, shared_out = (torch.randn(4, 96, generator=generator) for _ in range(3))
    gate = torch.rand(4, generator=generator)
    residual = x.numpy().copy()
    add_moe_output(residual, routed.numpy(), shared_out.numpy() if shared else np.empty((0, 96), np.float32),
                   gate.numpy())
    expected = x + (routed + gate[:, None] * shared_out) if shared else x + routed
    assert np.array_equal(residual, expected.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts, top_k, normalise, tokens", [(128, 10, True, 1), (12, 3, False, 8), (64, 1, True, 3)])
def test_routing_picks_what_torch_picks(experts, top_k, normalise, tokens, dtype):
    """Router logits, softmax, top-k (in torch.topk's order), renormalisation and the shared
    expert's sigmoid gate from one parallel and one serial call. Random logits are separated far
    beyond the sum-order rounding (width * eps of |w| |h|), so the same experts must be picked. A
    bf16 router (as a bf16 checkpoint's is kept) is read as its bit patterns and widened exactly."""
    width = 256
    generator = torch.Generator().manual_seed(experts)
    router = Router(width, experts, top_k, normalise).to(dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, width, generator=generator) * 0.1)
    shared_gate = torch.randn(1, width, generator=generator) * 0.1
    h = torch.randn(tokens, width, generator=generator)
    expected_weights, expected_ids = router(h)  # the model's router widens a bf16 one to h's fp32
    logits = np.empty((tokens, experts + 1), np.float32)
    router_logits(h.numpy(), stored_array(router.weight), shared_gate.numpy(), logits)
    widened = router.weight.float()
    bound = width * EPS32 * (widened.abs() @ h.abs().T).max().item()
    np.testing.assert_allclose(logits[:, :experts], F.linear(h, widened).detach().numpy(), rtol=0, atol=bound)
    weights = np.empty((tokens, top_k), np.float32)
    ids = np.empty((tokens, top_k), np.int64)
    gate = np.empty(tokens, np.float32)
    top_k_softmax(logits, experts, normalise, weights, ids, gate)
    assert np.array_equal(ids, expected_ids.numpy())
    np.testing.assert_allclose(weights, expected_weights.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gate, torch.sigmoid(F.linear(h, shared_gate))[:, 0].numpy(), rtol=1e-5, atol=1e-7)


def test_routing_of_a_broken_activation_still_names_real_experts():
    """NaN logits (an overflowed activation) must not index outside the experts: the kernels
    behind have no bounds checks."""
    logits = np.full((2, 8), np.nan, np.float32)
    logits[1, :4] = [1.0, np.nan, 3.0, 2.0]
    weights, ids = np.empty((2, 3), np.float32), np.empty((2, 3), np.int64)
    top_k_softmax(logits, 8, True, weights, ids, np.empty(2, np.float32))
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(row)) == 3 for row in ids.tolist())


@pytest.mark.parametrize("gated, rotary_dim", [(True, 16), (False, 64)])
def test_attention_inputs_are_the_models_norms_rotary_and_gate(gated, rotary_dim):
    """Per-head RMSNorm, rotary on the first channels (half-split pairs) and the gate's sigmoid in
    one call, against the model's torch pieces (rounding: a sum of Dh squares, a few products)."""
    heads, kv_heads, width, tokens = 4, 2, 64, 3
    generator = torch.Generator().manual_seed(rotary_dim)
    q_norm, k_norm = qwen3_next.RMSNorm(width, 1e-6), qwen3_next.RMSNorm(width, 1e-6)
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(torch.randn(width, generator=generator) * 0.3)
    q_width = heads * width * (2 if gated else 1)
    rows = torch.randn(tokens, q_width + 2 * kv_heads * width, generator=generator) * 2
    cos, sin = RotaryEmbedding(rotary_dim, 10000.0)(torch.arange(40, 40 + tokens), torch.float32)
    query, keys, values = (np.empty((n, tokens, width), np.float32) for n in (heads, kv_heads, kv_heads))
    gate = np.empty((tokens, heads * width) if gated else (0, 0), np.float32)
    attention_inputs(rows.numpy(), gated, q_norm.scale().detach().numpy(), k_norm.scale().detach().numpy(),
                     np.float32(1e-6), cos.numpy(), sin.numpy(), query, keys, values, gate)
    q_rows = rows[:, :q_width].view(tokens, heads, -1)
    expected_query = apply_rope(q_norm(q_rows[..., :width]).transpose(0, 1), cos, sin)
    k_rows = rows[:, q_width:q_width + kv_heads * width].view(tokens, kv_heads, width)
    expected_keys = apply_rope(k_norm(k_rows).transpose(0, 1), cos, sin)
    tolerance = dict(rtol=width * EPS32, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(query), expected_query.detach(), **tolerance)
    torch.testing.assert_close(torch.from_numpy(keys), expected_keys.detach(), **tolerance)
    assert np.array_equal(values, rows[:, q_width + kv_heads * width:].view(tokens, kv_heads, width).transpose(0, 1))
    if gated:
        torch.testing.assert_close(torch.from_numpy(gate), torch.sigmoid(q_rows[..., width:]).reshape(tokens, -1),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["next", "moe-hub", "moe-window"])
def test_a_lean_attention_is_the_models_attention(hf_checkpoint, name):
    """Same caches (f32, after the same 30-token prompt), same input: the same output up to the
    rounding of the norms and rotary, which can move one of o_proj's int8 activation codes by
    one step (far below what a wrong norm, rotary or gate would do: order 1)."""
    engine = offload.load(hf_checkpoint(name).path, quant="int4")
    args, rotary = engine.args, engine.model.rotary
    attention_layers = [layer.self_attn for layer in engine.model.layers if hasattr(layer, "self_attn")]
    assert attention_layers and all(isinstance(module, LeanAttention) for module in attention_layers)
    generator = torch.Generator().manual_seed(3)
    for lean in attention_layers:
        caches = [KVCache(64, args.num_key_value_heads, args.head_dim, "f32") for _ in range(2)]
        prompt = torch.randn(30, args.hidden_size, generator=generator)
        cos, sin = rotary(torch.arange(30), torch.float32)
        for cache in caches:  # 30 tokens: the model's path for both
            lean(prompt, cos, sin, cache, 0)
        x = torch.randn(3, args.hidden_size, generator=generator)
        cos, sin = rotary(torch.arange(30, 33), torch.float32)
        expected = lean.attention(x, cos, sin, caches[0], 30)
        assert ((lean(x, cos, sin, caches[1], 30) - expected).norm() / expected.norm()).item() < 1e-3


@pytest.mark.parametrize("name", ["next", "next-hub", "moe-hub"])
def test_a_lean_engine_decodes_as_the_models_modules_do(hf_checkpoint, name):
    """The default CPU engine (int4 experts, quantised dense layers, fast kernels) decodes through
    the lean modules; on the same weights and kernels the model's own modules give the same
    tokens' logits up to rounding: far less than what the fast kernels' int8 activations move
    them against the exact ones (itself a small part of what int4 costs: test_int4_engine)."""
    checkpoint = hf_checkpoint(name)
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(5))
    lean = offload.load(checkpoint.path, quant="int4")
    moe_layers = sum(lean.args.is_moe_layer(i) for i in range(lean.args.num_hidden_layers))
    assert sum(isinstance(m, LeanMoeBlock) for m in lean.model.modules()) == moe_layers
    assert isinstance(lean.model.batch_stages, LeanDecoder)  # whole layers on NumPy arrays
    plain = offload.load(checkpoint.path, quant="int4")
    lean_off(plain.model)
    assert not isinstance(plain.model.batch_stages, LeanDecoder)
    exact = offload.load(checkpoint.path, quant="int4", exact=True)
    assert not any(isinstance(m, (LeanMoeBlock, LeanNorm, LeanAttention)) for m in exact.model.modules())

    def moved(a, b):
        return ((a - b).norm() / b.norm()).item()

    lean_moves, fast_moves = [], []
    for engine in (lean, plain, exact):
        engine.feed(ids[:30])
    for i in range(30, 40):  # decode steps: the lean path
        step = ids[i:i + 1]
        lean_logits, plain_logits, exact_logits = (engine.feed(step) for engine in (lean, plain, exact))
        lean_moves.append(moved(lean_logits, plain_logits))
        fast_moves.append(moved(plain_logits, exact_logits))
    assert max(lean_moves) < 0.25 * max(fast_moves)
    # a short prompt goes through the lean path as a whole
    lean.reset()
    plain.reset()
    assert moved(lean.feed(ids[:6]), plain.feed(ids[:6])) < 0.25 * max(fast_moves)


@pytest.mark.parametrize("name", ["next", "next-hub", "moe-hub"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_a_lean_moe_block_is_the_models_block(hf_checkpoint, name, tokens):
    """On the same input both run the same expert and shared-expert kernels on the same int8
    codes: only the router's sums round in another order (a relative 1e-7 on the weights), and,
    where the shared expert has the routed experts' size (next-hub) and runs in their kernel, the
    sum of its part."""
    engine = offload.load(hf_checkpoint(name).path, quant="int4")
    blocks = [m for m in engine.model.modules() if isinstance(m, LeanMoeBlock)]
    assert blocks and all((block.fused is not None) == (name == "next-hub") for block in blocks)
    h = torch.randn(tokens, engine.args.hidden_size, generator=torch.Generator().manual_seed(tokens))
    for lean in blocks:
        expected = lean.block(h)
        assert ((lean(h) - expected).norm() / expected.norm()).item() < 1e-5


def test_a_dropped_lean_engine_frees_its_model_at_once(hf_checkpoint):
    """The decoder installed on the model does not hold the model: no reference cycle keeps a
    dropped model's weights until a full garbage collection."""
    engine = offload.load(hf_checkpoint("next").path, quant="int4")
    assert isinstance(engine.model.batch_stages, LeanDecoder)
    model = weakref.ref(engine.model)
    gc.disable()
    try:
        del engine
        assert model() is None
    finally:
        gc.enable()


def test_plans_off_the_lean_path_keep_the_models_modules(hf_checkpoint):
    """A GPU plan (here on the CPU standing in) keeps the model's norms and MoE blocks."""
    checkpoint = hf_checkpoint("next")
    hybrid = offload.load(checkpoint.path, quant="int4", **STAND_IN)
    assert not any(isinstance(m, (LeanMoeBlock, LeanNorm, LeanAttention)) for m in hybrid.model.modules())


def test_a_bf16_checkpoints_routers_stay_bf16(hf_checkpoint, tmp_path):
    """A bf16 checkpoint on a CPU plan keeps its routers as stored (half the bytes a token reads;
    widening is exact), the plan counts them so, and the lean router on their bit patterns routes
    as the model's router widening them: the same logits as the model's own modules, up to rounding.
    Where no lean block reads them (the exact kernels, a worker thread) they are widened once."""
    copy.deepcopy(hf_checkpoint("next").model).to(torch.bfloat16).save_pretrained(tmp_path)
    lean = offload.load(tmp_path, quant="int4")
    routers = [m for m in lean.model.modules() if isinstance(m, Router)]
    assert routers and all(router.weight.dtype == torch.bfloat16 for router in routers)
    assert all(block.router.dtype == np.uint16 for block in lean.model.modules() if isinstance(block, LeanMoeBlock))
    planned = {p.group: p for p in lean.plan.placement}["routers"]
    assert (planned.format, planned.nbytes) == ("bf16", 2 * sum(router.weight.numel() for router in routers))
    assert {p["group"]: p for p in lean.placement}["routers"]["nbytes"] == planned.nbytes
    for options in (dict(exact=True), dict(overlap=True)):  # no lean block reads them: widened once
        other = offload.load(tmp_path, quant="int4", **options)
        assert all(m.weight.dtype == torch.float32 for m in other.model.modules() if isinstance(m, Router))
    plain = offload.load(tmp_path, quant="int4")
    lean_off(plain.model)
    ids = torch.randint(0, 160, (12,), generator=torch.Generator().manual_seed(6))
    for engine in (lean, plain):
        engine.feed(ids[:8])
    for i in range(8, 12):
        ours, theirs = (engine.feed(ids[i:i + 1]) for engine in (lean, plain))
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5  # fp32 sums' order: ~3e-7
