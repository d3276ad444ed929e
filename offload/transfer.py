"""Streamed experts (prefill path b): whole layers of int4 experts copied to the device ahead of
use, dequantised there and run as grouped matmuls.

A long prompt routes tokens to nearly every expert of a layer, so reading the layer once and
moving it to the device beats running all those tokens through the CPU kernels. `ExpertStreamer`
keeps two device slots: while layer l computes from one, the copy of the next MoE layer fills
the other.

On CUDA a copy is two stages: the int4 arrays (memory-mapped from the store, pageable) are
copied into pinned staging on a worker thread, then to the device on a dedicated copy stream,
with an event the compute stream waits on; a slot is refilled only after the compute stream has
passed an event recorded when its previous layer was finished. On the CPU (no CUDA, or tests)
the same protocol runs with the device = CPU: the worker thread copies into the slot, and
waiting on a layer means waiting for that copy.

Shapes (one layer, E experts): gate_up packed uint8 [E, 2I/32, D*16], scales uint16 [E, 2I/32, D];
down packed uint8 [E, D/32, I*16], scales uint16 [E, D/32, I] (the `kernels.int4` layout).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from offload.kernels.int4 import BLOCK, GROUP
from offload.host import torch_view
from offload.models.moe import grouped_experts
from offload.store import ExpertStore

ARRAYS = ("gate_up_packed", "gate_up_scales", "down_packed", "down_scales")


def _host_arrays(store: ExpertStore, layer: int) -> dict[str, np.ndarray]:
    experts = store.layers[layer]
    return {"gate_up_packed": experts.gate_up.packed, "gate_up_scales": experts.gate_up.scales,
            "down_packed": experts.down.packed, "down_scales": experts.down.scales}


class ExpertStreamer:
    """Two device slots of int4 layers; `get(layer)` returns one, already or soon copied."""

    def __init__(self, store: ExpertStore, device: torch.device):
        self.store = store
        self.device = device
        self.cuda = device.type == "cuda"
        self.order = sorted(store.layers)  # MoE layers, in the order a forward pass meets them
        first = _host_arrays(store, self.order[0])  # every MoE layer has the same shapes
        dtypes = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.int16}  # bf16 scales as bits
        self.slots = [{name: torch.empty(a.shape, dtype=dtypes[a.dtype], device=device) for name, a in first.items()}
                      for _ in range(2)]
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-copy")
        self.pending: dict[int, tuple[int, Future]] = {}  # layer -> (slot, copy in flight or done)
        self.next_slot = 0
        self.staging: list[dict[str, torch.Tensor]] = []  # pinned host copies of the slots (CUDA only)
        if self.cuda:
            self.staging = [{name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in slot.items()}
                            for slot in self.slots]
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in self.slots]
            self.released = [torch.cuda.Event() for _ in self.slots]

    @torch.inference_mode()  # the slots may be inference tensors (made during a forward pass)
    def _copy(self, layer: int, slot: int) -> None:
        """Runs on the worker thread."""
        arrays = _host_arrays(self.store, layer)
        if not self.cuda:
            for name, target in self.slots[slot].items():
                target.copy_(torch_view(arrays[name]))
            return
        for name, staging in self.staging[slot].items():
            staging.copy_(torch_view(arrays[name]))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])  # the slot's last reader is done
            for name, target in self.slots[slot].items():
                target.copy_(self.staging[slot][name], non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def prefetch(self, layer: int) -> None:
        """Start copying `layer` into the slot not in use (no-op if it is there or on its way)."""
        if layer in self.pending:
            return
        slot = self.next_slot
        self.next_slot ^= 1
        for other, (other_slot, _) in list(self.pending.items()):
            if other_slot == slot:
                del self.pending[other]
        self.pending[layer] = (slot, self.worker.submit(self._copy, layer, slot))

    def get(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's arrays on the device, usable by work queued after this call. Starts the
        copy of the next MoE layer, so it overlaps this layer's compute."""
        self.prefetch(layer)
        slot, copying = self.pending[layer]
        copying.result()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        position = self.order.index(layer)
        if position + 1 < len(self.order):
            self.prefetch(self.order[position + 1])
        return self.slots[slot]

    def release(self, layer: int) -> None:
        """The compute queued so far is the last to read `layer`'s slot."""
        if self.cuda and layer in self.pending:
            self.released[self.pending[layer][0]].record(torch.cuda.current_stream(self.device))


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int4 experts on any device: packed uint8 [E, out/32, in*16], scales int16 (bf16 bits)
    [E, out/32, in] -> dtype [E, out, in]. The torch twin of `kernels.int4.dequantize`."""
    experts, blocks, columns = scales.shape
    nibbles = packed.reshape(experts, blocks, columns, 16)
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).to(torch.int8) - 8  # [E, blocks, in, 32 rows]
    bits = scales.to(torch.int32).bitwise_and(0xFFFF).bitwise_left_shift(16).view(torch.float32)
    per_row = bits.reshape(experts, blocks, columns // GROUP, BLOCK)  # [E, blocks, groups, 32 rows]
    weight = codes.reshape(experts, blocks, columns // GROUP, GROUP, BLOCK).to(torch.float32) * per_row[:, :, :, None]
    weight = weight.reshape(experts, blocks, columns, BLOCK).transpose(2, 3)  # [E, blocks, 32 rows, in]
    return weight.reshape(experts, blocks * BLOCK, columns).to(dtype)


class _Int4Experts:
    """Stacked int4 experts on the device that dequantise one expert at a time when indexed, so a
    layer never exists in float all at once (512 experts would be 3 GB of bf16)."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.packed, self.scales, self.dtype = packed, scales, dtype
        self.shape = (scales.shape[0], scales.shape[1] * BLOCK, scales.shape[2])

    def __getitem__(self, expert: int) -> torch.Tensor:
        return dequantize_int4(self.packed[expert:expert + 1], self.scales[expert:expert + 1], self.dtype)[0]


def streamed_experts(layer_arrays: dict[str, torch.Tensor], x: torch.Tensor, expert_ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The routed experts of one layer from its streamed int4 arrays: x [T, D] on the device,
    expert_ids / weights [T, K] -> [T, D] fp32. Only experts with tokens are dequantised."""
    device = layer_arrays["gate_up_packed"].device
    gate_up = _Int4Experts(layer_arrays["gate_up_packed"], layer_arrays["gate_up_scales"], x.dtype)
    down = _Int4Experts(layer_arrays["down_packed"], layer_arrays["down_scales"], x.dtype)
    return grouped_experts(x, expert_ids.to(device), weights.to(device), gate_up, down)
