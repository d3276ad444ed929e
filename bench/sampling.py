"""What drawing a token costs: `Sampler` against the whole-vocabulary way, per setting.

    python bench/sampling.py [--vocab 151936] [--draws 200]

Qwen's recommended settings and the common API ones, on two shapes of next-token logits over a
Qwen-sized vocabulary: "peaked" (as a trained model's mostly are: probabilities falling as the
square of the rank, the likeliest token ~0.6, the ten likeliest ~0.94, the ranks shuffled over the
vocabulary) and "flat" (standard normal logits: a model with random weights, as the demo's). Each setting: the median time of `Sampler` (truncations on
the tokens they keep, Gumbel noise for the tokens near the top) against the whole-vocabulary way
transformers takes (every truncation over all V logits, a sort for top-p, then torch.multinomial)
in the same run, and the ratio. One row adds a repetition penalty over a 32K-token history (the
whole sequence, prompt included, as it applies).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path: see bench/step.py)
sys.path.remove(str(ROOT))

from offload.hardware import cpu_model  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.sampling import Sampler, SamplingParams  # noqa: E402

SETTINGS = {"Qwen3 thinking (T 0.6, top-k 20, top-p 0.95)": SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
            "Qwen3 instruct (T 0.7, top-k 20, top-p 0.8)": SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
            "temperature 0.7 alone": SamplingParams(temperature=0.7),
            "top-p 0.9 alone (T 1)": SamplingParams(temperature=1.0, top_p=0.9),
            "min-p 0.05 (T 0.8)": SamplingParams(temperature=0.8, min_p=0.05),
            "Qwen3 instruct, repetition 1.05, 32K history": SamplingParams(temperature=0.7, top_k=20, top_p=0.8,
                                                                           repetition_penalty=1.05),
            "greedy": SamplingParams()}


def whole_vocabulary(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                     history: list[int]) -> int:
    """transformers' way: the repetition penalty gathered and scattered over the whole history,
    the truncations as masks over all V logits (`warped`), then torch.multinomial."""
    if params.repetition_penalty != 1.0:
        seen = torch.as_tensor(history, dtype=torch.long)
        scores = logits.gather(0, seen)
        scores = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
        logits = logits.scatter(0, seen, scores)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(warped(logits, params), dim=-1), 1, generator=generator))


def warped(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as transformers' logits warpers apply them: masks
    (-inf) over the whole vocabulary, a sort of it for top-p (also the tests' reference)."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, params.top_k).values[-1], float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        logits[order[probs.cumsum(dim=-1) - probs >= params.top_p]] = float("-inf")
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def median_ms(draw, logits: list[torch.Tensor]) -> float:
    times = []
    for row in logits:
        start = time.perf_counter()
        draw(row)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--draws", type=int, default=200)
    options = parser.parse_args()
    torch.set_num_threads(physical_cores())
    generator = torch.Generator().manual_seed(0)
    ranks = torch.randperm(options.vocab, generator=generator).float() + 1
    shapes = {"peaked": [-2.0 * ranks[torch.randperm(options.vocab, generator=generator)].log() for _ in range(8)],
              "flat": [torch.randn(options.vocab, generator=generator) for _ in range(8)]}
    history_of_all = torch.randint(0, options.vocab, (32768,), generator=generator).tolist()  # a long conversation
    print(f"{cpu_model()}, {physical_cores()} threads; {options.vocab} tokens; median of {options.draws} draws")
    print(f"{'':<46} {'shape':<7} {'Sampler':>9} {'whole V':>9}  ratio")
    for name, params in SETTINGS.items():
        for shape, rows in shapes.items():
            rows = [rows[i % len(rows)] for i in range(options.draws)]
            history = history_of_all if params.repetition_penalty != 1.0 else []
            sampler = Sampler(params.with_(seed=1))
            ours = median_ms(lambda row: sampler(row, history), rows)
            theirs = median_ms(lambda row: whole_vocabulary(row, params, generator, history), rows)
            print(f"{name:<46} {shape:<7} {ours:7.2f}ms {theirs:7.2f}ms  {theirs / ours:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
