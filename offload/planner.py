"""The placement planner: where every tensor group lives, what that costs, and how fast it runs.

From `ModelArgs` (a checkpoint's config.json or a preset), a `HardwareProfile`, a GPU budget, a
context length and the expert format, `make_plan()` returns a `Plan`: the placement of each
tensor group with its bytes and format, a GPU and a RAM ledger, and predicted decode and prefill
speeds with the resource that bounds each. Plans are plain data (`Plan.to_dict()`), printed by
`offload plan` and kept by the engine.

Policy. With a GPU: mixers (attention / DeltaNet), norms, routers, shared experts and lm_head on
the GPU in the checkpoint's precision, with the KV / recurrent caches; routed experts in RAM as
int4; embeddings in RAM (a decode step gathers one row). Optional GPU items are dropped first
when the budget is short: the expert prefetch buffers (then prefill runs experts on the CPU),
then the shared experts, then lm_head (both to the CPU in `dense_quant`'s formats). If the rest
still does not fit, the plan fails and names the smallest budget that works. Without a GPU
(budget 0 or none in the profile) everything is in RAM, where every dense matrix is read once per
decoded token: by default (`dense_format`, "auto") as int4, lm_head as int6, so a token reads no
more bytes than llama.cpp's Q4_K_M of the same checkpoint; routers as stored (bf16, widened as
they are used) or in fp32, routed experts int4.

Cost model (per token, per layer, then summed):
- decode: the GPU runs the mixer, then the CPU runs the routed experts while the GPU runs the
  shared expert; each side is bounded by bytes / bandwidth, the CPU's experts also by the
  measured int4 kernel throughput; plus a fixed synchronisation cost per layer;
- prefill of N tokens: either the CPU runs the experts for all N tokens (time grows with N, at
  the int4 kernel's rate) while the GPU mixes, or each layer's int4 experts are streamed to the GPU
  (time fixed by the host-to-device bandwidth) and run there; the faster one is chosen, and the
  prompt length where they cross is reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from offload.config import PREFILL_CHUNK, STAGING_BLOCKS, STREAM_EXPERT_BATCH, STREAM_PASS_TOKENS, ModelArgs
from offload.hardware import HardwareProfile, format_size
from offload.models.cache import KV_FORMATS, kv_bytes_per_position
from offload.models.hub import parameter_shapes

INT4_BYTES = 4.5 / 8  # kernels.int4: 4 bits + a bf16 scale per 32 weights
INT6_BYTES = 6.5 / 8  # kernels.int6 (an output head on the CPU): 6 bits + a bf16 scale per 32 weights
INT8_BYTES = 8.5 / 8  # kernels.int8 (dense matrices on the CPU): 8 bits + a bf16 scale per 32 weights
FORMAT_BYTES = {"int4": INT4_BYTES, "int6": INT6_BYTES, "int8": INT8_BYTES}
DENSE_QUANTS = ("auto", "int8", "int4")  # `dense_quant` values besides None (as stored)
KV_CACHES = ("auto", *KV_FORMATS)  # `kv_cache` values
# Decode attention on the CPU (kernels.attention) at depth: with a group of query heads per KV head
# it does 2 x heads x Dh multiply-adds per cached position, more than the RAM delivers bytes for
# on a few cores. Multiply-adds per second per core by KV format, measured with the RAM's time in
# them (Intel Xeon with AVX512-VNNI, 2 cores: 67M per layer at depth 8192 in 1.00 ms int8, 1.54 ms
# bf16, 2.51 ms f32; bench/long.py --kernel-only); fp16 keys take torch's blockwise path, counted as f32.
CPU_ATTENTION_FMA_PER_CORE = {"int8": 32e9, "bf16": 22e9, "f32": 13e9}
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context, cuBLAS workspace, allocator slack
RAM_RESERVE_BYTES = 2 * 2**30  # Python, torch and the OS page cache's working minimum
LAYER_SYNC_SECONDS = 40e-6  # per layer and token: two small copies, an event, a worker hand-off
# per layer and token when the CPU runs everything: torch operations and Python between the
# kernels (measured ~10 ms per decode step of an 8-layer Qwen3-Next slice, 2-core Zen 3)
CPU_LAYER_SECONDS = 1.2e-3
CPU_PREFILL_LAYER_SECONDS = 3e-3  # the same per layer and prompt chunk (the chunked delta rule's many ops)
GPU_EFFICIENCY = 0.7  # achieved fraction of a GPU's memory bandwidth / FLOP/s in small kernels
CPU_INT4_EFFICIENCY = 0.5  # int4 kernel rate as a fraction of RAM bandwidth, when not measured
CPU_FLOPS_PER_CORE = 3e9 * 32 * 0.5  # fp32 GEMM: 3 GHz x 2 AVX2 FMA x 8 lanes x 2 flops, at 50%
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PREFETCH_GROUP = "expert prefetch buffers (2 layers)"  # present in a plan iff prefill can stream
STAGING_GROUP = f"pinned staging ({STAGING_BLOCKS} blocks)"
MATRIX_GROUPS = ("mixers", "dense MLPs", "shared experts", "lm_head")  # what `dense_quant` applies to
KEEP_FLOAT = ("mlp.gate", "shared_expert_gate")  # linear layers (by name ending) that stay float


@dataclass
class Placement:
    group: str
    device: str  # "gpu" or "cpu"
    format: str  # "bf16", "fp16", "fp32", "int8", "int4"
    nbytes: int
    params: int = 0


@dataclass
class Prediction:
    decode_tok_s: float  # at depth 0
    decode_bound: str
    decode_limit_tok_s: float  # every byte a token reads (at depth 0), at the memories' bandwidth
    decode_tok_s_at_ctx: float  # with the context full: every cached key and value read per token
    decode_bound_at_ctx: str
    prefill_tok_s: float
    prefill_bound: str
    prefill_tokens: int
    prefill_strategy: str  # "cpu" (experts on the CPU) or "stream" (experts streamed to the GPU)
    stream_from_tokens: int | None  # prompt length from which streaming is faster, if ever


@dataclass
class Plan:
    model: str
    profile: str
    gpu_budget: int
    ctx: int
    quant: str
    fits: bool
    reason: str
    placement: list[Placement]
    gpu_bytes: int
    ram_bytes: int
    ram_available: int
    minimum_gpu_bytes: int
    params_total: int
    params_active: int
    predicted: Prediction | None = None
    notes: list[str] = field(default_factory=list)
    activations: str = "bf16"  # dtype the model computes in: the GPU's, or fp32 on a CPU with quantised layers
    dense_quant: str | None = None  # the policy for dense matrices on the CPU (`dense_format`)
    kv_format: str = "bf16"  # how the KV cache stores keys and values (KV_FORMATS)
    slots: int = 1  # sequences held at once, each with caches for `ctx` positions

    def to_dict(self) -> dict:
        return asdict(self)


# --- sizing ------------------------------------------------------------------------------------

def group_of(name: str) -> str:
    """The tensor group of one of the model's parameters, by its name (`layers.3.mlp.gate.weight`)."""
    if name == "embed_tokens.weight":
        return "embeddings"
    if name == "lm_head.weight":
        return "lm_head"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_expert" in name:
        return "shared experts"
    if name.endswith(".mlp.gate.weight"):
        return "routers"
    if name.endswith("norm.weight") and "linear_attn.norm" not in name:
        return "norms"
    if ".mlp." in name:
        return "dense MLPs"
    return "mixers"


def tensors_by_group(args: ModelArgs) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The model's parameters, (name, shape), by tensor group (a tied lm_head is not one)."""
    tensors: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in parameter_shapes(args).items():
        tensors.setdefault(group_of(name), []).append((name, shape))
    return tensors


def parameter_groups(args: ModelArgs) -> dict[str, int]:
    """Parameters per tensor group (a tied lm_head counts once, as embeddings)."""
    return {group: sum(math.prod(shape) for _, shape in items) for group, items in tensors_by_group(args).items()}


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(total, active per token): active counts top-k of the routed experts, all else once."""
    groups = parameter_groups(args)
    total = sum(groups.values())
    routed = groups.get("routed experts", 0)
    active = total - routed + routed * args.num_experts_per_tok // max(args.num_experts, 1)
    return total, active


def kv_cache_bytes(args: ModelArgs, ctx: int, kv_format: str) -> int:
    """Bytes of the KV caches for `ctx` positions in `kv_format` (full-attention layers only)."""
    return args.attention_layers * int(kv_bytes_per_position(args.num_key_value_heads, args.head_dim, kv_format) * ctx)


def _stream_pass_bytes(args: ModelArgs) -> int:
    """What a streamed prompt needs on the device beyond one chunk's work: each of a pass's
    chunks' residual stream and feed-forward results (fp32), the pass's expert inputs joined
    (bf16), and one batch of experts being dequantised (the nibbles, the codes and the weights in
    the compute dtype: ~6 bytes a weight at the peak)."""
    pass_bytes = (STREAM_PASS_TOKENS - PREFILL_CHUNK) * args.hidden_size * 12  # residual, routed, shared
    pass_bytes += STREAM_PASS_TOKENS * args.hidden_size * 2  # the chunks' inputs joined for the experts
    expert_weights = 3 * args.moe_intermediate_size * args.hidden_size
    return pass_bytes + STREAM_EXPERT_BATCH * expert_weights * 6


def _workspace_bytes(args: ModelArgs) -> int:
    """Activations of one prefill chunk: a handful of [chunk, widest] fp32 tensors, the
    attention scores of one head group, and last-token logits."""
    widest = args.widest_activation()
    return 6 * PREFILL_CHUNK * widest * 4 + PREFILL_CHUNK * PREFILL_CHUNK * args.num_attention_heads * 4 \
        + args.vocab_size * 4


# --- planning ----------------------------------------------------------------------------------


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether `dense_quant` turns this parameter into int8/int4 on the CPU: the matrices of
    linear layers whose sizes are multiples of 32, except the routers and the shared-expert gate
    (small, and they decide which experts run). The routed experts have their own format."""
    return (len(shape) == 2 and name.endswith(".weight") and group_of(name) not in ("embeddings", "routed experts")
            and not name[:-len(".weight")].endswith(KEEP_FLOAT) and not shape[0] % 32 and not shape[1] % 32)


def dense_format(group: str, dense_quant: str | None) -> str | None:
    """The format of a dense group's quantizable matrices on the CPU under `dense_quant`. "auto"
    (with int4 experts; with float ones, as stored) reads no more bytes per token than llama.cpp's Q4_K_M of the same checkpoint: int4 (4.5 bits,
    as Q4_K) for mixers, MLPs and shared experts, int6 (6.5 bits, as Q6_K) for lm_head, whose
    error reaches the logits unfiltered. "int8" / "int4" are the same for every group; None keeps
    the checkpoint's precision."""
    if dense_quant == "auto":
        return "int6" if group == "lm_head" else "int4"
    return dense_quant


def kv_choices(kv_cache: str, use_gpu: bool, compute_format: str, lossless: bool) -> list[str]:
    """The KV formats a plan may use, best first. "auto": the computed precision (fp32, fp16, else
    bf16) when the rest keeps full precision (weights as stored, or exact kernels); otherwise bf16 on a
    GPU, int8 when the budget needs the room, and int8 on the CPU, where a decode step at depth
    reads the whole cache (int8 is half of bf16's bytes; its error, measured in BENCHMARKS.md and
    held by tests/test_long_context.py, is a small part of what int4 experts already cost)."""
    if kv_cache != "auto":
        return [kv_cache]
    computed = {"fp32": "f32", "fp16": "f16"}.get(compute_format, "bf16")
    if lossless:
        return [computed, "int8"] if use_gpu else [computed]
    return [computed if computed == "f16" else "bf16", "int8"] if use_gpu else ["int8"]


def make_plan(args: ModelArgs, profile: HardwareProfile, gpu_budget: int | None = None, ctx: int = 4096,
              quant: str = "int4", prompt_tokens: int = 2048, model_name: str = "",
              dense_quant: str | None = "auto", kv_cache: str = "auto", exact: bool = False, slots: int = 1) -> Plan:
    """Place every tensor group; `gpu_budget` in bytes (None: the profile's GPU memory, 0: CPU only).
    `slots` sequences are held at once, each with its caches for `ctx` positions.
    Dense matrices placed on the CPU are in `dense_format(group, dense_quant)` ("auto", "int8",
    "int4", or None: as stored); the KV cache in `kv_choices(kv_cache, ...)`'s first format that
    fits. Sizes are those the loader allocates for this placement, tensor by tensor."""
    if dense_quant not in (None, *DENSE_QUANTS):
        raise ValueError(f"dense_quant must be one of {DENSE_QUANTS} or None, got {dense_quant!r}")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if dense_quant == "auto" and quant != "int4":
        dense_quant = None  # float experts: the dense matrices stay float too
    if gpu_budget is None:
        gpu_budget = profile.gpu.memory if profile.gpu else 0
    use_gpu = gpu_budget > 0 and profile.gpu is not None
    # FP8 weights are widened to the checkpoint's float dtype (its embeddings'; bf16 in the releases)
    dense_bytes = DTYPE_BYTES.get(args.torch_dtype, 2)
    stored_format = {4: "fp32", 2: "bf16"}[dense_bytes] if args.torch_dtype != "float16" else "fp16"
    # Without a GPU and with quantised dense matrices the model computes in fp32 (the CPU kernels'
    # activations); what stays float is widened to it. Otherwise everything keeps the checkpoint's dtype.
    compute_bytes = 4 if not use_gpu and dense_quant else dense_bytes
    compute_format = "fp32" if compute_bytes == 4 else stored_format
    # float experts are widened with the rest when the model computes in fp32 (`placement.place`)
    expert_bytes, expert_format = (INT4_BYTES, "int4") if quant == "int4" else (compute_bytes, compute_format)
    tensors = tensors_by_group(args)
    if args.tie_word_embeddings:  # the head is a second copy on its device
        tensors["lm_head"] = [("lm_head.weight", tensors["embeddings"][0][1])]
    groups = {group: sum(math.prod(shape) for _, shape in items) for group, items in tensors.items()}
    kv_formats = kv_choices(kv_cache, use_gpu, compute_format, lossless=quant != "int4" or exact)
    kv = {fmt: slots * kv_cache_bytes(args, ctx, fmt) for fmt in kv_formats}
    linear_state = slots * args.state_bytes(compute_bytes)
    held = f"{ctx} positions" if slots == 1 else f"{slots} slots x {ctx} positions"
    total, active = parameter_counts(args)
    moe_layers = sum(args.is_moe_layer(layer) for layer in range(args.num_hidden_layers))
    layer_experts = groups.get("routed experts", 0) * expert_bytes / max(moe_layers, 1)

    def on(device: str, group: str) -> Placement:
        params = groups.get(group, 0)
        if group == "routed experts":
            return Placement(group, "cpu", expert_format, int(params * expert_bytes), params)
        # embeddings as stored; a bf16 router too beside fp32 activations where the lean step reads it
        # (int4 experts, fast kernels), widening as it reads; elsewhere it is widened once
        lean_router = group == "routers" and device == "cpu" and stored_format == "bf16" and quant == "int4" \
            and not exact
        if group == "embeddings" or lean_router:
            return Placement(group, "cpu", stored_format, params * dense_bytes, params)
        if device == "gpu" or dense_quant is None:
            return Placement(group, device, stored_format, params * dense_bytes, params)
        fmt = dense_format(group, dense_quant)
        quantized = [math.prod(shape) for name, shape in tensors[group] if quantizable(name, shape)]
        nbytes = int(sum(quantized) * FORMAT_BYTES[fmt]) + (params - sum(quantized)) * compute_bytes
        fmt = fmt if quantized else compute_format
        return Placement(group, device, fmt, nbytes, params)

    dense_groups = [g for g in ("mixers", "dense MLPs", "routers", "norms") if groups.get(g)]
    optional = ["shared experts", "lm_head"] if groups.get("shared experts") else ["lm_head"]
    notes: list[str] = []
    stream_buffers = 2 * int(layer_experts) if quant == "int4" else 0
    batch = min(STREAM_EXPERT_BATCH, args.num_experts)  # the streamer's staging: blocks of experts
    staging = int(layer_experts * min(STAGING_BLOCKS, -(-args.num_experts // batch)) * batch / args.num_experts) \
        if quant == "int4" else 0

    def layout(gpu_optional: list[str], with_stream: bool, kv_format: str) -> list[Placement]:
        device = "gpu" if use_gpu else "cpu"
        placement = [on("cpu", "embeddings")]
        placement += [on(device, g) for g in dense_groups]
        placement += [on(device if g in gpu_optional else "cpu", g) for g in optional]
        placement.append(on("cpu", "routed experts"))
        placement.append(Placement(f"KV cache ({held})", device, kv_format, kv[kv_format]))
        if linear_state:
            placement.append(Placement("DeltaNet state", device, "fp32", linear_state))
        if use_gpu:
            placement.append(Placement("workspace + CUDA context", "gpu", "-", _workspace_bytes(args)
                                       + (_stream_pass_bytes(args) if with_stream else 0) + CUDA_CONTEXT_BYTES))
            if with_stream:
                placement.append(Placement(PREFETCH_GROUP, "gpu", expert_format, stream_buffers))
                placement.append(Placement(STAGING_GROUP, "cpu", expert_format, staging))
        else:
            placement.append(Placement("workspace", "cpu", "-", _workspace_bytes(args)))
        return placement

    def gpu_total(placement: list[Placement]) -> int:
        return sum(p.nbytes for p in placement if p.device == "gpu")

    # what a short budget gives up, in order: prefetch buffers, then bf16 keys and values (for int8),
    # then the shared experts' and lm_head's places on the GPU
    best, cheapest = kv_formats[0], kv_formats[-1]
    candidates = [(optional, stream_buffers > 0, best), (optional, False, best)]
    candidates += [(optional, False, fmt) for fmt in kv_formats[1:]]
    candidates += [(optional[i + 1:], False, cheapest) for i in range(len(optional))]
    placement = layout(*candidates[0])
    minimum = gpu_total(layout(*candidates[-1])) if use_gpu else 0
    fits, reason = True, ""
    if use_gpu:
        for candidate in candidates:
            placement = layout(*candidate)
            if gpu_total(placement) <= gpu_budget:
                break
        else:
            fits = False
            need, have = format_size(minimum), format_size(gpu_budget)
            if need == have:  # a few bytes short: show the difference
                need, have = f"{minimum / 2**20:.2f}MiB", f"{gpu_budget / 2**20:.2f}MiB"
            reason = (f"needs at least {need} of GPU memory for {ctx} tokens of context (mixers, routers, "
                      f"CUDA context, caches with a {cheapest} KV cache), the budget is {have}; "
                      f"raise --gpu-mem, lower --ctx, or use --gpu-mem 0 to run on the CPU")
        if fits and stream_buffers and not any(p.group == PREFETCH_GROUP for p in placement):
            notes.append("no room for expert prefetch buffers: prefill runs the experts on the CPU")
        moved = [g for g in optional if any(p.group == g and p.device == "cpu" for p in placement)]
        if fits and moved:
            notes.append(f"{' and '.join(moved)} on the CPU "
                         f"({', '.join(p.format for p in placement if p.group in moved)}) to fit the GPU budget")
    kv_entry = next(p for p in placement if p.group.startswith("KV cache"))
    if fits:
        notes.append(_kv_note(kv_entry, kv, best, use_gpu, args, held, asked=kv_cache != "auto"))
    gpu_bytes = gpu_total(placement)
    quantized = [p for p in placement if p.device == "cpu" and p.format in FORMAT_BYTES and p.group in MATRIX_GROUPS]
    if fits and quantized:
        notes.append(_format_note(quantized, tensors, compute_bytes, dense_bytes, stored_format, profile))
    ram_bytes = sum(p.nbytes for p in placement if p.device == "cpu") + RAM_RESERVE_BYTES
    if fits and ram_bytes > profile.cpu.ram:
        fits = False
        reason = (f"needs {format_size(ram_bytes)} of RAM (routed experts "
                  f"{format_size(groups.get('routed experts', 0) * expert_bytes)}), the machine has "
                  f"{format_size(profile.cpu.ram)}")
    plan = Plan(model=model_name or args.model_type, profile=profile.name, gpu_budget=gpu_budget if use_gpu else 0,
                ctx=ctx, quant=quant, fits=fits, reason=reason, placement=placement, gpu_bytes=gpu_bytes,
                ram_bytes=ram_bytes, ram_available=profile.cpu.ram, minimum_gpu_bytes=minimum,
                params_total=total, params_active=active, notes=notes,
                activations=compute_format, dense_quant=dense_quant, kv_format=kv_entry.format, slots=slots)
    plan.predicted = predict(args, profile, plan, groups, prompt_tokens)
    return plan


def _kv_note(entry: Placement, sizes: dict[str, int], best: str, use_gpu: bool, args: ModelArgs, held: str,
             asked: bool) -> str:
    """Why the KV cache has its format (`held`: "4096 positions", "4 slots x 4096 positions")."""
    layers = args.attention_layers
    if not layers:
        return f"no KV cache: no layer of {args.model_type} attends over the context"
    size = f"{format_size(entry.nbytes)} for {held} x {layers} attention layers"
    if asked:
        return f"KV cache {entry.format} ({size}): as asked (kv_cache)"
    if entry.format != best:
        return f"KV cache {entry.format} ({size}) to fit the GPU budget; {best} would take {format_size(sizes[best])}"
    if entry.format == "int8":
        return (f"KV cache int8 ({size}): a decode step at depth reads all of it, half of bf16's bytes, for an "
                "error well below the int4 experts' (BENCHMARKS.md)")
    why = "the GPU's" if use_gpu else "the model's"
    return f"KV cache {entry.format} ({size}): {why} precision"


def _format_note(quantized: list[Placement], tensors, compute_bytes: int, stored_bytes: int, stored_format: str,
                 profile: HardwareProfile) -> str:
    """Why the dense matrices in RAM have their formats: bytes per token against the alternatives,
    and the rates this machine measured for each format."""
    formats = {p.group: p.format for p in quantized}
    split = ", ".join(f"{group} {fmt}" for group, fmt in formats.items())

    def read(fmt: str | None) -> int:
        total = 0
        for p in quantized:
            matrices = sum(math.prod(shape) for name, shape in tensors[p.group] if quantizable(name, shape))
            total += (p.params * stored_bytes if fmt is None
                      else int(matrices * FORMAT_BYTES[fmt]) + (p.params - matrices) * compute_bytes)
        return total

    note = (f"dense matrices in RAM ({split}): a token reads {format_size(sum(p.nbytes for p in quantized))} of them "
            f"(int8 {format_size(read('int8'))}, {stored_format} {format_size(read(None))})")
    if set(formats.values()) == {"int4", "int6"}:
        note += "; 4 bits, the head 6, as llama.cpp's Q4_K_M"
    measured = profile.cpu.dense_gweights_per_s
    if measured:
        note += "; measured decode " + ", ".join(f"{fmt} {rates['decode']:.0f}" for fmt, rates in measured.items())
        note += " G weights/s"
    return note


# --- cost model --------------------------------------------------------------------------------


def _int4_rate(profile: HardwareProfile) -> float:
    """Weights/s the CPU's int4 expert kernels sustain (one multiply-add per weight and token)."""
    bandwidth_bound = profile.cpu.ram_bandwidth / INT4_BYTES
    if profile.cpu.int4_gweights_per_s:
        return min(profile.cpu.int4_gweights_per_s * 1e9, bandwidth_bound)
    return CPU_INT4_EFFICIENCY * bandwidth_bound


def _cpu_dense_seconds(profile: HardwareProfile, placements: list[Placement], tokens: int) -> float:
    """Seconds of the dense groups on the CPU for `tokens` tokens (one: decode; more: a prompt),
    at the rates `offload profile detect` measured for each format; without a measurement, decode
    reads every byte at the RAM bandwidth and a prompt runs at a nominal fp32 GEMM rate."""
    measured = profile.cpu.dense_gweights_per_s or {}
    seconds = 0.0
    for p in placements:
        # the measured rates are the formats' matrix kernels; a router is read by its own pass (at the
        # bus's rate), whatever it is stored in
        rate = None if p.group == "routers" else measured.get(p.format, {}).get("decode" if tokens == 1 else "prefill")
        bandwidth_s = p.nbytes / profile.cpu.ram_bandwidth if tokens == 1 else 0.0
        if rate:
            seconds += max(tokens * p.params / (rate * 1e9), bandwidth_s)
        elif tokens == 1:
            seconds += bandwidth_s
        else:
            seconds += tokens * 2 * p.params / (profile.cpu.physical_cores * CPU_FLOPS_PER_CORE)
    return seconds


def predict(args: ModelArgs, profile: HardwareProfile, plan: Plan, groups: dict[str, int],
            prompt_tokens: int) -> Prediction:
    layers = args.num_hidden_layers
    top_k, experts = args.num_experts_per_tok, max(args.num_experts, 1)
    routed_active = groups.get("routed experts", 0) * top_k / experts  # weights per token
    gpu_dense_bytes = sum(p.nbytes for p in plan.placement
                          if p.device == "gpu" and p.group in ("mixers", "dense MLPs", "routers", "norms",
                                                               "shared experts", "lm_head"))
    cpu_dense = [p for p in plan.placement
                 if p.device == "cpu" and p.group in ("mixers", "dense MLPs", "routers", "shared experts", "lm_head")]
    cpu_dense_params = sum(p.params for p in cpu_dense)
    gpu = profile.gpu if plan.gpu_budget else None
    expert_rate = _int4_rate(profile) if plan.quant == "int4" else profile.cpu.ram_bandwidth / 2

    # decode: per token
    experts_s = routed_active / expert_rate
    cpu_dense_s = _cpu_dense_seconds(profile, cpu_dense, 1)
    gpu_s = gpu_dense_bytes / (gpu.memory_bandwidth * GPU_EFFICIENCY) if gpu else 0.0
    sync_s = layers * LAYER_SYNC_SECONDS if gpu else 0.0
    cpu_layers_s = 0.0 if gpu else layers * CPU_LAYER_SECONDS
    parts = {"work between the kernels (torch, Python)": cpu_layers_s, "RAM bandwidth (routed experts)" if expert_rate >= profile.cpu.ram_bandwidth / INT4_BYTES * 0.99
             else "CPU int4 kernel (routed experts)": experts_s,
             "dense layers on the CPU": cpu_dense_s,
             "GPU memory bandwidth": gpu_s, "GPU-CPU synchronisation": sync_s}
    decode_s = sum(parts.values())
    decode_bound = max(parts, key=parts.get)
    # the bound: the active routed experts as placed, the dense layers and, for each DeltaNet layer,
    # its state read and written once; CPU and GPU parts added (a hybrid step runs them in turn)
    routed = next(p for p in plan.placement if p.group == "routed experts")
    # by device; a sequence's decode step reads its own slot's state
    state = {p.device: 2 * p.nbytes // plan.slots for p in plan.placement if p.group == "DeltaNet state"}
    cpu_bytes = routed.nbytes * top_k / experts + sum(p.nbytes for p in cpu_dense) + state.get("cpu", 0)
    gpu_bytes = gpu_dense_bytes + state.get("gpu", 0)
    limit_s = cpu_bytes / profile.cpu.ram_bandwidth + (gpu_bytes / gpu.memory_bandwidth if gpu else 0.0)
    attention_s = _attention_at_depth_s(args, profile, plan, gpu)
    decode_at_ctx_s = decode_s + attention_s
    bound_at_ctx = "attention over the full KV cache" if attention_s > max(parts.values()) else decode_bound

    # prefill of N tokens, either way
    def cpu_experts_s(tokens: int) -> float:
        expert_time = tokens * routed_active / expert_rate
        # dense layers: weights reused across the chunk; lm_head only for the last token
        dense_time = (_cpu_dense_seconds(profile, [p for p in cpu_dense if p.group != "lm_head"], tokens)
                      + _cpu_dense_seconds(profile, [p for p in cpu_dense if p.group == "lm_head"], 1)
                      + tokens * _gpu_flops_s(args, gpu, tokens, plan))
        if gpu:
            return max(expert_time, dense_time)
        return expert_time + dense_time + layers * CPU_PREFILL_LAYER_SECONDS * math.ceil(tokens / PREFILL_CHUNK)

    def stream_s(tokens: int) -> float:  # every layer's experts cross once per pass
        passes = math.ceil(tokens / STREAM_PASS_TOKENS)
        copy_time = passes * groups.get("routed experts", 0) * INT4_BYTES / gpu.h2d_bandwidth
        compute = tokens * (2 * routed_active / (gpu.bf16_tflops * 1e12 * GPU_EFFICIENCY)
                            + _gpu_flops_s(args, gpu, tokens, plan))
        return max(copy_time, compute)

    can_stream = gpu is not None and any(p.group == PREFETCH_GROUP for p in plan.placement)
    cpu_time = cpu_experts_s(prompt_tokens)
    strategy, prefill_s = "cpu", cpu_time
    prefill_bound = "CPU int4 kernel (routed experts)" if gpu or not cpu_dense_params else "CPU compute"
    stream_from = None
    if can_stream:
        if stream_s(prompt_tokens) < cpu_time:
            strategy, prefill_s, prefill_bound = "stream", stream_s(prompt_tokens), "host-to-device bandwidth"
        stream_from = _crossing(cpu_experts_s, stream_s, plan.ctx)
    return Prediction(decode_tok_s=1 / decode_s, decode_bound=decode_bound, decode_limit_tok_s=1 / limit_s,
                      decode_tok_s_at_ctx=1 / decode_at_ctx_s, decode_bound_at_ctx=bound_at_ctx,
                      prefill_tok_s=prompt_tokens / prefill_s, prefill_bound=prefill_bound,
                      prefill_tokens=prompt_tokens, prefill_strategy=strategy, stream_from_tokens=stream_from)


def _attention_at_depth_s(args: ModelArgs, profile: HardwareProfile, plan: Plan, gpu) -> float:
    """Seconds per decoded token of attention over a full KV cache (`plan.ctx` positions): its bytes
    at the memory's bandwidth; on the CPU at least its multiply-adds at the measured kernel rate."""
    kv = next(p for p in plan.placement if p.group.startswith("KV cache"))
    nbytes = kv.nbytes / plan.slots  # one sequence's
    if kv.device == "gpu":
        return nbytes / (gpu.memory_bandwidth * GPU_EFFICIENCY)
    layers = args.attention_layers
    seen = min(plan.ctx, args.attention_window or plan.ctx)  # positions a query attends to
    multiply_adds = 2 * args.num_attention_heads * args.head_dim * seen * layers
    rate = CPU_ATTENTION_FMA_PER_CORE.get(plan.kv_format, CPU_ATTENTION_FMA_PER_CORE["f32"])
    return max(nbytes / profile.cpu.ram_bandwidth, multiply_adds / (profile.cpu.physical_cores * rate))


def _gpu_flops_s(args: ModelArgs, gpu, tokens: int, plan: Plan) -> float:
    """Seconds per prompt token of the dense GPU work (2 flops per weight, plus attention)."""
    if gpu is None:
        return 0.0
    dense = sum(p.params for p in plan.placement if p.device == "gpu")
    attention = args.attention_layers * 4 * args.num_attention_heads * args.head_dim * tokens / 2
    return (2 * dense + attention) / (gpu.bf16_tflops * 1e12 * GPU_EFFICIENCY)


def _crossing(cpu_time, stream_time, limit: int) -> int | None:
    """Smallest prompt length at which streaming is faster, up to `limit` (the context: no prompt
    is longer) by binary search; None if it never is."""
    if stream_time(limit) >= cpu_time(limit):
        return None
    low, high = 1, limit
    while low < high:
        middle = (low + high) // 2
        if stream_time(middle) < cpu_time(middle):
            high = middle
        else:
            low = middle + 1
    return low
