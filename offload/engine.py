"""The engine: a loaded model, its caches, and prefill / decode / generate.

`load()` builds the architecture's torch model on the meta device and fills it tensor by tensor
from the checkpoint, so no tensor is held twice. Caches are allocated once for `ctx` positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from offload.checkpoint import Checkpoint, CheckpointError
from offload.config import DEFAULT_CONTEXT, PREFILL_CHUNK, ModelArgs, load_config
from offload.errors import OffloadError
from offload.models import ARCHITECTURES
from offload.models.cache import Cache, cache_nbytes
from offload.sampling import Sampler, SamplingParams, generation_stop_ids


PROGRESS_BYTES = 256 * 2**20  # models smaller than this load without a progress bar


class Engine:
    """A model ready to run. One sequence at a time."""

    def __init__(self, model: nn.Module, args: ModelArgs, ctx: int, device: torch.device):
        self.model = model
        self.args = args
        self.ctx = ctx
        self.device = device
        self.dtype = model.compute_dtype
        self.caches: list[Cache] = ARCHITECTURES[args.model_type].make_cache(args, ctx, self.dtype, device)
        self.plan = None  # the placement plan (set by load); execution does not follow it yet
        self.position = 0  # tokens of the current sequence held in the caches
        self.history: list[int] = []  # the ids `stream` has fed in the current sequence
        self.stop_ids = set(args.eos_token_ids)  # ends generation (load adds generation_config.json's)

    @property
    def cache_nbytes(self) -> int:
        return cache_nbytes(self.caches)

    def _ids(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise OffloadError("the prompt is empty; give at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.args.vocab_size:
            raise OffloadError(f"token ids must be in [0, {self.args.vocab_size}); got "
                               f"{int(ids.min())}..{int(ids.max())}")
        return ids.to(self.device)

    def _check_room(self, needed: int) -> None:
        if needed > self.ctx:
            raise OffloadError(f"{needed} tokens do not fit the context of {self.ctx}; load with a "
                               f"larger ctx (at most {self.args.max_position_embeddings})")

    def reset(self) -> None:
        """Start a new sequence."""
        for cache in self.caches:
            cache.reset()
        self.position = 0
        self.history = []

    def feed(self, input_ids: Sequence[int] | torch.Tensor, all_logits: bool = True) -> torch.Tensor:
        """Append tokens to the current sequence; float32 logits of each new token [T, vocab]
        (only of the last one, [1, vocab], when all_logits is False).

        Long inputs run in chunks of PREFILL_CHUNK tokens, each continuing from the caches.
        """
        ids = self._ids(input_ids)
        self._check_room(self.position + ids.shape[0])
        outputs = []
        with torch.inference_mode():
            for begin in range(0, ids.shape[0], PREFILL_CHUNK):
                chunk = ids[begin:begin + PREFILL_CHUNK]
                is_last = begin + PREFILL_CHUNK >= ids.shape[0]
                logits = self.model(chunk, self.caches, self.position, last_only=not all_logits)
                self.position += chunk.shape[0]
                if all_logits or is_last:
                    outputs.append(logits.float())
        return torch.cat(outputs).cpu()

    def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of a fresh sequence: input_ids [T] -> float32 [T, vocab]. No state is kept."""
        self.reset()
        try:
            return self.feed(input_ids)
        finally:
            self.reset()

    def stream(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
               temperature: float = 0.0, seed: int | None = None,
               sampling: SamplingParams | Sampler | None = None, fresh: bool = True) -> Iterator[int]:
        """Yield new token ids one at a time; stops after a stop token (`stop_ids`, yielded) or
        `max_new_tokens`. `sampling` (or just temperature and seed) chooses the tokens; pass a
        `Sampler` to keep one random stream across calls (a chat's turns). With
        fresh=False the input continues the current sequence (a chat's next turn) instead of
        starting a new one. Tokens are fed as they are drawn, except the last one."""
        ids = self._ids(input_ids)
        sampler = sampling if isinstance(sampling, Sampler) else \
            Sampler(sampling or SamplingParams(temperature=temperature, seed=seed))
        if fresh:
            self.reset()
        self._check_room(self.position + ids.shape[0] + max_new_tokens)
        logits = self.feed(ids, all_logits=False)[-1]
        self.history += ids.tolist()
        for step in range(max_new_tokens):
            token = sampler(logits, self.history)
            yield token
            if token in self.stop_ids or step == max_new_tokens - 1:
                return
            logits = self.feed([token], all_logits=False)[-1]
            self.history.append(token)

    def generate(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int | None = None,
                 sampling: SamplingParams | None = None) -> list[int]:
        """New token ids after `input_ids` (greedy when temperature == 0)."""
        return list(self.stream(input_ids, max_new_tokens, temperature, seed, sampling))


def load(model_dir: str | Path, quant: str | None = None, gpu_mem: str | int | None = None,
         profile: str | None = None, device: str | None = None, ctx: int | None = None,
         store_dir: str | Path | None = None, dense_quant: str | None = "auto", overlap: bool = False,
         prefill: str = "auto") -> Engine:
    """Load a Hugging Face checkpoint directory into an `Engine`.

    quant=None keeps the checkpoint's precision (FP8 weights are dequantised to bf16);
    quant="int4" runs the routed experts from the int4 expert store (built on first use, in
    `store_dir` or the cache; see offload.store) with the CPU kernels.
    overlap=True runs the int4 experts on a worker thread while the shared expert is computed.
    prefill picks how prompt chunks reach the int4 experts: "cpu" (grouped int4 kernels, path a),
    "stream" (whole layers copied to the device, dequantised and run there, path b; with the
    device = CPU without CUDA) or "auto" (the plan's choice by prompt length; "cpu" while
    everything executes on the CPU, where streaming cannot win).
    dense_quant="int8" or "int4" runs the dense matrices placed on the CPU (mixers, shared experts,
    lm_head) from that format with the same kernels (quantised at load) and computes in fp32;
    None keeps them in the checkpoint's precision. "auto" (the default) is "int8" when the
    routed experts are int4 and None with quant=None (the checkpoint as it is, everywhere).
    gpu_mem ("8G", bytes, 0 for CPU only) and profile (a name in profiles/ or a YAML file) make
    the placement plan, kept as `engine.plan`; execution does not follow it yet: everything runs
    on the CPU. device is accepted and not used yet.
    """
    if dense_quant not in (None, "auto", "int8", "int4"):
        raise OffloadError(f"dense_quant={dense_quant!r} is not a format offload has; use 'int8', 'int4', "
                           "None (the checkpoint's precision) or 'auto'")
    if quant not in (None, "int4"):
        raise OffloadError(f"quant={quant!r} is not a format offload has; use quant='int4' (routed experts "
                           "as int4) or quant=None (the checkpoint's precision)")
    args = load_config(model_dir)
    ctx = ctx or min(DEFAULT_CONTEXT, args.max_position_embeddings)
    if ctx <= 0:
        raise OffloadError(f"ctx must be positive, got {ctx}")
    if prefill not in ("auto", "cpu", "stream"):
        raise OffloadError(f"prefill={prefill!r} is not a prefill path; use 'cpu', 'stream' or 'auto'")
    if prefill == "stream" and quant != "int4":
        raise OffloadError("prefill='stream' streams the int4 experts; use it with quant='int4'")
    if dense_quant == "auto":  # every dense matrix runs on the CPU for now
        dense_quant = "int8" if quant == "int4" else None
    checkpoint = Checkpoint(model_dir, args.fp8_block_size)
    architecture = ARCHITECTURES[args.model_type]
    weights = architecture.sanitize(checkpoint.lazy_all(), args)
    with torch.device("meta"):
        model = architecture.Model(args)
    if quant == "int4":
        _swap_in_int4_experts(model, args, model_dir, store_dir, overlap, "stream" if prefill == "stream" else "cpu")
    dtype = weights["embed_tokens.weight"].dtype if "embed_tokens.weight" in weights else None
    _fill(model, weights, dtype, str(model_dir))
    model.eval()
    if dense_quant is not None:
        from offload.dense import quantize_dense

        quantize_dense(model, dense_quant, progress=_total_bytes(model) >= PROGRESS_BYTES)
        _widen_float_parameters(model)
    engine = Engine(model, args, ctx, torch.device("cpu"))
    engine.stop_ids |= generation_stop_ids(model_dir)
    engine.plan = _plan(args, gpu_mem, profile, ctx, quant, dense_quant, str(model_dir))
    return engine


def _swap_in_int4_experts(model: nn.Module, args: ModelArgs, model_dir, store_dir, overlap: bool,
                          prefill: str) -> None:
    """Replace each MoE layer's float experts by the int4 executor (their weights are never read)."""
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

    import kernels

    if not kernels.compiled():
        print(f"compiling the CPU kernels (first run only, ~15 s; cached in {kernels.cache_dir()}) ...",
              file=sys.stderr)
    store = open_store(model_dir, args, store_dir, progress=progress,
                       announce=lambda line: print(line, file=sys.stderr))
    if bar is not None:
        bar.close()
    executor = CpuExpertExecutor(store, args, overlap=overlap, prefill=prefill)
    for layer, block in enumerate(model.layers):
        if args.is_moe_layer(layer):
            block.mlp.experts = Int4Experts(executor, layer)


def _plan(args: ModelArgs, gpu_mem, profile, ctx: int, quant: str | None, dense_quant: str | None, name: str):
    from offload.hardware import ProfileError, default_profile, load_profile, parse_size
    from offload.planner import make_plan

    hardware = load_profile(profile) if profile else default_profile()[0]
    budget = parse_size(gpu_mem, "gpu_mem") if gpu_mem is not None else None
    if budget and hardware.gpu is None:
        raise ProfileError(f"profile {hardware.name} has no GPU; use gpu_mem=0 or a profile with a GPU")
    return make_plan(args, hardware, budget, ctx=ctx, quant=quant or "none", dense_quant=dense_quant,
                     model_name=name)


def _total_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _widen_float_parameters(model: nn.Module) -> None:
    """Compute in fp32 once the dense matrices are quantised: what stays float is small (norms,
    conv, routers) and the kernels take fp32, so bf16 activations would only add conversions
    (and run slower on CPUs without bf16 arithmetic). The embedding table keeps its dtype; only
    the rows gathered per token are widened."""
    for name, param in list(model.named_parameters()):
        if param.is_floating_point() and param.dtype != torch.float32 and name != "embed_tokens.weight":
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(param.float(), requires_grad=False))


def _fill(model: nn.Module, weights: dict, dtype: torch.dtype | None, source: str) -> None:
    """Replace every meta parameter of `model` by its checkpoint tensor (cast to `dtype`)."""
    from tqdm import tqdm

    loaded: dict[str, torch.Tensor] = {}  # by checkpoint name, so tied weights share storage
    parameters = list(model.named_parameters(remove_duplicate=False))
    bar = tqdm(parameters, desc="loading weights", unit=" tensors", disable=_total_bytes(model) < PROGRESS_BYTES,
               leave=False)
    for name, param in bar:
        if name not in weights:
            raise CheckpointError(f"{source}: tensor model.{name} is missing from the checkpoint; "
                                  "download the model again")
        lazy = weights[name]
        if tuple(lazy.shape) != tuple(param.shape):
            raise CheckpointError(f"{lazy.where}: shape {list(lazy.shape)} does not match config.json, "
                                  f"which implies {list(param.shape)}; the config and weights are "
                                  "from different models")
        key = id(lazy)
        if key not in loaded:
            tensor = lazy.load()
            loaded[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, leaf, nn.Parameter(loaded[key], requires_grad=False))
