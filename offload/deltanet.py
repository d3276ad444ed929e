"""The Gated DeltaNet mixer on the CPU: decode steps by `kernels.deltanet.deltanet_step`.

`FusedDeltaNet` is swapped in for a `GatedDeltaNet` placed on the CPU in fp32 (a CPU-only plan
with quantised dense layers): one token runs the input projections (one kernel call over their
joined rows), then the fused kernel (conv, gates, delta rule, gated norm in one parallel region
instead of ~60 small torch operations), then out_proj; a prompt chunk runs the model's own
chunked torch code. The model file stays pure torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from offload.dense import QuantizedLinear
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
        # the two input projections as one kernel call (None unless both are quantised alike);
        # not a submodule: its bytes are theirs
        object.__setattr__(self, "in_proj", QuantizedLinear.joined([mixer.in_proj_qkvz, mixer.in_proj_ba]))

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """x [T, D] float32 -> [T, D]; reads and advances `cache`."""
        mixer = self.mixer
        if x.shape[0] != 1:
            return mixer(x, cache)
        out = torch.empty(mixer.num_value_heads, mixer.value_head_dim)
        if self.in_proj is not None:
            both = self.in_proj.rows(numpy_view(x))[0]
            width = mixer.in_proj_qkvz.out_features
            qkvz, ba = both[:width].reshape(mixer.num_key_heads, -1), both[width:].reshape(mixer.num_key_heads, -1)
        else:
            qkvz = mixer.in_proj_qkvz(x).float().reshape(mixer.num_key_heads, -1).numpy()
            ba = mixer.in_proj_ba(x).float().reshape(mixer.num_key_heads, -1).numpy()
        with kernel_threads():
            deltanet_step(qkvz, ba, cache.conv_state.numpy(), self.conv_weight, self.A_log,
                          self.dt_bias, self.norm_weight, np.float32(mixer.norm.eps),
                          cache.recurrent_state.numpy(), self.mixed, out.numpy())
        return mixer.out_proj(out.reshape(1, -1))
