"""The frame both architectures share: embedding -> decoder layers -> final norm -> lm_head.

A forward pass is also available in stages (`CausalLM.stages`): a generator that pauses in each
layer once its feed-forward (in a MoE layer, the routed experts) has been started, so that an
engine can interleave two prompt chunks (one chunk's mixers run while the other's experts do).
`forward` runs the stages through.
"""

from __future__ import annotations

from typing import Callable, Generator

import torch
from torch import nn

from offload.config import ModelArgs
from offload.models.attention import RotaryEmbedding
from offload.models.cache import Cache, DevicePosition
from offload.models.moe import MLP, SparseMoeBlock


def feed_forward(args: ModelArgs, layer: int, shared_intermediate_size: int = 0) -> nn.Module:
    """Layer `layer`'s MLP: a sparse MoE block, or a dense MLP for the layers the config says."""
    if args.is_moe_layer(layer):
        return SparseMoeBlock(args.hidden_size, args.num_experts, args.num_experts_per_tok,
                              args.moe_intermediate_size, args.norm_topk_prob, shared_intermediate_size)
    return MLP(args.hidden_size, args.intermediate_size)


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)). Subclasses build `input_layernorm`,
    `post_attention_layernorm`, `mlp` and define `mix`, the first half."""

    def mix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache,
            start: int | DevicePosition) -> torch.Tensor:
        raise NotImplementedError

    def begin_feed_forward(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start the second half; the returned call yields x + mlp(norm(x))."""
        h = self.post_attention_layernorm(x)
        if hasattr(self.mlp, "begin"):  # a MoE block (or a module standing in for one) starts now, ends later
            finish = self.mlp.begin(h)
            return lambda: x + finish()
        out = x + self.mlp(h)
        return lambda: out

    def forward(self, x, cos, sin, cache: Cache, start: int | DevicePosition) -> torch.Tensor:
        return self.begin_feed_forward(self.mix(x, cos, sin, cache, start))()


class CausalLM(nn.Module):
    """Attribute names follow the checkpoint (without its leading `model.`)."""

    def __init__(self, args: ModelArgs, make_layer: Callable[[ModelArgs, int], nn.Module], norm: nn.Module):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(make_layer(args, i) for i in range(args.num_hidden_layers))
        self.norm = norm
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.rotary_dim, args.rope_theta, args.rope_scaling)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: that of the norms (the embedding table may be kept narrower)."""
        return self.norm.weight.dtype

    def stages(self, input_ids: torch.Tensor, caches: list[Cache], start: int,
               last_only: bool = False) -> Generator[None, None, torch.Tensor]:
        """`forward` as a generator: it yields after starting each layer's feed-forward (a MoE
        layer's routed experts may then be running elsewhere) and returns the logits. Work queued
        before a yield only reads this chunk's activations and the caches as the earlier chunks
        left them, so another chunk may run between yields as long as chunks enter each layer in
        order."""
        x = self.embed_tokens(input_ids).to(self.compute_dtype)
        positions = torch.arange(start, start + input_ids.shape[0], device=x.device)
        return (yield from self.layer_stages(x, positions, caches, start, last_only))

    def layer_stages(self, x: torch.Tensor, positions: torch.Tensor, caches: list[Cache],
                     start: int | DevicePosition, last_only: bool = False) -> Generator[None, None, torch.Tensor]:
        """`stages` from the embedded tokens x [T, D] at `positions` [T] (on x's device). The
        caches write at `start`: the first position, or a one-token step's `DevicePosition` (a
        captured CUDA graph replays it at any position: `offload.graphs`)."""
        cos, sin = self.rotary(positions, x.dtype)
        for layer, cache in zip(self.layers, caches):
            finish = layer.begin_feed_forward(layer.mix(x, cos, sin, cache, start))
            yield
            x = finish()
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))

    def forward(self, input_ids: torch.Tensor, caches: list[Cache], start: int,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [T] at positions start..start+T -> logits [T, V] (or [1, V] if last_only)."""
        return run_stages(self.stages(input_ids, caches, start, last_only))


def run_stages(stages: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Run a `CausalLM.stages` generator to the end; its result."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value
