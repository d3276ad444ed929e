"""Dense layers on the CPU from int8 or int4: a module swap for `nn.Linear` (`dense_quant`).

On the CPU every dense matrix is read once per decoded token, and in bf16 through torch that
costs more than all the routed experts (Qwen3-Next: 4.1 GB of mixers, shared experts and lm_head
per token against 0.85 GB of int4 experts). `QuantizedLinear` holds the matrix in the
`kernels.int8` (8.5 bits per weight, the default) or `kernels.int4` (4.5 bits) layout and runs it
with `kernels.linear`. Routers and the shared-expert gate stay in float: they are small and
decide which experts run. Matrices whose shape is not a multiple of 32 stay float.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels import int4, int8
from kernels.linear import linear
from kernels.threads import kernel_threads, physical_cores
from offload.config import PREFILL_CHUNK

FORMATS = {"int8": int8, "int4": int4}
KEEP_FLOAT = ("mlp.gate", "shared_expert_gate")  # module names ending so stay in float


def _numpy_weight(weight: torch.Tensor) -> np.ndarray:
    """The weight as numpy without widening it first (bf16 as its bit patterns)."""
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy().view(np.uint16)
    return weight.to(torch.float32).numpy() if weight.dtype != torch.float16 else weight.numpy()


class QuantizedLinear(nn.Module):
    def __init__(self, source: nn.Linear, fmt: str, threads: int):
        super().__init__()
        self.format = fmt
        self.weight = FORMATS[fmt].quantize(_numpy_weight(source.weight))  # [1, out, in]
        self.bias = None if source.bias is None else source.bias.detach().to(torch.float32)
        self.threads = threads
        _, self.out_features, self.in_features = self.weight.shape
        self.x_sums = np.zeros((PREFILL_CHUNK, self.in_features // int4.GROUP), np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        flat = x.reshape(-1, self.in_features).to(torch.float32).contiguous().numpy()
        x_sums = self.x_sums if flat.shape[0] <= PREFILL_CHUNK else np.zeros(
            (flat.shape[0], self.in_features // int4.GROUP), np.float32)
        out = np.empty((flat.shape[0], self.out_features), np.float32)
        with kernel_threads(self.threads):
            linear(flat, self.weight, out, x_sums)
        result = torch.from_numpy(out)
        if self.bias is not None:
            result += self.bias
        return result.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}"


def quantize_dense(model: nn.Module, fmt: str = "int8", threads: int | None = None, progress: bool = False) -> int:
    """Swap every eligible `nn.Linear` of `model` (loaded, not on meta) for `QuantizedLinear`
    in `fmt` ("int8" or "int4"); returns how many were swapped. A tied lm_head gets its own
    quantised copy. `progress` shows a bar (weights done, ETA)."""
    from tqdm import tqdm

    threads = threads or physical_cores()
    eligible = [(name, module) for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and not name.endswith(KEEP_FLOAT)
                and not module.out_features % int4.BLOCK and not module.in_features % int4.GROUP]
    bar = tqdm(total=sum(m.weight.numel() for _, m in eligible), desc=f"quantising dense layers to {fmt}",
               unit="w", unit_scale=True, disable=not progress, leave=False)
    swapped = 0
    for name, module in eligible:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, QuantizedLinear(module, fmt, threads))
        swapped += 1
        bar.update(module.weight.numel())
    bar.close()
    return swapped
