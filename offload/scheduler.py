"""Continuous batching: requests on the engine's slots, advanced together.

A `Scheduler` owns an engine loaded with several slots (`load(..., slots=N)`) and runs on one
thread. Each `tick` is one forward pass (`Engine.step`): a decode step for every answering
request and, while prompts wait to be read, up to `PROMPT_CHUNK` of their tokens (the oldest
prompt's first), so the answers streaming beside them keep their pace. On the CPU path (the lean
step, up to DECODE_MAX_TOKENS rows) each dense matrix is read once for all the rows; what grows
with them is the routed experts (each token picks its own) and the arithmetic.
A prompt that arrives when nothing is answering, or one long enough that the engine streams
its experts to the GPU, is read whole by the engine's own prefill (its larger chunks, and on a
GPU its pipelined or streamed paths), the answers pausing meanwhile.

Each slot keeps a `Session`: the sequence it last held and its snapshots, so a returning
conversation is sent to the free slot that holds its prefix and prefills only what is new.
Requests are sampled each with its own `Sampler` (parameters, seed, grammar), so a request's
random draws do not depend on the others. Its logits may round differently beside others (its
rows can take other kernels) and so, rarely, change a token where two are nearly tied.
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
        self.snapshots = snapshots  # kept per slot
        self.sessions = [Session(engine, snapshots, slot) for slot in range(len(engine.slots))]
        self.prompt_chunk = prompt_chunk
        self.running: dict[int, _Running] = {}  # by slot index
        self.used = [0] * len(engine.slots)  # when each slot last started a request (least recently used first)
        self.starts = 0

    @property
    def capacity(self) -> int:
        """How many requests run at once: the engine's slots."""
        return len(self.sessions)

    @property
    def idle(self) -> bool:
        return not self.running

    @property
    def free(self) -> int:
        return self.capacity - len(self.running)

    def status(self) -> list[dict]:
        """What each slot is doing: "idle", "prompt" (reading one) or "answer"; tokens held."""
        slots = []
        for index in range(self.capacity):
            run = self.running.get(index)
            state = "idle" if run is None else "prompt" if run.pending else "answer"
            entry = {"slot": index, "state": state, "tokens": self.engine.slots[index].position}
            if run is not None:
                entry.update(prompt_tokens=len(run.request.prompt), generated=run.request.produced)
            slots.append(entry)
        return slots

    def submit(self, request: Request) -> None:
        """Put `request` on a free slot: the one holding the longest start of its prompt (then the
        one least recently started), so returning conversations find their caches. A request that
        cannot run is refused here (OffloadError), before it takes a slot."""
        if not self.free:
            raise OffloadError(f"every one of the {self.capacity} slots is busy; wait for a free one")
        if not request.prompt:
            raise OffloadError("the prompt is empty; give at least one token")
        if request.max_tokens < 1:
            raise OffloadError(f"max_tokens={request.max_tokens}: ask for 1 new token or more")
        if len(request.prompt) + request.max_tokens > self.engine.ctx:
            raise OffloadError(f"{len(request.prompt)} prompt tokens and {request.max_tokens} new ones do not fit "
                               f"the context of {self.engine.ctx}; ask for fewer, or load with a larger ctx")
        free = [i for i in range(self.capacity) if i not in self.running]
        slot = max(free, key=lambda i: (self.sessions[i].reusable(request.prompt), -self.used[i]))
        self.starts += 1
        self.used[slot] = self.starts
        start, logits = self.sessions[slot].reuse(request.prompt)
        request.cached = start
        run = _Running(request, slot, request.prompt[start:])
        self.running[slot] = run
        if logits is not None:  # a snapshot held the whole prompt
            self._guarded(run, lambda: self._draw(run, logits))

    def tick(self) -> None:
        """One forward pass over the running requests (nothing when none runs)."""
        for run in list(self.running.values()):
            if run.request.cancelled():
                self._end(run, "cancelled")
        if not self.running:
            return
        answering = [run for run in self.running.values() if not run.pending]
        reading = sorted((run for run in self.running.values() if run.pending), key=lambda r: self.used[r.slot])
        # nothing streams, or a prompt the engine would stream to the GPU (each layer's experts
        # copied once for the whole prompt): the engine's own prefill, the whole prompt at once
        whole = next((run for run in reading if not answering or self.engine.streams(len(run.pending))), None)
        if whole is not None:
            self._read_whole(whole)
            return
        work = []
        for run in answering:
            run.fed = [run.token]
            work.append(run)
        budget = self.prompt_chunk  # prompt tokens this step, oldest prompt first, each cut at its snapshot point
        for run in reading:
            if budget <= 0:
                break
            run.fed = run.pending[:self._chunk_end(run, budget)]
            budget -= len(run.fed)
            work.append(run)
        try:
            logits = self.engine.step([(run.slot, run.fed) for run in work])
        except Exception as error:  # every request in the step fails; their slots start afresh
            for run in work:
                self.sessions[run.slot].reset()
                self._fail(run, error)
            return
        for run, row in zip(work, logits):  # each slot advanced whole: a failure here ends only its request
            self._guarded(run, lambda run=run, row=row: self._prompt_fed(run, row) if run.pending
                          else self._draw(run, row))

    def fail_all(self, error: Exception) -> None:
        """End every running request with `error`, their slots afresh (a fault no request owns)."""
        for run in list(self.running.values()):
            self.sessions[run.slot].reset()
            self._fail(run, error)

    def _guarded(self, run: _Running, work: Callable[[], None]) -> None:
        """Run `work` for `run`; if it fails (a grammar that allows no token, a failing callback),
        the request ends with the error and its slot is freed."""
        try:
            work()
        except Exception as error:
            if self.running.get(run.slot) is run:
                self._fail(run, error)

    def _fail(self, run: _Running, error: Exception) -> None:
        run.request.error = str(error) if isinstance(error, OffloadError) else f"{type(error).__name__}: {error}"
        self._end(run, "error")

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
            logits, _ = session.resume(request.prompt, request.boundary)  # resets the slot if it fails
        except Exception as error:
            self._fail(run, error)
            return
        run.pending = []
        self._guarded(run, lambda: self._draw(run, logits))

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
        """Free the run's slot (its sequence stays for prefix reuse) and tell the request, once."""
        if self.running.get(run.slot) is not run:
            return
        del self.running[run.slot]
        run.request.on_end(reason)
