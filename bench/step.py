"""Where a CPU decode step's time goes: each kernel family timed inside real decode steps.

    python bench/step.py [--layers 8] [--experts 128] [--vocab N] [--steps 60] [--runs 3] [--lean on|off]
                         [--rows N]

The slice of `bench/decode.py` (built once into the cache), CPU only, offload's defaults. A
16-token prompt, then decode steps: first untimed (the step as users get it, median of `runs`
blocks of `steps`), then with a timer around each kernel's Python entry point (the dense
layers' `q8.linear_fast`, the routed experts' `q8.moe_decode_fast`, the DeltaNet step, the
attention kernels). What the kernels do not account for is the work between them: norms, the
router, residuals, conversions, Python. The bound beside it: every byte a token reads (the
plan's count, as `offload bench` uses) over this run's RAM read bandwidth. `--lean off` runs
the step as the model's torch layers do it, without the lean executor, for comparison. `--rows N`
times a step of N conversations at once (`Engine.step` over N slots, as the server batches them),
each fed a token of its own: rows fed one token would pick the same experts and share their reads.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(ROOT))  # would shadow the `kernels` package transformers imports)
sys.path.insert(1, str(ROOT / "bench"))

from decode import slice_dir  # noqa: E402
from offload import deltanet  # noqa: E402
from offload.hardware import cpu_model  # noqa: E402
from offload.kernels import attention as attention_kernels, q8  # noqa: E402
from offload.kernels.membw import read_bandwidth  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.lean import lean_off  # noqa: E402

# (module, attribute, family): the kernel entry points, patched where their callers look them up;
# the output head, the largest dense matrix, is timed apart (`Timers.head_rows`)
KERNELS = [(q8, "linear_fast", "dense kernels"), (q8, "moe_decode_fast", "expert kernels"),
           (deltanet, "deltanet_step", "DeltaNet kernel"),
           (attention_kernels, "attend_decode", "attention kernel"),
           (attention_kernels, "attend_decode_tiled", "attention kernel")]
HEAD = "output head"


class Timers:
    """Seconds and calls per kernel family while installed; a dense call whose matrix has
    `head_rows` rows (the vocabulary) counts as the output head's."""

    def __init__(self, head_rows: int):
        self.head_rows = head_rows
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.saved = []

    def __enter__(self):
        for module, name, family in KERNELS:
            original = getattr(module, name)
            self.saved.append((module, name, original))
            setattr(module, name, self._timed(original, family, dense=name == "linear_fast"))
        return self

    def _timed(self, function, family: str, dense: bool):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                chosen = HEAD if dense and args[1].shape[1] == self.head_rows else family
                self.seconds[chosen] += time.perf_counter() - start
                self.calls[chosen] += 1
        return timed

    def __exit__(self, *exc):
        for module, name, original in self.saved:
            setattr(module, name, original)


def decode_steps(engine, steps: int, rows: int = 1, timers: Timers | None = None) -> float:
    """Seconds per step over `steps` decode steps after a 16-token prompt (with `timers` installed
    around the steps alone); with `rows` > 1, steps of that many slots, each its own prompt and
    tokens."""
    if rows == 1:
        engine.reset()
        engine.feed(list(range(1, 17)), all_logits=False)
        engine.feed([99], all_logits=False)  # warm
        with timers or contextlib.nullcontext():
            start = time.perf_counter()
            for i in range(steps):
                engine.feed([100 + i], all_logits=False)
            return (time.perf_counter() - start) / steps
    tokens = np.random.default_rng(0).permutation(np.arange(100, 100 + (steps + 1) * rows)).reshape(steps + 1, rows)
    for row in range(rows):
        engine.select(row)
        engine.reset()
        engine.step([(row, list(range(1 + 16 * row, 17 + 16 * row)))])
    engine.step(list(enumerate([[int(token)] for token in tokens[-1]])))  # warm
    with timers or contextlib.nullcontext():
        start = time.perf_counter()
        for i in range(steps):
            engine.step(list(enumerate([[int(token)] for token in tokens[i]])))
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--vocab", type=int, help="a smaller vocabulary than the real one (a quick rehearsal)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lean", choices=["on", "off"], default="on")
    parser.add_argument("--rows", type=int, default=1, help="conversations a step advances (slots)")
    options = parser.parse_args()
    threads = physical_cores()
    torch.set_num_threads(threads)
    path = slice_dir(options.layers, options.experts, options.vocab)

    print("RAM read bandwidth (1 GiB) ...", flush=True)
    values = np.ones(2**28, np.float32)  # 1 GiB: far beyond any L3 seen
    bandwidth = read_bandwidth(values, threads)
    del values
    engine = offload.load(path, quant="int4", ctx=512, gpu_mem=0, slots=options.rows)
    if options.lean == "off":
        lean_off(engine.model)
    hardware = offload.hardware.default_profile()[0]  # the profile the plan was made with (load's default)
    bytes_per_token = hardware.cpu.ram_bandwidth / engine.plan.predicted.decode_limit_tok_s
    limit = bandwidth / bytes_per_token
    seconds = statistics.median(decode_steps(engine, options.steps, options.rows) for _ in range(options.runs))
    timers = Timers(engine.args.vocab_size)
    timed = decode_steps(engine, options.steps, options.rows, timers)
    scale = 1e3 / options.steps

    print(f"{cpu_model()}, {threads} threads; {path.name}; RAM read {bandwidth / 1e9:.1f} GB/s (1 GiB)")
    print(f"{bytes_per_token / 1e6:.0f} MB read per token (the plan's count)")
    if options.rows == 1:
        print(f"decode step {seconds * 1e3:.2f} ms ({1 / seconds:.1f} tok/s), {1 / (seconds * limit):.0%} of the "
              f"bound: {1e3 / limit:.2f} ms ({limit:.1f} tok/s, the bytes a token reads at this run's bandwidth)")
    else:  # the rows' experts overlap by chance: no byte count to hold the step to
        print(f"decode step of {options.rows} rows {seconds * 1e3:.2f} ms ({options.rows / seconds:.1f} tok/s "
              f"together); one row's bound {1e3 / limit:.2f} ms")
    print(f"one timed run: {timed * 1e3:.2f} ms a step")
    print(f"  {'':<18} {'ms/step':>8} {'calls':>6} {'share':>6}")
    accounted = 0.0
    for family in dict.fromkeys([*(family for *_, family in KERNELS), HEAD]):
        if timers.calls[family]:
            ms = timers.seconds[family] * scale
            accounted += ms
            print(f"  {family:<18} {ms:>8.2f} {timers.calls[family] // options.steps:>6} {ms / (timed * 1e3):>6.0%}")
    rest = timed * 1e3 - accounted
    print(f"  {'between kernels':<18} {rest:>8.2f} {'':>6} {rest / (timed * 1e3):>6.0%}")


if __name__ == "__main__":
    main()
