"""What structured output costs a decode step: llguidance's token mask beside the step it gates.

    python bench/structured.py [--tokenizer DIR] [--steps 40]

The slice of `bench/decode.py` (CPU only, offload's defaults) decodes `steps` tokens for the
step's time. The grammars are built over `--tokenizer`'s vocabulary (default: the slice's own, a
4096-token stand-in; a real Qwen vocabulary of 151k tokens is the `hf/` folder `bench/peers.py`
builds), padded to the model's rows. Then each of three answers walks its grammar token by token
(a JSON schema, any JSON object, a required tool call), and every mask is timed: the median and
the worst, and the median as a share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path: see bench/step.py)
sys.path.remove(str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from decode import slice_dir  # noqa: E402
from offload.hardware import cpu_model  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.structured import Grammars  # noqa: E402
from offload.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "hourly"],
          "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                         "hourly": {"type": "array", "items": {"type": "number"}}}}
ANSWER = {"city": "San Francisco, California", "days": 3, "hourly": [12.5, 13.0, 14.25, 15.5, 15.0, 14.0]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]


def mask_times(tokenizer: Tokenizer, grammars: Grammars, constraint, text: str) -> list[float]:
    """Seconds of each mask while `text`'s tokens walk the constraint's grammar (then the end)."""
    logits = torch.randn(grammars.vocab_size)
    times = []
    for token in tokenizer.encode(text) + [grammars.end]:
        start = time.perf_counter()
        masked = constraint.mask(logits)
        times.append(time.perf_counter() - start)
        if masked[token] == float("-inf"):
            raise SystemExit(f"the grammar refused token {token} of {text!r}")
        constraint.advance(token)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="a folder with tokenizer.json (default: the slice's)")
    parser.add_argument("--steps", type=int, default=40)
    options = parser.parse_args()
    torch.set_num_threads(physical_cores())
    path = slice_dir(8, 128, None)
    engine = offload.load(path, quant="int4", ctx=512, gpu_mem=0)
    engine.feed(list(range(1, 17)), all_logits=False)
    engine.feed([99], all_logits=False)
    start = time.perf_counter()
    for i in range(options.steps):
        engine.feed([100 + i], all_logits=False)
    step = (time.perf_counter() - start) / options.steps

    tokenizer = Tokenizer(options.tokenizer or path)
    end = tokenizer.backend.token_to_id("<|im_end|>")
    start = time.perf_counter()
    grammars = Grammars(tokenizer, engine.args.vocab_size, end if end is not None else min(engine.stop_ids))
    built = time.perf_counter() - start

    print(f"{cpu_model()}, {physical_cores()} threads; {path.name}; grammars over {tokenizer.vocab_size} tokens "
          f"({options.tokenizer or 'the slice tokenizer'}) in {engine.args.vocab_size} rows")
    print(f"decode step {step * 1e3:.2f} ms; grammar tokenizer built once in {built:.2f} s")
    print(f"  {'answer':<22} {'tokens':>6} {'median ms':>10} {'worst ms':>9} {'of a step':>10}")
    call = {"name": "get_weather", "arguments": ANSWER}
    for name, constraint, text in [
            ("JSON schema", grammars.json_schema(SCHEMA), json.dumps(ANSWER, separators=(",", ":"))),
            ("any JSON object", grammars.json_schema({"type": "object"}), json.dumps(ANSWER, separators=(",", ":"))),
            ("required tool call", grammars.tool_call(TOOLS),
             f"<tool_call>\n{json.dumps(call, separators=(',', ':'))}\n</tool_call>")]:
        times = mask_times(tokenizer, grammars, constraint, text)
        median = statistics.median(times)
        print(f"  {name:<22} {len(times):>6} {median * 1e3:>10.3f} {max(times) * 1e3:>9.3f} {median / step:>10.1%}")


if __name__ == "__main__":
    main()
