"""A whole Qwen3-30B-A3B (48 layers x 128 experts) end to end on this machine, CPU only.

    python bench/fullsize.py [--model DIR] [--steps 32] [--blocks 4] [--prompt 512] [--out FILE.json]

Steps, each timed: write the checkpoint if DIR holds none (`offload synth qwen3-30b-a3b DIR
--dtype fp8`: block-scaled FP8 as the official FP8 release stores it, ~31 GB); build its int4
expert store (`offload quantize DIR`; "up to date" when it exists); then, in a fresh process, load
from the existing store (seconds, peak RSS), send a first 512-token prompt (which brings every
expert's pages in from the memory-mapped store), then decode after a 16-token prompt (--blocks
blocks of --steps steps in turn, each right after a read-bandwidth probe as `offload profile detect`
reads it, of 1 GiB: on a shared machine the bandwidth, and so
the bound, changes from minute to minute) and prefill a 512-token prompt. Each block's median step
is shown against its bound: every byte a token reads (the active routed experts as int4, the dense
layers in their CPU formats) over its probe's bandwidth; the figures are the blocks' medians.
Targets: load from an existing store < 15 s, peak RSS < 20 GiB, decode >= 80% of the bound.
Prints the CPU's model name and flags with the figures.

llama.cpp's converter goes through a bf16 GGUF (61 GB for this model), more than a disk that
holds the checkpoint and the store usually has left; its figures come from `bench/peers.py
--checkpoint` on a full-depth checkpoint with fewer experts (`offload synth qwen3-30b-a3b DIR
--experts 16`: 48 layers, top-8, a token reads within 3% of the whole model's bytes, on a
third of the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"load s": 15.0, "peak RSS GiB": 20.0, "decode vs bound": 0.8}

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import offload
import offload.hardware

path, steps, prompt, BLOCKS = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
started = time.perf_counter()
engine = offload.load(path, quant="int4", gpu_mem=0, ctx=prompt + 64)
load_s = time.perf_counter() - started
rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rng = np.random.default_rng(0)
begun = time.perf_counter()  # a first prompt brings every expert's pages in from the store (mmap)
engine.feed(rng.integers(1, 1000, prompt), all_logits=False)
warm_s = time.perf_counter() - begun
engine.reset()
engine.feed(rng.integers(1, 1000, 16), all_logits=False)
engine.feed([7], all_logits=False)  # warm-up step
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the model's, before the probe's
# each block right after a read-bandwidth probe (best of five reads of 1 GiB, far beyond any L3 seen,
# as bench/step.py reads; 4 GiB beside the model would push the store out of the page cache): a
# shared machine's bandwidth changes from minute to minute
from offload.kernels.membw import read_bandwidth
from offload.kernels.threads import physical_cores
probe = np.ones(2**28, np.float32)
probe_bytes = probe.nbytes
blocks, bandwidths = [], []  # BLOCKS blocks of `steps` steps: the rate as the page cache and the mappings settle
for _ in range(BLOCKS):
    bandwidths.append(read_bandwidth(probe, physical_cores()))
    times = []
    for token in rng.integers(1, 1000, steps):
        begun = time.perf_counter()
        engine.feed([int(token)], all_logits=False)
        times.append(time.perf_counter() - begun)
    blocks.append(statistics.median(times))
del probe
engine.reset()
begun = time.perf_counter()
engine.feed(rng.integers(1, 1000, prompt), all_logits=False)
prefill_s = time.perf_counter() - begun
plan = engine.plan
pmd = 0  # the store's pages mapped 2 MiB at a time (Linux: /proc/self/smaps_rollup)
try:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("FilePmdMapped:"):
            pmd = int(line.split()[1]) * 1024
except OSError:
    pass
hardware = offload.hardware.default_profile()[0]  # the profile the plan was made with (load's default)
bytes_per_token = hardware.cpu.ram_bandwidth / plan.predicted.decode_limit_tok_s  # what the bound counts
print(json.dumps({"load_s": load_s, "rss_after_load": rss_after_load, "first_prompt_s": warm_s,
                  "peak_rss": peak_rss, "decode_s": statistics.median(blocks), "decode_blocks_s": blocks,
                  "block_bandwidths": bandwidths, "probe_bytes": probe_bytes, "prefill_s": prefill_s,
                  "bytes_per_token": bytes_per_token, "profile": hardware.name,
                  "store_bytes": engine.executor.store.nbytes, "store_in_huge_pages": pmd}))
"""


def cpu_line() -> str:
    model, flags = "unknown CPU", []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = [f for f in wanted if f in value.split()]
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} threads; flags: {' '.join(flags)}"


def timed(command: list[str], what: str) -> float:
    print(f"{what}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / "models" / "qwen3-30b-a3b-fp8")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4,
                        help="decode blocks of --steps steps in turn; the last one's median is the figure")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    options = parser.parse_args()
    offload_cli = [sys.executable, "-m", "offload"]
    results: dict = {"cpu": cpu_line()}
    print(results["cpu"], flush=True)
    if not (options.model / "config.json").is_file():
        results["synth s"] = timed([*offload_cli, "synth", "qwen3-30b-a3b", str(options.model), "--dtype", "fp8"],
                                   "writing the checkpoint")
    results["store s"] = timed([*offload_cli, "quantize", str(options.model)], "the int4 expert store")
    print("loading from the store in a fresh process, then decode and prefill ...", flush=True)
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(options.model), str(options.steps),
                            str(options.prompt), str(options.blocks)], stdout=subprocess.PIPE, text=True,
                           check=True)  # progress on stderr
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    results.update(measured)
    print(f"\nQwen3-30B-A3B (48 layers x 128 experts, FP8 checkpoint -> int4 experts), CPU only; {results['cpu']}")
    if "synth s" in results:
        print(f"  checkpoint written in {results['synth s']:.0f} s")
    print(f"  expert store: {results['store s']:.0f} s (built now, or found up to date)")
    gib = 2**30
    print(f"  load from the store  {measured['load_s']:6.1f} s    (target < {TARGETS['load s']:.0f} s)")
    print(f"  peak RSS             {measured['peak_rss'] / gib:6.2f} GiB  after load {measured['rss_after_load'] / gib:.2f}"
          f" (target < {TARGETS['peak RSS GiB']:.0f} GiB)")
    per_token = measured["bytes_per_token"]
    shares = [per_token / seconds / bandwidth for seconds, bandwidth in
              zip(measured["decode_blocks_s"], measured["block_bandwidths"])]
    results["decode vs bound"] = statistics.median(shares)
    print(f"  decode               {1 / measured['decode_s']:6.1f} tok/s = {results['decode vs bound']:.0%} of the bound "
          f"({per_token / 1e6:.0f} MB a token) (target >= {TARGETS['decode vs bound']:.0%})")
    print("    blocks in turn      " + ", ".join(f"{1 / seconds:.1f} ({share:.0%} of {bandwidth / 1e9:.0f} GB/s)"
                                            for seconds, share, bandwidth in
                                            zip(measured["decode_blocks_s"], shares, measured["block_bandwidths"])))
    print(f"    ({options.steps} steps a block, each after a read-bandwidth probe of {measured['probe_bytes'] / 2**30:.1f}"
          " GiB; the rate and share above are the blocks' medians)")
    print(f"  prefill {options.prompt}          {options.prompt / measured['prefill_s']:6.1f} tok/s (the first prompt "
          f"after load, which brings the experts in from the store: {options.prompt / measured['first_prompt_s']:.1f})")
    print(f"  store in 2 MiB pages {measured['store_in_huge_pages'] / 1e9:6.1f} GB of {measured['store_bytes'] / 1e9:.1f}"
          " (the rest in 4 KiB pages)")
    if options.out:
        options.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
