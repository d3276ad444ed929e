"""Hugging Face checkpoint names <-> the parameter names of our models.

Our modules carry the hub's names without the leading `model.`, except that the routed experts
are stacked: the hub's per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` become
`mlp.experts.gate_up_proj` [E, 2I, D] (gate rows first) and `mlp.experts.down_proj` [E, D, I].
Checkpoints that already store the stacked form (transformers >= 5 style) pass through.
Multi-token-prediction tensors (`mtp.*`) are not used and dropped.

An architecture whose checkpoints differ (other prefixes, projections split differently) renames
with `rename` and finishes with `tie_and_stack`; its `checkpoint_shapes` says what its releases
hold, for `offload synth`. Every shape comes from the model itself (`parameter_shapes`: the
modules built on the meta device), so no table of shapes is kept beside the modules.
"""

from __future__ import annotations

import torch

from offload.checkpoint import CheckpointError, LazyTensor, lazy_cat, lazy_stack
from offload.config import ModelArgs

Shapes = dict[str, tuple[int, ...]]


def sanitize(weights: dict[str, LazyTensor], args: ModelArgs) -> dict[str, LazyTensor]:
    """A checkpoint whose language model lives under `model.` (Qwen3-MoE, Qwen3-Next)."""
    return tie_and_stack(rename(weights, {"model.": ""}, skip=("mtp.",)), args)


def rename(weights: dict[str, LazyTensor], prefixes: dict[str, str], skip: tuple[str, ...] = ()
           ) -> dict[str, LazyTensor]:
    """Names with the first matching prefix of `prefixes` replaced (others unchanged), the tensors
    whose names start with one of `skip` left out (never read)."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith(skip):
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        out[name if prefix is None else prefixes[prefix] + name[len(prefix):]] = tensor
    return out


def tie_and_stack(weights: dict[str, LazyTensor], args: ModelArgs) -> dict[str, LazyTensor]:
    """A tied lm_head from the embeddings, and each MoE layer's per-expert tensors stacked."""
    if args.tie_word_embeddings and "embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    for layer in range(args.num_hidden_layers):
        if args.is_moe_layer(layer):
            _stack_experts(weights, f"layers.{layer}.mlp.experts", args.num_experts)
    return weights


def _stack_experts(weights: dict[str, LazyTensor], prefix: str, num_experts: int) -> None:
    if f"{prefix}.0.gate_proj.weight" not in weights:
        return
    first_file = weights[f"{prefix}.0.gate_proj.weight"].where.split(":")[0]
    gate_up, down = [], []
    for expert in range(num_experts):
        names = [f"{prefix}.{expert}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        for name in names:
            if name not in weights:
                raise CheckpointError(f"tensor {checkpoint_name(name, weights)} is missing from the checkpoint (expert 0 of its layer "
                                      f"is in {first_file}); download the model again")
        gate, up, dn = (weights.pop(name) for name in names)
        gate_up.append(lazy_cat([gate, up], where=gate.where))
        down.append(dn)
    weights[f"{prefix}.gate_up_proj"] = lazy_stack(gate_up, where=f"{gate_up[0].where} and the other experts")
    weights[f"{prefix}.down_proj"] = lazy_stack(down, where=f"{down[0].where} and the other experts")


def parameter_shapes(args: ModelArgs) -> Shapes:
    """Every parameter of the model `args` describes, our name -> shape, in module order (a tied
    lm_head is the embeddings and not listed)."""
    key = repr(args)  # every field: two args alike in all of them build the same modules
    if key not in _SHAPES:
        from offload.models import ARCHITECTURES

        with torch.device("meta"):
            model = ARCHITECTURES[args.model_type].Model(args)
        if len(_SHAPES) >= 32:
            _SHAPES.clear()
        _SHAPES[key] = {name: tuple(param.shape) for name, param in model.named_parameters()
                        if not (args.tie_word_embeddings and name == "lm_head.weight")}
    return dict(_SHAPES[key])


_SHAPES: dict[str, Shapes] = {}  # parameter_shapes by repr(args): a meta model of 512 x 48 experts takes ~60 ms


def checkpoint_shapes(args: ModelArgs) -> Shapes:
    """What a release of a `model.`-prefixed architecture holds, hub name -> shape: one tensor per
    routed expert."""
    return unstack_experts({hub_name(name): shape for name, shape in parameter_shapes(args).items()})


def unstack_experts(shapes: Shapes) -> Shapes:
    """Stacked experts ([E, 2I, D] gate_up_proj, [E, D, I] down_proj) as one tensor per expert."""
    out: Shapes = {}
    for name, shape in shapes.items():
        base, _, proj = name.rpartition(".")
        if not base.endswith(".mlp.experts"):
            out[name] = shape
        elif proj == "gate_up_proj":
            experts, rows, hidden = shape
            for expert in range(experts):
                out[f"{base}.{expert}.gate_proj.weight"] = out[f"{base}.{expert}.up_proj.weight"] = (rows // 2, hidden)
                out[f"{base}.{expert}.down_proj.weight"] = (hidden, rows // 2)
    return out


def checkpoint_name(name: str, weights: dict[str, LazyTensor]) -> str:
    """One of our parameters as this checkpoint spells it: the prefix its embeddings carry (a release
    may keep the language model under model.language_model.), none for lm_head."""
    embeddings = weights.get("embed_tokens.weight")
    if name.startswith("lm_head") or embeddings is None:
        return hub_name(name)
    return embeddings.where.split(": ", 1)[-1].removesuffix("embed_tokens.weight") + name


def hub_name(name: str) -> str:
    """The checkpoint's name of one of our parameters in a `model.`-prefixed release."""
    return name if name.startswith("lm_head") else f"model.{name}"
