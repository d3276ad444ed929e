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
  conversion or view between the kernels; a shared expert of the routed experts' shape runs in
  their kernel instead, as each token's one more pick;
- `LeanAttention` stands in for an attention mixer whose projections are quantised alike: q, k and
  v in one kernel call, per-head norms, rotary and the output gate's sigmoid in one Numba call,
  the cache's write and attention as the model's.
Where every layer has those pieces (a `FusedDeltaNet` or `LeanAttention` mixer, a `LeanMoeBlock`
or `JoinedMLP`), a `LeanDecoder` takes the model's `batch_stages` for such calls: the residual stream is
one NumPy array that each `LeanLayer` advances in place (the residual add fused into the second
norm, the MoE block's outputs summed straight into it), with no torch tensor between kernels; it
serves batched calls too (several sequences' decode steps: the mixers per sequence, the rest once
over all the rows).
Longer calls (prefill chunks) go to the model's modules, which stay the definition of the maths:
the lean path is checked against them (its sums round in another order, and top-k may pick
another expert where two logits tie to the last bit), and `exact=True` never uses it.
"""

from __future__ import annotations

import weakref
from typing import Callable, Generator

import numpy as np
import torch
from torch import nn

from offload.attention import CpuDecodeAttention, Int8Writer
from offload.config import DECODE_MAX_TOKENS
from offload.dense import JoinedMLP, QuantizedLinear, linear_rows
from offload.experts import Int4Experts
from offload.host import numpy_view, stored_array
from offload.kernels.q8 import SharedExpert
from offload.kernels.step import (add_moe_output, add_rms_norm, attention_inputs, rms_norm, rotary_tables,
                                  router_logits, top_k_softmax)
from offload.kernels.threads import kernel_threads
from offload.models.attention import cached_attention
from offload.models.decoder import CausalLM, Segment
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
        return torch.from_numpy(self.rows(numpy_view(x)))

    def rows(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, D] -> a new [T, D]."""
        out = np.empty(x.shape, np.float32)
        rms_norm(x, self.scale, self.eps, out)
        return out


class LeanMoeBlock(nn.Module):
    """A `SparseMoeBlock` whose routed experts are `Int4Experts` on the CPU (no host lanes, no worker
    thread); same `begin` / `forward` contract."""

    def __init__(self, block: SparseMoeBlock):
        super().__init__()
        self.block = block
        gate = block.gate
        self.executor, self.layer = block.experts.executor, block.experts.layer
        self.router = stored_array(gate.weight)  # [E, D] fp32, or bf16 bits as placed (`placement.place`)
        self.shared = block.shared_expert
        hidden = self.router.shape[1]
        self.shared_gate = numpy_view(block.shared_expert_gate.weight) if self.shared is not None \
            else np.empty((0, hidden), np.float32)  # [G, D]
        self.top_k, self.normalise = gate.top_k, bool(gate.norm_topk_prob)
        rows = DECODE_MAX_TOKENS
        self.routing = (np.empty((rows, self.router.shape[0] + self.shared_gate.shape[0]), np.float32),  # logits
                        np.empty((rows, self.top_k), np.float32), np.empty((rows, self.top_k), np.int64),  # picks
                        np.empty(rows, np.float32))  # the shared expert's gate
        self.no_shared = np.empty((0, hidden), np.float32)
        # a quantised shared expert of the routed experts' shape runs in their kernel's passes
        # (two kernel calls and a pass fewer a layer, and its small matrices among their work)
        self.fused = None
        if isinstance(self.shared, JoinedMLP) and not self.shared.gate_up.exact and self.shared.down_proj.bias is None \
                and self.executor.fuses_shared(self.shared.gate_up.weight, self.shared.down_proj.weight):
            self.fused = (self.shared.gate_up.weight, self.shared.down_proj.weight)

    @classmethod
    def of(cls, block: nn.Module) -> LeanMoeBlock | None:
        """The lean block for `block`, or None where its parts do not allow it."""
        if not isinstance(block, SparseMoeBlock) or not isinstance(block.experts, Int4Experts):
            return None
        executor = block.experts.executor
        if executor.lanes or executor.worker is not None or executor.exact or block.shared_on_host:
            return None
        if block.gate.weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        return cls(block)

    def begin(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """x [T, D] -> a call yielding the block's output [T, D]: `SparseMoeBlock.begin`."""
        if not _lean_input(x):
            return self.block.begin(x)
        out = np.zeros(x.shape, np.float32)
        self.add_rows(numpy_view(x), out)
        result = torch.from_numpy(out)
        return lambda: result

    def add_rows(self, h: np.ndarray, x: np.ndarray) -> None:
        """x += the block's output for h, float32 [T, D] NumPy arrays of at most DECODE_MAX_TOKENS
        rows (x: the residual stream)."""
        tokens = h.shape[0]
        logits, weights, expert_ids, gate = (buffer[:tokens] for buffer in self.routing)
        with kernel_threads(self.executor.threads):
            router_logits(h, self.router, self.shared_gate, logits)
        top_k_softmax(logits, self.router.shape[0], self.normalise, weights, expert_ids, gate)
        routed = np.empty(h.shape, np.float32)
        if self.fused is not None:  # routed now holds the shared expert's part too
            self.executor.kernels(self.layer, h, expert_ids, weights, routed, SharedExpert(*self.fused, gate))
            add_moe_output(x, routed, self.no_shared, gate)
            return
        self.executor.kernels(self.layer, h, expert_ids, weights, routed)
        if self.shared is None:
            shared = self.no_shared
        elif isinstance(self.shared, JoinedMLP):  # in RAM: quantised, or float where its shape is not
            shared = self.shared.rows(h)
        else:
            shared = numpy_view(self.shared(torch.from_numpy(h)))
        add_moe_output(x, routed, shared, gate)

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
        # the query norm's weights times Dh ** -0.5, for the CPU's decode kernels, which take the
        # query scaled: the norm scales it, not a NumPy operation between kernels
        self.q_scale_attend = self.q_scale * np.float32(attention.head_dim ** -0.5)
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
        return torch.from_numpy(self.rows(numpy_view(x), numpy_view(cos), numpy_view(sin), cache, start))

    def rows(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache, start: int) -> np.ndarray:
        """`forward` on NumPy arrays: x float32 [T, D], T at most DECODE_MAX_TOKENS, cos and sin
        float32 [T, R] -> [T, D]."""
        return self.sequences_rows(x, cos, sin, [(cache, start, x.shape[0])])

    def sequences_rows(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, sequences: list) -> np.ndarray:
        """`rows` for several sequences' tokens stacked in x [T, D], each (its cache, its start, its
        number of rows) in turn: the projections, norms and rotary once over all the rows (each
        matrix read once), the cache's write and attention per sequence."""
        attention, tokens, width = self.attention, x.shape[0], self.head_dim
        rows = self.qkv.rows(x)
        query = np.empty((self.heads, tokens, width), np.float32)
        keys, values = (np.empty((self.kv_heads, tokens, width), np.float32) for _ in range(2))
        gate = np.empty((tokens, self.heads * width) if attention.output_gate else (0, 0), np.float32)
        served = all(isinstance(cache.decode, CpuDecodeAttention) and cache.decode.serves(cache, length)
                     for cache, _, length in sequences)
        attention_inputs(rows, attention.output_gate, self.q_scale_attend if served else self.q_scale, self.k_scale,
                         self.eps, cos, sin, query, keys, values, gate)
        if len(sequences) == 1:
            cache, start, _ = sequences[0]
            out = self._attend(cache, start, query, keys, values, served)
        else:
            out, first = np.empty((tokens, self.heads * width), np.float32), 0
            for cache, start, length in sequences:
                part = slice(first, first + length)
                parts = (np.ascontiguousarray(a[:, part]) for a in (query, keys, values))
                out[part] = self._attend(cache, start, *parts, served)
                first += length
        if attention.output_gate:
            out *= gate
        return linear_rows(attention.o_proj, out)

    def _attend(self, cache, start: int, query: np.ndarray, keys: np.ndarray, values: np.ndarray,
                served: bool) -> np.ndarray:
        """One sequence's tokens into its cache, then their attention over it: query [H, T, Dh],
        keys and values [Hkv, T, Dh] -> a new [T, H * Dh]. On NumPy arrays throughout where the
        CPU's decode kernels serve the cache (`served`: its reader and, for int8, its writer; the
        query comes scaled by Dh ** -0.5), as the model's `cached_attention` otherwise."""
        window = self.attention.sliding_window
        if not served:
            return numpy_view(cached_attention(torch.from_numpy(query), torch.from_numpy(keys),
                                               torch.from_numpy(values), cache, start, window))
        if isinstance(cache.writer, Int8Writer):
            cache.writer.rows(cache, keys, values, start)
        else:
            cache.write(torch.from_numpy(keys), torch.from_numpy(values), start)
        return cache.decode.rows(cache, query, start, window, scaled=True)


class LeanLayer:
    """A whole decoder layer for a lean call, on NumPy arrays: the input norm, the mixer (a
    `FusedDeltaNet` or a `LeanAttention`), the residual add and the second norm in one call
    (`add_rms_norm`), the MoE block (or a dense `JoinedMLP`) and its sum into the residual stream.
    Built where every piece has its NumPy form (`of`); the same maths as the model's layer with
    those pieces swapped in, without a torch tensor between them."""

    def __init__(self, input_norm: LeanNorm, mixer: nn.Module, post_norm: LeanNorm, mlp: nn.Module):
        self.input_norm, self.mixer, self.post_norm, self.mlp = input_norm, mixer, post_norm, mlp
        self.attention = isinstance(mixer, LeanAttention)

    @classmethod
    def of(cls, layer: nn.Module) -> LeanLayer | None:
        from offload.deltanet import FusedDeltaNet

        norms = layer.input_layernorm, layer.post_attention_layernorm
        mixer = getattr(layer, "linear_attn", None) or getattr(layer, "self_attn", None)  # either architecture
        if not all(isinstance(norm, LeanNorm) for norm in norms) \
                or not isinstance(mixer, (FusedDeltaNet, LeanAttention)) \
                or not isinstance(layer.mlp, (LeanMoeBlock, JoinedMLP)):
            return None
        return cls(norms[0], mixer, norms[1], layer.mlp)

    def __call__(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, segments: list[Segment], index: int) -> None:
        """Advance the residual stream x float32 [T, D] (T at most DECODE_MAX_TOKENS: the segments'
        rows one after another) in place through the layer, layer `index` of each segment's caches."""
        h = self.input_norm.rows(x)
        if self.attention:
            mixed = self.mixer.sequences_rows(h, cos, sin, [(s.caches[index], s.start, s.length) for s in segments])
        else:
            mixed = self.mixer.sequences_rows(h, [(s.caches[index], s.length) for s in segments])
        add_rms_norm(x, mixed, self.post_norm.scale, self.post_norm.eps, h)
        if isinstance(self.mlp, LeanMoeBlock):
            self.mlp.add_rows(h, x)
        else:
            x += self.mlp.rows(h)



class LeanDecoder:
    """`CausalLM.batch_stages` for calls of up to DECODE_MAX_TOKENS tokens (decode steps, short
    prompts, a few sequences' steps together) when every layer has a `LeanLayer`: the embedded
    tokens become one NumPy array that each layer advances in place, then the final norm and the
    output head; the model's own `batch_stages` serve longer calls. Installed on the model in
    place of its `batch_stages` method by `lean_layers`: an executor of the same layers, not a
    second model."""

    def __init__(self, model: nn.Module, layers: list[LeanLayer]):
        # the model's parts, not the model: the model holds this decoder, and a cycle would keep a
        # dropped model's weights in RAM until the next full garbage collection
        self.layers, self.embed, self.lm_head = layers, model.embed_tokens, model.lm_head
        self.model = weakref.ref(model)  # for the model's own stages (longer calls)
        self.norm = model.norm if isinstance(model.norm, LeanNorm) else LeanNorm(model.norm)
        self.inv_freq, self.scale = numpy_view(model.rotary.inv_freq), model.rotary.scale

    @classmethod
    def of(cls, model: nn.Module) -> LeanDecoder | None:
        layers = [LeanLayer.of(layer) for layer in model.layers]
        return None if any(layer is None for layer in layers) else cls(model, layers)

    def __call__(self, input_ids: torch.Tensor, segments: list[Segment], last_only: bool = False,
                 head: bool = True) -> Generator[None, None, torch.Tensor | None]:
        if input_ids.shape[0] > DECODE_MAX_TOKENS or input_ids.device.type != "cpu" \
                or not all(isinstance(segment.start, int) for segment in segments):
            return CausalLM.batch_stages(self.model(), input_ids, segments, last_only, head)
        return self._stages(input_ids, segments, last_only, head)

    def _stages(self, input_ids: torch.Tensor, segments: list[Segment], last_only: bool,
                head: bool) -> Generator[None, None, torch.Tensor | None]:
        table = self.embed.weight
        if table.dtype == torch.float32:
            x = table.detach().numpy()[input_ids.numpy()]  # a new array: the residual stream
        else:
            x = self.embed(input_ids).to(torch.float32).numpy()
        cos, sin = (np.empty((input_ids.shape[0], 2 * self.inv_freq.shape[0]), np.float32) for _ in range(2))
        first = 0
        for segment in segments:
            rows = slice(first, first + segment.length)
            rotary_tables(self.inv_freq, self.scale, segment.start, cos[rows], sin[rows])
            first += segment.length
        for index, layer in enumerate(self.layers):
            with kernel_threads():  # the kernels' own `with`s inside then ask Numba nothing
                layer(x, cos, sin, segments, index)
            yield  # as the model's stages: another chunk may run between layers (none held across)
        if not head:
            return None
        if last_only:
            x = x[np.cumsum([segment.length for segment in segments]) - 1]
        with kernel_threads():
            return torch.from_numpy(linear_rows(self.lm_head, self.norm.rows(x)))


def lean_layers(model: nn.Module) -> None:
    """Swap the lean pieces into `model` (placed on the CPU in fp32, routed experts int4 with the
    fast kernels): each layer's two norms, its attention mixer and its MoE block where they qualify;
    then, where every layer has all its pieces in NumPy form, the `LeanDecoder` for short calls."""
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
    decoder = LeanDecoder.of(model)
    if decoder is not None:
        model.batch_stages = decoder  # an instance attribute: it shadows CausalLM.batch_stages


def lean_off(model: nn.Module) -> None:
    """Put the model's own modules back where `lean_layers` swapped lean ones in (to compare)."""
    model.__dict__.pop("batch_stages", None)
    for layer in model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, name)
            if isinstance(module, LeanNorm):
                setattr(layer, name, module.norm)
        if isinstance(layer.mlp, LeanMoeBlock):
            layer.mlp = layer.mlp.block
        if isinstance(getattr(layer, "self_attn", None), LeanAttention):
            layer.self_attn = layer.self_attn.attention
