"""Long context: YaRN against transformers, the context limit it lifts, and the flag that turns it on."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import offload
from conftest import parity_bound
from offload.cli import main
from offload.config import Yarn, args_from_dict, parse_rope_scaling
from offload.errors import ConfigError, OffloadError
from offload.synthetic import PRESETS, preset_config, synthesize


def test_yarn_settings_are_read_with_transformers_defaults():
    config = dict(PRESETS["tiny-qwen3-moe"], max_position_embeddings=4096,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0})
    yarn = args_from_dict(config).rope_scaling
    # original context: max_position_embeddings; attention factor 0.1 ln(factor) + 1; betas 32 and 1
    assert yarn == Yarn(factor=4.0, original_max_position_embeddings=4096, attention_factor=pytest.approx(1.1386294),
                        beta_fast=32.0, beta_slow=1.0, truncate=True)
    assert args_from_dict(config).max_context == 16384
    with_mscale = dict(config, rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 2.0, "mscale_all_dim": 1.0,
                                             "original_max_position_embeddings": 1024})
    yarn = args_from_dict(with_mscale).rope_scaling
    assert yarn.original_max_position_embeddings == 1024 and yarn.attention_factor == pytest.approx(1.2772589 / 1.1386294)
    assert args_from_dict(PRESETS["tiny-qwen3-moe"]).rope_scaling is None


@pytest.mark.parametrize("text, params", [
    ("yarn:4", {"rope_type": "yarn", "factor": 4.0}),
    ("yarn:2.5:32768", {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32768}),
    ("none", {"rope_type": "default"}),
    ('{"rope_type": "yarn", "factor": 8, "beta_fast": 16}', {"rope_type": "yarn", "factor": 8, "beta_fast": 16}),
])
def test_the_flag_spellings(text, params):
    assert parse_rope_scaling(text) == params


@pytest.mark.parametrize("text", ["yarn", "yarn:", "yarn:four", "yarn:4:1.5", "linear:4", "yarn:4:8:9", "{1: 2}", "[1]"])
def test_a_bad_flag_is_one_line(text):
    with pytest.raises(ConfigError, match="--rope-scaling") as error:
        parse_rope_scaling(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["next-yarn", "moe-yarn"])
def test_the_flag_is_the_config_and_without_yarn_the_logits_are_not_transformers(hf_checkpoint, name):
    """The yarn models' parity with transformers is in test_models.py (prefill, step-by-step decode,
    greedy generation); here the flag's forms give the config's tables exactly, and leaving YaRN
    out (`none`) is far outside the parity bound."""
    checkpoint = hf_checkpoint(name)
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(5))
    from_config = offload.load(checkpoint.path).logits(ids)
    rope = json.loads((checkpoint.path / "config.json").read_text())
    rope = rope.get("rope_parameters") or rope["rope_scaling"]
    flag = f"yarn:{rope['factor']:g}:{rope['original_max_position_embeddings']}"
    if name == "next-yarn":
        assert torch.equal(offload.load(checkpoint.path, rope_scaling=flag).logits(ids), from_config)
    else:  # every setting: the dict form
        assert torch.equal(offload.load(checkpoint.path, rope_scaling=rope).logits(ids), from_config)
    plain = offload.load(checkpoint.path, rope_scaling="none", ctx=150).logits(ids)
    assert (plain - checkpoint.logits(ids)).abs().max() > 100 * parity_bound(checkpoint.model, ids)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint whose native context is 256 positions."""
    config = dict(preset_config("tiny-qwen3-moe"), num_hidden_layers=1, max_position_embeddings=256)
    return synthesize(tmp_path_factory.mktemp("moe") / "m", config)


def test_ctx_past_the_native_length_needs_yarn(tiny_moe):
    with pytest.raises(OffloadError, match=r"--ctx 1024 is more than this model's 256 positions .*"
                                           r"--rope-scaling yarn:4$"):
        offload.load(tiny_moe, ctx=1024)
    with pytest.raises(OffloadError, match=r"reaches with YaRN x2 \(512 positions\).*--rope-scaling yarn:4$"):
        offload.load(tiny_moe, ctx=1024, rope_scaling="yarn:2")
    engine = offload.load(tiny_moe, ctx=1024, rope_scaling="yarn:4")
    assert engine.ctx == 1024 and engine.args.rope_scaling.factor == 4
    ids = torch.arange(1000) % 200 + 1
    assert engine.logits(ids).shape == (1000, engine.args.vocab_size)  # positions past 256 run


def test_the_cli_takes_rope_scaling(tiny_moe, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    refused = runner.invoke(main, ["run", "--model", str(tiny_moe), "--ctx", "1024", "--ids", "1 2 3"])
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1 and "--rope-scaling yarn:4" in refused.stderr
    accepted = runner.invoke(main, ["run", "--model", str(tiny_moe), "--ctx", "1024", "--rope-scaling", "yarn:4",
                                    "--ids", "1 2 3", "--max-tokens", "2", "--json"])
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["generated_tokens"] == 2
    bad = runner.invoke(main, ["run", "--model", str(tiny_moe), "--rope-scaling", "yarn:x", "--ids", "1"])
    assert bad.exit_code == 1 and "write yarn:FACTOR" in bad.stderr


def test_plan_at_131072_for_qwen3_30b_a3b_needs_yarn():
    runner = CliRunner()
    refused = runner.invoke(main, ["plan", "--preset", "qwen3-30b-a3b", "--ctx", "131072", "--gpu-mem", "0",
                                   "--profile", "cpu-only-2core"])
    assert refused.exit_code == 1 and "--rope-scaling yarn:4" in refused.stderr
    planned = runner.invoke(main, ["plan", "--preset", "qwen3-30b-a3b", "--ctx", "131072", "--gpu-mem", "0",
                                   "--profile", "cpu-only-2core", "--rope-scaling", "yarn:4:32768"])
    assert "context 131072 tokens" in planned.stdout and "KV cache" in planned.stdout
