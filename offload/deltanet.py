"""The Gated DeltaNet mixer on the CPU: decode steps by `kernels.deltanet.deltanet_step`.

`FusedDeltaNet` is swapped in for a `GatedDeltaNet` placed on the CPU in fp32 (a CPU-only plan
with quantised dense layers): one token runs the projections, then the fused kernel (conv, gates,
delta rule, gated norm in one parallel region instead of ~60 small torch operations), then
out_proj; a prompt chunk runs the model's own chunked torch code. The model file stays pure torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from offload.kernels.deltanet import deltanet_step
from offload.kernels.threads import kernel_threads
from offload.host import numpy_view
from offload.models.cache import LinearAttentionCache


class FusedDeltaNet(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer  # the model's GatedDeltaNet: its parameters and its prefill path
        self.mixed = np.empty(mixer.conv_dim, np.float32)  # [C] the kernel's scratch
        # float32 NumPy views of the small parameters, made once
        self.conv_weight = numpy_view(mixer.conv1d.weight[:, 0])  # [C, K]
        self.A_log, self.dt_bias = numpy_view(mixer.A_log), numpy_view(mixer.dt_bias)  # [Hv]
        self.norm_weight = numpy_view(mixer.norm.weight)  # [Dv]

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """x [T, D] float32 -> [T, D]; reads and advances `cache`."""
        mixer = self.mixer
        if x.shape[0] != 1:
            return mixer(x, cache)
        out = torch.empty(mixer.num_value_heads, mixer.value_head_dim)
        qkvz = mixer.in_proj_qkvz(x).float().reshape(mixer.num_key_heads, -1)
        ba = mixer.in_proj_ba(x).float().reshape(mixer.num_key_heads, -1)
        with kernel_threads():
            deltanet_step(qkvz.numpy(), ba.numpy(), cache.conv_state.numpy(), self.conv_weight, self.A_log,
                          self.dt_bias, self.norm_weight, np.float32(mixer.norm.eps),
                          cache.recurrent_state.numpy(), self.mixed, out.numpy())
        return mixer.out_proj(out.reshape(1, -1))
