"""The frame both architectures share: embedding -> decoder layers -> final norm -> lm_head.

A forward pass is also available in stages (`CausalLM.stages`): a generator that pauses in each
layer once its feed-forward (in a MoE layer, the routed experts) has been started, so that an
engine can interleave two prompt chunks (one chunk's mixers run while the other's experts do).
`forward` runs the stages through.

Several sequences may share one pass (`CausalLM.batch_stages`): their tokens' rows are stacked,
each sequence a `Segment` with its own caches and position. Everything row-wise (norms, the
feed-forward and its routed experts, lm_head) runs once over all the rows, so each weight is read
once for the whole batch; the mixers (attention, DeltaNet) run per segment on its own caches.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Segment:
    """The rows of a batched pass that belong to one sequence: `length` tokens written into
    `caches` (one per layer) from `start` (in `layer_stages`, also a one-token step's
    `DevicePosition`)."""

    caches: list[Cache]
    start: int | DevicePosition
    length: int


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

    def stages(self, input_ids: torch.Tensor, caches: list[Cache], start: int, last_only: bool = False,
               head: bool = True) -> Generator[None, None, torch.Tensor | None]:
        """`forward` as a generator: it yields after starting each layer's feed-forward (a MoE
        layer's routed experts may then be running elsewhere) and returns the logits. Work queued
        before a yield only reads this chunk's activations and the caches as the earlier chunks
        left them, so another chunk may run between yields as long as chunks enter each layer in
        order. Without `head` it fills the caches and returns None (a prompt's chunk before its
        last: no output head read for logits no one wants)."""
        return self.batch_stages(input_ids, [Segment(caches, start, input_ids.shape[0])], last_only, head)

    def batch_stages(self, input_ids: torch.Tensor, segments: list[Segment], last_only: bool = False,
                     head: bool = True) -> Generator[None, None, torch.Tensor | None]:
        """`stages` for several sequences at once: input_ids [T] are the segments' tokens one after
        another (T = the sum of their lengths). Returns logits [T, V], or with last_only each
        segment's last token's [len(segments), V] (None without `head`)."""
        x = self.embed_tokens(input_ids).to(self.compute_dtype)
        ranges = [torch.arange(s.start, s.start + s.length, device=x.device) for s in segments]
        positions = ranges[0] if len(ranges) == 1 else torch.cat(ranges)  # one sequence: no copy
        return (yield from self.layer_stages(x, positions, segments, last_only, head))

    def layer_stages(self, x: torch.Tensor, positions: torch.Tensor, segments: list[Segment], last_only: bool = False,
                     head: bool = True) -> Generator[None, None, torch.Tensor | None]:
        """`batch_stages` from the embedded tokens x [T, D] at `positions` [T] (on x's device)."""
        cos, sin = self.rotary(positions, x.dtype)
        for index, layer in enumerate(self.layers):
            finish = layer.begin_feed_forward(mix_segments(layer, index, x, cos, sin, segments))
            yield
            x = finish()
        if not head:
            return None
        if last_only:  # each segment's last row (views: no index tensor to copy to the device)
            x = x[-1:] if len(segments) == 1 else torch.cat([x[end - 1:end] for end in segment_ends(segments)])
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


def mix_segments(layer: nn.Module, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 segments: list[Segment]) -> torch.Tensor:
    """Layer `index`'s first half (`DecoderLayer.mix`) over stacked segments, each on its caches."""
    if len(segments) == 1:
        return layer.mix(x, cos, sin, segments[0].caches[index], segments[0].start)
    pieces, first = [], 0
    for s in segments:
        rows = slice(first, first + s.length)
        pieces.append(layer.mix(x[rows], cos[rows], sin[rows], s.caches[index], s.start))
        first += s.length
    return torch.cat(pieces)


def segment_ends(segments: list[Segment]) -> list[int]:
    """Where each segment's rows end in the stacked rows."""
    ends, end = [], 0
    for s in segments:
        end += s.length
        ends.append(end)
    return ends
