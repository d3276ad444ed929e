"""The one crossing between torch and the CPU kernels' NumPy arrays, and between the execution
device and the host.

- `numpy_view` / `torch_view`: zero-copy views both ways (a copy only where the dtype or layout
  must change);
- `OnHost`: a module placed in RAM for a model that executes on a GPU; its inputs come to the
  CPU and its output goes back;
- `HostLane`: the preallocated buffers (pinned on CUDA) through which one MoE layer's routed
  experts go to the CPU kernels and come back, with the event that says the inputs have landed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from offload.graphs import Crossing, capturing, warming


def numpy_view(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """A C-contiguous NumPy array over a CPU tensor in `dtype` (zero-copy when it already is one)."""
    return tensor.detach().to(dtype).contiguous().numpy()


def stored_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as NumPy without widening it (bf16 as its uint16 bit patterns, fp16 as is,
    anything else as float32), for the quantisers."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy() if tensor.dtype == torch.float16 else numpy_view(tensor)


def torch_view(array: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over a NumPy array, read-only (memory-mapped) ones included; uint16 (bf16
    bits) comes as int16. Such tensors are only ever copied from, so torch's warning about writing
    to read-only memory does not apply."""
    array = np.asarray(array.view(np.int16) if array.dtype == np.uint16 else array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class OnHost(nn.Module):
    """Runs `inner` (kept in RAM, e.g. an int8 lm_head or an embedding table) for a model whose
    activations live on `device`: tensor arguments go to the CPU, the output comes back; with
    `output_in_ram` (the output head: its logits are wanted in RAM) it stays there, but inside a
    captured decode step."""

    def __init__(self, inner: nn.Module, device: torch.device, output_in_ram: bool = False):
        super().__init__()
        self.inner = inner
        self.device = device
        self.output_in_ram = output_in_ram
        self.crossing = None  # pinned buffers for a captured decode step (`offload.graphs.Crossing`)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        chain = capturing()
        if chain is not None:  # inside a decode step being captured: the host's part runs between graphs
            return chain.cross(self, args)
        # the inputs' copy waits for the device (the CPU needs them); the output goes back from
        # pinned memory without waiting (the host allocator keeps the block until the copy is done)
        out = self.inner(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        if self.device.type != "cuda":
            return out.to(self.device)
        if warming():  # the eager step before a capture: buffers for this call's shapes, made now
            self.crossing = Crossing(args, out)
        if self.output_in_ram:  # a prompt chunk's [T, vocab] would cross twice, through pinned memory
            return out
        return out.pin_memory().to(self.device, non_blocking=True)

    def start(self, *args: torch.Tensor):
        """The `Experts.start` protocol, for float routed experts kept in RAM."""
        out = self(*args)
        return lambda: out


class HostLane:
    """Buffers for one MoE layer call of up to `max_tokens` tokens crossing to the CPU kernels:
    x float32 [T, D], expert_ids int64 [T, K], weights float32 [T, K] in; out float32 [T, D] back
    (host side) and out_device [T, D] (device side). Pinned on CUDA, so copies are asynchronous.
    A lane is reused only after its previous result has been handed back (`busy`)."""

    def __init__(self, max_tokens: int, hidden: int, top_k: int, device: torch.device):
        pinned = device.type == "cuda"
        self.device = device
        self.x = torch.empty(max_tokens, hidden, pin_memory=pinned)
        self.expert_ids = torch.empty(max_tokens, top_k, dtype=torch.int64, pin_memory=pinned)
        self.weights = torch.empty(max_tokens, top_k, pin_memory=pinned)
        self.out = torch.empty(max_tokens, hidden, pin_memory=pinned)
        self.out_device = torch.empty(max_tokens, hidden, device=device)
        # external: recorded inside a captured CUDA graph too, and waited on by the host after replay
        self.landed = torch.cuda.Event(external=True) if pinned else None
        self.busy = False

    def send(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> int:
        """Queue the copies of a call's inputs into the lane (asynchronous on CUDA); its token count."""
        tokens = x.shape[0]
        self.x[:tokens].copy_(x, non_blocking=True)
        self.expert_ids[:tokens].copy_(expert_ids, non_blocking=True)
        self.weights[:tokens].copy_(weights, non_blocking=True)
        if self.landed is not None:  # on the stream that queued the copies, on the inputs' device
            self.landed.record(torch.cuda.current_stream(x.device))
        self.busy = True
        return tokens

    def wait(self) -> None:
        """Block until the inputs queued by `send` are in the host buffers."""
        if self.landed is not None:
            self.landed.synchronize()

    def receive(self, tokens: int) -> torch.Tensor:
        """Queue the result's copy back to the device; the device-side result [T, D] float32. The
        lane's host buffers are free again once the device has passed this copy, which any later
        `wait` on the same stream implies."""
        out = self.out_device[:tokens]
        out.copy_(self.out[:tokens], non_blocking=True)
        self.busy = False
        return out
