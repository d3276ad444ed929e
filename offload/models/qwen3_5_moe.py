"""Qwen3.5 MoE (Qwen3.5-35B-A3B, Qwen3.5-122B-A10B, Qwen3.5-397B-A17B; Qwen3.6-35B-A3B), text only.

Its language model is Qwen3-Next's maths: Gated DeltaNet and gated attention layers 3:1, routed
experts plus one gated shared expert, zero-centred RMSNorms. Qwen3-Next's modules run it
unchanged; what this file adds is how its checkpoints are written:
- releases are multimodal: config.json nests the language model's keys in `text_config`
  (`config.args_from_dict` reads them there), its tensors live under `model.language_model.`, the
  vision tower's under `model.visual.` and the multi-token-prediction head's under `mtp.` (neither
  is read). A text model saved alone (`Qwen3_5MoeForCausalLM`, model_type `qwen3_5_moe_text`)
  writes `model.` names and a flat config;
- a DeltaNet layer's input projection comes split by kind, each kind head-major: `in_proj_qkv`
  (every key head's q, then every key head's k, then every value head's v), `in_proj_z`,
  `in_proj_b`, `in_proj_a`. Qwen3-Next groups the same rows by key head ([q, k, v, z] and [b, a]
  per key head), which `sanitize` rebuilds, so the fused CPU step and the lean decoder read them
  as they read Qwen3-Next's;
- the router always renormalises its top-k weights and no layer is dense (there is no
  `norm_topk_prob`, `decoder_sparse_step` or `mlp_only_layers` key);
- rotary is multimodal (`mrope_section`): the time, height and width positions take turns over
  the frequencies. A text token has one position on all three axes, so every frequency turns by
  that position: plain partial rotary, as Qwen3-Next has (tests/test_models.py holds the logits
  to transformers').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from offload.checkpoint import CheckpointError, LazyTensor, lazy_rearrange
from offload.config import LINEAR_ATTENTION
from offload.models import hub, qwen3_next
from offload.models.qwen3_next import Model, fuse_cpu_steps, make_cache  # noqa: F401  (the architecture's interface)

_TEXT = "model.language_model."  # where a release keeps the language model
_SKIPPED = ("model.visual.", "mtp.")  # the vision tower, the multi-token-prediction head


@dataclass(kw_only=True)
class Args(qwen3_next.Args):
    """Qwen3-Next's fields; no dense MLP layers, top-k weights always renormalised."""

    intermediate_size: int = 0
    norm_topk_prob: bool = True

    @classmethod
    def config_values(cls, config: dict[str, Any]) -> dict[str, Any]:
        # transformers' model ignores these keys if a config sets them: so does this one
        return {**super().config_values(config), "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": ()}


def sanitize(weights: dict[str, LazyTensor], args: Args) -> dict[str, LazyTensor]:
    weights = hub.rename(weights, {_TEXT: "", "model.": ""}, skip=_SKIPPED)
    for layer in range(args.num_hidden_layers):
        if args.layer_type(layer) == LINEAR_ATTENTION:
            _group_by_key_head(weights, f"layers.{layer}.linear_attn", args)
    return hub.tie_and_stack(weights, args)


def _split_shapes(args: Args) -> dict[str, tuple[int, int]]:
    """The release's DeltaNet input projections, our name's suffix -> shape [rows, hidden]."""
    key_dim = args.linear_num_key_heads * args.linear_key_head_dim
    value_dim = args.linear_num_value_heads * args.linear_value_head_dim
    heads, hidden = args.linear_num_value_heads, args.hidden_size
    return {"in_proj_qkv.weight": (2 * key_dim + value_dim, hidden), "in_proj_z.weight": (value_dim, hidden),
            "in_proj_b.weight": (heads, hidden), "in_proj_a.weight": (heads, hidden)}


def _group_by_key_head(weights: dict[str, LazyTensor], prefix: str, args: Args) -> None:
    """in_proj_qkv + in_proj_z -> in_proj_qkvz and in_proj_b + in_proj_a -> in_proj_ba, rows grouped
    by key head as Qwen3-Next's GatedDeltaNet reads them (headers only: rows move when read)."""
    shapes = _split_shapes(args)
    names = [f"{prefix}.{suffix}" for suffix in shapes]
    if not any(name in weights for name in names):
        return  # already joined (a checkpoint in Qwen3-Next's layout); the loader checks what it holds
    for name, shape in zip(names, shapes.values()):
        if name not in weights:
            raise CheckpointError(f"tensor {hub.checkpoint_name(name, weights)} (a DeltaNet input projection) is "
                                  "missing from the checkpoint; download the model again")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{weights[name].where}: shape {list(weights[name].shape)} does not match "
                                  f"config.json, which implies {list(shape)}; the config and weights are from "
                                  "different models")
    qkv, z, b, a = (weights.pop(name) for name in names)
    key_heads, key_dim = args.linear_num_key_heads, args.linear_num_key_heads * args.linear_key_head_dim
    hidden = args.hidden_size

    def by_key_head(*parts: torch.Tensor) -> torch.Tensor:  # each [Hk * rows, D] -> [Hk, rows, D], joined per head
        return torch.cat([part.reshape(key_heads, -1, hidden) for part in parts], dim=1).reshape(-1, hidden)

    def qkvz(qkv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return by_key_head(qkv[:key_dim], qkv[key_dim:2 * key_dim], qkv[2 * key_dim:], z)

    rows = qkv.shape[0] + z.shape[0]
    weights[f"{prefix}.in_proj_qkvz.weight"] = lazy_rearrange([qkv, z], (rows, hidden), qkvz,
                                                             f"{qkv.where} and {z.where}")
    weights[f"{prefix}.in_proj_ba.weight"] = lazy_rearrange([b, a], (2 * b.shape[0], hidden), by_key_head,
                                                           f"{b.where} and {a.where}")


def checkpoint_shapes(args: Args) -> hub.Shapes:
    """What a release holds, hub name -> shape: the language model under model.language_model.,
    DeltaNet projections split, routed experts stacked [E, 2I, D] / [E, D, I] as the bf16 releases
    store them (one tensor per expert in FP8, whose block scales are per 2-D matrix)."""
    shapes: hub.Shapes = {}
    splits = _split_shapes(args)
    for name, shape in hub.parameter_shapes(args).items():
        base, _, suffix = name.rpartition(".linear_attn.")
        if suffix in ("in_proj_qkvz.weight", "in_proj_ba.weight"):
            for split in (("in_proj_qkv.weight", "in_proj_z.weight") if suffix == "in_proj_qkvz.weight"
                          else ("in_proj_b.weight", "in_proj_a.weight")):
                shapes[f"{_TEXT}{base}.linear_attn.{split}"] = splits[split]
        else:
            shapes[name if name == "lm_head.weight" else _TEXT + name] = shape
    return hub.unstack_experts(shapes) if args.fp8_block_size else shapes


# synth presets: the released models' config.json (a multimodal wrapper; its vision_config is left
# out: offload reads only the language model), from transformers' Qwen3_5MoeTextConfig (whose
# defaults are Qwen3.5-35B-A3B's) and the models' published configs; and a small one for tests
_LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
_35B_TEXT = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40,
    "layer_types": _LAYER_TYPES * 10, "full_attention_interval": 4,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "attention_bias": False,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    "bos_token_id": None, "eos_token_id": 248046, "tie_word_embeddings": False, "dtype": "bfloat16",
}
_122B_TEXT = {
    **_35B_TEXT, "hidden_size": 3072, "num_hidden_layers": 48, "layer_types": _LAYER_TYPES * 12,
    "num_attention_heads": 32, "linear_num_value_heads": 64, "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 1024,
}
_397B_TEXT = {
    **_122B_TEXT, "hidden_size": 4096, "num_hidden_layers": 60, "layer_types": _LAYER_TYPES * 15,
    "num_experts": 512, "num_experts_per_tok": 10,
}


def _release(text: dict[str, Any]) -> dict[str, Any]:
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3.5-35b-a3b": _release(_35B_TEXT),
    "qwen3.5-122b-a10b": _release(_122B_TEXT),
    "qwen3.5-397b-a17b": _release(_397B_TEXT),
    # small enough for tests: every feature of the architecture, a few MB
    "tiny-qwen3.5-moe": _release({
        **_35B_TEXT, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "layer_types": _LAYER_TYPES,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 16,
        "num_experts_per_tok": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "max_position_embeddings": 4096,
        "rope_parameters": {**_35B_TEXT["rope_parameters"], "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "eos_token_id": None, "dtype": "float32"}) | {"torch_dtype": "float32"},
}
