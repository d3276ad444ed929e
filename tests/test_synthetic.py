"""Synthetic checkpoints: the real architectures' files, readable by transformers and by offload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import offload
from conftest import parity_bound
from offload.config import args_from_dict
from offload.errors import OffloadError
from offload.synthetic import PRESETS, checkpoint_shapes, preset_config, synthesize


@pytest.mark.parametrize("preset", ["tiny-qwen3-next", "tiny-qwen3-moe", "tiny-qwen3.5-moe"])
def test_tiny_presets_match_transformers(preset, tmp_path):
    from transformers import AutoModelForCausalLM

    path = synthesize(tmp_path / preset, preset_config(preset))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    logits = offload.load(path).logits(ids)
    assert expected.std() > 0.1
    assert (logits - expected).abs().max() <= parity_bound(reference, ids)


def test_every_parameter_is_random(tmp_path):
    path = synthesize(tmp_path / "m", preset_config("tiny-qwen3-next"))
    tensors = load_file(path / "model.safetensors")
    for name, tensor in tensors.items():
        assert tensor.std() > 0.01, name  # norms, A_log, dt_bias, conv weights included
    a_log = tensors["model.layers.0.linear_attn.A_log"]
    assert torch.all(a_log >= 0) and torch.all(a_log < torch.log(torch.tensor(16.0)))


def test_sharding_and_determinism(tmp_path):
    config = preset_config("tiny-qwen3-next", layers=3, experts=6, dtype="bf16")
    single = synthesize(tmp_path / "single", config, seed=3)
    sharded = synthesize(tmp_path / "sharded", config, seed=3, max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_file(single / "model.safetensors").values())
    ids = list(range(1, 40))
    assert torch.equal(offload.load(single).logits(ids), offload.load(sharded).logits(ids))
    again = synthesize(tmp_path / "again", config, seed=3)
    assert (again / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    args = offload.load(single).args
    assert args.num_hidden_layers == 3 and args.num_experts == 6 and args.torch_dtype == "bfloat16"
    assert offload.load(single).dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3-next", "tiny-qwen3.5-moe"])
def test_fp8_checkpoints_are_stored_as_the_official_releases_store_them(preset, tmp_path):
    """--dtype fp8: every projection's weight e4m3 with an fp32 scale per 128 x 128 block beside it
    (`_scale_inv`), the rest bf16, `quantization_config` in config.json; offload reads it back
    within e4m3's precision of the weights a bf16 synth of the same seed holds."""
    from offload.checkpoint import Checkpoint
    from offload.synthetic import FP8_BLOCK, checkpoint_nbytes, stored_as_fp8

    config = preset_config(preset, dtype="fp8")
    path = synthesize(tmp_path / "fp8", config, seed=4, max_shard_bytes=200_000)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    stored = {}
    for shard in path.glob("*.safetensors"):
        stored |= load_file(shard)
    assert sum(t.nbytes for t in stored.values()) == checkpoint_nbytes(config)
    shapes = checkpoint_shapes(args_from_dict(config))
    fp8 = [name for name, shape in shapes.items() if stored_as_fp8(name, shape)]
    assert fp8 and all(stored[name].dtype == torch.float8_e4m3fn for name in fp8)
    for name in fp8:
        rows, cols = shapes[name]
        assert stored[name + "_scale_inv"].shape == (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    assert all(stored[name].dtype == torch.bfloat16 for name in shapes if name not in fp8)
    bf16 = synthesize(tmp_path / "bf16", preset_config(preset, dtype="bf16"), seed=4)
    wide, narrow = Checkpoint(bf16), Checkpoint(path, args_from_dict(config).fp8_block_size)
    common = [name for name in fp8 if name in wide]  # (a bf16 release may stack its experts)
    assert len(common) >= 6
    for name in common[:6]:
        expected, got = wide.read(name).float(), narrow.read(name).float()
        assert ((got - expected).norm() / expected.norm()).item() < 0.04  # e4m3: 3 mantissa bits
    ids = list(range(1, 30))
    assert offload.load(path, quant="int4").generate(ids, max_new_tokens=4)


def test_real_presets_have_the_published_sizes():
    # total parameters, from the model cards: 80B, 30.5B, 235B; Qwen3.5's less its ~0.4B vision tower
    expected = {"qwen3-next-80b-a3b": 80e9, "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235e9,
                "qwen3.5-35b-a3b": 34.6e9, "qwen3.5-122b-a10b": 121.6e9, "qwen3.5-397b-a17b": 396.6e9}
    for preset, total in expected.items():
        shapes = checkpoint_shapes(args_from_dict(PRESETS[preset]))
        count = sum(torch.Size(shape).numel() for shape in shapes.values())
        assert abs(count - total) / total < 0.01, (preset, count)


def test_existing_output_is_not_overwritten(tmp_path):
    out = synthesize(tmp_path / "m", preset_config("tiny-qwen3-moe"))
    with pytest.raises(OffloadError, match="already exists and is not empty; choose a new directory or pass --force"):
        synthesize(out, preset_config("tiny-qwen3-moe"))
    synthesize(out, preset_config("tiny-qwen3-moe", layers=2), overwrite=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not list(tmp_path.glob(".m.partial-*"))


def test_bad_overrides():
    with pytest.raises(OffloadError, match="unknown preset 'qwen4'; choose one of qwen3-next-80b-a3b"):
        preset_config("qwen4")
    with pytest.raises(OffloadError, match="--layers must be positive"):
        preset_config("tiny-qwen3-moe", layers=0)
    assert preset_config("tiny-qwen3-moe", experts=2)["num_experts_per_tok"] == 2
