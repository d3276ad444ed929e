"""The Gated DeltaNet mixer on the CPU: decode steps by `kernels.deltanet.deltanet_step`.

`FusedDeltaNet` is swapped in for a `GatedDeltaNet` placed on the CPU in fp32 (a CPU-only plan
with quantised dense layers): a call of up to DELTANET_STEP_MAX_TOKENS tokens (a decode step, a
short prompt) runs the input projections for all its tokens at once (one kernel call over their
joined rows), then the fused kernel (conv, gates, delta rule, gated norm in one parallel region
instead of ~60 small torch operations) token after token, then out_proj for all of them. Longer
chunks run the model's chunked torch form, as transformers' prefill does. The step is faster at
every length measured (2-core Zen 4, one Qwen3-Next layer: 8 tokens 1.3 vs 8.5 ms, 64 tokens
10.2 vs 12.6, 512 tokens 76 vs 113), but over a long prompt the recurrence rounds differently
from the chunked form that prefill is checked against. The model file stays pure torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from offload.config import DELTANET_STEP_MAX_TOKENS
from offload.dense import QuantizedLinear, linear_rows
from offload.kernels.deltanet import deltanet_step
from offload.kernels.threads import kernel_threads
from offload.host import numpy_view
from offload.models.cache import LinearAttentionCache


class FusedDeltaNet(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer  # the model's GatedDeltaNet: its parameters and its chunked form
        self.mixed = np.empty(mixer.conv_dim, np.float32)  # [C] the kernel's scratch
        # float32 NumPy views of the small parameters, made once
        self.conv_weight = numpy_view(mixer.conv1d.weight[:, 0])  # [C, K]
        self.A_log, self.dt_bias = numpy_view(mixer.A_log), numpy_view(mixer.dt_bias)  # [Hv]
        self.norm_weight = numpy_view(mixer.norm.weight)  # [Dv]
        # the two input projections as one kernel call (None unless both are quantised alike);
        # not a submodule: its bytes are theirs
        object.__setattr__(self, "in_proj", QuantizedLinear.joined([mixer.in_proj_qkvz, mixer.in_proj_ba]))
        self.eps = np.float32(mixer.norm.eps)

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """x [T, D] float32 -> [T, D]; reads and advances `cache`: the projections of every token at
        once, the recurrence token after token (longer chunks: the model's chunked form)."""
        if x.shape[0] > DELTANET_STEP_MAX_TOKENS:
            return self.mixer(x, cache)
        return torch.from_numpy(self.rows(numpy_view(x), cache))

    def rows(self, x: np.ndarray, cache: LinearAttentionCache) -> np.ndarray:
        """`forward` on NumPy arrays: x float32 [T, D], T at most DELTANET_STEP_MAX_TOKENS -> [T, D]."""
        return self.sequences_rows(x, [(cache, x.shape[0])])

    def sequences_rows(self, x: np.ndarray, sequences: list[tuple[LinearAttentionCache, int]]) -> np.ndarray:
        """`rows` for several sequences' tokens stacked in x [T, D], each (its cache, its number of
        rows) in turn: the projections once over all the rows (each matrix read once), the
        recurrence per sequence on its own state."""
        mixer = self.mixer
        if self.in_proj is not None:
            both = self.in_proj.rows(x)
            width = mixer.in_proj_qkvz.out_features
            qkvz, ba = both[:, :width], both[:, width:]
        else:
            qkvz, ba = linear_rows(mixer.in_proj_qkvz, x), linear_rows(mixer.in_proj_ba, x)
        if len(sequences) == 1:
            out = self._recurrence(qkvz, ba, sequences[0][0])
        else:
            out, first = np.empty((x.shape[0], mixer.num_value_heads, mixer.value_head_dim), np.float32), 0
            for cache, length in sequences:
                rows = slice(first, first + length)
                out[rows] = self._recurrence(qkvz[rows], ba[rows], cache)
                first += length
        return linear_rows(mixer.out_proj, out.reshape(x.shape[0], -1))

    def _recurrence(self, qkvz: np.ndarray, ba: np.ndarray, cache: LinearAttentionCache) -> np.ndarray:
        """The fused kernel token after token: qkvz [T, 2 Hk Dk + 2 Hv Dv], ba [T, 2 Hv] (rows of
        the projections) -> the gated norm's output [T, Hv, Dv], the input of out_proj."""
        mixer = self.mixer
        out = np.empty((qkvz.shape[0], mixer.num_value_heads, mixer.value_head_dim), np.float32)
        conv_state, state, heads = cache.conv_state.numpy(), cache.recurrent_state.numpy(), mixer.num_key_heads
        with kernel_threads():
            for t in range(out.shape[0]):
                deltanet_step(qkvz[t].reshape(heads, -1), ba[t].reshape(heads, -1), conv_state, self.conv_weight,
                              self.A_log, self.dt_bias, self.norm_weight, self.eps, state, self.mixed, out[t])
        return out
