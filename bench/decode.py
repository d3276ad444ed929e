"""End-to-end decode and prefill on a slice of Qwen3-Next-80B-A3B, CPU only, in one run.

    python bench/decode.py [--layers 8] [--experts 128] [--tokens 32]

The slice has the real per-token shapes (hidden 2048, 512-wide experts, top-10, the real
attention/DeltaNet mixers, the real vocabulary) with 8 layers (2 full attention) and 128 experts
per layer, built once with `offload synth` into the cache. Prints, all with int4 routed experts
(fast kernels unless it says exact): decode tok/s with the dense layers as int4 with an int6
lm_head (the default, "auto"), int8, int4 and bf16, exact experts, overlap off and on, as a fraction of the bound for this run (every
weight a token reads, at this run's measured int4 kernel rate or RAM bandwidth, whichever is
slower) and the fast kernels' logits against the exact ones' (relative RMS, a 128-token prompt); the time of 8- and 32-token prompts beside as many decode steps; prefill tok/s for 512
and 2048-token prompts by path (a) (CPU kernels, fast and exact) and (b) (streamed layers; the
device is the CPU here); transformers
bf16 on the same checkpoint as the peer; and a second column scaled to the full model (48 layers,
512 experts) by the weights a token reads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(Path(__file__).resolve().parents[1]))  # would shadow the `kernels` package transformers imports)

from offload.kernels.membw import read_bandwidth  # noqa: E402
from offload.kernels.probe import decode_throughput, median_seconds, pool_for  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.config import args_from_dict  # noqa: E402
from offload.paths import cache_root  # noqa: E402
from offload.planner import FORMAT_BYTES, MATRIX_GROUPS, dense_format, parameter_groups  # noqa: E402
from offload.synthetic import preset_config, synthesize  # noqa: E402


def slice_dir(layers: int, experts: int, vocab: int | None = None) -> Path:
    """The slice in the cache, built on first use; `vocab` replaces the real vocabulary (a smaller
    one makes a quicker rehearsal: the embedding and lm_head are most of a short slice's bytes)."""
    path = cache_root() / "bench" / f"qwen3-next-slice-{layers}l-{experts}e{f'-{vocab}v' if vocab else ''}"
    if not (path / "config.json").is_file():
        print(f"building the slice checkpoint in {path} (once) ...", flush=True)
        config = preset_config("qwen3-next-80b-a3b", layers=layers, experts=experts)
        synthesize(path, {**config, "vocab_size": vocab or config["vocab_size"]}, overwrite=True)
    return path


def time_decode(step, tokens: int) -> float:
    """Median seconds per decode step (after one warm-up step)."""
    step(-1)
    return median_seconds(step, tokens)


def offload_decode(engine, tokens: int) -> float:
    """Median seconds per decode step after a 16-token prompt."""
    engine.reset()
    engine.feed(list(range(1, 17)), all_logits=False)
    return time_decode(lambda i: engine.feed([100 + i], all_logits=False), tokens)


def prefill_seconds(engine, tokens: int, runs: int = 2) -> float:
    """Seconds of a fresh `tokens`-token prompt, the best of `runs` (the first also loads the
    prefill kernels)."""
    best = float("inf")
    for _ in range(runs):
        engine.reset()
        start = time.perf_counter()
        engine.feed(np.arange(tokens) % 1000 + 1, all_logits=False)
        best = min(best, time.perf_counter() - start)
    return best


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
    kernel_rate = decode_throughput(gate_up, down, 1, 10, 40)  # the fast kernel, the default
    del gate_up, down

    def read_per_token(model_args) -> tuple[float, float]:
        """Weights a decode step reads: (routed experts, everything else but the embedding rows)."""
        groups = parameter_groups(model_args)
        routed = groups["routed experts"] * model_args.num_experts_per_tok / model_args.num_experts
        return routed, sum(n for g, n in groups.items() if g not in ("routed experts", "embeddings"))

    def bound_seconds(model_args, dense_quant: str) -> float:
        """A step's floor: routed experts at the measured int4 kernel rate, every other matrix
        in its `dense_quant` format at that rate scaled by its bytes per weight (the kernels are
        bound by bytes or by multiply-adds, whichever is slower); routers and norms in fp32."""
        seconds = read_per_token(model_args)[0] / kernel_rate
        for group, weights in parameter_groups(model_args).items():
            if group not in ("routed experts", "embeddings"):
                fmt = dense_format(group, dense_quant) if group in MATRIX_GROUPS else "fp32"
                seconds += weights / min(kernel_rate, bandwidth / FORMAT_BYTES.get(fmt, 4))
        return seconds

    def measure(dense_quant, overlap=False, prefill_lengths=(512,), prefill="cpu", exact=False):
        engine = offload.load(path, quant="int4", dense_quant=dense_quant, ctx=2048 + 64, overlap=overlap,
                              prefill=prefill, exact=exact, gpu_mem=0)
        decode = offload_decode(engine, options.tokens)
        timings = {n: prefill_seconds(engine, n) for n in prefill_lengths}
        logits[(dense_quant, exact)] = engine.logits(torch.arange(1, 129) * 7 % 1000).float()
        return decode, timings

    logits: dict[tuple, torch.Tensor] = {}  # a 128-token prompt's logits, by (dense_quant, exact)

    print("measuring (a few minutes) ...", flush=True)
    decode_bf16, prefill_bf16 = measure(None)
    decode, prefill = measure("auto", prefill_lengths=(8, 32, 512, 2048))
    decode_exact, prefill_exact = measure("auto", prefill_lengths=(8, 32, 512, 2048), exact=True)
    decode_int8, prefill_int8 = measure("int8")
    decode_int4, prefill_int4 = measure("int4")
    decode_overlap, _ = measure("auto", overlap=True, prefill_lengths=())
    _, prefill_stream = measure("auto", prefill_lengths=(512, 2048), prefill="stream")
    # the full model: the slice's time scaled by the weights a token reads (decode streams
    # weights; experts per layer change only the RAM needed, not the work per token)
    scale = sum(read_per_token(full)) / sum(read_per_token(args))

    print(f"machine: {threads} threads; RAM read {bandwidth / 1e9:.1f} GB/s; int4 kernels {kernel_rate / 1e9:.1f} "
          f"G weights/s (batch 1)")
    routed, dense = read_per_token(args)
    full_routed, full_dense = read_per_token(full)
    print(f"weights read per token: routed experts {routed / 1e6:.0f} M (int4), dense {dense / 1e6:.0f} M "
          f"(slice); full model {full_routed / 1e6:.0f} M + {full_dense / 1e6:.0f} M")
    print(f"{'':<40} {'slice':>12} {'full model':>12}  ratio")

    def row(label: str, seconds: float, tokens: int = 1, note: str = "") -> None:
        print(f"{label:<40} {tokens / seconds:8.1f} tok/s {tokens / (seconds * scale):8.1f} tok/s  {note}")

    for name, seconds in (("auto", decode), ("int8", decode_int8), ("int4", decode_int4)):
        label = "decode, dense int4 + int6 head (auto)" if name == "auto" else f"decode, dense {name}"
        bound = bound_seconds(args, name)
        if seconds < bound:  # faster than the bound: the bound is wrong, not the kernels
            row(label, seconds, note=f"no bound: this run's probes ({1 / bound:.1f} tok/s) "
                "read slower than the kernels; the bandwidth or kernel-rate probe is wrong")
            continue
        row(label, seconds, note=f"{bound / seconds:.0%} of the kernel bound "
            f"({1 / bound:.1f} tok/s: every weight a token reads at this run's int4 kernel rate)")
    fast, exact = logits[("auto", False)], logits[("auto", True)]
    difference = ((fast - exact).norm() / exact.norm()).item()
    row("decode, auto, exact experts", decode_exact, note=f"fast experts {decode_exact / decode:.2f}x faster; "
        f"fast vs exact logits (128 tokens): {difference:.2%} relative RMS")
    row("decode, auto, overlap on", decode_overlap, note=f"{decode / decode_overlap:.2f}x of overlap off")
    row("decode, dense bf16 (dense_quant=None)", decode_bf16, note=f"auto is {decode_bf16 / decode:.2f}x faster")
    for tokens in (8, 32):
        print(f"{f'a {tokens}-token prompt':<40} {prefill[tokens]:8.3f} s     (exact experts {prefill_exact[tokens]:.3f} s; "
              f"{tokens} decode steps {tokens * decode:.3f} s)")
    for tokens in (512, 2048):
        row(f"prefill {tokens}, (a) CPU kernels", prefill[tokens], tokens,
            f"exact experts: {tokens / prefill_exact[tokens]:.1f} tok/s")
        row(f"prefill {tokens}, (b) streamed (device = CPU)", prefill_stream[tokens], tokens,
            f"(a) is {prefill_stream[tokens] / prefill[tokens]:.1f}x faster")
    row("prefill 512, dense int8", prefill_int8[512], 512)
    row("prefill 512, dense int4", prefill_int4[512], 512)
    row("prefill 512, dense bf16", prefill_bf16[512], 512)
    if not options.skip_peer:
        peer_decode, peer_prefill = transformers_decode(path, min(options.tokens, 16))
        row("transformers bf16 decode", peer_decode, note=f"offload (auto) {peer_decode / decode:.1f}x faster")
        row("transformers bf16 prefill 512", peer_prefill, 512, f"offload {peer_prefill / prefill[512]:.1f}x faster")


if __name__ == "__main__":
    main()
