"""A sequence across requests (`offload.session`): the live sequence and snapshots reused, exactly;
a sequence interrupted while being fed is never continued."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import offload
from offload.cli import main
from offload.config import PREFILL_CHUNK
from offload.sampling import Sampler, SamplingParams
from offload.session import Session


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "tiny"
    assert CliRunner().invoke(main, ["synth", "tiny-qwen3-next", str(path)]).exit_code == 0
    return path


def fresh_logits(path, prompt: list[int]) -> torch.Tensor:
    return offload.load(path).feed(prompt, all_logits=False)[-1]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of feeding a prompt in other chunks (short ones take the lean
    path, whose sums round in another order): far below what a wrong state would move."""
    return ((a - b).norm() / b.norm()).item() < 1e-4


def test_a_continued_prompt_an_edited_one_and_a_repeated_one_reuse_what_they_can(tiny):
    session = Session(offload.load(tiny), limit=4)
    first = list(range(5, 25))
    logits, reused = session.resume(first, boundary=12)
    assert reused == 0 and same(logits, fresh_logits(tiny, first))
    answer = list(session.decode(logits, 4, Sampler(SamplingParams(temperature=0))))
    following = first + answer + [7, 8, 9]  # the next turn: continues the live sequence
    logits, reused = session.resume(following)
    assert reused == len(first) + len(answer) - 1  # the last drawn token was never fed
    assert same(logits, fresh_logits(tiny, following))
    edited = first[:12] + [40, 41]  # the last message edited: from the boundary's snapshot
    logits, reused = session.resume(edited)
    assert reused == 12 and same(logits, fresh_logits(tiny, edited))
    again = session.resume(edited)  # regenerated: the end's snapshot, nothing to prefill
    assert again[1] == len(edited) and torch.equal(again[0], logits)
    session.forget()
    assert session.resume(edited)[1] == 0


def test_an_interrupted_prefill_leaves_a_fresh_sequence(tiny):
    session = Session(offload.load(tiny, ctx=1400))
    session.resume(list(range(5, 15)))

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a long continuation, stopped after its first chunk
        session.resume(list(range(5, 15)) + [30 + i % 200 for i in range(PREFILL_CHUNK + 100)], progress=interrupt)
    assert session.held == [] and session.engine.position == 0
    prompt = list(range(5, 15)) + [3]
    logits, reused = session.resume(prompt)
    assert reused == 0 and torch.equal(logits, fresh_logits(tiny, prompt))
