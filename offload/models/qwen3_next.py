"""Qwen3-Next (Qwen3-Next-80B-A3B).

A hybrid decoder: most layers mix tokens with Gated DeltaNet (a linear-attention recurrence with
a causal depthwise conv in front), every few layers with gated full attention (an output gate per
channel, RMSNorm on each query/key head, rotary on a fraction of the head). Every block's MLP is a
sparse MoE with one always-active shared expert. RMSNorms here are zero-centred: scale = 1 + w.

Shape legend: T = tokens, D = hidden, H / Hkv = query / key-value heads, Dh = head dim,
Hk / Hv = DeltaNet key / value heads (each key head serves Hv / Hk value heads),
Dk / Dv = DeltaNet key / value head dims, C = conv channels (2 Hk Dk + Hv Dv), K = conv kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from offload.config import FULL_ATTENTION, LINEAR_ATTENTION, ConfigError, ModelArgs, require
from offload.models.attention import apply_rope, cached_attention
from offload.models.cache import Cache, DevicePosition, KVCache, LinearAttentionCache
from offload.models.hub import checkpoint_shapes, sanitize  # noqa: F401  (the architecture's interface)
from offload.models import decoder
from offload.models.decoder import CausalLM, feed_forward

DELTA_CHUNK_SIZE = 64  # tokens per chunk of the chunked delta rule (prefill)
# Cumulative log decays within a chunk reach -100 and below, and e^x under -87 is a subnormal
# float, as are the products of small decay factors with small values: x86 multiplies subnormals
# 10-100x slower (a 512-token chunk of a DeltaNet layer took 3x as long). Decay factors below
# e^MIN_LOG_DECAY ~ 9e-27 are therefore exactly 0: far below what a sum of order-1 fp32 terms holds.
MIN_LOG_DECAY = -60.0


@dataclass(kw_only=True)
class Args(ModelArgs):
    """Qwen3-Next: Gated DeltaNet and gated full attention layers, routed + one shared expert."""

    layer_types: tuple[str, ...]
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    shared_expert_intermediate_size: int = 512
    partial_rotary_factor: float = 0.25
    SCHEMA: ClassVar[dict[str, tuple[str, float, float]]] = {
        "full_attention_interval": ("int", 1, 1024), "layer_types": ("names", 0, 0),
        "linear_conv_kernel_dim": ("int", 1, 64), "linear_key_head_dim": ("int", 1, 4096),
        "linear_value_head_dim": ("int", 1, 4096), "linear_num_key_heads": ("int", 1, 1024),
        "linear_num_value_heads": ("int", 1, 1024), "shared_expert_intermediate_size": ("int", 1, 1 << 20)}

    @classmethod
    def config_values(cls, config: dict[str, Any]) -> dict[str, Any]:
        """layer_types as given, or every `full_attention_interval`-th layer full attention."""
        if config.get("layer_types") is not None:
            return {"layer_types": tuple(config["layer_types"])}
        if "num_hidden_layers" not in config:
            raise ConfigError("config.json: missing required key num_hidden_layers for qwen3_next")
        interval = config.get("full_attention_interval")
        interval = 4 if interval is None else interval
        return {"layer_types": tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION
                                     for i in range(config["num_hidden_layers"]))}

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer]

    @property
    def conv_dim(self) -> int:
        """Channels of a DeltaNet layer's causal conv: q and k of every key head, v of every value head."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim \
            + self.linear_num_value_heads * self.linear_value_head_dim

    def state_bytes(self, dtype_bytes: int) -> int:
        """Each DeltaNet layer's conv tail (in the compute dtype) and fp32 recurrent state."""
        per_layer = self.conv_dim * (self.linear_conv_kernel_dim - 1) * dtype_bytes \
            + self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4
        return per_layer * (self.num_hidden_layers - self.attention_layers)

    def widest_activation(self) -> int:
        return max(super().widest_activation(), 2 * self.shared_expert_intermediate_size,
                   2 * (self.linear_num_key_heads * self.linear_key_head_dim
                        + self.linear_num_value_heads * self.linear_value_head_dim))

    def norm_is_zero_centred(self, name: str) -> bool:
        return not name.endswith("linear_attn.norm.weight")  # the gated norm keeps a plain scale

    def validate(self) -> None:
        super().validate()
        require(len(self.layer_types) == self.num_hidden_layers,
                 f"layer_types has {len(self.layer_types)} entries for "
                 f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION})
        require(not unknown, f"unknown layer_types {unknown}; expected "
                              f"'{FULL_ATTENTION}' or '{LINEAR_ATTENTION}'")
        require(self.linear_num_value_heads % self.linear_num_key_heads == 0,
                 f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                 f"linear_num_key_heads ({self.linear_num_key_heads})")


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) * (1 + weight), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def scale(self) -> torch.Tensor:
        """What the normalised row is multiplied by, fp32 [dim]."""
        return 1.0 + self.weight.float()


class RMSNormGated(nn.Module):
    """RMSNorm (plain scale) of the DeltaNet output, then times silu(gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


class GatedAttention(nn.Module):
    """Full attention whose output is gated per channel by sigmoid(gate); q_proj yields both."""

    output_gate = True  # q_proj's rows per head: [query, gate]
    sliding_window = None

    def __init__(self, args: Args):
        super().__init__()
        heads, kv_heads, head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, 2 * heads * head_dim, bias=bias)  # per head: query, gate
        self.k_proj = nn.Linear(args.hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, args.rms_norm_eps)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                start: int | DevicePosition) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        num_tokens = x.shape[0]
        query, gate = self.q_proj(x).view(num_tokens, -1, 2 * self.head_dim).chunk(2, dim=-1)
        query = self.q_norm(query).transpose(0, 1)  # [H, T, Dh]
        key = self.k_norm(self.k_proj(x).view(num_tokens, -1, self.head_dim)).transpose(0, 1)
        value = self.v_proj(x).view(num_tokens, -1, self.head_dim).transpose(0, 1)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        out = cached_attention(query, key, value, cache, start)  # [T, H * Dh]
        return self.o_proj(out * torch.sigmoid(gate.reshape(num_tokens, -1)))


class GatedDeltaNet(nn.Module):
    """Linear attention by the gated delta rule. Per value head, with state S [Dk, Dv]:
        S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
    where q, k are L2-normalised (q also scaled by Dk^-1/2), beta = sigmoid(b) and
    g = -exp(A_log) softplus(a + dt_bias) <= 0 is the log decay.
    """

    def __init__(self, args: Args):
        super().__init__()
        self.num_key_heads = args.linear_num_key_heads
        self.num_value_heads = args.linear_num_value_heads
        self.key_head_dim = args.linear_key_head_dim
        self.value_head_dim = args.linear_value_head_dim
        key_dim = self.num_key_heads * self.key_head_dim
        value_dim = self.num_value_heads * self.value_head_dim
        self.conv_dim = 2 * key_dim + value_dim
        # in_proj_qkvz rows are grouped by key head: [q (Dk), k (Dk), v (r Dv), z (r Dv)] per key
        # head, r = Hv / Hk; in_proj_ba likewise [b (r), a (r)] per key head.
        self.in_proj_qkvz = nn.Linear(args.hidden_size, 2 * key_dim + 2 * value_dim, bias=False)
        self.in_proj_ba = nn.Linear(args.hidden_size, 2 * self.num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, args.linear_conv_kernel_dim,
                                groups=self.conv_dim, bias=False)  # weight [C, 1, K]
        self.dt_bias = nn.Parameter(torch.ones(self.num_value_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_value_heads))
        self.norm = RMSNormGated(self.value_head_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """x [T, D] -> [T, D]; reads and advances `cache`."""
        num_tokens = x.shape[0]
        per_key_head = self.num_value_heads // self.num_key_heads
        value_width = per_key_head * self.value_head_dim
        qkvz = self.in_proj_qkvz(x).view(num_tokens, self.num_key_heads, -1)
        query, key, value, z = qkvz.split([self.key_head_dim, self.key_head_dim, value_width, value_width], -1)
        b, a = self.in_proj_ba(x).view(num_tokens, self.num_key_heads, -1).split(per_key_head, -1)

        mixed = torch.cat([t.reshape(num_tokens, -1) for t in (query, key, value)], dim=-1)  # [T, C]
        mixed = self._causal_conv(mixed, cache)
        key_dim = self.num_key_heads * self.key_head_dim
        query, key, value = mixed.split([key_dim, key_dim, mixed.shape[1] - 2 * key_dim], dim=-1)

        # fp32 from here: the recurrence accumulates over the whole sequence
        query = _l2norm(query.float().view(num_tokens, self.num_key_heads, self.key_head_dim))
        key = _l2norm(key.float().view(num_tokens, self.num_key_heads, self.key_head_dim))
        query = query.repeat_interleave(per_key_head, dim=1) * self.key_head_dim**-0.5  # [T, Hv, Dk]
        key = key.repeat_interleave(per_key_head, dim=1)
        value = value.float().view(num_tokens, self.num_value_heads, self.value_head_dim)
        beta = torch.sigmoid(b.reshape(num_tokens, -1)).float()  # [T, Hv]
        decay = -self.A_log.float().exp() * F.softplus(a.reshape(num_tokens, -1).float() + self.dt_bias)

        if num_tokens == 1:
            out = gated_delta_step(query[0], key[0], value[0], decay[0], beta[0], cache.recurrent_state)[None]
        else:
            out = gated_delta_chunked(query, key, value, decay, beta, cache.recurrent_state)
        out = self.norm(out.to(x.dtype), z.reshape(num_tokens, self.num_value_heads, self.value_head_dim))
        return self.out_proj(out.reshape(num_tokens, -1))

    def _causal_conv(self, mixed: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """Depthwise causal conv + silu over [T, C], continuing from the cached last K-1 inputs.

        Written as K shifted multiply-adds in fp32: torch's depthwise conv1d on the CPU is tens of
        milliseconds per decode step in bf16 (C = 8192 channels, one position).
        """
        extended = torch.cat([cache.conv_state, mixed.transpose(0, 1)], dim=1)  # [C, K-1+T]
        cache.conv_state.copy_(extended[:, -cache.conv_state.shape[1]:])
        weight = self.conv1d.weight[:, 0].float()  # [C, K]
        kernel_size, num_tokens = weight.shape[1], mixed.shape[0]
        source = extended.float()
        out = source[:, :num_tokens] * weight[:, :1]
        for k in range(1, kernel_size):
            out += source[:, k:k + num_tokens] * weight[:, k:k + 1]
        return F.silu(out).to(mixed.dtype).transpose(0, 1)  # [T, C]


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """e^log_decay, with factors below e^MIN_LOG_DECAY exactly 0 (no subnormals downstream)."""
    return log_decay.exp().masked_fill(log_decay < MIN_LOG_DECAY, 0.0)


def gated_delta_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One token of the gated delta rule, all heads, fp32.

    query, key [Hv, Dk]; value [Hv, Dv]; decay, beta [Hv]; state [Hv, Dk, Dv] updated in place.
    Returns [Hv, Dv].
    """
    state.mul_(decay.exp()[:, None, None])
    predicted = torch.bmm(key[:, None, :], state)[:, 0]  # S^T k: [Hv, Dv]
    delta = (value - predicted) * beta[:, None]
    state.baddbmm_(key[:, :, None], delta[:, None, :])  # S += k delta^T
    return torch.bmm(query[:, None, :], state)[:, 0]


def gated_delta_chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor,
                        beta: torch.Tensor, state: torch.Tensor,
                        chunk_size: int = DELTA_CHUNK_SIZE) -> torch.Tensor:
    """The gated delta rule over T tokens, in chunks (fp32). Same contract as `gated_delta_step`
    with a leading T: query, key [T, Hv, Dk]; value [T, Hv, Dv]; decay, beta [T, Hv].

    Within a chunk, with G_i the cumulative log decay up to token i and S0 the state before it,
    the corrections delta_i = beta_i (v_i - S_{i-1}'^T k_i) solve a unit lower-triangular system
        delta_i + sum_{j<i} beta_i e^{G_i - G_j} (k_i . k_j) delta_j = beta_i (v_i - e^{G_i} S0^T k_i)
    so delta = U - W S0 with U, W independent of S0 (batched over all chunks at once); only
    the cheap S0-dependent part runs sequentially, one chunk at a time.
    """
    num_tokens = query.shape[0]
    pad = -num_tokens % chunk_size  # padded tokens have beta = 0 and decay = 0: no effect

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [T, Hv, ...] -> [Hv, N, chunk, ...]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        x = x.transpose(0, 1)
        return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])

    query, key, value, decay, beta = (chunks(t) for t in (query, key, value, decay, beta))
    cumulative = decay.cumsum(dim=-1)  # G: [Hv, N, chunk]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).tril()
    # e^{G_i - G_j} for j <= i, 0 above the diagonal (where G_i - G_j > 0: masked after the exp)
    pair_decay = _decay(cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, 0.0)

    key_beta = key * beta[..., None]
    # strictly lower part of the system; solve_triangular(unitriangular=True) supplies the unit diagonal
    system = (key_beta @ key.transpose(-1, -2) * pair_decay).tril(-1)
    u = torch.linalg.solve_triangular(system, value * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, key_beta * _decay(cumulative)[..., None], upper=False,
                                      unitriangular=True)
    intra = query @ key.transpose(-1, -2) * pair_decay  # [Hv, N, chunk, chunk]
    query_decayed = query * _decay(cumulative)[..., None]
    key_to_end = key * _decay(cumulative[..., -1:] - cumulative)[..., None]
    chunk_decay = _decay(cumulative[..., -1])  # [Hv, N]

    out = torch.empty_like(u)  # [Hv, N, chunk, Dv]
    for n in range(query.shape[1]):
        delta = u[:, n] - w[:, n] @ state
        out[:, n] = query_decayed[:, n] @ state + intra[:, n] @ delta
        state.mul_(chunk_decay[:, n, None, None]).add_(key_to_end[:, n].transpose(-1, -2) @ delta)
    out = out.reshape(out.shape[0], -1, out.shape[-1])[:, :num_tokens]
    return out.transpose(0, 1)  # [T, Hv, Dv]


class DecoderLayer(decoder.DecoderLayer):
    def __init__(self, args: Args, layer: int):
        super().__init__()
        self.is_linear = args.layer_type(layer) == LINEAR_ATTENTION
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = feed_forward(args, layer, args.shared_expert_intermediate_size)

    def mix(self, x, cos, sin, cache: Cache, start: int | DevicePosition) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.is_linear:
            return x + self.linear_attn(h, cache)
        return x + self.self_attn(h, cos, sin, cache, start)


class Model(CausalLM):
    def __init__(self, args: Args):
        super().__init__(args, DecoderLayer, RMSNorm(args.hidden_size, args.rms_norm_eps))


def fuse_cpu_steps(model: Model) -> None:
    """Each Gated DeltaNet mixer placed on the CPU in fp32 becomes a `FusedDeltaNet` (its decode
    steps and short prompts by one fused kernel)."""
    from offload.deltanet import FusedDeltaNet  # the runtime's executor of this model's maths

    for layer in model.layers:
        if layer.is_linear:
            layer.linear_attn = FusedDeltaNet(layer.linear_attn)


def make_cache(args: Args, max_len: int, dtype: torch.dtype,
               device: torch.device | str = "cpu", kv_format: str = "f32") -> list[Cache]:
    """One cache per layer for `max_len` positions: KV caches in `kv_format` (cache.KV_FORMATS)."""
    conv_dim = args.conv_dim
    return [
        LinearAttentionCache(conv_dim, args.linear_conv_kernel_dim, args.linear_num_value_heads,
                             args.linear_key_head_dim, args.linear_value_head_dim, dtype, device)
        if args.layer_type(layer) == LINEAR_ATTENTION
        else KVCache(max_len, args.num_key_value_heads, args.head_dim, kv_format, device)
        for layer in range(args.num_hidden_layers)
    ]


# synth presets: the released models' configs (the hub's spelling), and small ones for tests and the demo
_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "full_attention_interval": 4,
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 10000000, "partial_rotary_factor": 0.25,
    "rope_scaling": None, "max_position_embeddings": 262144, "tie_word_embeddings": False,
    "attention_bias": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-next-80b-a3b": _NEXT_80B,
    # small enough for tests: every feature of the architecture, a few MB
    "tiny-qwen3-next": {
        **_NEXT_80B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "full_attention_interval": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 16,
        "num_experts_per_tok": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "bos_token_id": None,
        "eos_token_id": None, "torch_dtype": "float32",
    },
    # the `offload run --demo` model: this architecture at a size any machine runs at once
    "demo-qwen3-next": {
        **_NEXT_80B, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 4,
        "linear_num_value_heads": 8, "num_experts": 32, "num_experts_per_tok": 4,
        "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128,
        "max_position_embeddings": 8192, "bos_token_id": None, "eos_token_id": None,
    },
}
