"""Dense layers on the CPU from int4, int6 or int8: a module swap for `nn.Linear` (`dense_quant`).

On the CPU every dense matrix is read once per decoded token, and in bf16 through torch that
costs more than all the routed experts (Qwen3-Next: 4.1 GB of mixers, shared experts and lm_head
per token against 0.85 GB of int4 experts). `QuantizedLinear` holds the matrix in the
`kernels.int4` (4.5 bits per weight), `kernels.int6` (6.5 bits: the default for lm_head) or
`kernels.int8` (8.5 bits) layout and runs it with `kernels.q8` (or `kernels.linear`, exact). Which matrices qualify is the planner's rule (`offload.planner.quantizable`):
routers and the shared-expert gate stay in float (they are small and decide which experts run),
as do matrices whose shape is not a multiple of 32.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from offload.kernels import int4, int6, int8, q8
from offload.kernels.linear import linear
from offload.kernels.threads import kernel_threads, physical_cores
from offload.config import PREFILL_CHUNK
from offload.host import numpy_view, stored_array
from offload.models.hub import hub_name
from offload.planner import quantizable

FORMATS = {"int8": int8, "int6": int6, "int4": int4}


class QuantizedLinear(nn.Module):
    """`nn.Linear` from int4 / int6 / int8 on the CPU. By default activations are quantised to int8 and
    multiplied with integer dot products (`kernels.q8.linear_fast`, the same code from one token
    to a prompt chunk); with `exact`, they stay fp32 (`kernels.linear`). `activations` is the
    int8 activation buffer, shared by every layer of the same input width."""

    def __init__(self, source: nn.Linear, fmt: str, threads: int, exact: bool = False,
                 activations: q8.Activations | None = None):
        super().__init__()
        self.format = fmt
        self.weight = FORMATS[fmt].quantize(stored_array(source.weight))  # [1, out, in]
        self.bias = None if source.bias is None else source.bias.detach().to(torch.float32)
        self.threads = threads
        self.exact = exact
        _, self.out_features, self.in_features = self.weight.shape
        if exact:
            self.x_sums = np.zeros((PREFILL_CHUNK, self.in_features // int4.GROUP), np.float32)
        else:
            self.activations = activations or q8.Activations(PREFILL_CHUNK, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        flat = numpy_view(x.reshape(-1, self.in_features))
        tokens = flat.shape[0]
        out = np.empty((tokens, self.out_features), np.float32)
        with kernel_threads(self.threads):
            if self.exact:
                x_sums = self.x_sums if tokens <= PREFILL_CHUNK else np.zeros(
                    (tokens, self.in_features // int4.GROUP), np.float32)
                linear(flat, self.weight, out, x_sums)
            else:
                activations = self.activations if tokens <= PREFILL_CHUNK else q8.Activations(tokens, self.in_features)
                q8.linear_fast(flat, self.weight, out, activations)
        result = torch.from_numpy(out)
        if self.bias is not None:
            result += self.bias
        return result.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised matrix and the bias."""
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}"


def quantize_dense(model: nn.Module, fmt: str = "int8", names=None, threads: int | None = None,
                   progress: bool = False, exact: bool = False) -> int:
    """Swap `nn.Linear`s of `model` (loaded, not on meta) for `QuantizedLinear` in `fmt` ("int4",
    "int6" or "int8"): those named in `names`, or every one, that `quantizable` allows; with `exact` they
    keep fp32 activations. Returns how many were swapped. A tied lm_head gets its own quantised
    copy. `progress` shows a bar."""
    from tqdm import tqdm

    threads = threads or physical_cores()
    eligible = [(name, module) for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and (names is None or name in names)
                and quantizable(hub_name(name) + ".weight", tuple(module.weight.shape))]
    bar = tqdm(total=sum(m.weight.numel() for _, m in eligible), desc=f"quantising dense layers to {fmt}",
               unit="w", unit_scale=True, disable=not progress, leave=False)
    shared: dict[int, q8.Activations] = {}  # one int8 activation buffer per input width
    for name, module in eligible:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        activations = shared.setdefault(module.in_features, q8.Activations(PREFILL_CHUNK, module.in_features))
        setattr(parent, attribute, QuantizedLinear(module, fmt, threads, exact, activations))
        bar.update(module.weight.numel())
    bar.close()
    return len(eligible)
