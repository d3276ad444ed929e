"""The lean decode step: a layer's work between the matrix kernels as a few Numba calls.

Swapped in (`lean_layers`) where a model executes on the CPU in fp32 with quantised dense layers,
int4 routed experts and the fast kernels: the step users get from a CPU-only plan. For calls of
up to DECODE_MAX_TOKENS tokens (a decode step, a short prompt's chunk):
- `LeanNorm` stands in for an RMSNorm: one pass over each row (`kernels.step.rms_norm`) instead of
  ~8 torch operations;
- `LeanMoeBlock` stands in for a `SparseMoeBlock`: the router's logits and the shared expert's
  gate logit in one parallel pass over the router (`kernels.step.router_logits`), softmax, top-k
  and renormalisation in one serial call, then the routed experts' kernel, the shared expert's
  two kernel calls (a `JoinedMLP`) and the gated sum, all on NumPy arrays: no torch operation,
  conversion or view between the kernels;
- `LeanAttention` stands in for an attention mixer whose projections are quantised alike: q, k and
  v in one kernel call, per-head norms, rotary and the output gate's sigmoid in one Numba call,
  the cache's write and attention as the model's.
Longer calls (prefill chunks) go to the model's modules, which stay the definition of the maths:
the lean path is checked against them (its sums round in another order, and top-k may pick
another expert where two logits tie to the last bit), and `exact=True` never uses it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from offload.config import DECODE_MAX_TOKENS
from offload.dense import JoinedMLP, QuantizedLinear
from offload.experts import Int4Experts
from offload.host import numpy_view
from offload.kernels.step import attention_inputs, rms_norm, router_logits, top_k_softmax
from offload.kernels.threads import kernel_threads
from offload.models.attention import cached_attention
from offload.models.moe import SparseMoeBlock


def _lean_input(x: torch.Tensor) -> bool:
    """Whether x takes the lean path: a CPU float32 [T, D] of at most DECODE_MAX_TOKENS rows."""
    return x.dim() == 2 and x.shape[0] <= DECODE_MAX_TOKENS and x.dtype == torch.float32 and x.device.type == "cpu"


class LeanNorm(nn.Module):
    """An RMSNorm of the model (either form: it says its effective `scale()`) as one Numba call."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.scale = numpy_view(norm.scale())  # fp32 [D], made once
        self.eps = np.float32(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _lean_input(x):
            return self.norm(x)
        out = np.empty(x.shape, np.float32)
        rms_norm(numpy_view(x), self.scale, self.eps, out)
        return torch.from_numpy(out)


class LeanMoeBlock(nn.Module):
    """A `SparseMoeBlock` whose routed experts are `Int4Experts` on the CPU (no host lanes, no worker
    thread); same `begin` / `forward` contract."""

    def __init__(self, block: SparseMoeBlock):
        super().__init__()
        self.block = block
        gate = block.gate
        self.executor, self.layer = block.experts.executor, block.experts.layer
        self.router = numpy_view(gate.weight)  # [E, D] fp32, a view where it already is one
        self.shared = block.shared_expert
        hidden = self.router.shape[1]
        self.shared_gate = numpy_view(block.shared_expert_gate.weight) if self.shared is not None \
            else np.empty((0, hidden), np.float32)  # [G, D]
        self.top_k, self.normalise = gate.top_k, bool(gate.norm_topk_prob)
        self.logits = np.empty((DECODE_MAX_TOKENS, self.router.shape[0] + self.shared_gate.shape[0]), np.float32)

    @classmethod
    def of(cls, block: nn.Module) -> LeanMoeBlock | None:
        """The lean block for `block`, or None where its parts do not allow it."""
        if not isinstance(block, SparseMoeBlock) or not isinstance(block.experts, Int4Experts):
            return None
        executor = block.experts.executor
        if executor.lanes or executor.worker is not None or executor.exact or block.shared_on_host:
            return None
        if block.gate.weight.dtype != torch.float32:
            return None
        return cls(block)

    def begin(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """x [T, D] -> a call yielding the block's output [T, D]: `SparseMoeBlock.begin`."""
        if not _lean_input(x):
            return self.block.begin(x)
        h = numpy_view(x)
        tokens = h.shape[0]
        logits = self.logits[:tokens]
        with kernel_threads(self.executor.threads):
            router_logits(h, self.router, self.shared_gate, logits)
        weights = np.empty((tokens, self.top_k), np.float32)
        expert_ids = np.empty((tokens, self.top_k), np.int64)
        gate = np.empty(tokens, np.float32)
        top_k_softmax(logits, self.router.shape[0], self.normalise, weights, expert_ids, gate)
        out = np.empty(h.shape, np.float32)
        self.executor.kernels(self.layer, h, expert_ids, weights, out)
        if self.shared is not None:  # in RAM: quantised (a JoinedMLP), or float where its shape is not
            shared = self.shared.rows(h) if isinstance(self.shared, JoinedMLP) else numpy_view(self.shared(x))
            shared *= gate[:, None]
            out += shared
        result = torch.from_numpy(out)
        return lambda: result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.begin(x)()


class LeanAttention(nn.Module):
    """A model's attention mixer (`self_attn`, either architecture: `output_gate` says whether
    q_proj also yields a gate) whose q, k, v projections are quantised alike: for calls of up to
    DECODE_MAX_TOKENS tokens, the three as one kernel call, per-head norms, rotary and the gate's
    sigmoid in one Numba call (`kernels.step.attention_inputs`), the cache's write and attention
    as the model does them, the gate and o_proj on NumPy arrays."""

    def __init__(self, attention: nn.Module, qkv: QuantizedLinear):
        super().__init__()
        self.attention = attention
        object.__setattr__(self, "qkv", qkv)  # not a submodule: its bytes are q_proj's, k_proj's, v_proj's
        self.q_scale, self.k_scale = numpy_view(attention.q_norm.scale()), numpy_view(attention.k_norm.scale())
        self.eps = np.float32(attention.q_norm.eps)
        self.head_dim = attention.head_dim
        self.heads = attention.o_proj.in_features // attention.head_dim
        self.kv_heads = attention.k_proj.out_features // attention.head_dim

    @classmethod
    def of(cls, attention: nn.Module | None) -> LeanAttention | None:
        if attention is None or not hasattr(attention, "output_gate"):
            return None
        qkv = QuantizedLinear.joined([attention.q_proj, attention.k_proj, attention.v_proj])
        return None if qkv is None else cls(attention, qkv)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start) -> torch.Tensor:
        """x [T, D] -> [T, D]: the model's attention forward."""
        if not _lean_input(x) or not isinstance(start, int):
            return self.attention(x, cos, sin, cache, start)
        attention, tokens, width = self.attention, x.shape[0], self.head_dim
        rows = self.qkv.rows(numpy_view(x))
        query = np.empty((self.heads, tokens, width), np.float32)
        keys, values = (np.empty((self.kv_heads, tokens, width), np.float32) for _ in range(2))
        gate = np.empty((tokens, self.heads * width) if attention.output_gate else (0, 0), np.float32)
        attention_inputs(rows, attention.output_gate, self.q_scale, self.k_scale, self.eps, numpy_view(cos),
                         numpy_view(sin), query, keys, values, gate)
        out = numpy_view(cached_attention(torch.from_numpy(query), torch.from_numpy(keys), torch.from_numpy(values),
                                          cache, start, attention.sliding_window))  # [T, H * Dh], a new array
        if attention.output_gate:
            out *= gate
        if isinstance(attention.o_proj, QuantizedLinear):
            return torch.from_numpy(attention.o_proj.rows(out))
        return attention.o_proj(torch.from_numpy(out))


def lean_layers(model: nn.Module) -> None:
    """Swap the lean pieces into `model` (placed on the CPU in fp32, routed experts int4 with the
    fast kernels): each layer's two norms, its attention mixer and its MoE block where they qualify."""
    for layer in model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(layer, name), LeanNorm):
                setattr(layer, name, LeanNorm(getattr(layer, name)))
        lean = LeanMoeBlock.of(layer.mlp)
        if lean is not None:
            layer.mlp = lean
        attention = LeanAttention.of(getattr(layer, "self_attn", None))  # both architectures' name for it
        if attention is not None:
            layer.self_attn = attention


def lean_off(model: nn.Module) -> None:
    """Put the model's own modules back where `lean_layers` swapped lean ones in (to compare)."""
    for layer in model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, name)
            if isinstance(module, LeanNorm):
                setattr(layer, name, module.norm)
        if isinstance(layer.mlp, LeanMoeBlock):
            layer.mlp = layer.mlp.block
        if isinstance(getattr(layer, "self_attn", None), LeanAttention):
            layer.self_attn = layer.self_attn.attention
