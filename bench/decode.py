"""End-to-end decode and prefill on a slice of Qwen3-Next-80B-A3B, CPU only, in one run.

    python bench/decode.py [--layers 8] [--experts 128] [--tokens 32]

The slice has the real per-token shapes (hidden 2048, 512-wide experts, top-10, the real
attention/DeltaNet mixers, the real vocabulary) with 8 layers (2 full attention) and 128 experts
per layer, built once with `offload synth` into the cache. Prints: offload decode tok/s with int4
experts (overlap off and on); the bound for this run (the bytes a token reads: int4 routed experts at the kernels'
measured rate, everything else at RAM bandwidth); transformers bf16 on the same checkpoint as the
peer; prefill tok/s for a 512-token prompt; and a second column scaled to the full model's 48
layers and 512 experts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offload  # noqa: E402
from kernels.membw import read_bandwidth  # noqa: E402
from kernels.probe import decode_throughput, median_seconds, pool_for  # noqa: E402
from kernels.threads import physical_cores  # noqa: E402
from offload.config import args_from_dict  # noqa: E402
from offload.paths import cache_root  # noqa: E402
from offload.planner import INT4_BYTES, parameter_groups  # noqa: E402
from offload.synthetic import preset_config, synthesize  # noqa: E402


def slice_dir(layers: int, experts: int) -> Path:
    path = cache_root() / "bench" / f"qwen3-next-slice-{layers}l-{experts}e"
    if not (path / "config.json").is_file():
        print(f"building the slice checkpoint in {path} (once) ...", flush=True)
        synthesize(path, preset_config("qwen3-next-80b-a3b", layers=layers, experts=experts), overwrite=True)
    return path


def time_decode(step, tokens: int) -> float:
    """Median seconds per decode step (after one warm-up step)."""
    step(-1)
    return median_seconds(step, tokens)


def offload_decode(engine, tokens: int) -> float:
    engine.reset()
    engine.feed(list(range(1, 17)), all_logits=False)
    return time_decode(lambda i: engine.feed([100 + i], all_logits=False), tokens)


def transformers_decode(path: Path, tokens: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = model(torch.arange(1, 17)[None], use_cache=True)
        cache = out.past_key_values
        state = {"cache": cache}

        def step(i):
            result = model(torch.tensor([[100 + i]]), past_key_values=state["cache"], use_cache=True)
            state["cache"] = result.past_key_values

        decode = time_decode(step, tokens)
        start = time.perf_counter()
        model(torch.arange(512)[None] % 1000 + 1)
        prefill = time.perf_counter() - start
    return decode, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--skip-peer", action="store_true", help="do not run transformers")
    options = parser.parse_args()
    threads = physical_cores()
    torch.set_num_threads(threads)
    path = slice_dir(options.layers, options.experts)
    args = args_from_dict(preset_config("qwen3-next-80b-a3b", layers=options.layers, experts=options.experts))
    full = args_from_dict(preset_config("qwen3-next-80b-a3b"))

    values = np.ones(2**30, np.float32)
    bandwidth = read_bandwidth(values, threads)
    del values
    gate_up, down = pool_for(2048, 512, 2 * 2**30, 64)
    kernel_rate = decode_throughput(gate_up, down, 1, 10, 40)
    del gate_up, down

    def bound_seconds(model_args, dense_bytes_per_weight=2.0) -> tuple[float, float, float]:
        groups = parameter_groups(model_args)
        routed = groups["routed experts"] * model_args.num_experts_per_tok / model_args.num_experts
        dense = sum(n for g, n in groups.items() if g not in ("routed experts", "embeddings"))
        return (routed / kernel_rate + dense * dense_bytes_per_weight / bandwidth, routed * INT4_BYTES,
                dense * dense_bytes_per_weight)

    def measure(dense_quant, overlap=False):
        engine = offload.load(path, quant="int4", dense_quant=dense_quant, ctx=1024, overlap=overlap)
        decode = offload_decode(engine, options.tokens)
        engine.reset()
        start = time.perf_counter()
        engine.feed(np.arange(512) % 1000 + 1, all_logits=False)
        return decode, time.perf_counter() - start

    decode, prefill = measure(None)
    decode_int4, prefill_int4 = measure("int4")
    decode_overlap, _ = measure("int4", overlap=True)
    slice_bound, routed_bytes, dense_bytes = bound_seconds(args)
    full_bound, full_routed, full_dense = bound_seconds(full)
    # the full model: the slice's measured time per layer, scaled to 48 layers (experts per layer
    # do not change the work per token; they change only the RAM needed)
    scale = full.num_hidden_layers / args.num_hidden_layers
    print(f"machine: {threads} threads; RAM read {bandwidth / 1e9:.1f} GB/s; int4 kernels {kernel_rate / 1e9:.1f} "
          f"G weights/s (batch 1)")
    print(f"per token: routed experts {routed_bytes / 1e6:.0f} MB int4, dense {dense_bytes / 1e6:.0f} MB bf16 "
          f"(slice); full model {full_routed / 1e6:.0f} MB + {full_dense / 1e6:.0f} MB")
    print(f"{'':<34} {'slice':>12} {'full model':>12}")
    print(f"{'offload decode, int4 experts':<34} {1 / decode:8.1f} tok/s {1 / (decode * scale):8.1f} tok/s")
    print(f"{'bound (bytes read per token)':<34} {1 / slice_bound:8.1f} tok/s {1 / full_bound:8.1f} tok/s "
          f"-> {slice_bound / decode:.0%} of the bound")
    print(f"{'offload prefill, 512 tokens':<34} {512 / prefill:8.1f} tok/s {512 / (prefill * scale):8.1f} tok/s")
    slice_bound4 = bound_seconds(args, INT4_BYTES)[0]
    full_bound4 = bound_seconds(full, INT4_BYTES)[0]
    print(f"{'  ... with dense_quant=int4':<34} {1 / decode_int4:8.1f} tok/s {1 / (decode_int4 * scale):8.1f} tok/s "
          f"(bound {1 / slice_bound4:.1f} / {1 / full_bound4:.1f}: {slice_bound4 / decode_int4:.0%})")
    print(f"{'  ... prefill 512, dense int4':<34} {512 / prefill_int4:8.1f} tok/s "
          f"{512 / (prefill_int4 * scale):8.1f} tok/s")
    print(f"{'  ... dense int4, overlap on':<34} {1 / decode_overlap:8.1f} tok/s "
          f"({decode_int4 / decode_overlap:.2f}x of overlap off; experts on a worker thread)")
    if not options.skip_peer:
        peer_decode, peer_prefill = transformers_decode(path, min(options.tokens, 16))
        print(f"{'transformers bf16 decode':<34} {1 / peer_decode:8.1f} tok/s   ({peer_decode / decode:.1f}x slower)")
        print(f"{'transformers bf16 prefill, 512':<34} {512 / peer_prefill:8.1f} tok/s   "
              f"(offload {peer_prefill / prefill:.2f}x)")


if __name__ == "__main__":
    main()
