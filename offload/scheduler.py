"""Continuous batching: requests on the engine's slots, advanced together.

A `Scheduler` owns an engine loaded with several slots (`load(..., slots=N)`) and runs on one
thread. Each `tick` is one forward pass (`Engine.step`): a decode step for every answering
request and, while prompts wait to be read, up to `PROMPT_CHUNK` of their tokens (the oldest
prompt's first), so the answers streaming beside them keep their pace. On a CPU a decode step reads every dense matrix
whatever the number of rows, so N answers cost little more than one; prompt tokens ride along.
A prompt that arrives when nothing is answering is read whole by the engine's own prefill (its
larger chunks, and on a GPU its pipelined or streamed paths).

Each slot keeps a `Session`: the sequence it last held and its snapshots, so a returning
conversation is sent to the free slot that holds its prefix and prefills only what is new.
Requests are sampled each with its own `Sampler` (parameters, seed, grammar): a seeded request
draws the same tokens alone or beside others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from offload.engine import Engine
from offload.errors import OffloadError
from offload.sampling import Sampler
from offload.session import Session

PROMPT_CHUNK = 64  # prompt tokens read in a step beside running answers


@dataclass
class Request:
    """One generation: its prompt, how to draw and where the tokens go.

    `on_token(token)` receives each token drawn (stop tokens included) and returns "stop" to end
    the answer there (a stop string), else None; `on_end(reason)` is called once at the end with
    "stop", "length", "cancelled" or, when the engine failed, "error" (and `error` says what);
    `cancelled()` is polled before each step."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    on_token: Callable[[int], str | None]
    on_end: Callable[[str], None]
    cancelled: Callable[[], bool] = lambda: False
    boundary: int = 0  # a point of the prompt to snapshot at (the last message's start), or 0
    cached: int = 0  # prompt tokens reused rather than prefilled (set when it starts)
    produced: int = 0  # tokens drawn so far
    error: str | None = None


@dataclass
class _Running:
    request: Request
    slot: int
    pending: list[int]  # prompt tokens still to be fed
    token: int | None = None  # the last token drawn, fed by the next step
    fed: list[int] = field(default_factory=list)  # what the current step feeds


class Scheduler:
    """Requests on an engine's slots (`submit`, then `tick` until `idle`), on one thread."""

    def __init__(self, engine: Engine, snapshots: int = 0, prompt_chunk: int = PROMPT_CHUNK):
        self.engine = engine
        self.sessions = [Session(engine, snapshots, slot) for slot in range(len(engine.slots))]
        self.prompt_chunk = prompt_chunk
        self.running: dict[int, _Running] = {}  # by slot
        self.used = [0] * len(engine.slots)  # when each slot last started a request (least recently used first)
        self.starts = 0

    @property
    def slots(self) -> int:
        return len(self.sessions)

    @property
    def idle(self) -> bool:
        return not self.running

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    def status(self) -> list[dict]:
        """What each slot is doing: "idle", "prompt" (reading one) or "answer"; tokens held."""
        slots = []
        for index, session in enumerate(self.sessions):
            run = self.running.get(index)
            state = "idle" if run is None else "prompt" if run.pending else "answer"
            entry = {"slot": index, "state": state, "tokens": self.engine.slots[index].position}
            if run is not None:
                entry.update(prompt_tokens=len(run.request.prompt), generated=run.request.produced)
            slots.append(entry)
        return slots

    def submit(self, request: Request) -> None:
        """Put `request` on a free slot: the one holding the longest start of its prompt (then the
        one least recently started), so returning conversations find their caches."""
        if not self.free:
            raise OffloadError(f"every one of the {self.slots} slots is busy; wait for a free one")
        if not request.prompt:
            raise OffloadError("the prompt is empty; give at least one token")
        if len(request.prompt) + request.max_tokens > self.engine.ctx:
            raise OffloadError(f"{len(request.prompt)} prompt tokens and {request.max_tokens} new ones do not fit "
                               f"the context of {self.engine.ctx}; ask for fewer, or load with a larger ctx")
        free = [i for i in range(self.slots) if i not in self.running]
        slot = max(free, key=lambda i: (self.sessions[i].reusable(request.prompt), -self.used[i]))
        self.starts += 1
        self.used[slot] = self.starts
        start, logits = self.sessions[slot].reuse(request.prompt)
        request.cached = start
        run = _Running(request, slot, request.prompt[start:])
        self.running[slot] = run
        if logits is not None:  # a snapshot held the whole prompt
            self._draw(run, logits)

    def tick(self) -> None:
        """One forward pass over the running requests (nothing when none runs)."""
        for run in list(self.running.values()):
            if run.request.cancelled():
                self._end(run, "cancelled")
        if not self.running:
            return
        answering = [run for run in self.running.values() if not run.pending]
        reading = [run for run in self.running.values() if run.pending]
        if not answering and reading:  # nothing streams: the engine's own prefill, whole
            self._read_whole(reading[0])
            return
        work = []
        for run in answering:
            run.fed = [run.token]
            work.append(run)
        budget = self.prompt_chunk  # prompt tokens this step, oldest prompt first, each cut at its snapshot point
        for run in sorted(reading, key=lambda r: self.used[r.slot]):
            if budget <= 0:
                break
            run.fed = run.pending[:self._chunk_end(run, budget)]
            budget -= len(run.fed)
            work.append(run)
        try:
            logits = self.engine.step([(run.slot, run.fed) for run in work])
        except Exception as error:  # every request in the step fails; the slots start afresh
            for run in work:
                self.sessions[run.slot].reset()
                run.request.error = str(error) if isinstance(error, OffloadError) else f"{type(error).__name__}: {error}"
                self._end(run, "error")
            return
        for run, row in zip(work, logits):
            if run.pending:
                self._prompt_fed(run, row)
            else:
                self._draw(run, row)

    def _chunk_end(self, run: _Running, budget: int) -> int:
        """How many of `run`'s pending prompt tokens the next step feeds (at most `budget`)."""
        request, session = run.request, self.sessions[run.slot]
        done = len(request.prompt) - len(run.pending)
        end = min(len(run.pending), budget)
        if session.limit and done < request.boundary < done + end:
            end = request.boundary - done
        return end

    def _read_whole(self, run: _Running) -> None:
        request, session = run.request, self.sessions[run.slot]
        try:
            logits, _ = session.resume(request.prompt, request.boundary)
        except Exception as error:
            session.reset()
            request.error = str(error) if isinstance(error, OffloadError) else f"{type(error).__name__}: {error}"
            self._end(run, "error")
            return
        run.pending = []
        self._draw(run, logits)

    def _prompt_fed(self, run: _Running, logits: torch.Tensor) -> None:
        request, session = run.request, self.sessions[run.slot]
        del run.pending[:len(run.fed)]
        done = len(request.prompt) - len(run.pending)
        if run.pending:
            if done == request.boundary:
                session.keep()
            return
        session.keep(logits)
        self._draw(run, logits)

    def _draw(self, run: _Running, logits: torch.Tensor) -> None:
        """Draw the next token from `logits` and hand it over; end the request where it ends."""
        request = run.request
        token = request.sampler(logits, self.engine.slots[run.slot].history)
        request.produced += 1
        stopped = request.on_token(token)
        if token in self.engine.stop_ids or stopped == "stop":
            self._end(run, "stop")
        elif request.produced >= request.max_tokens:
            self._end(run, "length")
        else:
            run.token = token

    def _end(self, run: _Running, reason: str) -> None:
        del self.running[run.slot]
        run.request.on_end(reason)
