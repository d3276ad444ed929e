"""The Mixture-of-Experts pieces both architectures share.

Shape legend: T = tokens, D = hidden size, E = routed experts, K = experts per token,
I = one expert's intermediate size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def grouped_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """The routed SwiGLU experts: x [T, D], expert_ids [T, K] indexing gate_up_proj [E, 2I, D] and
    down_proj [E, D, I] (tensors, or anything with `.shape` that yields one expert's matrix when
    indexed), weights [T, K] fp32 -> [T, D] fp32.

    Tokens are grouped by expert so each expert's weights are read once per call.
    """
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # slots sorted by expert
    counts = torch.bincount(flat_ids, minlength=gate_up_proj.shape[0]).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_weights = weights.reshape(-1)
    begin = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[begin:begin + count]
        begin += count
        tokens = slots // top_k
        gate, up = F.linear(x[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[expert])
        out.index_add_(0, tokens, y.float() * flat_weights[slots, None])
    return out


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax over E experts in fp32, keep the top K, optionally renormalise them to sum to 1."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # [E, D]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] fp32, expert_ids [T, K] int64)."""
        # the weights may be stored narrower than x (a bf16 router beside fp32 activations): widened
        probs = torch.softmax(F.linear(x, self.weight.to(x.dtype)), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, expert_ids


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights.

    gate_up_proj: [E, 2I, D]  rows 0..I are the gate projection, I..2I the up projection
    down_proj:    [E, D, I]
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, K], weights [T, K] fp32 -> [T, D] fp32."""
        return grouped_experts(x, expert_ids, weights, self.gate_up_proj, self.down_proj)

    def start(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Begin computing the routed experts; the returned call yields the [T, D] fp32 result.
        Executors that run elsewhere (another thread, another device) return before finishing,
        so the caller can compute the shared expert meanwhile."""
        out = self(x, expert_ids, weights)
        return lambda: out


class SparseMoeBlock(nn.Module):
    """Router + routed experts, plus an always-active shared expert when `shared_intermediate_size`.

    Attribute names follow the checkpoint (`mlp.gate`, `mlp.experts`, `mlp.shared_expert`, ...).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 norm_topk_prob: bool, shared_intermediate_size: int = 0):
        super().__init__()
        self.gate = Router(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = None
        if shared_intermediate_size:
            self.shared_expert = MLP(hidden_size, shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        # set where the shared expert is kept in RAM and the routed experts cross to the CPU anyway:
        # their call computes it there (`experts.start(..., shared=...)`) instead of a round trip of its own
        self.shared_on_host = False

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The gated shared expert of x [T, D]: [T, D] fp32."""
        return (torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)).float()

    def begin(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Route x [T, D], start the routed experts and compute the shared expert (meanwhile, when
        the experts run elsewhere); the returned call yields the block's output [T, D] in x's dtype."""
        weights, expert_ids = self.gate(x)
        dtype = x.dtype  # not x itself: a waiting chunk (streamed prefill) keeps no more than it needs
        if self.shared_on_host:
            routed = self.experts.start(x, expert_ids, weights, shared=self.shared_output)
            return lambda: routed().to(dtype)
        routed = self.experts.start(x, expert_ids, weights)
        shared = self.shared_output(x) if self.shared_expert is not None else None

        def finish() -> torch.Tensor:
            out = routed()
            if shared is not None:
                out = out + shared
            return out.to(dtype)
        return finish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D] in x's dtype."""
        return self.begin(x)()
