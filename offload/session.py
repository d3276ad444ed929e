"""A sequence kept on one engine across requests: what it holds, where it has been, and how a new
prompt reuses either. The chat REPL (`Conversation`) and the server (`Service`) both run on one.

Prefix reuse. A prompt that starts with the tokens the engine holds (the previous prompt and
answer: a chat's next turn) prefills only the rest. DeltaNet's recurrent state cannot be rolled
back, so a session may also keep snapshots of the sequence (`Engine.snapshot`: the conv and
recurrent states copied to RAM; keys and values stay in the KV cache by position) at two points of
every prompt: a boundary the caller names (the last message's start) and the prompt's end (with
its last logits). An edited last message resumes from the first, a regenerated answer from the
second (nothing to prefill), instead of re-reading the history. At most `limit` are kept, the
least recently used dropped first: memory is bounded by `limit` x (the DeltaNet state + a row of
logits): Qwen3-Next-80B 76 MiB each, Qwen3-MoE 0.6 MiB.

A sequence that a failure or Ctrl-C interrupts while tokens are being fed may hold a half-updated
layer: the session resets the engine then, so nothing ever continues from it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from offload.engine import Engine, Progress, Snapshot
from offload.sampling import Sampler


class Session:
    """The sequence in one of the engine's slots (`slot`), across requests."""

    def __init__(self, engine: Engine, limit: int = 0, slot: int = 0):
        self.engine = engine
        self.limit = limit  # snapshots kept (0: only the live sequence is reused)
        self.slot = slot
        self.snapshots: list[Snapshot] = []  # most recently used last

    def _engine(self) -> Engine:
        """The engine, its single-sequence calls on this session's slot."""
        self.engine.select(self.slot)
        return self.engine

    @property
    def held(self) -> list[int]:
        """The tokens the engine's caches hold for the live sequence."""
        return self.engine.slots[self.slot].history

    def reusable(self, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens `reuse` would not have to prefill."""
        start = self._held_start(prompt)
        return max([start] + [s.position for s in self._usable(prompt, start)])

    def _held_start(self, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens the live sequence holds: all of it when it is a shorter
        start of the prompt, else none."""
        held = self.held
        return len(held) if held and len(held) < len(prompt) and prompt[:len(held)] == held else 0

    def _usable(self, prompt: list[int], start: int) -> list[Snapshot]:
        return [s for s in self.snapshots if start < s.position <= len(prompt) and prompt[:s.position] == s.history
                and (s.position < len(prompt) or s.logits is not None) and self.engine.can_restore(s, self.slot)]

    def reuse(self, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        """Bring the slot's sequence to the longest start of `prompt` it holds or a snapshot holds
        (a fresh sequence if none). -> (how many prompt tokens it now holds, the last one's logits
        when that is the whole prompt, else None)."""
        engine = self._engine()
        start = self._held_start(prompt)
        usable = self._usable(prompt, start)
        if usable:
            best = max(usable, key=lambda s: s.position)
            engine.restore(best)
            self.snapshots.remove(best)
            self.snapshots.append(best)
            return best.position, best.logits if best.position == len(prompt) else None
        if not start:
            engine.reset()
        return start, None

    def resume(self, prompt: list[int], boundary: int = 0,
               progress: Progress | None = None) -> tuple[torch.Tensor, int]:
        """Bring the engine to the end of `prompt`, reusing the tokens it holds or a snapshot, and
        (with `limit`) taking snapshots at `boundary` and at the end. -> (the last token's logits,
        how many prompt tokens were reused rather than prefilled)."""
        start, logits = self.reuse(prompt)
        if logits is not None:
            return logits, start
        reused, engine = start, self._engine()
        with _reset_on_failure(engine):
            if self.limit and start < boundary < len(prompt):
                engine.append(prompt[start:boundary], progress=progress)
                start = boundary
                self.keep()
            logits = engine.append(prompt[start:], progress=progress)
        self.keep(logits)
        return logits, reused

    def keep(self, logits: torch.Tensor | None = None) -> None:
        """Snapshot the slot's sequence as it is now (with `limit`), with its last logits if given
        (the end of a prompt)."""
        if not self.limit:
            return
        snapshot = self._engine().snapshot()
        if logits is not None:
            snapshot.logits = logits.clone()
        self.snapshots = [s for s in self.snapshots if s.history != snapshot.history] + [snapshot]
        del self.snapshots[:-self.limit]

    def decode(self, logits: torch.Tensor, max_tokens: int, sampler: Sampler) -> Iterator[int]:
        """`Engine.decode` from `resume`'s logits; the caller may stop early (close the generator).
        Each token is fed into this session's slot, whatever another session selected meanwhile."""
        tokens = self._engine().decode(logits, max_tokens, sampler)
        while True:
            engine = self._engine()
            with _reset_on_failure(engine):
                token = next(tokens, None)
            if token is None:
                return
            yield token

    def reset(self) -> None:
        """Start the next prompt from scratch (the snapshots, copies, stay usable)."""
        self._engine().reset()

    def forget(self) -> None:
        """Drop the live sequence and every snapshot."""
        self.snapshots.clear()
        self._engine().reset()


@contextmanager
def _reset_on_failure(engine: Engine) -> Iterator[None]:
    """Resets the engine when what runs inside fails or is interrupted (a caller closing a
    generator early is neither: every token fed so far was fed whole)."""
    try:
        yield
    except GeneratorExit:
        raise
    except BaseException:
        engine.reset()
        raise
