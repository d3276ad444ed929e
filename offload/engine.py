"""The engine: a loaded model, its caches, and prefill / decode / generate.

`load()` builds the architecture's torch model on the meta device and fills it tensor by tensor
from the checkpoint, so no tensor is held twice. Caches are allocated once for `ctx` positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from offload.checkpoint import Checkpoint, CheckpointError
from offload.config import ModelArgs, load_config
from offload.errors import OffloadError
from offload.models import ARCHITECTURES
from offload.models.cache import Cache, cache_nbytes
from offload.sampling import sample

DEFAULT_CONTEXT = 4096  # positions the KV cache holds unless `ctx` says otherwise
PREFILL_CHUNK = 512  # prompt tokens per forward pass (bounds the attention score memory)


class Engine:
    """A model ready to run. One sequence at a time."""

    def __init__(self, model: nn.Module, args: ModelArgs, ctx: int, device: torch.device):
        self.model = model
        self.args = args
        self.ctx = ctx
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        self.caches: list[Cache] = ARCHITECTURES[args.model_type].make_cache(args, ctx, self.dtype, device)
        self.plan = None  # set by the planner once it exists; execution ignores it for now

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

    def _forward(self, ids: torch.Tensor, start: int, last_only: bool) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(ids, self.caches, start, last_only=last_only).float()

    def _prefill(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Run a fresh sequence's prompt in chunks; logits [T, V] or of the last token [1, V]."""
        for cache in self.caches:
            cache.reset()
        outputs = []
        for start in range(0, ids.shape[0], PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            last_chunk = start + PREFILL_CHUNK >= ids.shape[0]
            if all_logits or last_chunk:
                outputs.append(self._forward(chunk, start, last_only=not all_logits))
            else:
                self._forward(chunk, start, last_only=True)
        return torch.cat(outputs)

    def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of a fresh sequence: input_ids [T] -> float32 [T, vocab]. No state is kept."""
        ids = self._ids(input_ids)
        self._check_room(ids.shape[0])
        return self._prefill(ids, all_logits=True).cpu()

    def stream(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
               temperature: float = 0.0, seed: int | None = None) -> Iterator[int]:
        """Yield new token ids one at a time; stops early at an end-of-sequence token."""
        ids = self._ids(input_ids)
        self._check_room(ids.shape[0] + max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        logits = self._prefill(ids, all_logits=False)[-1]
        position = ids.shape[0]
        token_buffer = torch.empty(1, dtype=torch.long, device=self.device)
        for step in range(max_new_tokens):
            token = sample(logits.cpu(), temperature, generator)
            yield token
            if token in self.args.eos_token_ids or step == max_new_tokens - 1:
                return
            token_buffer[0] = token
            logits = self._forward(token_buffer, position, last_only=True)[-1]
            position += 1

    def generate(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int | None = None) -> list[int]:
        """New token ids after `input_ids` (greedy when temperature == 0)."""
        return list(self.stream(input_ids, max_new_tokens, temperature, seed))


def load(model_dir: str | Path, quant: str | None = None, gpu_mem: str | int | None = None,
         profile: str | None = None, device: str | None = None, ctx: int | None = None) -> Engine:
    """Load a Hugging Face checkpoint directory into an `Engine`.

    quant=None keeps the checkpoint's precision (FP8 weights are dequantised to bf16).
    gpu_mem, profile and device are accepted for the placement planner and not used yet:
    everything runs on the CPU.
    """
    if quant is not None:
        raise OffloadError(f"quant={quant!r} is not available yet; use quant=None to run in the "
                           "checkpoint's precision")
    args = load_config(model_dir)
    ctx = ctx or min(DEFAULT_CONTEXT, args.max_position_embeddings)
    if ctx <= 0:
        raise OffloadError(f"ctx must be positive, got {ctx}")
    checkpoint = Checkpoint(model_dir, args.fp8_block_size)
    architecture = ARCHITECTURES[args.model_type]
    weights = architecture.sanitize(checkpoint.lazy_all(), args)
    with torch.device("meta"):
        model = architecture.Model(args)
    dtype = weights["embed_tokens.weight"].dtype if "embed_tokens.weight" in weights else None
    _fill(model, weights, dtype, str(model_dir))
    model.eval()
    return Engine(model, args, ctx, torch.device("cpu"))


def _fill(model: nn.Module, weights: dict, dtype: torch.dtype | None, source: str) -> None:
    """Replace every meta parameter of `model` by its checkpoint tensor (cast to `dtype`)."""
    loaded: dict[str, torch.Tensor] = {}  # by checkpoint name, so tied weights share storage
    for name, param in list(model.named_parameters(remove_duplicate=False)):
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
