"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition,
presence and frequency penalties, reproducible with a seed.

The order is the one llama.cpp and transformers use: repetition penalty on the raw logits, then
temperature, then the truncations (top-k, top-p, min-p) on the resulting distribution, then a
draw. Temperature 0 is greedy (after the penalty).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from offload.errors import OffloadError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0: none
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence; 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token drawn so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was drawn so far
    seed: int | None = None  # a seed makes sampling reproducible

    def __post_init__(self):
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OffloadError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise OffloadError(f"seed must be between -2^63 and 2^64 - 1, got {self.seed}")
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]")]
        for ok, message in checks:
            if not ok:
                raise OffloadError(f"{message}; got {getattr(self, message.split()[0])}")

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)


def generation_config(model_dir: str | Path) -> dict:
    """The checkpoint's generation_config.json ({} if it has none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OffloadError(f"{path}: not readable JSON ({error}); fix or delete the file") from None
    return config if isinstance(config, dict) else {}


def generation_stop_ids(model_dir: str | Path) -> set[int]:
    """eos_token_id of generation_config.json (an id or a list)."""
    eos = generation_config(model_dir).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else set() if eos is None else {eos}


def generation_defaults(model_dir: str | Path) -> SamplingParams:
    """Sampling settings from the checkpoint's generation_config.json (greedy if it has none or
    says do_sample = false)."""
    config = generation_config(model_dir)
    known = {f.name for f in fields(SamplingParams)} - {"seed"}
    values = {name: config[name] for name in known if isinstance(config.get(name), (int, float))}
    if not config.get("do_sample", bool(values.get("temperature"))):
        values["temperature"] = 0.0
    try:
        return SamplingParams(**values)
    except OffloadError as error:
        raise OffloadError(f"{Path(model_dir) / 'generation_config.json'}: {error}; fix or delete the file") from None


def processed_logits(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = (),
                     drawn: Sequence[int] = ()) -> torch.Tensor:
    """logits [V] -> the float32 logits the draw uses: penalised (the repetition penalty over
    `history`, the whole sequence; presence and frequency penalties over `drawn`, the tokens
    generated so far), tempered and truncated (-inf)."""
    logits = logits.float().clone()
    if (params.presence_penalty or params.frequency_penalty) and len(drawn):
        tokens, counts = torch.unique(torch.as_tensor(list(drawn), dtype=torch.long), return_counts=True)
        logits[tokens] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.repetition_penalty != 1.0 and len(history):
        seen = torch.unique(torch.as_tensor(list(history), dtype=torch.long))
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if params.temperature == 0:
        return logits
    logits /= params.temperature
    if 0 < params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits[logits < threshold] = float("-inf")
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p  # mass before this token already >= p
        logits[order[drop]] = float("-inf")
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits[probs < params.min_p * probs.max()] = float("-inf")
    return logits


@dataclass
class TokenLogprobs:
    """A drawn token's log-probability and the `top` most likely tokens' (id, log-probability), in
    the distribution it was drawn from (penalties, temperature and truncation applied; greedy: the
    penalised logits). `top` lists only tokens the draw could have picked (fewer where truncation
    or a grammar left fewer)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


class Sampler:
    """Draws tokens for one sequence with `params`; its own generator makes a seeded run repeat.
    With `logprobs` (how many of the likeliest tokens to list beside each drawn one, 0 to 20), each
    draw leaves its `TokenLogprobs` in `last`. With a `constraint` (`offload.structured`), each
    draw is limited to the tokens its grammar allows next, and advances it."""

    def __init__(self, params: SamplingParams = SamplingParams(), logprobs: int | None = None, constraint=None):
        self.params = params
        self.logprobs = logprobs
        self.constraint = constraint
        self.last: TokenLogprobs | None = None
        self.drawn: list[int] = []  # the tokens this sampler has drawn (presence / frequency penalties)
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        logits = processed_logits(logits, self.params, history, self.drawn)
        if self.params.temperature == 0:  # NumPy's argmax: the same first largest index as torch's
            token = int(np.argmax(logits.cpu().numpy()))  # (a NaN counts as largest), ~10x faster
        else:
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator))
        self.drawn.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            values, ids = torch.topk(logprobs, min(self.logprobs, logprobs.numel()))
            top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]  # drawable ones
            self.last = TokenLogprobs(token, float(logprobs[token]), top)
        return token
