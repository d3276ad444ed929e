"""The frame both architectures share: embedding -> decoder layers -> final norm -> lm_head."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from offload.config import ModelArgs
from offload.models.attention import RotaryEmbedding
from offload.models.cache import Cache
from offload.models.moe import MLP, SparseMoeBlock


def feed_forward(args: ModelArgs, layer: int, shared_intermediate_size: int = 0) -> nn.Module:
    """Layer `layer`'s MLP: a sparse MoE block, or a dense MLP for the layers the config says."""
    if args.is_moe_layer(layer):
        return SparseMoeBlock(args.hidden_size, args.num_experts, args.num_experts_per_tok,
                              args.moe_intermediate_size, args.norm_topk_prob, shared_intermediate_size)
    return MLP(args.hidden_size, args.intermediate_size)


class CausalLM(nn.Module):
    """Attribute names follow the checkpoint (without its leading `model.`)."""

    def __init__(self, args: ModelArgs, make_layer: Callable[[ModelArgs, int], nn.Module], norm: nn.Module):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(make_layer(args, i) for i in range(args.num_hidden_layers))
        self.norm = norm
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.rotary_dim, args.rope_theta)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: that of the norms (the embedding table may be kept narrower)."""
        return self.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, caches: list[Cache], start: int,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [T] at positions start..start+T -> logits [T, V] (or [1, V] if last_only)."""
        x = self.embed_tokens(input_ids).to(self.compute_dtype)
        positions = torch.arange(start, start + input_ids.shape[0], device=x.device)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, start)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))
