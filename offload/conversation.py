"""Generating text: one prompt (`complete`) or a multi-turn chat (`Conversation`), streamed as
text pieces, with the timings the CLI reports.

A chat keeps the model's caches between turns on a `Session` (as the server does): the next
turn's rendered prompt usually starts with exactly the tokens already fed, and then only the new
tokens are prefilled. When it does not (the template re-renders earlier turns differently), the
turn resumes from a snapshot if the session keeps them, else starts a fresh sequence: the
recurrent DeltaNet state cannot be rolled back to a common prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from offload.engine import Engine, Progress
from offload.errors import OffloadError
from offload.sampling import Sampler, SamplingParams
from offload.session import Session
from offload.tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens prefilled for this answer (only the new ones in a chat)
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (a stop token), "length" (max tokens) or "interrupted"
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_rate(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first (which comes with the prefill)."""
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s else 0.0

    def line(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens at {self.prefill_rate:.1f} tok/s, "
                f"generated {self.generated_tokens} tokens at {self.decode_rate:.1f} tok/s")


def generate(engine: Engine, prompt_ids: list[int], sampling: SamplingParams | Sampler, max_tokens: int,
             stats: Stats, fresh: bool = True, progress: Progress | None = None) -> Iterator[int]:
    """`engine.stream` with timings recorded into `stats` as it goes (`progress` follows a long
    prompt's prefill)."""
    stats.prompt_tokens = len(prompt_ids)
    started = time.perf_counter()
    tokens = engine.stream(prompt_ids, max_tokens, sampling=sampling, fresh=fresh, progress=progress)
    return timed(tokens, stats, started, engine.stop_ids)


def timed(tokens: Iterator[int], stats: Stats, started: float, stop_ids: set[int]) -> Iterator[int]:
    """The tokens, with their timings recorded into `stats` (the prefill's time: from `started`
    to the first token) and the finish reason once they end ("interrupted" until then)."""
    stats.finish_reason = "interrupted"
    first_at = None
    for token in tokens:
        now = time.perf_counter()
        if first_at is None:
            first_at = now
            stats.prefill_s = now - started
        stats.decode_s = now - first_at
        stats.generated_tokens += 1
        stats.token_ids.append(token)
        yield token
    stats.finish_reason = "stop" if stats.token_ids and stats.token_ids[-1] in stop_ids else "length"


def text_pieces(tokenizer: Tokenizer, tokens: Iterator[int], stop_ids: set[int]) -> Iterator[str]:
    """Decoded text as tokens arrive; stop tokens are not shown."""
    detokenize = tokenizer.detokenizer()
    for token in tokens:
        if token not in stop_ids:
            piece = detokenize(token)
            if piece:
                yield piece


class Conversation:
    """A chat with one model: messages, the chat template and the engine's caches across turns
    (`snapshots`: how many points of the sequence the session keeps to resume from, as the
    server's `--snapshots`)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, sampling: SamplingParams = SamplingParams(),
                 max_tokens: int = 1024, system: str | None = None, snapshots: int = 0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.session = Session(engine, snapshots)
        self.sampling = sampling  # settable; one random stream runs across the turns
        self.max_tokens = max_tokens
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last = Stats()
        self.thinking = False
        self.progress: Progress | None = None  # follows a long prompt's prefill (the REPL shows it)
        self._sampler: Sampler | None = None

    def _current_sampler(self) -> Sampler:
        if self._sampler is None or self._sampler.params != self.sampling:
            self._sampler = Sampler(self.sampling)
        return self._sampler

    def reset(self) -> None:
        """Forget the turns (the system prompt stays)."""
        self.messages = []
        self.session.reset()

    def set_system(self, text: str | None) -> None:
        self.system = text or None  # the next prompt differs from its first tokens: a fresh sequence

    def _rendered(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def ask(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer as text pieces. The answer (or as much of it
        as was generated, if the caller stops early) is added to the messages."""
        self.messages.append({"role": "user", "content": text})
        rendered = self._rendered()
        ids = self.tokenizer.chat_ids(rendered)
        room = self.engine.ctx - len(ids)  # continuing or not, the caches end up holding all of ids
        if room < 1:
            self.messages.pop()
            raise OffloadError(f"the conversation needs {len(ids)} tokens and the context holds {self.engine.ctx}; "
                               "/reset to start over, or restart with a larger --ctx")
        boundary = 0
        if self.session.limit and len(rendered) > 1:  # the last message's start: a point to resume from
            before = self.tokenizer.chat_ids(rendered[:-1], add_generation_prompt=False)
            boundary = len(before) if ids[:len(before)] == before else 0
        self.last = stats = Stats(finish_reason="interrupted")  # until the answer ends
        self.thinking = self.tokenizer.opens_thinking(ids)  # the answer starts inside <think>
        try:
            started = time.perf_counter()
            logits, reused = self.session.resume(ids, boundary, self.progress)
            stats.prompt_tokens = len(ids) - reused
            tokens = timed(self.session.decode(logits, min(self.max_tokens, room), self._current_sampler()),
                           stats, started, self.engine.stop_ids)
            yield from text_pieces(self.tokenizer, tokens, self.engine.stop_ids)
        finally:  # also on errors (e.g. Ctrl-C in the prefill) and when the caller stops early
            answer = [t for t in stats.token_ids if t not in self.engine.stop_ids]
            if stats.token_ids:
                self.messages.append({"role": "assistant", "content": self.tokenizer.decode(answer)})
            else:  # nothing came back: the turn did not happen
                self.messages.pop()
