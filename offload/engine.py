"""The engine: a loaded model, its caches, and prefill / decode / generate.

`load()` makes the placement plan first (and refuses one that does not fit), builds the
architecture's torch model on the meta device, fills it tensor by tensor from the checkpoint (so
no tensor is held twice) and places it as the plan says (`offload.placement`). Caches are
allocated once for `ctx` positions on the execution device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from offload.checkpoint import Checkpoint, CheckpointError, require_finite
from offload.config import (DECODE_MAX_TOKENS, DEFAULT_CONTEXT, PREFILL_CHUNK, STREAM_PASS_TOKENS, ModelArgs,
                            check_context, load_config)
from offload.errors import OffloadError
from offload.hardware import HardwareProfile
from offload.models import ARCHITECTURES
from offload.models.hub import checkpoint_name
from offload.models.cache import Cache, cache_nbytes
from offload.models.decoder import Segment, run_stages
from offload.planner import CUDA_CONTEXT_BYTES, DENSE_QUANTS, KV_CACHES
from offload.sampling import Sampler, SamplingParams, generation_stop_ids


PROGRESS_BYTES = 256 * 2**20  # models smaller than this load without a progress bar
# slots="auto": as llama.cpp's server; a CPU decode step of 4 rows reads the dense weights once (BENCHMARKS.md)
AUTO_SLOTS = 4
Progress = Callable[[int, int], None]  # (tokens done, tokens in all)


class Slot:
    """One sequence the engine holds: its caches (one per layer) and what they hold."""

    def __init__(self, caches: list[Cache]):
        self.caches = caches
        self.position = 0  # tokens of the sequence held in the caches
        self.history: list[int] = []  # the ids `append` and `step` have fed in the sequence
        self.written: list[int] = []  # the ids whose keys and values the KV caches hold, by position


def _selected(name: str) -> property:
    """The selected slot's attribute `name`, read and written as the engine's own."""
    return property(lambda engine: getattr(engine.selected, name),
                    lambda engine, value: setattr(engine.selected, name, value))


class Engine:
    """A model ready to run, holding `slots` sequences (one unless loaded with more).

    The single-sequence calls (`feed`, `append`, `stream`, `snapshot`, ...) work on the selected
    slot (`select`; the first at load); `step` advances several slots by a few tokens each in one
    forward pass.

    `device` is where the activations live (CUDA, or the CPU: CPU-only, or standing in for a GPU);
    `plan` is the placement plan and `placement` what was done with it (set by `load`).
    `prefill` chooses the path of a prompt's routed experts: "cpu" (the int4 kernels), "stream"
    (whole layers streamed to the device), "auto" (streamed from the plan's `stream_from_tokens`).
    With `pipelined`, prompt chunks run two at a time: one chunk's mixers on the device while the
    other's routed experts run on the CPU (on by default on CUDA)."""

    def __init__(self, model: nn.Module, args: ModelArgs, ctx: int, device: torch.device, executor=None,
                 prefill: str = "cpu", kv_format: str = "f32", slots: int = 1):
        self.model = model
        self.args = args
        self.ctx = ctx
        self.device = device
        self.dtype = model.compute_dtype
        make_cache = ARCHITECTURES[args.model_type].make_cache
        self.slots = [Slot(make_cache(args, ctx, self.dtype, device, kv_format)) for _ in range(slots)]
        self.selected = self.slots[0]  # the one the single-sequence calls work on
        self.executor = executor  # the int4 routed experts' CpuExpertExecutor, if any
        self.graphs = None  # decode steps replayed from CUDA graphs (`offload.graphs.GraphedDecode`), if on
        self.prefill = prefill
        self.pipelined = device.type == "cuda" and executor is not None and bool(executor.lanes)
        self.plan = None
        self.placement: list[dict] = []
        self.gpu_outside_bytes = 0  # device memory in use outside the allocator at load (`load` sets it)
        self.stop_ids = set(args.eos_token_ids)  # ends generation (load adds generation_config.json's)

    @property
    def cache_nbytes(self) -> int:
        return sum(cache_nbytes(slot.caches) for slot in self.slots)

    def select(self, index: int) -> None:
        """Make slot `index` the one the single-sequence calls work on."""
        self.selected = self.slots[index]

    # the selected slot's state, under the names of a one-sequence engine
    caches = property(lambda self: self.selected.caches)
    position = _selected("position")
    history = _selected("history")
    written = _selected("written")

    def _ids(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise OffloadError("the prompt is empty; give at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.args.vocab_size:
            raise OffloadError(f"token ids must be in [0, {self.args.vocab_size}); got "
                               f"{int(ids.min())}..{int(ids.max())}")
        return ids.cpu()  # the embedding table is in RAM

    def _check_room(self, needed: int) -> None:
        if needed > self.ctx:
            raise OffloadError(f"{needed} tokens do not fit the context of {self.ctx}; load with a "
                               f"larger ctx (at most {self.args.max_context})")

    def reset(self) -> None:
        """Start a new sequence (in the selected slot)."""
        for cache in self.caches:
            cache.reset()
        if self.executor is not None:
            self.executor.reset()
        self.position = 0
        self.history = []

    def snapshot(self) -> Snapshot:
        """The current sequence's state, to `restore` later: the position, the ids fed, and copies
        (in RAM) of the caches that cannot be rolled back (DeltaNet's conv and recurrent states;
        keys and values stay where they are, written by position)."""
        states = [cache.snapshot() for cache in self.caches]
        return Snapshot(self.position, list(self.history), states)

    def can_restore(self, snapshot: Snapshot, slot: int | None = None) -> bool:
        """Whether the KV caches (of `slot`, default the selected one) still hold the snapshot's keys
        and values (no other sequence has written over its positions since)."""
        written = self.written if slot is None else self.slots[slot].written
        return written[:snapshot.position] == snapshot.history[:snapshot.position]

    def restore(self, snapshot: Snapshot) -> None:
        """Continue from `snapshot` (taken from this engine, `can_restore`)."""
        if not self.can_restore(snapshot):
            raise OffloadError("the snapshot's keys and values have been overwritten; start a fresh sequence")
        for cache, state in zip(self.caches, snapshot.states):
            cache.restore(state)
        if self.executor is not None:
            self.executor.reset()
        self.position = snapshot.position
        self.history = list(snapshot.history)

    def append(self, input_ids: Sequence[int] | torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Feed tokens into the current sequence, recording them in `history`; the last token's
        float32 logits [vocab]."""
        ids = self._ids(input_ids)
        logits = self.feed(ids, all_logits=False, progress=progress)[-1]
        self.history += ids.tolist()
        return logits

    def streams(self, prompt_tokens: int) -> bool:
        """Whether a prompt of this many tokens runs its routed experts streamed to the device."""
        if self.executor is None or prompt_tokens <= DECODE_MAX_TOKENS or self.prefill == "cpu":
            return False  # every decode step ends here
        planned = self.plan is not None and _plans_streaming(self.plan)
        if self.prefill == "stream":  # a GPU plan streams only into the slots it counted
            return planned or not self.executor.lanes
        threshold = self.plan.predicted.stream_from_tokens if self.plan and self.plan.predicted else None
        return planned and threshold is not None and prompt_tokens >= threshold

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative figures of what the engine moved: "h2d_expert_bytes", the bytes of routed
        experts copied host to device for streamed prompts."""
        streamer = self.executor.streamer if self.executor is not None else None
        return {"h2d_expert_bytes": streamer.copied_bytes if streamer is not None else 0}

    @property
    def gpu_peak_bytes(self) -> int:
        """The most device memory offload has held at once (0 unless on CUDA): the allocator's
        peak reservation (fragmentation included) plus what lay outside it at load (the context)."""
        if self.device.type != "cuda":
            return 0
        return torch.cuda.max_memory_reserved(self.device) + self.gpu_outside_bytes

    def feed(self, input_ids: Sequence[int] | torch.Tensor, all_logits: bool = True,
             progress: Progress | None = None) -> torch.Tensor:
        """Append tokens to the current sequence; float32 logits of each new token [T, vocab]
        (only of the last one, [1, vocab], when all_logits is False).

        Long inputs run in chunks of PREFILL_CHUNK tokens, each continuing from the caches; memory
        beyond the caches is one chunk's work whatever the length (keep all_logits False for long
        inputs: the logits themselves are [T, vocab]). A streamed input (`streams`) runs layer by
        layer instead: the chunks of a pass of up to STREAM_PASS_TOKENS tokens all go through
        layer l before any enters layer l + 1, so each layer's experts are copied to the device
        once per pass. `progress(done, total)` is called after each chunk (each pass, streamed) of
        an input longer than one. Interrupted (Ctrl-C), the sequence is left unusable: start a
        fresh one.
        """
        ids = self._ids(input_ids)
        self._check_room(self.position + ids.shape[0])
        streamed = self.streams(ids.shape[0])
        if self.executor is not None:
            self.executor.stream = streamed
        del self.written[self.position:]  # overwritten from here on (and unknown if this fails midway)
        if self.graphs is not None and ids.shape[0] == 1 and self.selected is self.slots[0]:  # captured on slot 0
            logits = self.graphs.step(int(ids[0]), self.position)  # in RAM, complete
            self.written += ids.tolist()
            self.position += 1
            return logits.float()
        starts = range(0, ids.shape[0], PREFILL_CHUNK)
        # without all_logits only the last chunk reads the output head
        stages = [self.model.stages(ids[begin:begin + PREFILL_CHUNK], self.caches, self.position + begin,
                                    last_only=not all_logits, head=all_logits or begin == starts[-1])
                  for begin in starts]
        with torch.inference_mode():
            if streamed:
                logits = []
                per_pass = STREAM_PASS_TOKENS // PREFILL_CHUNK
                self.executor.prepare_streaming()
                streamer = self.executor.streamer
                try:
                    for first in range(0, len(stages), per_pass):
                        # another streamed pass follows (a last chunk of a few tokens runs on the CPU's
                        # kernels): its first layer's copy starts during this pass's last
                        streamer.wrap = ids.shape[0] - (first + per_pass) * PREFILL_CHUNK > DECODE_MAX_TOKENS
                        logits += _run_in_turns(stages[first:first + per_pass], per_pass, self._to_host)
                        if progress is not None and len(stages) > 1:
                            progress(min((first + per_pass) * PREFILL_CHUNK, ids.shape[0]), ids.shape[0])
                finally:
                    streamer.wrap = False
            elif self.pipelined and len(stages) > 1:
                logits = _run_in_turns(stages, 2, self._to_host)
            else:
                logits = []
                for begin, chunk in zip(starts, stages):
                    logits.append(self._to_host(run_stages(chunk)))
                    if progress is not None and len(stages) > 1:
                        progress(min(begin + PREFILL_CHUNK, ids.shape[0]), ids.shape[0])
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the copies to RAM have landed
        self.written += ids.tolist()
        self.position += ids.shape[0]
        return torch.cat(logits if all_logits else logits[-1:]).float()  # widened on the CPU

    def step(self, work: Sequence[tuple[int, Sequence[int] | torch.Tensor]]) -> torch.Tensor:
        """Advance several slots in one forward pass: each (slot index, ids) of `work` appends its
        ids to that slot's sequence (its `history` too), as `append` would. Everything row-wise
        (norms, the feed-forward, the routed experts the rows share, lm_head) runs once for all the
        rows, and on the CPU's lean step the mixers' projections too; attention and DeltaNet run
        per slot on its own caches. -> float32 logits [len(work), vocab]: each entry's last
        token's. Keep it a step: a decode token per slot and at most a prompt chunk (every row's
        activations are held at once). Work that is refused (a slot twice, ids out of range, no
        room) changes nothing; a failure during the pass leaves the slots in `work` unusable:
        reset them. One token for the first slot replays the CUDA graphs when they are on."""
        indices = [index for index, _ in work]
        if len(set(indices)) != len(indices):
            raise OffloadError(f"a step advances each slot once; got slots {indices}")
        batch = [(self.slots[index], self._ids(ids)) for index, ids in work]
        for slot, ids in batch:
            self._check_room(slot.position + ids.shape[0])
        if self.graphs is not None and indices == [0] and batch[0][1].shape[0] == 1:
            selected, self.selected = self.selected, self.slots[0]
            try:
                logits = self.feed(batch[0][1], all_logits=False)
            finally:
                self.selected = selected
            self.slots[0].history += batch[0][1].tolist()
            return logits
        segments = [Segment(slot.caches, slot.position, ids.shape[0]) for slot, ids in batch]
        for slot, _ in batch:
            del slot.written[slot.position:]
        if self.executor is not None:
            self.executor.stream = False
        with torch.inference_mode():
            logits = self._to_host(run_stages(self.model.batch_stages(torch.cat([ids for _, ids in batch]), segments,
                                                                      last_only=True)))
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the copy to RAM has landed
        for slot, ids in batch:
            tokens = ids.tolist()
            slot.written += tokens
            slot.history += tokens
            slot.position += len(tokens)
        return logits.float()

    def _to_host(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """A chunk's logits in RAM, copied as it finishes (none are kept on the device: a prompt's
        [T, vocab] would not be in the plan). From a GPU, a last token's row goes to pinned memory
        without waiting; a whole chunk's is copied as it is (pinned blocks are cached by the
        allocator, so large ones are not pinned)."""
        if logits is None or self.device.type != "cuda" or logits.device.type == "cpu":
            return logits  # None: a chunk run without the head
        if logits.shape[0] > 1:
            return logits.cpu()
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        host.copy_(logits, non_blocking=True)
        return host

    def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of a fresh sequence: input_ids [T] -> float32 [T, vocab]. No state is kept."""
        self.reset()
        try:
            return self.feed(input_ids)
        finally:
            self.reset()

    def stream(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
               temperature: float = 0.0, seed: int | None = None,
               sampling: SamplingParams | Sampler | None = None, fresh: bool = True,
               progress: Progress | None = None) -> Iterator[int]:
        """Yield new token ids one at a time; stops after a stop token (`stop_ids`, yielded) or
        `max_new_tokens`. `sampling` (or just temperature and seed) chooses the tokens; pass a
        `Sampler` to keep one random stream across calls (a chat's turns). With
        fresh=False the input continues the current sequence (a chat's next turn) instead of
        starting a new one. Tokens are fed as they are drawn, except the last one. `progress`
        follows a long prompt's prefill (`feed`)."""
        ids = self._ids(input_ids)
        sampler = sampling if isinstance(sampling, Sampler) else \
            Sampler(sampling or SamplingParams(temperature=temperature, seed=seed))
        if fresh:
            self.reset()
        self._check_room(self.position + ids.shape[0] + max_new_tokens)
        yield from self.decode(self.append(ids, progress), max_new_tokens, sampler)

    def decode(self, logits: torch.Tensor, max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
        """Yield tokens drawn from `logits` (the current sequence's last token's), each fed before
        the next is drawn; stops after a stop token (yielded) or `max_new_tokens`. The last token
        is not fed; neither is one the caller stops at (closing the generator)."""
        for step in range(max_new_tokens):
            token = sampler(logits, self.history)
            yield token
            if token in self.stop_ids or step == max_new_tokens - 1:
                return
            logits = self.append([token])

    def generate(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int | None = None,
                 sampling: SamplingParams | None = None) -> list[int]:
        """New token ids after `input_ids` (greedy when temperature == 0)."""
        return list(self.stream(input_ids, max_new_tokens, temperature, seed, sampling))


@dataclass
class Snapshot:
    """A sequence's state at `position` (`Engine.snapshot`): its ids and the per-cache states."""

    position: int
    history: list[int]
    states: list
    logits: torch.Tensor | None = None  # the last token's, if the taker kept them


def _run_in_turns(stages: list, at_once: int, done: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Run prompt chunks' `stages` generators in turns, one step (one layer) each, with up to
    `at_once` chunks in flight. Two: while one chunk's routed experts run on the CPU, the device
    works through what the other queued (its mixers of the same layer). All of them: every chunk
    passes layer l before any enters layer l + 1 (a streamed layer serves them all). Legal because
    chunks enter every layer in order: chunk c+1's mixer of layer l reads the caches as chunk c's
    mixer of layer l left them and nothing of chunk c's experts. Returns `done` of each chunk's
    logits (applied as each finishes), in order."""
    results: list[torch.Tensor | None] = [None] * len(stages)
    in_flight: list[int] = []
    waiting = list(range(len(stages)))
    while in_flight or waiting:
        while len(in_flight) < at_once and waiting:
            in_flight.append(waiting.pop(0))
        for index in list(in_flight):
            try:
                next(stages[index])
            except StopIteration as finished:
                results[index] = done(finished.value)
                in_flight.remove(index)
    return results


def load(model_dir: str | Path, quant: str | None = None, gpu_mem: str | int | None = None,
         profile: str | HardwareProfile | None = None, device: str | None = None, ctx: int | None = None,
         store_dir: str | Path | None = None, dense_quant: str | None = "auto", overlap: bool = False,
         prefill: str = "auto", exact: bool = False, rope_scaling: str | dict | None = None,
         kv_cache: str = "auto", cuda_graphs: bool = False, slots: int | str = 1) -> Engine:
    """Load a Hugging Face checkpoint directory into an `Engine`, placed as its plan says.

    quant=None keeps the checkpoint's precision (FP8 weights are dequantised to bf16);
    quant="int4" runs the routed experts from the int4 expert store (built on first use, in
    `store_dir` or the cache; see offload.store) with the CPU kernels: the fast ones (activations
    quantised to int8, integer dot products) or, with exact=True, those that keep activations in
    fp32 and reproduce transformers on the int4 weights. The same holds for the dense matrices
    quantised for the CPU (dense_quant).
    gpu_mem ("8G", bytes, 0 for CPU only) and profile (a name in profiles/, a YAML file or a
    `HardwareProfile`; default this machine's detected one, else the reference box) make the
    placement plan, kept as `engine.plan` and executed: mixers, norms, routers, shared experts
    and lm_head on the GPU in the checkpoint's precision, routed experts (and embeddings) in RAM.
    A plan that does not fit is refused before anything loads; `gpu_mem` caps what offload
    allocates on the GPU.
    device: where the GPU groups run. None picks CUDA when torch sees it (without it the
    model runs on the CPU, with a one-line notice if gpu_mem asked for a GPU); "cuda", "cuda:1";
    "cpu" with a gpu_mem > 0 runs the GPU plan on the CPU as a stand-in (tests).
    dense_quant: the format of dense matrices the plan puts on the CPU — "auto" (with int4
    experts: int4, lm_head int6; `offload.planner.dense_format`), "int8" or "int4" for all of
    them (from then on a CPU-only model computes in fp32), or None (the checkpoint's precision).
    prefill picks how prompt chunks reach the int4 experts: "cpu" (grouped int4 kernels, path a),
    "stream" (whole layers copied to the device, dequantised and run there, path b) or "auto"
    (streamed for prompts of at least the plan's `stream_from_tokens`, when the plan has room for
    the prefetch buffers).
    overlap=True runs the int4 experts on a worker thread while the shared expert is computed
    (a model executing on the CPU only; slower on small CPUs).
    rope_scaling replaces config.json's: "yarn:4" (YaRN, factor 4 over max_position_embeddings),
    "yarn:4:32768" (over an original context of 32768), "none", or a dict in config.json's
    spelling. ctx may then reach factor x the original context (`ModelArgs.max_context`).
    kv_cache: how keys and values are stored — "f32", "bf16", "f16", "int8" (per position and head, a
    scale per 64 channels), or "auto": as computed when the weights keep their precision (quant=None) or
    with exact=True; otherwise int8 on the CPU, bf16 on a GPU (int8 if the plan needs the room).
    The plan says which (`engine.plan.kv_format`) and why.
    cuda_graphs=True replays each decode step's device work from captured CUDA graphs
    (`offload.graphs`): on CUDA, with the KV cache in the compute dtype; elsewhere a note says it
    is off. They serve the first slot's single-sequence decode steps.
    slots: how many sequences the engine holds at once, each with caches for `ctx` positions (the
    plan counts them all), or "auto": AUTO_SLOTS, else 2, where their caches fit beside the
    placement one slot gets (on a GPU more slots never cost a format or a group's place), else 1.
    `Engine.step` advances several in one pass (`offload.scheduler` runs requests on them).
    """
    if dense_quant not in (None, *DENSE_QUANTS):
        raise OffloadError(f"dense_quant={dense_quant!r} is not a format offload has; use 'auto', 'int8', 'int4' "
                           "or None (the checkpoint's precision)")
    if quant not in (None, "int4"):
        raise OffloadError(f"quant={quant!r} is not a format offload has; use quant='int4' (routed experts "
                           "as int4) or quant=None (the checkpoint's precision)")
    if slots != "auto" and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
        raise OffloadError(f"slots={slots!r}: give how many sequences to hold at once (1 or more), or 'auto'")
    args = load_config(model_dir, rope_scaling)
    ctx = ctx or min(DEFAULT_CONTEXT, args.max_context)
    check_context(args, ctx)
    if kv_cache not in KV_CACHES:
        raise OffloadError(f"kv_cache={kv_cache!r} is not a KV cache format; use {', '.join(KV_CACHES)}")
    if prefill not in ("auto", "cpu", "stream"):
        raise OffloadError(f"prefill={prefill!r} is not a prefill path; use 'cpu', 'stream' or 'auto'")
    if prefill == "stream" and quant != "int4":
        raise OffloadError("prefill='stream' streams the int4 experts; use it with quant='int4'")
    execution, hardware, budget = _execution_device(device, gpu_mem, profile)
    plan = _plan(args, hardware, budget, ctx, quant, dense_quant, str(model_dir), kv_cache, exact,
                 1 if slots == "auto" else slots)
    if slots == "auto" and plan.fits:  # more slots only where their caches fit beside the same placement
        for tried in (AUTO_SLOTS, 2):
            wider = _plan(args, hardware, budget, ctx, quant, dense_quant, str(model_dir), kv_cache, exact, tried)
            if wider.fits and _same_placement(wider, plan):
                plan = wider
                break
        if plan.slots < AUTO_SLOTS:
            print(f"note: {plan.slots} slot(s): the caches of {AUTO_SLOTS} would not fit beside this placement "
                  "(give slots, --parallel, to choose)", file=sys.stderr)
    slots = plan.slots
    if not plan.fits:
        raise OffloadError(f"{Path(model_dir).name} does not fit: {plan.reason}")
    hybrid = plan.gpu_budget > 0
    if prefill == "stream" and hybrid and quant == "int4" and not _plans_streaming(plan):
        raise OffloadError(f"prefill='stream' needs room on the GPU for two layers of experts, which a "
                           f"{plan.gpu_budget / 2**30:.1f} GiB budget leaves none of; raise gpu_mem, or use "
                           "prefill='auto' (streams when there is room)")
    outside = _cap_gpu_memory(execution, plan.gpu_budget) if execution.type == "cuda" else 0
    checkpoint = Checkpoint(model_dir, args.fp8_block_size)
    architecture = ARCHITECTURES[args.model_type]
    weights = architecture.sanitize(checkpoint.lazy_all(), args)
    with torch.device("meta"):
        model = architecture.Model(args)
    _check_weights(model, weights, str(model_dir))  # before the expert store or any weight is read
    from offload.placement import executed_placement, place, quantized_layers

    executor = stored = None
    if quant == "int4":
        executor = _swap_in_int4_experts(model, args, model_dir, store_dir, overlap, execution, hybrid, exact)
        layers = quantized_layers(model, plan)
        if layers:  # the dense layers this plan quantises, as an earlier load kept them beside the experts
            from offload.store import DenseLayer, DenseStore

            modules = {name: model.get_submodule(name) for name in layers}
            stored = DenseStore(executor.store.path, Path(model_dir), {
                name: DenseLayer(fmt, modules[name].out_features, modules[name].in_features,
                                 modules[name].bias is not None) for name, fmt in layers.items()})
    dtype = weights["embed_tokens.weight"].dtype if "embed_tokens.weight" in weights else None
    _fill(model, weights, dtype, str(model_dir), skip=stored.loaded_names if stored is not None else set())
    model.eval()
    nbytes = place(model, plan, execution, progress=_total_bytes(model) >= PROGRESS_BYTES, exact=exact,
                   stored=stored)
    if executor is not None and hybrid and _plans_streaming(plan):
        executor.prepare_streaming()
    engine = Engine(model, args, ctx, execution, executor, prefill, plan.kv_format, slots)
    engine.gpu_outside_bytes = outside
    if not hybrid:
        from offload.attention import plug_into

        plug_into([cache for slot in engine.slots for cache in slot.caches], args)
    engine.stop_ids |= generation_stop_ids(model_dir)
    engine.plan = plan
    expert_nbytes = executor.store.nbytes if executor is not None else 0
    caches = [cache for slot in engine.slots for cache in slot.caches]
    engine.placement = executed_placement(plan, execution, nbytes, caches, expert_nbytes, executor)
    if cuda_graphs:
        engine.graphs = _graphed_decode(engine)
    return engine


def _same_placement(plan, other) -> bool:
    """Whether two plans put every tensor group in the same place and format, caches apart (their
    sizes grow with the slots) but for the KV cache's format."""
    def layout(p):
        return [(e.group, e.device, e.format) for e in p.placement
                if not e.group.startswith("KV cache") and e.group != "DeltaNet state"]

    return layout(plan) == layout(other) and plan.kv_format == other.kv_format


def _plans_streaming(plan) -> bool:
    """Whether the plan counts the device slots that streamed prefill copies experts into."""
    from offload.planner import PREFETCH_GROUP

    return any(p.group == PREFETCH_GROUP for p in plan.placement)


def _graphed_decode(engine: Engine):
    """The engine's `GraphedDecode`, or None with a note saying why graphs stay off."""
    from offload.graphs import GraphedDecode

    reason = "they need a CUDA device" if engine.device.type != "cuda" else GraphedDecode.refusal(engine)
    if reason:
        print(f"note: CUDA graphs are off: {reason}", file=sys.stderr)
        return None
    return GraphedDecode(engine)


def _execution_device(device: str | None, gpu_mem, profile: str | HardwareProfile | None):
    """(execution device, hardware profile, GPU budget for the plan: None = the profile's GPU)."""
    import sys

    from offload.hardware import default_profile, load_profile, parse_size

    if isinstance(profile, HardwareProfile):
        hardware = profile
    else:
        hardware = load_profile(profile) if profile else default_profile()[0]
    budget = parse_size(gpu_mem, "gpu_mem") if gpu_mem is not None else None
    if device is None:
        if budget == 0:
            return torch.device("cpu"), hardware, 0
        if not torch.cuda.is_available():
            if budget:
                print("note: torch sees no CUDA device, so everything runs on the CPU (gpu_mem is ignored)",
                      file=sys.stderr)
            return torch.device("cpu"), hardware, 0
        device = "cuda"
    try:
        execution = torch.device(device)
    except RuntimeError:
        raise OffloadError(f"device={device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'") from None
    if execution.type == "cpu":  # a stand-in for the GPU only when a GPU budget is asked for
        return execution, hardware, budget or 0
    if execution.type != "cuda":
        raise OffloadError(f"device={device!r}: offload runs on CUDA GPUs or the CPU; use 'cuda' or 'cpu'")
    if not torch.cuda.is_available():
        raise OffloadError(f"device={device!r}, but torch sees no CUDA device; install a CUDA build of torch, "
                           "or run on the CPU with gpu_mem=0")
    if execution.index is not None and execution.index >= torch.cuda.device_count():
        raise OffloadError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA devices")
    if budget is None:
        budget = hardware.gpu.memory if hardware.gpu else 0
    return execution, hardware, budget


def _cap_gpu_memory(device: torch.device, budget: int) -> int:
    """Make the allocator refuse to grow past the plan's GPU budget, so a large card behaves like
    the one planned for; returns the bytes in use outside the allocator on offload's behalf."""
    free, total = torch.cuda.mem_get_info(device)  # creates the context first: it is counted below
    fraction, outside, note = gpu_memory_cap(budget, total, free, torch.cuda.memory_reserved(device))
    if note:
        print(note, file=sys.stderr)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.cuda.reset_peak_memory_stats(device)
    return outside


def gpu_memory_cap(budget: int, total: int, free: int, reserved: int) -> tuple[float, int, str | None]:
    """The allocator's share of a card for a plan's budget: (fraction of `total`, bytes in use
    outside the allocator on offload's behalf, a note or None). That part (the CUDA context,
    cuBLAS workspaces: total - free - reserved, at most CUDA_CONTEXT_BYTES; beyond that it belongs
    to other processes) comes out of the budget, and the allocator never counts on more than is
    free. A budget up to 10% above the card's memory (an "8 GB" card reports a little less) is
    clamped to it with a note; one further above is refused."""
    outside = min(max(0, total - free - reserved), CUDA_CONTEXT_BYTES)
    note = None
    if budget > total:
        if budget > 1.1 * total:
            raise OffloadError(f"gpu_mem is {budget / 2**30:.1f} GiB but the GPU has {total / 2**30:.1f} GiB; "
                               "lower --gpu-mem")
        note = (f"note: gpu_mem {budget / 2**30:.2f} GiB is more than the GPU's {total / 2**30:.2f} GiB; "
                f"using {total / 2**30:.2f} GiB")
        budget = total
    usable = min(budget - outside, free + reserved)
    if usable <= 0:
        raise OffloadError(f"gpu_mem is {budget / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of the GPU is "
                           "free; free the GPU or lower --gpu-mem")
    return usable / total, outside, note


def _swap_in_int4_experts(model: nn.Module, args: ModelArgs, model_dir, store_dir, overlap: bool,
                          device: torch.device, hybrid: bool, exact: bool):
    """Replace each MoE layer's float experts by the int4 executor (their weights are never read);
    returns the executor."""
    import sys

    from tqdm import tqdm

    from offload.experts import CpuExpertExecutor, Int4Experts
    from offload.store import open_store

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantising experts",
                       disable=total < 64 * 2**20)  # small models build in a blink
        bar.update(done - bar.n)

    import offload.kernels as kernels

    if not kernels.compiled():
        print(f"compiling the CPU kernels (first run only, ~20 s; cached in {kernels.cache_dir()}) ...",
              file=sys.stderr)
    store = open_store(model_dir, args, store_dir, progress=progress,
                       announce=lambda line: print(line, file=sys.stderr))
    if bar is not None:
        bar.close()
    executor = CpuExpertExecutor(store, args, overlap=overlap, device=device, hybrid=hybrid, exact=exact)
    for layer, block in enumerate(model.layers):
        if args.is_moe_layer(layer):
            block.mlp.experts = Int4Experts(executor, layer)
    return executor


def _plan(args: ModelArgs, hardware, budget: int | None, ctx: int, quant: str | None, dense_quant: str | None,
          name: str, kv_cache: str, exact: bool, slots: int = 1):
    from offload.hardware import ProfileError
    from offload.planner import make_plan

    if budget and hardware.gpu is None:
        raise ProfileError(f"profile {hardware.name} has no GPU; use gpu_mem=0 or a profile with a GPU")
    return make_plan(args, hardware, budget, ctx=ctx, quant=quant or "none", dense_quant=dense_quant,
                     model_name=name, kv_cache=kv_cache, exact=exact, slots=slots)


def _total_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_weights(model: nn.Module, weights: dict, source: str) -> None:
    """Every parameter the config implies is in the checkpoint with its shape (headers only)."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in weights:
            raise CheckpointError(f"{source}: tensor {checkpoint_name(name, weights)} is missing from the checkpoint; "
                                  "download the model again")
        lazy = weights[name]
        if tuple(lazy.shape) != tuple(param.shape):
            raise CheckpointError(f"{lazy.where}: shape {list(lazy.shape)} does not match config.json, "
                                  f"which implies {list(param.shape)}; the config and weights are "
                                  "from different models")


def _fill(model: nn.Module, weights: dict, dtype: torch.dtype | None, source: str,
          skip: set[str] = frozenset()) -> None:
    """Replace every meta parameter of `model` by its checkpoint tensor (cast to `dtype`), but for
    those in `skip` (layers the expert store keeps quantised: they stay on meta until `place`)."""
    from tqdm import tqdm

    loaded: dict[str, torch.Tensor] = {}  # by checkpoint name, so tied weights share storage
    parameters = [(name, param) for name, param in model.named_parameters(remove_duplicate=False)
                  if name not in skip]
    bar = tqdm(parameters, desc="loading weights", unit=" tensors", disable=_total_bytes(model) < PROGRESS_BYTES,
               leave=False)
    for name, param in bar:
        lazy = weights[name]  # present, with its shape: `_check_weights`
        key = id(lazy)
        if key not in loaded:
            tensor = lazy.load()
            require_finite(tensor, lazy.where)
            loaded[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, leaf, nn.Parameter(loaded[key], requires_grad=False))
