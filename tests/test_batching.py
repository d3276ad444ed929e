"""Several sequences at once: `Engine.step` against transformers, the scheduler against each
request run alone."""

from __future__ import annotations

import pytest
import torch

import offload
from conftest import parity_bound, stepped_reference
from offload.errors import OffloadError
from offload.sampling import Sampler, SamplingParams
from offload.scheduler import Request, Scheduler


def prompt(length: int, seed: int, vocab: int = 160) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["next", "moe", "q35"])
def test_a_batched_step_is_each_sequence_as_transformers_runs_it(hf_checkpoint, name):
    """Three prompts of different lengths read in one step, then greedy decode steps for all three
    at once: each slot's logits are transformers' for its sequence alone (a prefill, then cached
    steps), within the oracle's own fp32 error."""
    checkpoint = hf_checkpoint(name)
    engine = offload.load(checkpoint.path, slots=3)
    prompts = [prompt(40, 1), prompt(17, 2), prompt(70, 3)]  # long enough for the oracle's error to mean something
    rows = [[row] for row in engine.step(list(enumerate(prompts)))]
    sequences = [list(p) for p in prompts]
    for _ in range(6):
        tokens = [int(r[-1].argmax()) for r in rows]
        for sequence, token in zip(sequences, tokens):
            sequence.append(token)
        for r, row in zip(rows, engine.step([(slot, [token]) for slot, token in enumerate(tokens)])):
            r.append(row)
    for p, sequence, r, slot in zip(prompts, sequences, rows, engine.slots):
        ids = torch.tensor(sequence)  # every token fed: the prompt's last row predicts the first drawn
        expected = stepped_reference(checkpoint.model, ids, len(p))[len(p) - 1:]
        assert (torch.stack(r) - expected).abs().max().item() <= parity_bound(checkpoint.model, ids, prefix=len(p))
        assert slot.history == sequence and slot.position == len(sequence)
    assert len({tuple(s) for s in sequences}) == 3


def test_a_step_refuses_a_slot_twice_and_a_full_slot_and_the_scheduler_a_request_too_long(hf_checkpoint):
    engine = offload.load(hf_checkpoint("next").path, slots=2, ctx=16)
    with pytest.raises(OffloadError, match="each slot once"):
        engine.step([(0, [1]), (0, [2])])
    with pytest.raises(OffloadError, match="do not fit the context of 16"):
        engine.step([(0, [1]), (1, list(range(17)))])
    scheduler = Scheduler(engine)
    with pytest.raises(OffloadError, match="10 prompt tokens and 7 new ones do not fit the context of 16"):
        scheduler.submit(Request(list(range(10)), Sampler(SamplingParams()), 7, lambda token: None, lambda reason: None))
    assert scheduler.idle  # refused before it took a slot


def run(scheduler: Scheduler, requests: list[tuple[list[int], SamplingParams]], max_tokens: int = 10,
        arrivals: dict[int, int] | None = None) -> list[list[int]]:
    """Each request's tokens, the scheduler ticking until all have ended; request i joins at step
    arrivals[i] (default: at once)."""
    arrivals = arrivals or {}
    answers: list[list[int]] = [[] for _ in requests]
    ended: list[str | None] = [None] * len(requests)
    step = 0
    while not all(ended):
        for i, (ids, params) in enumerate(requests):
            if arrivals.get(i, 0) == step:
                scheduler.submit(Request(ids, Sampler(params), max_tokens, answers[i].append,
                                         lambda reason, i=i: ended.__setitem__(i, reason)))
        scheduler.tick()
        step += 1
        assert step < 200
    return answers


STAND_IN = dict(gpu_mem="8G", profile="rtx4060-ddr5", device="cpu")  # a GPU plan, the CPU standing in


@pytest.mark.parametrize("options", [dict(quant=None), dict(quant="int4"), dict(quant="int4", **STAND_IN)],
                         ids=["exact", "int4", "hybrid"])
def test_requests_together_draw_what_each_draws_alone(hf_checkpoint, options):
    """Greedy and seeded sampling, three requests on three slots (two joining mid-answer, their
    prompts read in chunks of 8 tokens beside the first one's steps, one of them cut to fill a
    chunk): the same tokens as each request alone. int4: the fast kernels users get, batched rows
    through the lean step; hybrid: a GPU plan's modules and its CPU expert lanes."""
    path = hf_checkpoint("next").path
    requests = [(prompt(11, 4), SamplingParams()),
                (prompt(5, 5), SamplingParams(temperature=1.0, seed=7)),
                (prompt(23, 6), SamplingParams(temperature=0.8, top_p=0.9, seed=3))]
    together = Scheduler(offload.load(path, slots=3, **options), prompt_chunk=8)
    answers = run(together, requests, arrivals={1: 2, 2: 2})
    alone = Scheduler(offload.load(path, **options))
    assert answers == [run(alone, [r])[0] for r in requests]
    assert all(len(a) == 10 for a in answers) and len({tuple(a) for a in answers}) == 3


def test_slots_are_freed_and_reused_for_a_returning_conversation(hf_checkpoint):
    """An ended or cancelled request frees its slot; a prompt that continues a conversation goes to
    the free slot that holds it and prefills only the rest."""
    path = hf_checkpoint("next").path
    scheduler = Scheduler(offload.load(path, slots=2), snapshots=2)
    first, other = prompt(12, 8), prompt(9, 9)
    answers = run(scheduler, [(first, SamplingParams()), (other, SamplingParams())], max_tokens=4)
    assert scheduler.idle and scheduler.free == 2
    held = next(i for i, s in enumerate(scheduler.engine.slots) if s.history[:12] == first)
    follow = first + answers[0][:3] + prompt(4, 10)
    request = Request(follow, Sampler(SamplingParams()), 3, lambda token: None, lambda reason: None)
    scheduler.submit(request)
    assert scheduler.running[held].request is request and request.cached == 15
    stop = Request(other, Sampler(SamplingParams()), 50, lambda token: None, lambda reason: None,
                   cancelled=lambda: True)
    scheduler.submit(stop)
    scheduler.tick()  # the cancelled one ends before the step; the other advances
    assert scheduler.free == 1 and [s["state"] for s in scheduler.status()].count("idle") == 1


def test_a_request_that_fails_ends_alone(hf_checkpoint):
    """A request whose draw fails (here its sampler raises on its third token) ends with the error
    and frees its slot; the request beside it answers as it does alone."""
    path = hf_checkpoint("next").path

    class Failing(Sampler):
        def __call__(self, logits, history):
            if len(history) >= 13:
                raise ValueError("no token fits")
            return super().__call__(logits, history)

    scheduler = Scheduler(offload.load(path, slots=2))
    ended, tokens = {}, []
    scheduler.submit(Request(prompt(11, 4), Failing(SamplingParams()), 10, lambda token: None,
                             lambda reason: ended.setdefault("failing", reason)))
    scheduler.submit(Request(prompt(7, 5), Sampler(SamplingParams()), 10, tokens.append,
                             lambda reason: ended.setdefault("other", reason)))
    failing = scheduler.running[0].request if scheduler.running[0].request.prompt == prompt(11, 4) \
        else scheduler.running[1].request
    while not scheduler.idle:
        scheduler.tick()
    assert ended == {"failing": "error", "other": "length"} and failing.error == "ValueError: no token fits"
    assert tokens == run(Scheduler(offload.load(path)), [(prompt(7, 5), SamplingParams())])[0]


def test_auto_slots_never_change_the_placement(hf_checkpoint):
    """slots="auto" holds 4 sequences where their caches fit beside the one-slot placement; on a
    GPU budget with no room for them it keeps the placement (prefetch buffers, formats) and fewer
    slots."""
    path = hf_checkpoint("next").path
    assert len(offload.load(path, quant="int4", gpu_mem=0, slots="auto").slots) == 4
    stand_in = dict(quant="int4", gpu_mem="8G", profile="rtx4060-ddr5", device="cpu")
    one = offload.load(path, **stand_in).plan
    tight = offload.load(path, **{**stand_in, "gpu_mem": one.gpu_bytes}, slots="auto")
    assert len(tight.slots) < 4
    assert [(p.group, p.device, p.format) for p in tight.plan.placement if "cache" not in p.group.lower()
            and p.group != "DeltaNet state"] == [(p.group, p.device, p.format) for p in one.placement
                                                  if "cache" not in p.group.lower() and p.group != "DeltaNet state"]
    with pytest.raises(OffloadError, match="slots=0"):
        offload.load(path, slots=0)
