"""Reading checkpoints: shards, FP8 blocks, MTP tensors, and every way a download goes wrong."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from conftest import parity_bound
from offload.checkpoint import Checkpoint, dequantize_fp8
from offload.errors import CheckpointError
from offload.synthetic import preset_config, synthesize


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint split over several shards with an index."""
    path = tmp_path_factory.mktemp("sharded") / "model"
    return synthesize(path, preset_config("tiny-qwen3-moe"), max_shard_bytes=200_000)


def copy_of(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def test_sharded_checkpoint_reads_lazily(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    checkpoint = Checkpoint(sharded)
    assert set(checkpoint.names()) == set(index["weight_map"])
    lazy = checkpoint.lazy("model.layers.2.self_attn.k_proj.weight")
    assert lazy.shape == (32, 64) and lazy.dtype == torch.float32
    shard = sharded / index["weight_map"]["model.layers.2.self_attn.k_proj.weight"]
    assert torch.equal(lazy.load(), load_file(shard)["model.layers.2.self_attn.k_proj.weight"])


def test_missing_shard(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d{5}\.safetensors: shard missing \(it holds "
                                              r"model\.layers\.\S+, says model.safetensors.index.json\)"):
        offload.load(path)


def _rewrite(path, edit):
    """Apply `edit(tensors) -> tensors` to the single-file checkpoint at `path`."""
    tensors = load_file(path / "model.safetensors")
    save_file(edit(tensors), path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def single(tmp_path):
    return synthesize(tmp_path / "single", preset_config("tiny-qwen3-next"))


def test_missing_tensor(single):
    _rewrite(single, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_norm.weight"})
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.self_attn.k_norm.weight is missing"):
        offload.load(single)


def test_missing_expert_tensor(single):
    _rewrite(single, lambda t: {k: v for k, v in t.items() if k != "model.layers.0.mlp.experts.5.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.mlp.experts.5.up_proj.weight is missing.*"
                                              r"model.safetensors"):
        offload.load(single)


def test_wrong_shape(single):
    def shrink(tensors):
        tensors["model.layers.0.linear_attn.out_proj.weight"] = torch.zeros(64, 32)
        return tensors
    _rewrite(single, shrink)
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.0.linear_attn.out_proj.weight: "
                                              r"shape \[64, 32\] does not match config.json, which implies "
                                              r"\[64, 64\]"):
        offload.load(single)


@pytest.mark.parametrize("keep", [0, 5, 100, -1000])
def test_truncated_file(single, keep):
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file .*"
                                              r"truncated or corrupt"):
        offload.load(single)


def test_no_weights(single):
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights here"):
        offload.load(single)


def test_mtp_tensors_are_skipped(single):
    before = offload.load(single).logits([1, 2, 3, 4])
    _rewrite(single, lambda t: {**t, "mtp.fc.weight": torch.ones(64, 128),
                                "mtp.layers.0.input_layernorm.weight": torch.ones(64)})
    assert torch.equal(offload.load(single).logits([1, 2, 3, 4]), before)


def test_fp8_dequantization_matches_direct_computation():
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 200, generator=generator) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=generator) + 0.01  # blocks of 128x128, partial at the edges
    out = dequantize_fp8(weight, scale, (128, 128))
    assert out.dtype == torch.bfloat16 and out.shape == (300, 200)
    for r in range(300):
        for c in range(0, 200, 40):
            direct = torch.tensor(float(weight[r, c].float()) * float(scale[r // 128, c // 128]))
            assert out[r, c] == direct.to(torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"FP8 scale has shape \[3, 3\], expected \[3, 2\]"):
        dequantize_fp8(weight, torch.ones(3, 3), (128, 128))


def quantize_fp8(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax FP8, the way the FP8 releases are made: returns (fp8 weight, scale_inv)."""
    rows, cols = weight.shape
    scale = torch.zeros(math.ceil(rows / block), math.ceil(cols / block))
    quantized = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / 448.0
            quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(
                torch.float8_e4m3fn)
    return quantized, scale


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(hf_checkpoint, tmp_path):
    """An FP8 checkpoint (64x64 blocks, partial at the edges) runs as the bf16 model its blocks
    decode to: transformers on the dequantised weights is the reference."""
    source = hf_checkpoint("moe")
    path = shutil.copytree(source.path, tmp_path / "fp8")
    tensors = load_file(path / "model.safetensors")
    reference = {}
    for name in list(tensors):
        if name.endswith("proj.weight"):
            quantized, scale = quantize_fp8(tensors[name], 64)
            tensors[name], tensors[name + "_scale_inv"] = quantized, scale
            reference[name] = dequantize_fp8(quantized, scale, (64, 64)).float()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [64, 64]}
    (path / "config.json").write_text(json.dumps(config))

    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(source.model.config).eval()
    state = {**source.model.state_dict()}
    for name, value in reference.items():  # hub names -> transformers' stacked expert params
        state[name] = value
    model.load_state_dict(_stack_for_transformers(state, source.model.state_dict()), strict=True)
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    bound = parity_bound(model, ids)
    assert (expected - source.logits(ids)).abs().max() > 10 * bound  # FP8 really changed the weights
    logits = offload.load(path).logits(ids)
    assert (logits - expected).abs().max() <= bound


def _stack_for_transformers(state: dict, template: dict) -> dict:
    out = {}
    for name in template:
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            count = template[name].shape[0]
            out[name] = torch.stack([torch.cat([state[f"{prefix}.{e}.gate_proj.weight"],
                                                state[f"{prefix}.{e}.up_proj.weight"]]) for e in range(count)])
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            count = template[name].shape[0]
            out[name] = torch.stack([state[f"{prefix}.{e}.down_proj.weight"] for e in range(count)])
        else:
            out[name] = state[name]
    return out
