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
    ids, values = candidates(logits, params, history, drawn)
    if ids is None:
        return values.clone() if values.data_ptr() == logits.data_ptr() else values
    out = torch.full(logits.shape, float("-inf"), dtype=torch.float32, device=logits.device)
    out[ids] = values
    return out


NOTHING_DRAWABLE = "no token can be drawn: every logit is -inf (a grammar that allows nothing?)"


def candidates(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = (),
               drawn: Sequence[int] = ()) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens the draw can pick and their processed logits (`processed_logits`): (ids int64
    [n], float32 [n]); or (None, all V logits) where no truncation applies (greedy, or temperature
    alone; the logits may be the caller's own). The truncations work on the tokens they keep, not
    the whole vocabulary: a sort of 151,936 logits for top-p took 8-17 ms a token on two cores
    (`bench/sampling.py`)."""
    logits = logits.float()
    penalised = (params.presence_penalty or params.frequency_penalty) and len(drawn) \
        or params.repetition_penalty != 1.0 and len(history)
    if penalised:
        logits = logits.clone()
    if (params.presence_penalty or params.frequency_penalty) and len(drawn):
        tokens, counts = _distinct(drawn, logits.numel(), logits.device)
        logits[tokens] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.repetition_penalty != 1.0 and len(history):
        seen, _ = _distinct(history, logits.numel(), logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if params.temperature == 0:
        return None, logits
    logits = logits / params.temperature
    if torch.isnan(logits.max()):  # a truncation would drop it silently, a draw could not be made
        raise OffloadError("no token can be drawn: the logits hold NaN")
    vocab = logits.numel()
    if 0 < params.top_k < vocab:  # the top k, likeliest first (ties with the k-th all kept)
        values, ids = torch.topk(logits, params.top_k)
        tied = logits >= values[-1]
        if values[-1] > float("-inf") and torch.count_nonzero(tied) > params.top_k:
            values, order = torch.sort(logits[tied], descending=True)
            ids = torch.nonzero(tied).flatten()[order]
        total = torch.logsumexp(values, dim=0)  # they are the distribution now
    elif params.top_p < 1.0:  # enough of the likeliest to hold the nucleus
        total = torch.logsumexp(logits, dim=0)
        values, ids = _nucleus(logits, total, params.top_p)
    elif params.min_p > 0:  # min-p alone: its ratio to the likeliest as a logit's distance to the largest
        ids = torch.nonzero(logits >= logits.max() + math.log(params.min_p)).flatten()
        if ids.numel() == 0:
            raise OffloadError(NOTHING_DRAWABLE)
        return ids, logits[ids]
    else:
        return None, logits
    drawable = values > float("-inf")  # a grammar's mask can leave fewer than were asked for
    values, ids = values[drawable], ids[drawable]
    if ids.numel() == 0:  # (top-p and min-p keep at least the likeliest of those left)
        raise OffloadError(NOTHING_DRAWABLE)
    if params.top_p < 1.0:  # keep a token while the mass before it is below p
        probs = torch.exp(values - total)
        kept = (probs.cumsum(dim=0) - probs < params.top_p).nonzero().flatten()
        values, ids = values[kept], ids[kept]
    if params.min_p > 0:
        probs = torch.softmax(values, dim=0)
        kept = (probs >= params.min_p * probs.max()).nonzero().flatten()
        values, ids = values[kept], ids[kept]
    return ids, values


def _distinct(tokens: Sequence[int], vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, counts) of the distinct tokens of a sequence: sorted, or for a long one counted per
    vocabulary entry (a 32K-token history: 0.5 ms against 3.3 for torch.unique)."""
    values = np.fromiter(tokens, np.int64, len(tokens))
    if len(values) < vocab // 16:
        ids, counts = np.unique(values, return_counts=True)
    else:
        counts = np.bincount(values, minlength=vocab)
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    return torch.from_numpy(ids).to(device), torch.from_numpy(counts).to(device)


NOISE_SPAN = 27.0  # the Gumbel noise of `_draw` lies in [-3.13, 22.87]: a logit further below the
# largest can never win


def _mixed64(value: int) -> int:
    """SplitMix64's step and finaliser on a Python int: 64 well-mixed bits."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def _hashed(words: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash (xorshift-multiply rounds, constants from Wellons' hash prospector):
    uint32 -> well-mixed uint32, a bijection."""
    words = words ^ (words >> np.uint32(16))
    words *= np.uint32(0x21F0AAAD)
    words ^= words >> np.uint32(15)
    words *= np.uint32(0x735A2D97)
    return words ^ (words >> np.uint32(15))


def _draw(ids: torch.Tensor | None, logits: torch.Tensor, key: int, draw: int) -> int:
    """The index (into `logits`: of token ids[index], or of token index where ids is None) drawn
    with probability softmax(logits): the largest logit plus Gumbel noise. Token t's noise is a
    hash of (key, draw, t) and of nothing else (not which other tokens are candidates, nor their
    order), so logits that differ a little (a sequence's rows beside others' take other kernels)
    change the draw only where two tokens' sums were that close, as a race over all V does
    (torch.multinomial's draw of one), without V random numbers (~3 ms over 151,936): only tokens
    within NOISE_SPAN of the largest logit get noise at all."""
    values = logits.cpu().numpy()
    if not np.isfinite(values.max()):
        raise OffloadError(f"no token can be drawn: the largest logit is {values.max()}")
    near = np.flatnonzero(values >= values.max() - NOISE_SPAN)
    tokens = near if ids is None else ids.cpu().numpy()[near]
    base = _mixed64(key ^ _mixed64(draw + 1)) >> 32  # every bit of (key, draw) moves it
    bits = _hashed(_hashed(tokens.astype(np.uint32) * np.uint32(0x9E3779B9) + np.uint32(base)))
    uniform = (bits.astype(np.float64) + 0.5) * 2.0**-32  # in (0, 1)
    return int(near[np.argmax(values[near] - np.log(-np.log(uniform)))])


NUCLEUS_TRIES = (64, 512, 4096)  # top-p without top-k: the likeliest tokens examined, in turn, before
# the whole vocabulary is sorted


def _nucleus(logits: torch.Tensor, total: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids), likeliest first, of enough of the likeliest tokens to hold the top-p nucleus
    (`total`: the logits' logsumexp): the first 64, else 512, else 4096 if their mass reaches
    top_p, else all of them sorted. A trained model's nucleus is mostly a few dozen tokens."""
    for count in NUCLEUS_TRIES:
        if count >= logits.numel():
            break
        values, ids = torch.topk(logits, count)
        if torch.exp(values - total).sum() >= top_p:
            return values, ids
    return torch.sort(logits, descending=True)


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
        generator = torch.Generator()
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        self.key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))  # keys the draws' noise

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        ids, values = candidates(logits, self.params, history, self.drawn)  # ids None: values are all V
        if self.params.temperature == 0:  # NumPy's argmax: the same first largest index as torch's
            index = int(np.argmax(values.cpu().numpy()))  # (a NaN counts as largest), ~10x faster
        else:
            index = _draw(ids, values, self.key, len(self.drawn))
        token = index if ids is None else int(ids[index])
        self.drawn.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.logprobs is not None:
            logprobs = torch.log_softmax(values, dim=-1)
            best, at = torch.topk(logprobs, min(self.logprobs, logprobs.numel()))
            at = at if ids is None else ids[at]
            top = [(i, v) for i, v in zip(at.tolist(), best.tolist()) if v != float("-inf")]  # drawable ones
            self.last = TokenLogprobs(token, float(logprobs[index]), top)
        return token
