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
from offload.kernels.step import silu_mul
from offload.kernels.threads import kernel_threads, physical_cores
from offload.config import PREFILL_CHUNK
from offload.host import numpy_view, stored_array
from offload.planner import quantizable

FORMATS = {"int8": int8, "int6": int6, "int4": int4}


class QuantizedLinear(nn.Module):
    """`nn.Linear` from int4 / int6 / int8 on the CPU. By default activations are quantised to int8 and
    multiplied with integer dot products (`kernels.q8.linear_fast`, the same code from one token
    to a prompt chunk); with `exact`, they stay fp32 (`kernels.linear`). `activations` is the
    int8 activation buffer, shared by every layer of the same input width."""

    def __init__(self, source: nn.Linear | None, fmt: str, threads: int, exact: bool = False,
                 activations: q8.Activations | None = None, stored: tuple | None = None):
        """`source` quantised to `fmt`, or `stored`: its (weights, float32 bias or None) as an
        earlier load quantised them (`offload.store.DenseStore`)."""
        super().__init__()
        self.format = fmt
        if stored is not None:
            self.weight, self.bias = stored
        else:
            self.weight = FORMATS[fmt].quantize(stored_array(source.weight))  # [1, out, in]
            self.bias = None if source.bias is None else source.bias.detach().to(torch.float32)
        _read_only(self.weight)
        self.threads = threads
        self.exact = exact
        _, self.out_features, self.in_features = self.weight.shape
        if exact:
            self.x_sums = np.zeros((PREFILL_CHUNK, self.in_features // int4.GROUP), np.float32)
        else:
            self.activations = activations or q8.Activations(PREFILL_CHUNK, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        out = torch.from_numpy(self.rows(numpy_view(x.reshape(-1, self.in_features))))
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def joined(cls, pieces: list[QuantizedLinear]) -> QuantizedLinear | None:
        """One layer over the rows of `pieces` (same format, input width and kernels, no bias), or
        None where they differ: layers that read the same input then cost one kernel call and one
        quantisation of it. The pieces' weights become views of the joined one (their own arrays are
        let go: no memory added, but for pages of a memory-mapped store the copy has read)."""
        first = pieces[0]
        if any(not isinstance(piece, QuantizedLinear) or piece.bias is not None or piece.exact != first.exact
               or (piece.format, piece.in_features) != (first.format, first.in_features) for piece in pieces):
            return None
        kind = type(first.weight)
        packed = np.concatenate([piece.weight.packed for piece in pieces], axis=1)
        scales = np.concatenate([piece.weight.scales for piece in pieces], axis=1)
        joined = cls.__new__(cls)
        nn.Module.__init__(joined)
        joined.format, joined.threads, joined.exact, joined.bias = first.format, first.threads, first.exact, None
        joined.weight = kind(packed=packed, scales=scales, shape=(1, packed.shape[1] * int4.BLOCK, first.in_features))
        _read_only(joined.weight)
        _, joined.out_features, joined.in_features = joined.weight.shape
        if first.exact:
            joined.x_sums = first.x_sums
        else:
            joined.activations = first.activations  # one buffer per input width
        begin = 0
        for piece in pieces:  # each piece now reads its rows of the joined arrays
            blocks = piece.out_features // int4.BLOCK
            piece.weight = kind(packed=packed[:, begin:begin + blocks], scales=scales[:, begin:begin + blocks],
                                shape=piece.weight.shape)
            begin += blocks
        return joined

    def rows(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, in] (C-contiguous) -> float32 [T, out], NumPy in and out."""
        tokens = x.shape[0]
        out = np.empty((tokens, self.out_features), np.float32)
        with kernel_threads(self.threads):
            if self.exact:
                x_sums = self.x_sums if tokens <= PREFILL_CHUNK else np.zeros(
                    (tokens, self.in_features // int4.GROUP), np.float32)
                linear(x, self.weight, out, x_sums)
            else:
                activations = self.activations if tokens <= PREFILL_CHUNK else q8.Activations(tokens, self.in_features)
                q8.linear_fast(x, self.weight, out, activations)
        if self.bias is not None:
            out += self.bias.numpy()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised matrix and the bias."""
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}"


def _read_only(weights) -> None:
    """Mark a quantised matrix's arrays read-only, as a later load maps them from the dense store:
    the kernels, compiled for each array type they meet, then take the same types on every load
    (else the first load after the store is written compiles them again, ~10 s at its first token)."""
    for array in vars(weights).values():
        if isinstance(array, np.ndarray):
            array.flags.writeable = False


def linear_rows(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """A linear layer on NumPy arrays: x float32 [T, in] (C-contiguous) -> float32 [T, out]. A
    `QuantizedLinear` runs its kernel; another module (a float layer kept as it is) runs in torch
    on a view of x."""
    if isinstance(module, QuantizedLinear):
        return module.rows(x)
    return numpy_view(module(torch.from_numpy(x)))


def quantize_dense(model: nn.Module, fmt: str = "int8", names=None, threads: int | None = None,
                   progress: bool = False, exact: bool = False, stored=None) -> int:
    """Swap `nn.Linear`s of `model` for `QuantizedLinear` in `fmt` ("int4", "int6" or "int8"):
    those named in `names`, or every one, that `quantizable` allows; with `exact` they keep fp32
    activations. `stored` (an `offload.store.DenseStore`) gives layers an earlier load quantised
    (their weights were never loaded) and keeps the ones quantised now. Returns how many were
    swapped. A tied lm_head gets its own quantised copy. `progress` shows a bar."""
    from tqdm import tqdm

    threads = threads or physical_cores()
    eligible = [(name, module) for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and (names is None or name in names)
                and quantizable(name + ".weight", tuple(module.weight.shape))]
    fresh = [(name, module) for name, module in eligible if stored is None or stored.get(name) is None]
    bar = tqdm(total=sum(m.weight.numel() for _, m in fresh), desc=f"quantising dense layers to {fmt}",
               unit="w", unit_scale=True, disable=not progress or not fresh, leave=False)
    shared: dict[int, q8.Activations] = {}  # one int8 activation buffer per input width
    for name, module in eligible:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        activations = shared.setdefault(module.in_features, q8.Activations(PREFILL_CHUNK, module.in_features))
        kept = stored.get(name) if stored is not None else None
        layer = QuantizedLinear(module if kept is None else None, fmt, threads, exact, activations, kept)
        setattr(parent, attribute, layer)
        if kept is None:
            if stored is not None:
                stored.put(name, layer)
            bar.update(module.weight.numel())
    bar.close()
    return len(eligible)


class JoinedMLP(nn.Module):
    """A SwiGLU MLP kept in RAM as quantised layers (a shared expert, a dense MLP), swapped in for
    the model's `MLP`: gate and up as one kernel call over their joined rows, silu(gate) * up in
    one pass over the kernel's output (`kernels.step.silu_mul`), then down. The hidden activations stay fp32 until down's input (the model's MLP rounds them to its dtype
    between operations when that is bf16: a hybrid plan's shared expert in RAM)."""

    def __init__(self, mlp: nn.Module, gate_up: QuantizedLinear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj  # views of gate_up
        object.__setattr__(self, "gate_up", gate_up)  # not a submodule: its bytes are gate_proj's and up_proj's
        self.intermediate = mlp.gate_proj.out_features

    @classmethod
    def of(cls, mlp: nn.Module) -> JoinedMLP | None:
        gate_up = QuantizedLinear.joined([mlp.gate_proj, mlp.up_proj])
        return cls(mlp, gate_up) if gate_up is not None and isinstance(mlp.down_proj, QuantizedLinear) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D] in x's dtype."""
        out = torch.from_numpy(self.rows(numpy_view(x.reshape(-1, self.gate_up.in_features))))
        return out.to(x.dtype).reshape(x.shape)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, D] (C-contiguous) -> float32 [T, D], NumPy in and out."""
        hidden = np.empty((x.shape[0], self.intermediate), np.float32)
        silu_mul(self.gate_up.rows(x), hidden)
        return self.down_proj.rows(hidden)
