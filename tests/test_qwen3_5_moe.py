"""Qwen3.5 MoE as its releases are written: the multimodal wrapper's names and nested config, the
vision tower and MTP head left unread, DeltaNet projections split by kind. Parity with transformers
(logits, prefill, step-by-step decode, int4 experts, the stand-in) is in the shared suites
(test_models.py, test_int4_engine.py, test_hybrid.py) under the names q35 and q35-release."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import offload
from offload.checkpoint import CheckpointError
from offload.cli import main
from offload.config import args_from_dict
from offload.models import qwen3_5_moe
from offload.synthetic import PRESETS, checkpoint_shapes, preset_config, synthesize


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))


def _edit(directory, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_the_vision_tower_and_mtp_head_are_never_read(hf_checkpoint, tmp_path):
    """Every vision and MTP tensor holds NaN (reading one would refuse the checkpoint), and the
    logits are the text model's, with and without the int4 store."""
    release = hf_checkpoint("q35-release")
    copy = tmp_path / "release"
    shutil.copytree(release.path, copy)

    def poison(tensors):
        assert any(name.startswith("model.visual.") for name in tensors)
        for name in [n for n in tensors if n.startswith("model.visual.")]:
            tensors[name] = torch.full_like(tensors[name], float("nan"))
        tensors["mtp.fc.weight"] = torch.full((64, 128), float("nan"))

    _edit(copy, poison)
    ids = torch.arange(1, 40)
    expected = offload.load(release.path).logits(ids)
    assert torch.equal(offload.load(copy).logits(ids), expected)
    assert torch.isfinite(offload.load(copy, quant="int4").logits(ids)).all()


def test_the_text_model_saved_alone_reads_as_the_release(hf_checkpoint, tmp_path):
    """The release's language model under model.* with a flat config (what Qwen3_5MoeForCausalLM
    writes) loads to the same logits as the wrapper."""
    release = hf_checkpoint("q35-release")
    flat = tmp_path / "flat"
    shutil.copytree(release.path, flat)
    config = json.loads((flat / "config.json").read_text())
    (flat / "config.json").write_text(json.dumps(config["text_config"] | {"dtype": config["dtype"]}))

    def unwrap(tensors):
        for name in list(tensors):
            if name.startswith("model.visual."):
                del tensors[name]
            elif name.startswith("model.language_model."):
                tensors["model." + name.removeprefix("model.language_model.")] = tensors.pop(name)

    _edit(flat, unwrap)
    ids = torch.arange(3, 50)
    assert offload.load(flat).args.model_type == "qwen3_5_moe_text"
    assert torch.equal(offload.load(flat).logits(ids), offload.load(release.path).logits(ids))


def test_a_missing_split_projection_is_named(hf_checkpoint, tmp_path):
    copy = tmp_path / "release"
    shutil.copytree(hf_checkpoint("q35-release").path, copy)
    _edit(copy, lambda t: t.pop("model.language_model.layers.1.linear_attn.in_proj_z.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model.language_model.layers.1.linear_attn.in_proj_z.weight "
                                              r"\(a DeltaNet input projection\) is missing"):
        offload.load(copy)


def test_a_missing_tensor_is_named_as_the_release_names_it(hf_checkpoint, tmp_path):
    copy = tmp_path / "release"
    shutil.copytree(hf_checkpoint("q35-release").path, copy)
    _edit(copy, lambda t: t.pop("model.language_model.layers.2.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model.language_model.layers.2.self_attn.q_proj.weight is missing"):
        offload.load(copy)


def test_a_split_projection_of_the_wrong_shape_is_named(hf_checkpoint, tmp_path):
    copy = tmp_path / "release"
    shutil.copytree(hf_checkpoint("q35-release").path, copy)
    name = "model.language_model.layers.0.linear_attn.in_proj_b.weight"
    _edit(copy, lambda t: t.update({name: t[name][:2]}))
    with pytest.raises(CheckpointError, match=r"in_proj_b.weight: shape \[2, 64\] does not match config.json"):
        offload.load(copy)


def test_config_keys_the_architecture_ignores_are_ignored():
    """The router always renormalises and no layer is dense, whatever a config says."""
    config = preset_config("tiny-qwen3.5-moe")
    config["text_config"] |= {"norm_topk_prob": False, "mlp_only_layers": [1], "decoder_sparse_step": 2}
    args = args_from_dict(config)
    assert isinstance(args, qwen3_5_moe.Args) and args.norm_topk_prob
    assert all(args.is_moe_layer(layer) for layer in range(args.num_hidden_layers))


def test_a_bad_text_config_is_one_config_error():
    config = preset_config("tiny-qwen3.5-moe")
    config["text_config"] = dict(config["text_config"], hidden_size="64")
    with pytest.raises(offload.OffloadError, match=r'config.json: hidden_size is "64"'):
        args_from_dict(config)
    with pytest.raises(offload.OffloadError, match=r'config.json: text_config is "x"; expected an object'):
        args_from_dict(dict(config, text_config="x"))


def test_presets_match_the_released_configs():
    for preset, (layers, experts, top_k, hidden) in {"qwen3.5-35b-a3b": (40, 256, 8, 2048),
                                                     "qwen3.5-122b-a10b": (48, 256, 8, 3072),
                                                     "qwen3.5-397b-a17b": (60, 512, 10, 4096)}.items():
        args = args_from_dict(PRESETS[preset])
        assert (args.num_hidden_layers, args.num_experts, args.num_experts_per_tok, args.hidden_size) == \
            (layers, experts, top_k, hidden)
        assert args.attention_layers == layers // 4 and args.rotary_dim == 64 and args.vocab_size == 248320


def test_synth_writes_the_release_layout(tmp_path):
    """bf16: experts stacked, DeltaNet projections split, under model.language_model.; --layers cuts
    the layer pattern; the written checkpoint loads."""
    config = preset_config("tiny-qwen3.5-moe", layers=6)
    assert config["text_config"]["layer_types"][4:] == ["linear_attention", "linear_attention"]
    path = synthesize(tmp_path / "m", config)
    names = set(load_file(path / "model.safetensors"))
    assert names == set(checkpoint_shapes(args_from_dict(config)))
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert not any("in_proj_qkvz" in name or name.startswith("model.layers.") for name in names)
    assert offload.load(path).generate(list(range(1, 9)), max_new_tokens=3)


@pytest.mark.parametrize("preset, fits", [("qwen3.5-35b-a3b", True), ("qwen3.5-122b-a10b", False),
                                          ("qwen3.5-397b-a17b", False)])
def test_plan_for_the_presets_at_8g(preset, fits):
    result = CliRunner().invoke(main, ["plan", "--preset", preset, "--gpu-mem", "8G", "--profile", "rtx4060-ddr5"])
    assert "KV cache (4096 positions)" in result.output and "DeltaNet state" in result.output
    assert (result.exit_code == 0) == fits
    if not fits:
        assert "smallest budget that works" in result.output
