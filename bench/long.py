"""Long context on the CPU: prefill of long prompts, decode at depth, peak RSS, by KV cache format,
beside llama.cpp on the same checkpoints in the same run.

    python bench/long.py [--slices 30b,next] [--depths 8192,32768] [--formats int8,bf16,f32]
                         [--threads N] [--peer-configs f16,f16-fa,q8_0-fa] [--no-peer] [--kernel-only]

First the decode attention kernel alone at each depth, against this run's RAM bandwidth.

Two slices with the real per-token shapes, built once into the cache: Qwen3-30B-A3B's (8 layers of
full attention with 4 KV heads of 128, 32 experts) and Qwen3-Next-80B-A3B's (8 layers, 2 of them
full attention with 2 KV heads of 256, 128 experts). For each slice and KV format a fresh process
loads the model with room for the deepest prompt, reads a 1024-token prompt (so that every expert's
pages have been touched), then a 1-token prompt and 16 decode steps (depth 0: the median step is
the decode rate), then the deep prompt in pieces, stopping at each depth for 16 decode steps, and
reports prefill rates up to each depth and its peak RSS. llama.cpp
(built by bench/peers.py's steps, Q4_K_M) runs `llama-bench -p D -n 0` and `-n 16 -d D` for its KV
cache configurations: f16 without flash attention, f16 and q8_0 with it (`-fa on`; a quantised V
cache needs it), each again with `--repack 0` (marked "no repack") where its repacked path crashes
(its AMX path on some Xeons). Ratios are offload's rate over llama.cpp's best configuration at
that depth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(ROOT))  # would shadow the `kernels` package transformers imports)
sys.path.insert(1, str(ROOT / "bench"))

from offload.hardware import cpu_model  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.paths import cache_root  # noqa: E402

DECODE_STEPS = 16
PEER_CONFIGS = {"f16": ["-fa", "off", "-ctk", "f16", "-ctv", "f16"], "f16-fa": ["-fa", "on", "-ctk", "f16", "-ctv", "f16"],
                "q8_0-fa": ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]}


def slice_checkpoint(name: str) -> Path:
    from decode import slice_dir
    from offload.synthetic import preset_config, synthesize

    if name == "next":
        return slice_dir(8, 128)
    path = cache_root() / "bench" / "qwen3-30b-a3b-slice-8l-32e"
    if not (path / "config.json").is_file():
        print(f"building the slice checkpoint in {path} (once) ...", flush=True)
        synthesize(path, preset_config("qwen3-30b-a3b", layers=8, experts=32), overwrite=True)
    return path


def measure(checkpoint: Path, kv_cache: str, depths: list[int], threads: int) -> dict:
    """In this process: prefill to each depth and decode there; rates and peak RSS."""
    import numpy as np
    import psutil
    import torch

    import offload

    torch.set_num_threads(threads)
    deepest = depths[-1]
    ctx = deepest + 2 * DECODE_STEPS + 8
    rope = "yarn:4" if ctx > offload.config.load_config(checkpoint).max_position_embeddings else None
    engine = offload.load(checkpoint, quant="int4", gpu_mem=0, ctx=ctx, kv_cache=kv_cache, rope_scaling=rope)
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rng = np.random.default_rng(0)
    vocab = engine.args.vocab_size

    def decode_rate() -> float:
        steps = []
        for token in rng.integers(1, vocab, DECODE_STEPS):
            started = time.perf_counter()
            engine.feed([int(token)], all_logits=False)
            steps.append(time.perf_counter() - started)
        return 1 / statistics.median(steps[1:])

    engine.feed(rng.integers(1, vocab, 1024), all_logits=False)  # touches every expert's pages (mmap'd)
    engine.reset()
    engine.feed([1], all_logits=False)
    result = {"kv_cache": engine.plan.kv_format, "decode": {0: decode_rate()}, "prefill": {}}
    engine.reset()
    prompt = rng.integers(1, vocab, deepest)
    fed, seconds = 0, 0.0
    for depth in depths:
        started = time.perf_counter()
        engine.feed(prompt[fed:depth], all_logits=False)
        seconds += time.perf_counter() - started
        fed = depth
        result["prefill"][depth] = depth / seconds  # the decode steps in between are not counted
        result["decode"][depth] = decode_rate()
    done.set()
    result["peak_rss"] = peak[0]
    result["kv_bytes"] = engine.cache_nbytes
    # what the plan holds in RAM (model, caches, one chunk's workspace; not its runtime reserve)
    result["plan_ram"] = sum(p.nbytes for p in engine.plan.placement if p.device == "cpu")
    return result


def offload_figures(checkpoint: Path, kv_cache: str, depths: list[int], threads: int) -> dict:
    """`measure` in a fresh process (so that each format's peak RSS is its own)."""
    command = [sys.executable, __file__, "--measure", str(checkpoint), "--formats", kv_cache,
               "--depths", ",".join(map(str, depths)), "--threads", str(threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    for key in ("decode", "prefill"):
        figures[key] = {int(depth): rate for depth, rate in figures[key].items()}
    return figures


def peer_figures(checkpoint: Path, depths: list[int], threads: int, configs: list[str]) -> dict:
    """llama.cpp's {config: {"prefill": {depth: tok/s}, "decode": {depth: tok/s}}} on Q4_K_M."""
    import peers

    peer_dir = cache_root() / "peers"
    peer_dir.mkdir(parents=True, exist_ok=True)
    source = peers.llama_cpp_source(peer_dir)
    binaries = peers.llama_cpp_binaries(peer_dir, source)
    python = peers.converter_python(peer_dir, source)
    model = peers.gguf_files(checkpoint, peer_dir / checkpoint.name, ["Q4_K_M"], peer_dir, source, binaries, python,
                             threads)["Q4_K_M"]
    figures = {}
    for config in configs:
        peers.step(f"llama-bench {config}")
        base = [binaries / "llama-bench", "-m", model, "-t", threads, "-r", "1", "-o", "json", *PEER_CONFIGS[config]]
        prefill = ["-p", ",".join(map(str, depths)), "-n", "0"]
        decode = ["-p", "0", "-n", str(DECODE_STEPS), "-d", ",".join(map(str, [0, *depths]))]
        rates = {"prefill": {}, "decode": {}}
        name = config
        for kind, extra in (("prefill", prefill), ("decode", decode)):
            command = [str(part) for part in base + extra]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:  # the repacked (e.g. AMX) path crashed: run it as stored
                peers.step(f"llama-bench {config} {kind} failed ({run.returncode}); again with --repack 0")
                run = subprocess.run(command + ["--repack", "0"], capture_output=True, text=True)
                name = f"{config} (no repack)"
            if run.returncode:
                peers.step(f"llama-bench {config} {kind} failed ({run.returncode}): {run.stderr.strip()[-200:]}")
                continue
            for row in json.loads(run.stdout):
                depth = row["n_prompt"] if kind == "prefill" else row.get("n_depth", 0)
                rates[kind][depth] = row["avg_ts"]
        figures[name] = rates
    return figures


def kernel_figures(depths: list[int], threads: int) -> None:
    """The decode attention kernel alone, one layer at each depth, each format, against this run's RAM
    bound for its bytes: the 30B-A3B shape (32 query heads, 4 KV heads of 128) and Qwen3-Next's (16,
    2 of 256). Layers are many, so each call reads a fresh cache (a pool of them, > the L3)."""
    import numpy as np
    import torch

    from offload.attention import CpuDecodeAttention
    from offload.kernels.membw import read_bandwidth
    from offload.models.cache import KVCache

    bandwidth = read_bandwidth(np.ones(2**28, np.float32), threads)
    print(f"\nRAM read {bandwidth / 1e9:.1f} GB/s; decode attention, one layer, one token (ms, and the RAM "
          "bound's share of it)")
    for label, heads, kv_heads, width in (("30B-A3B", 32, 4, 128), ("Next-80B", 16, 2, 256)):
        row = f"{label:<10}"
        for depth in depths:
            for fmt in ("int8", "bf16", "f32"):
                per_cache = KVCache(depth + 1, kv_heads, width, fmt).nbytes
                caches = [KVCache(depth + 1, kv_heads, width, fmt) for _ in range(max(2, (2**30 // per_cache)))]
                for cache in caches:
                    cache.write(torch.randn(kv_heads, depth + 1, width), torch.randn(kv_heads, depth + 1, width), 0)
                attend = CpuDecodeAttention(heads, kv_heads, width)
                query = torch.randn(heads, 1, width)
                times = []
                for i in range(3 * len(caches)):
                    started = time.perf_counter()
                    attend(caches[i % len(caches)], query, depth, None)
                    times.append(time.perf_counter() - started)
                seconds = statistics.median(times[len(caches):])
                bound = per_cache / bandwidth
                row += f"  {depth // 1024}K {fmt} {seconds * 1e3:6.2f} ({bound / seconds:4.0%})"
                del caches
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="30b,next")
    parser.add_argument("--depths", default="8192,32768")
    parser.add_argument("--formats", default="int8,bf16,f32")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--peer-configs", default=",".join(PEER_CONFIGS))
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--kernel-only", action="store_true", help="only the attention kernel against the RAM bound")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one format, in this process
    options = parser.parse_args()
    depths = sorted(int(d) for d in options.depths.split(","))
    if options.measure:
        print(json.dumps(measure(options.measure, options.formats, depths, options.threads)))
        return
    formats = options.formats.split(",")
    print(f"{cpu_model()}, {options.threads} threads", flush=True)
    kernel_figures(depths, options.threads)
    if options.kernel_only:
        return
    for name in options.slices.split(","):
        checkpoint = slice_checkpoint(name)
        ours = {}
        for fmt in formats:
            print(f"[{time.strftime('%H:%M:%S')}] offload, {checkpoint.name}, KV {fmt}", flush=True)
            ours[fmt] = offload_figures(checkpoint, fmt, depths, options.threads)
        theirs = {} if options.no_peer else peer_figures(checkpoint, depths, options.threads,
                                                         options.peer_configs.split(","))
        report(checkpoint.name, depths, ours, theirs)


def report(name: str, depths: list[int], ours: dict, theirs: dict) -> None:
    print(f"\n{name}")
    columns = [("decode", 0)] + [("decode", d) for d in depths] + [("prefill", d) for d in depths]
    header = f"{'':<22}" + "".join(f" {kind[:3]} {depth // 1024:>3}K" if depth else f" {kind[:3]}   0 "
                                   for kind, depth in columns)
    print(header + f" {'peak RSS':>9} {'KV':>9} {'planned':>9}")
    best = {}
    for kind, depth in columns:
        rates = [figures[kind].get(depth) for figures in theirs.values()]
        rates = [rate for rate in rates if rate]
        best[(kind, depth)] = max(rates) if rates else None
    for config, figures in theirs.items():
        print(f"{'llama.cpp ' + config:<22}" + "".join(
            f" {figures[kind].get(depth, float('nan')):8.1f}" for kind, depth in columns))
    for fmt, figures in ours.items():
        print(f"{'offload ' + fmt:<22}" + "".join(f" {figures[kind][depth]:8.1f}" for kind, depth in columns)
              + f" {figures['peak_rss'] / 2**30:8.2f}G {figures['kv_bytes'] / 2**30:8.2f}G"
              + (f" {figures['plan_ram'] / 2**30:8.2f}G" if "plan_ram" in figures else ""))
        if theirs:
            print(f"{'  / llama.cpp best':<22}" + "".join(
                f" {figures[kind][depth] / best[(kind, depth)]:7.2f}x" if best[(kind, depth)] else f" {'-':>8}"
                for kind, depth in columns))
    print("tok/s; ratio: offload over llama.cpp's best configuration at that depth (above 1: offload is faster); "
          "planned: the plan's RAM for model, caches and one chunk's workspace (peak RSS adds Python, torch and "
          "the kernels' code)", flush=True)


if __name__ == "__main__":
    main()
