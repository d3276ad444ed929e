"""The CPU expert executor: routed experts of every MoE layer from the int4 store, computed by
the Numba kernels, behind a torch module that replaces the model's float `Experts` (a module
swap: the float expert weights are never loaded).

Few tokens (decode) go to `kernels.gemv.moe_decode`, many (prefill chunks) to
`kernels.gemm.moe_prefill`. Scratch buffers are allocated once and shared by all layers.

With prefill="stream", chunks of more than DECODE_MAX_TOKENS tokens run instead from whole
layers streamed to the device (`offload.transfer`, prefill path b), the next layer's copy
overlapping this layer's compute.

With `overlap`, the kernels run on a worker thread (they release the GIL) while the calling
thread computes the shared expert; a layer's result is awaited before the next layer starts, so
one set of buffers serves every layer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import nn

from kernels import gemm, gemv
from kernels.threads import kernel_threads, physical_cores
from offload.config import PREFILL_CHUNK, ModelArgs
from offload.store import ExpertStore

DECODE_MAX_TOKENS = 8  # up to this many tokens per call use the decode kernel


class CpuExpertExecutor:
    def __init__(self, store: ExpertStore, args: ModelArgs, threads: int | None = None, overlap: bool = False,
                 prefill: str = "cpu", device: torch.device | str = "cpu"):
        self.store = store
        self.prefill = prefill
        self.device = torch.device(device)
        self.streamer = None  # created on the first streamed chunk
        self.threads = threads or physical_cores()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-experts") if overlap else None
        hidden, intermediate, top_k = args.hidden_size, args.moe_intermediate_size, args.num_experts_per_tok
        self.decode_scratch = gemv.DecodeScratch(DECODE_MAX_TOKENS, top_k, hidden, intermediate)
        self.prefill_scratch = gemm.PrefillScratch(PREFILL_CHUNK, top_k, hidden, intermediate)

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, K], weights [T, K] -> float32 [T, D] (a new tensor)."""
        tokens = x.shape[0]
        if tokens > DECODE_MAX_TOKENS and self.prefill == "stream":
            return self._run_streamed(layer, x, expert_ids, weights)
        experts = self.store.layers[layer]
        x_np = x.detach().to(torch.float32).contiguous().numpy()
        ids = expert_ids.numpy()
        w = weights.to(torch.float32).contiguous().numpy()
        out = np.empty((tokens, x.shape[1]), np.float32)  # handed to torch: the caller owns it
        with kernel_threads(self.threads):
            if tokens <= DECODE_MAX_TOKENS:
                gemv.moe_decode(x_np, ids, w, experts.gate_up, experts.down, out, self.decode_scratch)
            elif tokens <= PREFILL_CHUNK:
                gemm.moe_prefill(x_np, ids, w, experts.gate_up, experts.down, out, self.prefill_scratch)
            else:
                scratch = gemm.PrefillScratch(tokens, ids.shape[1], x.shape[1], experts.down.shape[2])
                gemm.moe_prefill(x_np, ids, w, experts.gate_up, experts.down, out, scratch)
        return torch.from_numpy(out)

    def _run_streamed(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
        from offload.transfer import ExpertStreamer, streamed_experts

        if self.streamer is None:
            self.streamer = ExpertStreamer(self.store, self.device)
        arrays = self.streamer.get(layer)
        out = streamed_experts(arrays, x.to(self.device), expert_ids, weights)
        self.streamer.release(layer)
        return out.to(x.device)

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Begin `run` (on the worker thread when overlapping); the returned call yields its result."""
        if self.worker is None:
            out = self.run(layer, x, expert_ids, weights)
            return lambda: out
        return self.worker.submit(self.run, layer, x, expert_ids, weights).result


class Int4Experts(nn.Module):
    """Stands in for `models.moe.Experts` of one layer; same call, computed from int4 on the CPU."""

    def __init__(self, executor: CpuExpertExecutor, layer: int):
        super().__init__()
        self.executor = executor
        self.layer = layer

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.executor.run(self.layer, x, expert_ids, weights)

    def start(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.executor.start(self.layer, x, expert_ids, weights)
