"""The CPU expert executor: routed experts of every MoE layer from the int4 store, computed by
the Numba kernels, behind a torch module that replaces the model's float `Experts` (a module
swap: the float expert weights are never loaded).

Few tokens (decode) go to a decode kernel, many (prefill chunks) to a prefill kernel: by default
the fast ones (`kernels.q8`: activations quantised to int8, integer dot products), with `exact`
the fp32-activation ones (`kernels.gemv.moe_decode`, `kernels.gemm.moe_prefill`), which
reproduce transformers on the int4 weights. Scratch buffers are allocated once and shared by
all layers.

With `stream` set, chunks of more than DECODE_MAX_TOKENS tokens run instead from whole
layers streamed to the device (`offload.transfer`, prefill path b), the next layer's copy
overlapping this layer's compute; the chunks of a pass that have started a layer run as one
call when the first of them finishes it (each expert dequantised once per pass).

When the model executes on a GPU (`device`, or the CPU standing in for one), a call crosses
through a `HostLane`: the router's output is copied into pinned host buffers and an event
recorded (`start`, which returns at once, so the device goes on to the shared expert); the
returned call waits for the event, runs the kernels on the calling thread (they release the GIL;
the device keeps working on what was queued) and queues the result's copy back. Two lanes are
used in turn, so two prompt chunks can be in flight (`Engine` pipelines prefill).

Hot-expert caching slots in at `start`: a layer's experts may be split into a device-resident
part (computed on the device from the same expert_ids and weights) and this host part, the two
results summed on the device in the returned call.

With `overlap`, on a model executing on the CPU, the kernels run on a worker thread while the
calling thread computes the shared expert; a layer's result is awaited before the next layer
starts, so one set of buffers serves every layer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from offload.kernels import gemm, gemv, int4, q8
from offload.kernels.threads import kernel_threads, physical_cores
from offload.config import DECODE_MAX_TOKENS, PREFILL_CHUNK, ModelArgs
from offload.graphs import between_graphs
from offload.host import HostLane, numpy_view
from offload.store import ExpertStore

@dataclass
class _StreamedCall:
    """The chunks that started one layer's streamed experts together, and their results once run."""

    chunks: list = field(default_factory=list)  # (x, expert_ids, weights) on the device
    results: list | None = None


class CpuExpertExecutor:
    """The routed experts of every MoE layer. `device` is where the model's activations live;
    `hybrid` says they cross to the CPU through host lanes (a GPU plan: on CUDA, or on the CPU
    standing in for it). `stream` (set per prompt by the engine) sends chunks of more than
    DECODE_MAX_TOKENS tokens to the streamed path instead of the kernels."""

    def __init__(self, store: ExpertStore, args: ModelArgs, threads: int | None = None, overlap: bool = False,
                 stream: bool = False, device: torch.device | str = "cpu", hybrid: bool = False,
                 exact: bool = False):
        self.store = store
        self.exact = exact
        self.stream = stream
        self.device = torch.device(device)
        self.streamer = None  # created by `prepare_streaming` or on the first streamed chunk
        self.threads = threads or physical_cores()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-experts") if overlap else None
        hidden, intermediate, top_k = args.hidden_size, args.moe_intermediate_size, args.num_experts_per_tok
        if exact:
            self.decode_scratch = gemv.DecodeScratch(DECODE_MAX_TOKENS, top_k, hidden, intermediate)
            self.prefill_scratch = gemm.PrefillScratch(PREFILL_CHUNK, top_k, hidden, intermediate)
        else:
            # room for a shared expert of the routed ones' shape, run beside them (`LeanMoeBlock`)
            shared = getattr(args, "shared_expert_intermediate_size", 0) == intermediate
            self.fast_scratch = q8.FastScratch(PREFILL_CHUNK, top_k, hidden, intermediate, shared=shared)
        self.lanes = [HostLane(PREFILL_CHUNK, hidden, top_k, self.device) for _ in range(2)] if hybrid else []
        self.next_lane = 0
        self.calls: dict[int, _StreamedCall] = {}  # layer -> the streamed call chunks are joining
        # False: the CPU waits until the device has finished everything queued (the shared expert,
        # the other chunk's mixers) before running the kernels; only to measure what concurrency buys
        self.concurrent = True

    def reset(self) -> None:
        """Forget calls that were started and never finished (an interrupted forward pass)."""
        for lane in self.lanes:
            lane.busy = False
        self.next_lane = 0
        self.calls.clear()

    def prepare_streaming(self) -> None:
        """Allocate the streamer's two device slots now (the plan counts them in the budget)."""
        from offload.transfer import ExpertStreamer

        if self.streamer is None:
            self.streamer = ExpertStreamer(self.store, self.device)

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, K], weights [T, K] on the CPU -> float32 [T, D] (a new tensor)."""
        if x.shape[0] > DECODE_MAX_TOKENS and self.stream:
            return self._run_streamed(layer, x, expert_ids, weights)
        out = np.empty((x.shape[0], x.shape[1]), np.float32)  # handed to torch: the caller owns it
        self.kernels(layer, numpy_view(x), numpy_view(expert_ids, torch.int64), numpy_view(weights), out)
        return torch.from_numpy(out)

    def fuses_shared(self, gate_up, down) -> bool:
        """Whether `kernels` can run this shared expert (int4 weights gate_up [1, 2I, D] and down
        [1, D, I]) beside the routed experts, in the decode kernel's passes."""
        if self.exact or not self.fast_scratch.shared or not self.store.layers:
            return False
        routed = next(iter(self.store.layers.values()))
        return all(isinstance(w, int4.Int4Weights) and w.shape[0] == 1 and w.shape[1:] == r.shape[1:]
                   for w, r in ((gate_up, routed.gate_up), (down, routed.down)))

    def kernels(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray,
                out: np.ndarray, shared: q8.SharedExpert | None = None) -> None:
        """The int4 kernels: x float32 [T, D], expert_ids int64 [T, K], weights float32 [T, K] ->
        out float32 [T, D] (overwritten). `shared` (where `fuses_shared`, for up to
        DECODE_MAX_TOKENS tokens) adds a shared expert's weighted output, run in the same passes."""
        experts = self.store.layers[layer]
        tokens, top_k = expert_ids.shape
        sizes = (tokens, top_k, x.shape[1], experts.down.shape[2])
        if shared is not None and (self.exact or tokens > DECODE_MAX_TOKENS):
            raise ValueError(f"a shared expert runs in the fast decode kernel, for up to {DECODE_MAX_TOKENS} tokens")
        with kernel_threads(self.threads):
            if not self.exact and tokens <= DECODE_MAX_TOKENS:
                q8.moe_decode_fast(x, expert_ids, weights, experts.gate_up, experts.down, out, self.fast_scratch,
                                   shared=shared)
            elif not self.exact:
                scratch = self.fast_scratch if tokens <= PREFILL_CHUNK else q8.FastScratch(*sizes)
                q8.moe_prefill_fast(x, expert_ids, weights, experts.gate_up, experts.down, out, scratch)
            elif tokens <= DECODE_MAX_TOKENS:
                gemv.moe_decode(x, expert_ids, weights, experts.gate_up, experts.down, out, self.decode_scratch)
            else:
                scratch = self.prefill_scratch if tokens <= PREFILL_CHUNK else gemm.PrefillScratch(*sizes)
                gemm.moe_prefill(x, expert_ids, weights, experts.gate_up, experts.down, out, scratch)

    def _run_streamed(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
        return self._start_streamed(layer, x, expert_ids, weights)()

    def _start_streamed(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                        weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Queue a chunk for the layer's streamed experts; the returned call runs every chunk
        queued for the layer so far in one `streamed_experts` call (the first to be called does:
        a streamed prompt's pass starts all its chunks' layer before finishing any, so the layer's
        experts are dequantised once per pass) and yields this chunk's [T, D] on x's device."""
        call = self.calls.setdefault(layer, _StreamedCall())  # this pass's chunks at this layer
        index, device = len(call.chunks), x.device
        call.chunks.append((x.to(self.device), expert_ids, weights))

        def finish() -> torch.Tensor:
            from offload.transfer import streamed_experts

            if call.results is None:  # the first to finish runs every chunk that joined
                if self.calls.get(layer) is call:
                    del self.calls[layer]  # chunks starting this layer later make a new call
                self.prepare_streaming()
                call.results = streamed_experts(self.streamer.get(layer), call.chunks)
                self.streamer.release(layer)
                call.chunks = []
            out, call.results[index] = call.results[index], None  # handed over once
            return out.to(device)
        return finish

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], torch.Tensor]:
        """Begin the layer's routed experts; the returned call yields float32 [T, D] on x's device.
        `shared` (a shared expert kept in RAM) is computed on the host from x and added: through a
        host lane, inside the lane's CPU work, with no crossing of its own."""
        if self.stream and x.shape[0] > DECODE_MAX_TOKENS:
            finish = self._start_streamed(layer, x, expert_ids, weights)
        elif self.lanes:
            return self._start_crossing(layer, x, expert_ids, weights, shared)
        elif self.worker is None:
            out = self.run(layer, x, expert_ids, weights)
            finish = lambda: out  # noqa: E731
        else:
            finish = self.worker.submit(self.run, layer, x, expert_ids, weights).result
        if shared is None:
            return finish
        extra = shared(x.cpu()).to(x.device)
        return lambda: finish() + extra

    def _start_crossing(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                        shared: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[], torch.Tensor]:
        """Inputs to a host lane now (asynchronously on CUDA); kernels and the way back on the call."""
        lane = self.lanes[self.next_lane]
        if lane.busy:
            raise RuntimeError("both host lanes are in use: finish a layer call before starting a third")
        self.next_lane ^= 1
        if x.shape[0] > lane.x.shape[0]:  # a direct call with more tokens than a prompt chunk
            host = x.cpu()
            out = self.run(layer, host, expert_ids.cpu(), weights.cpu())
            out = (out if shared is None else out + shared(host)).to(x.device)
            return lambda: out
        tokens, dtype = lane.send(x, expert_ids, weights), x.dtype

        def host_work() -> None:
            lane.wait()
            if not self.concurrent and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.kernels(layer, lane.x[:tokens].numpy(), lane.expert_ids[:tokens].numpy(),
                          lane.weights[:tokens].numpy(), lane.out[:tokens].numpy())
            if shared is not None:  # from the same inputs, already in RAM
                lane.out[:tokens] += shared(lane.x[:tokens].to(dtype))

        def finish() -> torch.Tensor:
            between_graphs(host_work)  # now, or between two graphs of a captured decode step
            return lane.receive(tokens)
        return finish


class Int4Experts(nn.Module):
    """Stands in for `models.moe.Experts` of one layer; same call, computed from int4 on the CPU."""

    def __init__(self, executor: CpuExpertExecutor, layer: int):
        super().__init__()
        self.executor = executor
        self.layer = layer

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.executor.run(self.layer, x, expert_ids, weights)

    def start(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], torch.Tensor]:
        return self.executor.start(self.layer, x, expert_ids, weights, shared)
