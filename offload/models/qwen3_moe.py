"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

A decoder of grouped-query attention (RMSNorm on each query/key head, full rotary) and sparse MoE
blocks of softmax-top-K routed SwiGLU experts.
Shape legend: T = tokens, D = hidden, H / Hkv = query / key-value heads, Dh = head dim, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from offload.config import ModelArgs
from offload.models.attention import apply_rope, cached_attention
from offload.models.cache import Cache, DevicePosition, KVCache
from offload.models.hub import checkpoint_shapes, sanitize  # noqa: F401  (the architecture's interface)
from offload.models import decoder
from offload.models.decoder import CausalLM, feed_forward


@dataclass(kw_only=True)
class Args(ModelArgs):
    """Qwen3-30B-A3B, Qwen3-235B-A22B: grouped-query attention with q/k RMSNorm, routed experts."""

    sliding_window: int | None = None  # set only when the config enables use_sliding_window
    SCHEMA: ClassVar[dict[str, tuple[str, float, float]]] = {
        "sliding_window": ("int", 1, 1 << 24), "use_sliding_window": ("bool", 0, 0)}

    @classmethod
    def config_values(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"sliding_window": config.get("sliding_window") if config.get("use_sliding_window") else None}

    @property
    def attention_window(self) -> int | None:
        return self.sliding_window


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def scale(self) -> torch.Tensor:
        """What the normalised row is multiplied by, fp32 [dim]."""
        return self.weight.float()


class Attention(nn.Module):
    output_gate = False

    def __init__(self, args: Args):
        super().__init__()
        heads, kv_heads, head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, args.rms_norm_eps)
        self.head_dim = head_dim
        self.sliding_window = args.sliding_window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                start: int | DevicePosition) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        num_tokens = x.shape[0]
        query = self.q_norm(self.q_proj(x).view(num_tokens, -1, self.head_dim)).transpose(0, 1)
        key = self.k_norm(self.k_proj(x).view(num_tokens, -1, self.head_dim)).transpose(0, 1)
        value = self.v_proj(x).view(num_tokens, -1, self.head_dim).transpose(0, 1)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        out = cached_attention(query, key, value, cache, start, self.sliding_window)
        return self.o_proj(out)


class DecoderLayer(decoder.DecoderLayer):
    def __init__(self, args: Args, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = feed_forward(args, layer)

    def mix(self, x, cos, sin, cache: KVCache, start: int | DevicePosition) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)


class Model(CausalLM):
    def __init__(self, args: Args):
        super().__init__(args, DecoderLayer, RMSNorm(args.hidden_size, args.rms_norm_eps))


def fuse_cpu_steps(model: Model) -> None:
    """Nothing to swap: attention has no CPU step executor of its own beyond the cache's."""


def make_cache(args: Args, max_len: int, dtype: torch.dtype,
               device: torch.device | str = "cpu", kv_format: str = "f32") -> list[Cache]:
    """One cache per layer for `max_len` positions: KV caches in `kv_format` (cache.KV_FORMATS)."""
    return [KVCache(max_len, args.num_key_value_heads, args.head_dim, kv_format, device)
            for _ in range(args.num_hidden_layers)]


# synth presets: the released models' configs (the hub's spelling), and a small one for tests
_30B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "max_position_embeddings": 40960, "max_window_layers": 48,
    "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": False,
    "attention_bias": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
_235B = {
    **_30B, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 94,
    "num_attention_heads": 64, "num_key_value_heads": 4, "moe_intermediate_size": 1536,
    "max_window_layers": 94,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": _30B,
    "qwen3-235b-a22b": _235B,
    # small enough for tests: every feature of the architecture, a few MB
    "tiny-qwen3-moe": {
        **_30B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "max_window_layers": 4,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
    },
}
