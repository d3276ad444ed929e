"""Sampling: masks on known distributions, penalties, seeds, generation_config.json defaults."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_bench
from offload.errors import OffloadError
from offload.sampling import Sampler, SamplingParams, generation_defaults, processed_logits

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])
LOGITS = PROBS.log()


def kept(params: SamplingParams) -> list[int]:
    return torch.isfinite(processed_logits(LOGITS, params)).nonzero().flatten().tolist()


def test_truncations_keep_the_right_tokens():
    assert kept(SamplingParams(temperature=1.0)) == [0, 1, 2, 3]
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.65)) == [0, 1]  # 0.4 < 0.65 <= 0.4 + 0.3
    assert kept(SamplingParams(temperature=1.0, top_p=0.7001)) == [0, 1, 2]
    assert kept(SamplingParams(temperature=1.0, min_p=0.45)) == [0, 1, 2]  # p >= 0.45 x 0.4
    assert kept(SamplingParams(temperature=1.0, top_k=3, min_p=0.6)) == [0, 1]
    # temperature reshapes before truncation: at T = 0.5, p ~ [0.53, 0.3, 0.13, 0.03]
    assert kept(SamplingParams(temperature=0.5, top_p=0.8)) == [0, 1]


def reference_truncation(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The truncations as transformers' logits warpers apply them, on the whole vocabulary
    (`bench/sampling.py`'s `warped`, what the bench times Sampler against)."""
    return load_bench("sampling").warped(logits, params)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "masked"])
def test_truncations_match_the_whole_vocabulary_reference(kind):
    """The truncations work on the tokens they keep (a nucleus grown from the likeliest few, the
    top k): on a 3,000-token vocabulary of every shape they keep what the reference keeps, with the
    same logits. Only a token within float rounding of top-p's or min-p's edge may go either way (the
    set lies between the float64 reference's at p -/+ 1e-5 and min-p +/- 1e-5, on any CPU's sums),
    and where tokens tie at top-p's edge either may break the tie (as many of them)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3000, generator=generator) * {"peaked": 6.0, "flat": 0.3, "ties": 2.0, "masked": 3.0}[kind]
    if kind == "ties":
        logits = logits.round()  # many tokens share each value
    if kind == "masked":  # a grammar's mask leaves a few
        logits[torch.rand(3000, generator=generator) < 0.995] = float("-inf")
    edge = 1e-5
    for temperature in (0.7, 1.3):
        for top_k in (0, 1, 5, 40):
            for top_p in (1.0, 0.5, 0.9, 0.99):
                for min_p in (0.0, 0.05, 0.5):
                    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
                    ours = processed_logits(logits, params)
                    kept = torch.isfinite(ours)
                    assert torch.equal(ours[kept], (logits / temperature)[kept]), params
                    fewest = torch.isfinite(reference_truncation(logits.double(), params.with_(
                        top_p=max(top_p - edge, edge), min_p=min(min_p + edge, 1.0))))
                    most = torch.isfinite(reference_truncation(logits.double(), params.with_(
                        top_p=min(top_p + edge, 1.0), min_p=max(min_p - edge, 0.0))))
                    if kind == "ties":  # which of the tied tokens: as many of them
                        assert fewest.sum() <= kept.sum() <= most.sum(), params
                    else:
                        assert torch.all(fewest <= kept) and torch.all(kept <= most), params


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, 1.9, -1.0, -1.1])
    penalised = processed_logits(logits, SamplingParams(repetition_penalty=1.5), history=[0, 2, 0])
    assert penalised.tolist() == pytest.approx([2.0 / 1.5, 1.9, -1.5, -1.1])
    greedy = Sampler(SamplingParams(repetition_penalty=1.5))
    assert greedy(logits, history=[0]) == 1 and greedy(logits) == 0


def test_presence_and_frequency_penalties_count_the_drawn_tokens():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = processed_logits(logits, params, history=[0, 1, 2, 3], drawn=[2, 2, 1])
    # OpenAI's definition: logit - presence * [count > 0] - frequency * count, over drawn tokens only
    assert torch.allclose(out, torch.tensor([1.0, 2.0 - 0.75, 3.0 - 1.0, 0.5]))
    sampler = Sampler(SamplingParams(frequency_penalty=2.0))  # greedy: penalties alone change the choice
    drawn = [sampler(logits) for _ in range(3)]
    assert drawn == [2, 1, 0] and sampler.drawn == drawn  # 3, then 3 - 2 < 2, then 2 - 2 < 1 = 3 - 2 (first wins)
    with pytest.raises(OffloadError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=3)


def test_draws_follow_the_distribution_and_seeds_repeat():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = [sampler(LOGITS) for _ in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, PROBS, atol=0.03)
    again = Sampler(SamplingParams(temperature=1.0, seed=3))
    assert [again(LOGITS) for _ in range(4000)] == draws
    other = Sampler(SamplingParams(temperature=1.0, seed=4))
    assert [other(LOGITS) for _ in range(200)] != draws[:200]
    truncated = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert set(truncated(LOGITS) for _ in range(500)) == {0, 1}
    three = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=2))  # drawn among the three kept
    frequencies = torch.bincount(torch.tensor([three(LOGITS) for _ in range(4000)]), minlength=4).float() / 4000
    assert torch.allclose(frequencies, torch.cat([PROBS[:3] / 0.9, torch.zeros(1)]), atol=0.03)
    masked = LOGITS.clone()
    masked[[1, 3]] = float("-inf")  # as a grammar masks: never drawn, untruncated or not
    for params in (SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, top_p=0.99, seed=5)):
        sampler = Sampler(params)
        assert set(sampler(masked) for _ in range(2000)) == {0, 2}


def test_greedy_ignores_the_seed():
    assert Sampler(SamplingParams(seed=1))(LOGITS) == Sampler(SamplingParams(seed=2))(LOGITS) == 0


def test_logprobs_are_those_of_the_distribution_drawn_from():
    """At temperature 1 with top_k 2 the draw is from [0.4, 0.3] renormalised: the drawn token's
    log-probability and the alternatives are that distribution's, the truncated ones left out; asking
    for them changes no draw."""
    params = SamplingParams(temperature=1.0, top_k=2, seed=7)
    sampler, plain = Sampler(params, logprobs=3), Sampler(params)
    expected = {0: torch.tensor(0.4 / 0.7).log().item(), 1: torch.tensor(0.3 / 0.7).log().item()}
    for _ in range(20):
        token = sampler(LOGITS)
        assert token == plain(LOGITS) and sampler.last.token == token
        assert sampler.last.logprob == pytest.approx(expected[token], abs=1e-6)
        assert [t for t, _ in sampler.last.top] == [0, 1]  # 3 asked for, 2 drawable
        assert [v for _, v in sampler.last.top] == pytest.approx([expected[0], expected[1]], abs=1e-6)
    greedy = Sampler(SamplingParams(temperature=0.0), logprobs=0)
    assert greedy(LOGITS) == 0 and greedy.last.top == []
    assert greedy.last.logprob == pytest.approx(torch.tensor(0.4).log().item(), abs=1e-6)
    assert Sampler(SamplingParams()).last is None


def test_bad_settings_are_explained():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"top_k": -3},
                {"repetition_penalty": 0}):
        with pytest.raises(OffloadError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_defaults_come_from_generation_config(tmp_path):
    assert generation_defaults(tmp_path) == SamplingParams()
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [1, 2]}))
    params = generation_defaults(tmp_path)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 20, 0.95, 0.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert generation_defaults(tmp_path).temperature == 0.0
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(OffloadError, match="generation_config.json: not readable JSON"):
        generation_defaults(tmp_path)


def test_the_sampling_bench_times_every_setting_against_the_whole_vocabulary_way():

    run = subprocess.run([sys.executable, "bench/sampling.py", "--vocab", "3000", "--draws", "4"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = re.findall(r"^(.+?)\s+(peaked|flat)\s+([\d.]+)ms\s+([\d.]+)ms\s+([\d.]+)x$", run.stdout, re.M)
    assert len(rows) == 14 and len({name for name, *_ in rows}) == 7  # seven settings, two shapes each


def test_broken_logits_are_refused_not_drawn_from():
    """NaN logits, or a mask that leaves nothing: a clear error, whatever the truncations (a
    truncation would otherwise drop a NaN silently, or leave nothing to draw from)."""
    broken = torch.tensor([1.0, float("nan"), 0.5, 0.2])
    nothing = torch.full((10,), float("-inf"))
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2),
                   SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.1),
                   SamplingParams(temperature=1.0, top_k=2, top_p=0.9, min_p=0.1)):
        for logits in (broken, nothing):
            with pytest.raises(OffloadError, match="no token can be drawn"):
                Sampler(params)(logits)
