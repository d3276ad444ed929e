"""Executing the plan: every tensor group on the device and in the format `Plan.placement` gives.

`load()` fills the model in RAM in the checkpoint's precision (with the routed experts already
swapped for the int4 executor), then `place()` reads the plan group by group; this is the one
place that maps plan groups to modules:
- groups on "gpu" move to the execution device (CUDA, or the CPU standing in for a GPU) in the
  checkpoint's precision;
- groups on "cpu" stay in RAM: dense matrices become `QuantizedLinear` where the plan gives them
  int8/int4, embeddings stay as stored, the routed experts stay with the int4 executor (which
  crosses through its host lanes, and computes a shared expert kept in RAM in the same CPU work).
  On CUDA each other RAM-resident module is wrapped in `OnHost`;
- a plan that computes in fp32 on the CPU widens what stays float, and mixers placed on the CPU
  in fp32 become their architecture's step executors (`fuse_cpu_steps`: Qwen3-Next's DeltaNet
  mixers a `FusedDeltaNet`); an MLP whose projections are quantised becomes a `JoinedMLP` (gate
  and up in one kernel call); a CPU-only fp32 plan with the fast kernels takes the lean decode
  step's norms, attention mixers and MoE blocks (`offload.lean`).
It returns what it did, group by group (`Engine.placement`).
"""

from __future__ import annotations

import torch
from torch import nn

from offload.dense import JoinedMLP, QuantizedLinear, quantize_dense
from offload.experts import Int4Experts
from offload.host import OnHost
from offload.models.cache import KVCache, LinearAttentionCache
from offload.models.moe import MLP, SparseMoeBlock
from offload.planner import PREFETCH_GROUP, STAGING_GROUP, Plan, group_of, quantizable

QUANTIZED = ("int8", "int6", "int4")


def _group(module_name: str, leaf: str = "weight") -> str:
    return group_of(f"{module_name}.{leaf}" if module_name else leaf)


def quantized_layers(model: nn.Module, plan: Plan) -> dict[str, str]:
    """The linear layers `place` quantises: module name -> format ("int4", "int6", "int8")."""
    formats = {p.group: p.format for p in plan.placement if p.device == "cpu" and p.format in QUANTIZED}
    return {name: formats[_group(name)] for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _group(name) in formats
            and quantizable(f"{name}.weight", tuple(module.weight.shape))}


def place(model: nn.Module, plan: Plan, device: torch.device, progress: bool = False,
          exact: bool = False, stored=None) -> dict[str, int]:
    """Move, quantise and wrap `model`'s modules as `plan` says (quantised layers with the exact
    kernels if `exact`; those `stored`, an `offload.store.DenseStore`, holds are taken from it
    and the others kept in it); returns the bytes of each tensor group as placed (routed experts
    from the int4 store are counted by the caller)."""
    where = {p.group: p for p in plan.placement}
    layers = quantized_layers(model, plan)
    for fmt in QUANTIZED:
        names = {name for name, f in layers.items() if f == fmt}
        if names:
            quantize_dense(model, fmt, names, progress=progress, exact=exact, stored=stored)
    if stored is not None:
        stored.save()
    nbytes: dict[str, int] = {}
    for module_name, module in model.named_modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            group = _group(module_name, leaf)
            placed = where.get(group)
            target = device if placed is not None and placed.device == "gpu" else torch.device("cpu")
            dtype = param.dtype
            kept = group == "embeddings" or placed is not None and (group, placed.format, param.dtype) == (
                "routers", "bf16", torch.bfloat16)  # bf16 routers as the plan says: half the bytes, widened exactly
            if plan.activations == "fp32" and param.is_floating_point() and not kept:
                dtype = torch.float32  # quantised layers compute in fp32 on the CPU: so does the rest
            if (target, dtype) != (param.device, param.dtype):
                param = nn.Parameter(param.detach().to(target, dtype), requires_grad=False)
                setattr(module, leaf, param)
            nbytes[group] = nbytes.get(group, 0) + param.nbytes
        if isinstance(module, QuantizedLinear):
            group = _group(module_name)
            nbytes[group] = nbytes.get(group, 0) + module.nbytes
    model.rotary.to(device)
    _join_mlps(model)
    if "shared experts" in where and where["shared experts"].device == "cpu":
        _run_shared_experts_with_routed(model)
    if device.type != "cpu":
        _wrap_host_modules(model, {g for g, p in where.items() if p.device == "cpu"}, device)
    if plan.activations == "fp32" and "mixers" in where and where["mixers"].device == "cpu":
        _fuse_mixer_steps(model)
    if plan.activations == "fp32" and device.type == "cpu" and not plan.gpu_budget and not exact:
        from offload.lean import lean_layers

        lean_layers(model)
    if plan.activations == "fp32":
        nbytes["routers"] = nbytes.get("routers", 0) + _widen_unread_routers(model)
    return nbytes


def _widen_unread_routers(model: nn.Module) -> int:
    """Widen to fp32 the bf16 routers no lean block reads (its kernel widens them as it reads; a
    model's own `Router` would make an fp32 copy every call): a worker thread's or the exact
    kernels' MoE blocks. Returns the bytes added."""
    from offload.lean import LeanMoeBlock

    read = {id(lean.block) for lean in model.modules() if isinstance(lean, LeanMoeBlock)}
    added = 0
    for module in model.modules():
        if isinstance(module, SparseMoeBlock) and id(module) not in read and module.gate.weight.dtype == torch.bfloat16:
            module.gate.weight = nn.Parameter(module.gate.weight.detach().float(), requires_grad=False)
            added += module.gate.weight.nbytes // 2
    return added


def _join_mlps(model: nn.Module) -> None:
    """Each MLP kept in RAM as quantised layers becomes a `JoinedMLP` (gate and up in one call)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MLP):
            joined = JoinedMLP.of(module)
            if joined is not None:
                parent, _, attribute = name.rpartition(".")
                setattr(model.get_submodule(parent), attribute, joined)


def _run_shared_experts_with_routed(model: nn.Module) -> None:
    """Shared experts kept in RAM beside int4 routed experts that cross to the CPU (host lanes) run
    in the lanes' CPU work, from the inputs already there: no crossing of their own."""
    for layer in model.layers:
        block = layer.mlp
        if isinstance(block, SparseMoeBlock) and block.shared_expert is not None \
                and isinstance(block.experts, Int4Experts) and block.experts.executor.lanes:
            block.shared_on_host = True


def _groups_within(module: nn.Module, prefix: str) -> set[str] | None:
    """The tensor groups a module holds; None if it holds routed int4 experts (which cross to the
    CPU by themselves)."""
    groups = set()
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, Int4Experts):
            return None
        groups |= {_group(name, leaf) for leaf, _ in sub.named_parameters(recurse=False)}
        if isinstance(sub, QuantizedLinear):
            groups.add(_group(name))
    return groups


def _wrap_host_modules(module: nn.Module, host_groups: set[str], device: torch.device, prefix: str = "") -> None:
    """Wrap each largest module whose tensors all stay in RAM in `OnHost`."""
    for name, child in module.named_children():
        if getattr(module, "shared_on_host", False) and name in ("shared_expert", "shared_expert_gate"):
            continue  # called on the host by the routed experts' lane work
        full = f"{prefix}{name}"
        groups = _groups_within(child, full)
        if groups and groups <= host_groups:
            setattr(module, name, OnHost(child, device, output_in_ram=full == "lm_head"))
        elif groups is None or groups:
            _wrap_host_modules(child, host_groups, device, f"{full}.")


def _fuse_mixer_steps(model: nn.Module) -> None:
    """The architecture's CPU step executors in place of its mixers (placed on the CPU in fp32)."""
    from offload.models import ARCHITECTURES

    ARCHITECTURES[model.args.model_type].fuse_cpu_steps(model)


def torch_device_name(device: torch.device) -> str:
    """"cuda:0" rather than "cuda": the device a tensor really lands on."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def executed_placement(plan: Plan, device: torch.device, nbytes: dict[str, int], caches: list,
                       expert_nbytes: int, executor=None) -> list[dict]:
    """`plan.placement` as executed: each entry with the torch device it runs on and the bytes
    actually allocated (the workspace entries, not tensors of offload's own, keep the plan's figure)."""
    measured = dict(nbytes)
    measured["routed experts"] = measured.get("routed experts", 0) + expert_nbytes
    streamer = executor.streamer if executor is not None else None
    if streamer is not None:
        measured[PREFETCH_GROUP] = sum(t.nbytes for slot in streamer.slots for t in slot.values())
        measured[STAGING_GROUP] = sum(t.nbytes for slot in streamer.staging for t in slot.values())
    executed = []
    for entry in plan.placement:
        if entry.group.startswith("KV cache"):
            size = sum(c.nbytes for c in caches if isinstance(c, KVCache))
        elif entry.group == "DeltaNet state":
            size = sum(c.nbytes for c in caches if isinstance(c, LinearAttentionCache))
        else:
            size = measured.get(entry.group, entry.nbytes if entry.group.startswith("workspace") else 0)
        executed.append({"group": entry.group, "device": entry.device,
                         "torch_device": torch_device_name(device) if entry.device == "gpu" else "cpu",
                         "format": entry.format, "nbytes": int(size)})
    return executed


def describe(executed: list[dict]) -> list[str]:
    """`Engine.placement` as aligned lines: group, where it runs (planned device), format, size."""
    from offload.hardware import format_size

    lines = [f"  {'tensor group':<36} {'runs on':<14} {'format':<6} {'size':>10}"]
    for entry in executed:
        where = entry["torch_device"] + (" (GPU)" if entry["device"] == "gpu" and entry["torch_device"] == "cpu"
                                         else "")
        lines.append(f"  {entry['group']:<36} {where:<14} {entry['format']:<6} {format_size(entry['nbytes']):>10}")
    return lines
