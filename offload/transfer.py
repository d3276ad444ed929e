"""Streamed experts (prefill path b): whole layers of int4 experts copied to the device ahead of
use, dequantised there and run as grouped matmuls, with one host read a layer (its routing).

A long prompt routes tokens to nearly every expert of a layer, so reading the layer once and
moving it to the device beats running all those tokens through the CPU kernels. `ExpertStreamer`
keeps two device slots: while layer l computes from one, the copy of the next MoE layer fills
the other.

A layer travels in blocks of STREAM_EXPERT_BATCH experts, the unit the compute dequantises. On
CUDA each block is copied from the memory-mapped store (pageable) into one of STAGING_BLOCKS
pinned buffers on a worker thread, then to the device on a dedicated copy stream, with an event
per block: the host copy of block b+1 overlaps the device copy of block b, a staging buffer is
refilled only once its previous device copy is done, and the compute of a layer's first experts
starts as soon as their block has landed (`StreamedLayer.ready`), while the rest are still on
their way. A slot is refilled only after the compute stream has passed the event recorded when
its previous layer was finished. On the CPU (no CUDA, or tests) the same protocol runs with the
device = CPU: the worker copies each block into the slot and flags it.

Shapes (one layer, E experts): gate_up packed uint8 [E, 2I/32, D*16], scales uint16 [E, 2I/32, D];
down packed uint8 [E, D/32, I*16], scales uint16 [E, D/32, I] (the `kernels.int4` layout).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from offload.config import STAGING_BLOCKS, STREAM_EXPERT_BATCH
from offload.kernels.int4 import BLOCK, GROUP
from offload.host import torch_view
from offload.store import ExpertStore

ARRAYS = ("gate_up_packed", "gate_up_scales", "down_packed", "down_scales")


def _host_arrays(store: ExpertStore, layer: int) -> dict[str, np.ndarray]:
    experts = store.layers[layer]
    return {"gate_up_packed": experts.gate_up.packed, "gate_up_scales": experts.gate_up.scales,
            "down_packed": experts.down.packed, "down_scales": experts.down.scales}


@dataclass
class StreamedLayer:
    """One layer's copy into a device slot: its arrays there, and a flag (plus, on CUDA, an event)
    per block of STREAM_EXPERT_BATCH experts, set as each block lands."""

    arrays: dict[str, torch.Tensor]
    slot: int
    device: torch.device
    copying: Future | None = None
    staged: list[threading.Event] = field(default_factory=list)
    landed: list[torch.cuda.Event] = field(default_factory=list)

    def ready(self, block: int) -> None:
        """Block `block` (experts block * STREAM_EXPERT_BATCH onwards) is usable by work queued
        after this call: waits on the host until it was handed to the copy stream (not for the
        device), then makes the current stream wait for its copy."""
        while not self.staged[block].wait(timeout=0.05):
            if self.copying.done():
                self.copying.result()  # the copy failed: raise its error here
        if self.landed:
            torch.cuda.current_stream(self.device).wait_event(self.landed[block])


class ExpertStreamer:
    """Two device slots of int4 layers; `get(layer)` returns one, its blocks landing as they come."""

    def __init__(self, store: ExpertStore, device: torch.device):
        self.store = store
        self.device = device
        self.cuda = device.type == "cuda"
        self.order = sorted(store.layers)  # MoE layers, in the order a forward pass meets them
        first = _host_arrays(store, self.order[0])  # every MoE layer has the same shapes
        self.experts = first["gate_up_scales"].shape[0]
        self.blocks = [(begin, min(begin + STREAM_EXPERT_BATCH, self.experts))
                       for begin in range(0, self.experts, STREAM_EXPERT_BATCH)]
        dtypes = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.int16}  # bf16 scales as bits
        self.slots = [{name: torch.empty(a.shape, dtype=dtypes[a.dtype], device=device) for name, a in first.items()}
                      for _ in range(2)]
        # on CUDA the copy thread works on the model's device (so leaving a stream context never
        # creates a context on another card); "cuda" alone means the current one
        index = (device.index if device.index is not None else torch.cuda.current_device()) if self.cuda else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-copy",
                                         initializer=torch.cuda.set_device if self.cuda else None,
                                         initargs=(index,) if self.cuda else ())
        self.pending: dict[int, StreamedLayer] = {}  # layer -> its copy, in flight or done
        self.wrap = False  # another pass follows: the last MoE layer's `get` starts copying the first
        self.next_slot = 0
        self.copied_bytes = 0  # cumulative bytes of expert arrays copied into the slots
        self.staging: list[dict[str, torch.Tensor]] = []  # pinned blocks on the way to the device (CUDA only)
        if self.cuda:
            batch = min(STREAM_EXPERT_BATCH, self.experts)
            self.staging = [{name: torch.empty((batch, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                             for name, t in self.slots[0].items()} for _ in range(min(STAGING_BLOCKS, len(self.blocks)))]
            self.staging_free = [torch.cuda.Event() for _ in self.staging]  # its last copy to the device is done
            self.next_staging = 0
            self.copy_stream = torch.cuda.Stream(device)
            self.released = [torch.cuda.Event() for _ in self.slots]

    @torch.inference_mode()  # the slots may be inference tensors (made during a forward pass)
    def _copy(self, layer: int, target: StreamedLayer) -> None:
        """Runs on the worker thread: the layer's blocks into the slot, each flagged as it goes."""
        arrays = _host_arrays(self.store, layer)
        self.copied_bytes += sum(a.nbytes for a in arrays.values())
        if not self.cuda:
            for (begin, end), staged in zip(self.blocks, target.staged):
                for name, slot in target.arrays.items():
                    slot[begin:end].copy_(torch_view(arrays[name][begin:end]))
                staged.set()
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[target.slot])  # the slot's last reader is done
            for (begin, end), staged, landed in zip(self.blocks, target.staged, target.landed):
                staging, free = self.staging[self.next_staging], self.staging_free[self.next_staging]
                self.next_staging = (self.next_staging + 1) % len(self.staging)
                free.synchronize()  # this buffer's previous block has left it
                for name, slot in target.arrays.items():
                    block = staging[name][:end - begin]
                    block.copy_(torch_view(arrays[name][begin:end]))
                    slot[begin:end].copy_(block, non_blocking=True)
                free.record(self.copy_stream)
                landed.record(self.copy_stream)
                staged.set()

    def prefetch(self, layer: int) -> None:
        """Start copying `layer` into the slot not in use (no-op if it is there or on its way)."""
        if layer in self.pending:
            return
        slot = self.next_slot
        self.next_slot ^= 1
        for other, copy in list(self.pending.items()):
            if copy.slot == slot:
                del self.pending[other]
        target = StreamedLayer(self.slots[slot], slot, self.device, staged=[threading.Event() for _ in self.blocks],
                               landed=[torch.cuda.Event() for _ in self.blocks] if self.cuda else [])
        target.copying = self.worker.submit(self._copy, layer, target)
        self.pending[layer] = target

    def get(self, layer: int) -> StreamedLayer:
        """The layer's copy (`StreamedLayer.ready` before using a block of it). Starts the copy of
        the next MoE layer (after the last, the first when `wrap`), which follows this one's on the
        worker and the copy stream."""
        self.prefetch(layer)
        position = self.order.index(layer)
        if position + 1 < len(self.order) or self.wrap:
            self.prefetch(self.order[(position + 1) % len(self.order)])
        return self.pending[layer]

    def release(self, layer: int) -> None:
        """The compute queued so far is the last to read `layer`'s slot."""
        if self.cuda and layer in self.pending:
            self.released[self.pending[layer].slot].record(torch.cuda.current_stream(self.device))


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int4 experts on any device: packed uint8 [E, out/32, in*16], scales int16 (bf16 bits)
    [E, out/32, in] -> dtype [E, out, in]. The torch twin of `kernels.int4.dequantize`, bit for bit.

    Two passes over the weights: the nibbles split (uint8), then one multiply-add that reads the
    codes as they are and writes each weight straight to its transposed place, (code - 8) x scale
    computed exactly in fp32 and rounded once (about 4.5 bytes of memory traffic per weight)."""
    experts, blocks, columns = scales.shape
    nibbles = packed.reshape(experts, blocks, columns, 16)
    # [E, blocks, groups, GROUP columns, BLOCK rows]: the low nibbles are rows 0-15, the high 16-31
    codes = torch.stack([nibbles & 15, nibbles >> 4], dim=3).view(experts, blocks, columns // GROUP, GROUP, BLOCK)
    scale = scales.view(torch.bfloat16).reshape(experts, blocks, columns // GROUP, 1, BLOCK).to(dtype)
    weight = torch.empty(experts, blocks, BLOCK, columns, dtype=dtype, device=packed.device)
    rows_last = weight.view(experts, blocks, BLOCK, columns // GROUP, GROUP).permute(0, 1, 3, 4, 2)
    torch.addcmul(scale * -8, codes, scale, out=rows_last)
    return weight.view(experts, blocks * BLOCK, columns)


def streamed_experts(layer: StreamedLayer,
                     chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The routed experts of one layer from its streamed copy, for the chunks of a pass:
    each (x [T, D] on the device, expert_ids, weights [T, K]) -> [T, D] fp32.

    The chunks' rows run as one: their T x K slots are sorted by expert on the device and each
    expert's group end found there (`searchsorted`); then the group ends are read on the host, the
    call's one wait for the device (for this layer's routers: by then its copy has long been on its
    way, and the host queues the rest before the device gets far). Knowing them, each batch of
    STREAM_EXPERT_BATCH experts touches only its own slots: their rows gathered, two grouped matmuls
    (`torch._grouped_mm`, the group offsets made on the device), the weighted sum added into the
    output, a few kernels a batch whatever the number of chunks; a batch no slot is routed to is not
    dequantised. Where no grouped kernel reads its offsets on the device, each expert runs as one
    matmul pair. A batch is queued as soon as its block of the copy has landed."""
    device = layer.device
    packed = layer.arrays["gate_up_packed"], layer.arrays["down_packed"]
    scales = layer.arrays["gate_up_scales"], layer.arrays["down_scales"]
    experts = scales[0].shape[0]
    x = torch.cat([chunk[0] for chunk in chunks]) if len(chunks) > 1 else chunks[0][0]
    expert_ids = torch.cat([chunk[1].to(device) for chunk in chunks])
    weights = torch.cat([chunk[2].to(device) for chunk in chunks])
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    # each expert's last slot + 1 (not bincount: on CUDA it reads the largest id on the host)
    ends = torch.searchsorted(flat[order], torch.arange(experts, device=device), right=True)
    sorted_weights, token_of = weights.reshape(-1)[order], order // top_k
    out = torch.zeros(x.shape, dtype=torch.float32, device=device)
    dtype, grouped = x.dtype, grouped_kernel(device, x.dtype)
    bounds = ends.tolist()  # the one host read
    for block, first in enumerate(range(0, experts, STREAM_EXPERT_BATCH)):
        last = min(first + STREAM_EXPERT_BATCH, experts)
        layer.ready(block)  # waited for in order, used or not: the batch's block has landed
        begin, end = bounds[first - 1] if first else 0, bounds[last - 1]
        if begin == end:
            continue  # no slot in this batch: nothing to dequantise
        gate_up = dequantize_int4(packed[0][first:last], scales[0][first:last], dtype)  # [B, 2I, D]
        down = dequantize_int4(packed[1][first:last], scales[1][first:last], dtype)  # [B, D, I]
        if grouped:  # offsets from the batch's first slot, made on the device
            tokens = token_of[begin:end]
            offsets = (ends[first:last] - begin).to(torch.int32)
            gate, up = torch._grouped_mm(x[tokens], gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)  # [end - begin, D]
            out.index_add_(0, tokens, y.float() * sorted_weights[begin:end, None])
            continue
        for expert in range(first, last):
            start, stop = bounds[expert - 1] if expert else 0, bounds[expert]
            if start == stop:
                continue
            tokens = token_of[start:stop]
            gate, up = F.linear(x[tokens], gate_up[expert - first]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, down[expert - first])
            out.index_add_(0, tokens, y.float() * sorted_weights[start:stop, None])
    return list(out.split([chunk[0].shape[0] for chunk in chunks]))


def grouped_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` reads its group offsets on the device here: the CPU, or CUDA
    sm90 / sm100 in bf16. Elsewhere torch falls back to reading them on the host per call."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10) \
        and dtype == torch.bfloat16
