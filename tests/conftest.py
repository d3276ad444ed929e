"""Shared fixtures: tiny random checkpoints written by transformers, the correctness oracle."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Tiny but complete configurations. Every parameter is re-drawn at a useful scale after
# construction (norm weights, A_log, dt_bias included), so a wrong sign or a missing "1 +" shows.
NEXT_CONFIGS = {
    # 2 of 5 layers full attention, value heads = 2x key heads, untied, renormalised top-k
    "next": dict(layer_types=["linear_attention", "full_attention", "linear_attention",
                              "linear_attention", "full_attention"],
                 linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False,
                 norm_topk_prob=True),
    # value heads = 4x key heads, tied embeddings, raw top-k weights, a dense MLP layer, a shared
    # expert of the routed experts' size (as the released model's), written as a hub-style
    # config.json (full_attention_interval, flat rope keys)
    "next-hub": dict(num_hidden_layers=4, full_attention_interval=2, linear_num_key_heads=1,
                     linear_num_value_heads=4, tie_word_embeddings=True, norm_topk_prob=False,
                     mlp_only_layers=[2], shared_expert_intermediate_size=32, hub_style=True),
    # YaRN x4 over an original context of 64 positions (prompts of 150 reach past it)
    "next-yarn": dict(layer_types=["linear_attention", "full_attention", "full_attention"],
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                       "factor": 4.0, "original_max_position_embeddings": 64},
                      max_position_embeddings=256),
}
MOE_CONFIGS = {
    "moe": dict(num_hidden_layers=3, tie_word_embeddings=False, norm_topk_prob=True),
    # tied, raw top-k weights, every other layer dense, hub-style config.json
    "moe-hub": dict(num_hidden_layers=4, tie_word_embeddings=True, norm_topk_prob=False,
                    decoder_sparse_step=2, hub_style=True),
    # sliding-window attention over 24 positions
    "moe-window": dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=24),
    # YaRN with every setting given (hub spelling: a flat rope_scaling with "type")
    "moe-yarn": dict(num_hidden_layers=2, hub_style=True,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.5,
                                      "original_max_position_embeddings": 48, "beta_fast": 16.0, "beta_slow": 2.0,
                                      "attention_factor": 1.25},
                     max_position_embeddings=160),
}

QWEN35_CONFIGS = {
    # the language model saved alone (Qwen3_5MoeForCausalLM: model_type qwen3_5_moe_text, model.* names);
    # value heads = 4x key heads over two key heads, as the released models' 16 x 4
    "q35": dict(linear_num_key_heads=2, linear_num_value_heads=8),
    # a release as published: the multimodal wrapper (text_config, model.language_model.*, a vision
    # tower under model.visual.* that is never read), value heads = 4x key heads, its rope's
    # multimodal sections
    "q35-release": dict(linear_num_key_heads=1, linear_num_value_heads=4, wrapper=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
}


def _qwen35_model(overrides: dict):
    from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration,
                              Qwen3_5MoeTextConfig)

    values = dict(vocab_size=160, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                  num_experts=12, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                               "full_attention"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                  max_position_embeddings=1024, tie_word_embeddings=False)
    values.update(overrides)
    if values.pop("wrapper", False):
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
        return Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=values, vision_config=vision,
                                                                   tie_word_embeddings=False))
    return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**values))


def _next_config(overrides: dict):
    from transformers import Qwen3NextConfig

    values = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=12,
                  num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.25},
                  max_position_embeddings=1024)
    values.update(overrides)
    interval = values.pop("full_attention_interval", None)
    if interval:
        values["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                 for i in range(values["num_hidden_layers"])]
    else:
        values["num_hidden_layers"] = len(values["layer_types"])
    return Qwen3NextConfig(**values)


def _moe_config(overrides: dict):
    from transformers import Qwen3MoeConfig

    values = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=12, num_experts_per_tok=3,
                  moe_intermediate_size=32, max_position_embeddings=1024,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    values.update(overrides)
    return Qwen3MoeConfig(**values)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), vectors ~ N(0.5, 0.3), A_log > 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(1, 16, generator=generator).log())
            elif param.dim() == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + 0.5)
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * fan_in**-0.5)


def to_hub_style(config_path: Path, full_attention_interval: int | None) -> None:
    """Rewrite a transformers-5 config.json the way the original hub releases spell it."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    if full_attention_interval:
        del config["layer_types"]
        config["full_attention_interval"] = full_attention_interval
    config["torch_dtype"] = config.pop("dtype", "float32")
    config_path.write_text(json.dumps(config, indent=2))


class HFCheckpoint:
    def __init__(self, path: Path, model):
        self.path = path
        self.model = model

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids[None]).logits[0].float()


_built: dict[str, HFCheckpoint] = {}


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """What the tests build (expert stores, dense files, the demo) goes to this run's own cache:
    never the user's, and never one another run is building in at the same time."""
    previous = os.environ.get("OFFLOAD_CACHE")
    os.environ["OFFLOAD_CACHE"] = str(tmp_path_factory.mktemp("offload-cache"))
    yield
    if previous is None:
        os.environ.pop("OFFLOAD_CACHE", None)
    else:
        os.environ["OFFLOAD_CACHE"] = previous


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> HFCheckpoint: a transformers model and its saved directory."""

    def build(name: str) -> HFCheckpoint:
        if name in _built:
            return _built[name]
        from transformers import Qwen3MoeForCausalLM, Qwen3NextForCausalLM

        is_next = name in NEXT_CONFIGS
        overrides = dict({**NEXT_CONFIGS, **MOE_CONFIGS, **QWEN35_CONFIGS}[name])
        hub_style = overrides.pop("hub_style", False)
        interval = overrides.get("full_attention_interval")
        torch.manual_seed(0)
        if name in QWEN35_CONFIGS:
            model = _qwen35_model(overrides).eval()
        else:
            config = _next_config(overrides) if is_next else _moe_config(overrides)
            model = (Qwen3NextForCausalLM if is_next else Qwen3MoeForCausalLM)(config).eval()
        randomize(model)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        if hub_style:
            to_hub_style(path / "config.json", interval)
        _built[name] = HFCheckpoint(path, model)
        return _built[name]

    return build


# --- parity bounds -------------------------------------------------------------------------------
# Two fp32 implementations of the same maths differ by about as much as each differs from the exact
# result, and how much a model amplifies rounding depends on its weights, its input and the CPU's
# instructions (FMA contraction, BLAS blocking: AVX2, AVX-512 and AMX round differently). So no
# fixed tolerance is right everywhere: a parity test allows PARITY_FACTOR times the oracle's own
# fp32 error on the same weights and input, measured against an fp64 run of the same model. On the
# tiny configs offload sits at 0.3-0.8 of that error; one norm weight off by 1% moves the logits
# by 10x more than the bound or further (`test_models.py::test_parity_bound_catches_a_perturbed_weight`).
PARITY_FACTOR = 2.0


def _float64(model):
    """A float64 copy of a transformers model (eager experts: grouped_mm has no float64 kernel).
    transformers computes a few pieces in fp32 whatever the model's dtype (RMSNorm, the gated
    delta rule); the copy still measures the rounding of everything else."""
    wide = copy.deepcopy(model).to(torch.float64)
    wide.config._experts_implementation = "eager"
    return wide


def stepped_reference(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """transformers' logits for a prefill of ids[:prefix], then one cached decode step per token:
    the oracle of step-by-step decode (the recurrence rounds differently from the chunked form)."""
    with torch.no_grad():
        out = model(ids[None, :prefix], use_cache=True)
        key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.2x
        logits = [out.logits[0]]
        for i in range(prefix, ids.shape[0]):
            out = model(ids[None, i:i + 1], use_cache=True, **{key: out[key]})
            logits.append(out.logits[0])
    return torch.cat(logits).float()


def parity_bound(model, ids: torch.Tensor, prefix: int | None = None) -> float:
    """PARITY_FACTOR x the largest |fp32 - fp64| logit of transformers' `model` on `ids` (a full
    forward; with `prefix`, also a prefill of ids[:prefix] then cached steps, as step-by-step
    decode is compared)."""
    with torch.no_grad():
        exact = _float64(model)(ids[None]).logits[0]
        error = (model(ids[None]).logits[0].double() - exact).abs().max().item()
        if prefix is not None:
            error = max(error, (stepped_reference(model, ids, prefix).double() - exact).abs().max().item())
    return PARITY_FACTOR * error


@functools.cache
def load_bench(name: str):
    """The module of `bench/NAME.py` (benchmarks are scripts, not a package), loaded once."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
