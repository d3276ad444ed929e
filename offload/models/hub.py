"""Hugging Face checkpoint names -> the parameter names of our models.

Our modules carry the hub's names without the leading `model.`, except that the routed experts
are stacked: the hub's per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` become
`mlp.experts.gate_up_proj` [E, 2I, D] (gate rows first) and `mlp.experts.down_proj` [E, D, I].
Checkpoints that already store the stacked form (transformers >= 5 style) pass through.
Multi-token-prediction tensors (`mtp.*`) are not used and dropped.
"""

from __future__ import annotations

from offload.checkpoint import CheckpointError, LazyTensor, lazy_cat, lazy_stack
from offload.config import ModelArgs


def sanitize(weights: dict[str, LazyTensor], args: ModelArgs) -> dict[str, LazyTensor]:
    out = {name.removeprefix("model."): tensor for name, tensor in weights.items()
           if not name.startswith("mtp.")}
    if args.tie_word_embeddings and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    for layer in range(args.num_hidden_layers):
        if args.is_moe_layer(layer):
            _stack_experts(out, f"layers.{layer}.mlp.experts", args.num_experts)
    return out


def _stack_experts(weights: dict[str, LazyTensor], prefix: str, num_experts: int) -> None:
    if f"{prefix}.0.gate_proj.weight" not in weights:
        return
    first_file = weights[f"{prefix}.0.gate_proj.weight"].where.split(":")[0]
    gate_up, down = [], []
    for expert in range(num_experts):
        names = [f"{prefix}.{expert}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        for name in names:
            if name not in weights:
                raise CheckpointError(f"tensor model.{name} is missing from the checkpoint (expert 0 "
                                      f"of its layer is in {first_file}); download the model again")
        gate, up, dn = (weights.pop(name) for name in names)
        gate_up.append(lazy_cat([gate, up], where=gate.where))
        down.append(dn)
    weights[f"{prefix}.gate_up_proj"] = lazy_stack(gate_up, where=f"{gate_up[0].where} and the other experts")
    weights[f"{prefix}.down_proj"] = lazy_stack(down, where=f"{down[0].where} and the other experts")


def hub_name(name: str) -> str:
    """The checkpoint's name of one of our modules or parameters (ours drop the leading `model.`)."""
    return name if name.startswith("lm_head") else f"model.{name}"
