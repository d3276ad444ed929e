"""config.json -> ModelArgs: both spellings, validation, and the errors a user sees."""

from __future__ import annotations

import json

import pytest

from offload.config import ModelArgs, args_from_dict, load_config
from offload.errors import ConfigError
from offload.models import qwen3_moe, qwen3_next
from offload.synthetic import PRESETS, checkpoint_shapes


def test_hub_and_transformers_styles_agree(hf_checkpoint):
    # the same models, saved by transformers 5 and rewritten in the hub's spelling
    for name, hub_name in (("next", "next-hub"), ("moe", "moe-hub")):
        modern = json.loads((hf_checkpoint(name).path / "config.json").read_text())
        assert "rope_parameters" in modern
        hub = json.loads((hf_checkpoint(hub_name).path / "config.json").read_text())
        assert "rope_parameters" not in hub and "rope_theta" in hub
    next_hub = load_config(hf_checkpoint("next-hub").path)
    assert isinstance(next_hub, qwen3_next.Args)
    assert next_hub.layer_types == ("linear_attention", "full_attention") * 2
    assert next_hub.partial_rotary_factor == 0.25 and next_hub.rotary_dim == 8
    assert next_hub.tie_word_embeddings and not next_hub.norm_topk_prob

    modern = json.loads((hf_checkpoint("moe").path / "config.json").read_text())
    flat = dict(modern)
    flat["rope_theta"] = flat.pop("rope_parameters")["rope_theta"]
    # transformers writes Qwen3-MoE's expert count as num_local_experts, the hub as num_experts
    flat["num_experts"] = flat.pop("num_local_experts")
    assert args_from_dict(flat) == args_from_dict(modern)


def test_real_presets_parse():
    next80 = args_from_dict(PRESETS["qwen3-next-80b-a3b"])
    assert isinstance(next80, qwen3_next.Args)
    assert next80.layer_types.count("full_attention") == 12 and next80.layer_type(3) == "full_attention"
    assert next80.rotary_dim == 64 and next80.eos_token_ids == (151645,)
    moe30 = args_from_dict(PRESETS["qwen3-30b-a3b"])
    assert isinstance(moe30, qwen3_moe.Args) and moe30.sliding_window is None
    assert all(moe30.is_moe_layer(i) for i in range(48))


def test_mlp_only_layers_and_sparse_step():
    config = dict(PRESETS["tiny-qwen3-moe"], decoder_sparse_step=2, mlp_only_layers=[3])
    args = args_from_dict(config)
    assert [args.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    shapes = checkpoint_shapes(args)
    assert "model.layers.0.mlp.gate_proj.weight" in shapes
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in shapes


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, r"model_type 'llama' is not supported; offload runs qwen3_5_moe, qwen3_5_moe_text, qwen3_moe, qwen3_next"),
    ({"model_type": None}, r"model_type None is not supported"),
    ({"hidden_size": None}, r"missing required key\(s\) hidden_size for qwen3_moe"),
    ({"num_experts_per_tok": 99}, r"num_experts_per_tok \(99\) must be between 1 and num_experts \(16\)"),
    ({"num_key_value_heads": 3}, r"must be a multiple of num_key_value_heads \(3\)"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, r"rope scaling 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, r"yarn factor is \"4\"; expected a number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, r"yarn factor is 0.5"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quantization method 'gptq' is not supported"),
])
def test_bad_configs_are_explained(change, message):
    config = dict(PRESETS["tiny-qwen3-moe"], **change)
    with pytest.raises(ConfigError, match=message):
        args_from_dict(config)


def test_bad_layer_types():
    config = dict(PRESETS["tiny-qwen3-next"], layer_types=["linear_attention", "sliding"] * 2)
    with pytest.raises(ConfigError, match=r"unknown layer_types \['sliding'\]"):
        args_from_dict(config)
    config = dict(PRESETS["tiny-qwen3-next"], layer_types=["full_attention"])
    with pytest.raises(ConfigError, match="layer_types has 1 entries for 4 layers"):
        args_from_dict(config)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        load_config(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"not a model directory \(no config.json\)"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-qwen3-next"]))
    assert isinstance(load_config(tmp_path), ModelArgs)
