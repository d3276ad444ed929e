"""CUDA graphs for decode steps (`load(..., cuda_graphs=True)`, `--cuda-graphs`).

One token through a layer is a dozen small kernels on the device; launched one by one from
Python, launching them takes longer than running them. `GraphedDecode` captures a whole decode
step once as a chain of CUDA graphs and replays it at every later position. The chain is cut
wherever the host must work in the middle of a step (`between_graphs`): a MoE layer's routed
experts on the CPU (the host lane's hand-off) and any module kept in RAM (`OnHost`). A replay
launches a graph, then does the host work that follows it while the device runs what the graph
queued after the hand-off (the shared expert), then launches the next.

What changes from step to step lives in static buffers the graphs read: the token's embedding,
its position (`DevicePosition`: the KV write index, the rotary angles and the attention mask are
computed from it on the device). Attention reads a fixed span of the cache, positions after the
token masked; spans double from GRAPH_SPAN up to the context, and a chain is captured for a span
when a sequence first reaches it. The first step at a new span runs eagerly through the same code
(it also warms up what must not initialise during capture); the capture follows it, and the next
step at that span replays.

Off CUDA nothing is captured: `GraphedDecode(capture=False)` runs the same code eagerly, host work
at once, which is how the CPU stand-in checks it. A capture that fails (an operation that cannot
be captured) turns graphs off for the engine with a one-line note; decoding goes on eagerly.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

import torch

from offload.config import GRAPH_SPAN
from offload.models.cache import KV_DTYPES, DevicePosition, KVCache
from offload.models.decoder import Segment, run_stages
from offload.models.moe import Experts

_state = threading.local()  # .chain: the `_Chain` being captured on this thread; .warming: the eager step before


def capturing() -> _Chain | None:
    """The chain a decode step is being captured into on this thread, or None."""
    return getattr(_state, "chain", None)


def warming() -> bool:
    """Whether this thread runs the eager step a capture follows (crossings make their buffers)."""
    return getattr(_state, "warming", False)


def between_graphs(host_work: Callable[[], None]) -> None:
    """Do host work that needs what the device has queued so far (it waits for that itself): now,
    or, while a step is being captured, between two graphs of its chain at every replay."""
    chain = capturing()
    if chain is None:
        host_work()
    else:
        chain.cut(host_work)


class Crossing:
    """What an `OnHost` module needs to run inside a captured step, made during the eager step
    before the capture (nothing pinned is allocated while capturing): pinned buffers shaped like
    that call's inputs and output, and the event that says the inputs have landed."""

    def __init__(self, args: tuple, out: torch.Tensor):
        self.inputs = [torch.empty(a.shape, dtype=a.dtype, pin_memory=True) if isinstance(a, torch.Tensor) else a
                       for a in args]
        self.out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self.landed = torch.cuda.Event(external=True)  # recorded by the graph, waited on by the host


class _Chain:
    """One decode step as CUDA graphs, each followed by the host work to do before the next."""

    def __init__(self, pool, device: torch.device):
        self.pool = pool
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.pieces: list[tuple[torch.cuda.CUDAGraph, Callable[[], None] | None]] = []
        self.graph = self._begin()

    def _begin(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a server's, a copy worker's) do not break the capture
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        return graph

    def cut(self, host_work: Callable[[], None]) -> None:
        self.graph.capture_end()
        self.pieces.append((self.graph, host_work))
        self.graph = self._begin()

    def end(self) -> None:
        self.graph.capture_end()
        self.pieces.append((self.graph, None))

    def abandon(self) -> None:
        """End a capture that failed (on the stream it began on). An invalidated capture makes
        `capture_end` raise before torch stops routing this thread's allocations to the pool: that
        is undone here too."""
        try:
            self.graph.capture_end()
        except RuntimeError:
            try:
                torch.cuda.memory._cuda_endAllocateToPool(self.index, self.pool)
            except Exception:  # a private hook: whatever it does, the engine goes on without graphs
                pass
        self.pieces.clear()

    def cross(self, module, args: tuple) -> torch.Tensor:
        """An `OnHost` module's call inside the step being captured: its inputs copied into its
        crossing's pinned buffers and the event recorded (in the graph), the module run on them
        between graphs, its output copied back (in the next graph)."""
        crossing = getattr(module, "crossing", None)
        if crossing is None or [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] != \
                [tuple(p.shape) for p in crossing.inputs if isinstance(p, torch.Tensor)]:
            raise RuntimeError(f"{type(module.inner).__name__} kept in RAM has no buffers for this call")
        for pinned, arg in zip(crossing.inputs, args):
            if isinstance(arg, torch.Tensor):
                pinned.copy_(arg, non_blocking=True)
        crossing.landed.record(torch.cuda.current_stream(self.device))

        def host_work() -> None:
            crossing.landed.synchronize()
            crossing.out.copy_(module.inner(*crossing.inputs))

        self.cut(host_work)
        return crossing.out.to(self.device, non_blocking=True)

    def replay(self) -> None:
        for graph, host_work in self.pieces:
            graph.replay()
            if host_work is not None:
                host_work()


class GraphedDecode:
    """Decode steps of `engine` (one token each) replayed from captured CUDA graphs; with
    capture=False (the CPU stand-in) the same code runs eagerly at every step."""

    def __init__(self, engine, capture: bool = True):
        self.engine = engine
        self.device = engine.device
        self.capture = capture and self.device.type == "cuda"
        model = engine.model
        self.x = torch.zeros(1, model.args.hidden_size, dtype=engine.dtype, device=self.device)  # the token's embedding
        self.index = torch.zeros(1, dtype=torch.long, device=self.device)  # its position
        self.chains: dict[int, _Chain] = {}  # span -> the step captured for it
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()  # one pool: the chains never run at the same time
            self.stream = torch.cuda.Stream(self.device)  # captures run on a side stream
            self.done = torch.cuda.Event()
            self.logits = torch.empty(1, model.args.vocab_size, pin_memory=True)  # a replayed step's output

    @staticmethod
    def refusal(engine) -> str | None:
        """Why graphs cannot serve this engine's decode steps, or None."""
        if any(isinstance(module, Experts) and module.gate_up_proj.device.type == "cuda"
               for module in engine.model.modules()):
            return "routed experts kept in float on the GPU group tokens on the host; use quant='int4'"
        stored = {cache.format for cache in engine.caches if isinstance(cache, KVCache)}
        wanted = next(name for name, dtype in KV_DTYPES.items() if dtype == engine.dtype)
        if stored - {wanted}:
            return (f"the KV cache is {', '.join(sorted(stored))}, not the compute dtype; "
                    f"load with kv_cache={wanted!r}")
        return None

    def span(self, position: int) -> int:
        """The cached positions a step at `position` attends over: GRAPH_SPAN doubled until it covers
        the position, at most the context."""
        span = GRAPH_SPAN
        while span <= position:
            span *= 2
        return min(span, self.engine.ctx)

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """The logits [1, vocab] of `token` fed at `position` (the caches hold everything before)."""
        engine = self.engine
        ids = torch.tensor([token], dtype=torch.long)
        self.x.copy_(engine.model.embed_tokens(ids).to(engine.dtype), non_blocking=True)
        self.index.fill_(position)
        span = self.span(position)
        chain = self.chains.get(span)
        if chain is None:
            logits = self._eager(span)
            if self.capture:
                self._capture(span)
            return logits
        chain.replay()
        self.done.record(torch.cuda.current_stream(self.device))
        self.done.synchronize()
        return self.logits.clone()

    def _run(self, span: int) -> torch.Tensor:
        segment = Segment(self.engine.slots[0].caches, DevicePosition(self.index, span), 1)  # graphs serve slot 0
        return run_stages(self.engine.model.layer_stages(self.x, self.index, [segment], last_only=True))

    def _eager(self, span: int) -> torch.Tensor:
        if not self.capture:
            return self._warm(span)
        # the step a capture follows runs on the capture's stream, so that whatever the libraries
        # make lazily for a stream (cuBLAS's workspace) is made now and not inside the graph
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            logits = self._warm(span)
        current.wait_stream(self.stream)
        return logits

    def _warm(self, span: int) -> torch.Tensor:
        _state.warming = self.capture  # a capture follows: crossings make their buffers now
        try:
            logits = self.engine._to_host(self._run(span))
        finally:
            _state.warming = False
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the copy to RAM has landed
        return logits

    def _capture(self, span: int) -> None:
        """Capture the step at `span`; on failure turn graphs off for good (eager steps go on)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        failure = None
        with torch.cuda.stream(self.stream):  # a failed capture is ended on the stream it began on
            chain = None
            try:
                chain = _Chain(self.pool, self.device)
                _state.chain = chain
                self.logits.copy_(self._run(span), non_blocking=True)
                chain.end()
            except Exception as error:  # an operation that cannot be captured
                if chain is not None:
                    chain.abandon()
                failure = error
            finally:
                _state.chain = None
        if self.engine.executor is not None:
            self.engine.executor.reset()  # the capture started and finished lanes without running them
        if failure is None:
            current.wait_stream(self.stream)
            self.chains[span] = chain
            return
        self.capture = False
        self.engine.graphs = None
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        print(f"note: CUDA graphs turned off, the decode step could not be captured ({reason}); "
              "decoding goes on without them", file=sys.stderr)
