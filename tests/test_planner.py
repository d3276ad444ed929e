"""The placement planner: sizes, ledgers, budgets, the cost model, and `offload plan`."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from offload.cli import main
from offload.config import args_from_dict
from offload.hardware import load_profile, parse_size
from offload.planner import (INT4_BYTES, RAM_RESERVE_BYTES, make_plan, parameter_counts, parameter_groups, quantizable,
                             tensors_by_group)
from offload.synthetic import PRESETS

NEXT = args_from_dict(PRESETS["qwen3-next-80b-a3b"])


@pytest.mark.parametrize("preset, total, active", [
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),  # model cards: 30.5B total, 3.3B activated
    ("qwen3-235b-a22b", 235e9, 22e9),  # 235B total, 22B activated
])
def test_parameter_counts_match_the_model_cards(preset, total, active):
    counted_total, counted_active = parameter_counts(args_from_dict(PRESETS[preset]))
    assert abs(counted_total - total) / total < 0.01
    assert abs(counted_active - active) / active < 0.02  # the cards round to two digits


def test_qwen3_next_parameter_counts():
    total, active = parameter_counts(NEXT)
    assert abs(total - 80e9) / 80e9 < 0.01
    groups = parameter_groups(NEXT)
    # "A3B": the card's 3B is the active count without the embedding and lm_head matrices
    without_vocab = active - groups["embeddings"] - groups["lm_head"]
    assert 3.0e9 <= without_vocab <= 3.3e9
    assert groups["routed experts"] == 48 * 512 * 3 * 2048 * 512


def test_ledgers_add_up():
    plan = make_plan(NEXT, load_profile("rtx4060-ddr5"), parse_size("8G"), ctx=32768)
    assert plan.fits
    assert plan.gpu_bytes == sum(p.nbytes for p in plan.placement if p.device == "gpu")
    assert plan.ram_bytes == sum(p.nbytes for p in plan.placement if p.device == "cpu") + RAM_RESERVE_BYTES
    experts = next(p for p in plan.placement if p.group == "routed experts")
    assert experts.device == "cpu" and experts.format == "int4"
    assert 40e9 <= experts.nbytes <= 46e9
    assert experts.nbytes == int(experts.params * INT4_BYTES)
    assert {p.group for p in plan.placement if p.device == "gpu"} >= {"mixers", "routers", "norms", "lm_head",
                                                                       "shared experts"}


def test_the_minimum_budget_is_exact():
    profile = load_profile("rtx4060-ddr5")
    minimum = make_plan(NEXT, profile, parse_size("2G"), ctx=32768).minimum_gpu_bytes
    at_minimum = make_plan(NEXT, profile, minimum, ctx=32768)
    below = make_plan(NEXT, profile, minimum - 1, ctx=32768)
    assert at_minimum.fits and at_minimum.gpu_bytes <= minimum
    assert not below.fits and "needs at least" in below.reason
    # degraded on the way down: no prefetch buffers, shared experts and lm_head on the CPU
    assert {p.group for p in at_minimum.placement if p.device == "cpu"} >= {"shared experts", "lm_head"}
    assert not any(p.group.startswith("expert prefetch") for p in at_minimum.placement)
    assert at_minimum.notes


def test_too_little_ram_says_how_much():
    plan = make_plan(NEXT, load_profile("cpu-only-2core"), 0, ctx=4096)
    assert not plan.fits and plan.reason.startswith("needs 4") and "of RAM" in plan.reason
    assert plan.gpu_bytes == 0 and all(p.device == "cpu" for p in plan.placement)
    formats = {p.group: p.format for p in plan.placement}
    assert formats["mixers"] == formats["shared experts"] == "int4" and formats["lm_head"] == "int6"


@pytest.mark.parametrize("preset", ["qwen3-next-80b-a3b", "qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_cpu_dense_formats_read_no_more_per_token_than_q4_k_m(preset):
    """CPU only, the default formats: a token reads no more dense bytes than llama.cpp's Q4_K_M
    would at best (every matrix Q4_K's 4.5 bits per weight, the head Q6_K's 6.5625, the small
    vectors and convolutions F32, as it keeps them), and int8 reads more."""
    args = args_from_dict(PRESETS[preset])
    profile = load_profile("cpu-only-2core")
    default, int8 = make_plan(args, profile, 0), make_plan(args, profile, 0, dense_quant="int8")
    groups = ("mixers", "dense MLPs", "shared experts", "lm_head")

    def dense(plan):
        return [p for p in plan.placement if p.group in groups]

    tensors = tensors_by_group(args)
    budget = sum(math.prod(shape) * ((6.5625 if group == "lm_head" else 4.5) / 8 if quantizable(name, shape) else 4)
                 for group in groups for name, shape in tensors.get(group, ()))
    assert sum(p.nbytes for p in dense(default)) <= budget < sum(p.nbytes for p in dense(int8))
    assert {p.format for p in dense(default) if p.group != "lm_head"} == {"int4"}


def test_cost_model():
    profile = load_profile("rtx4090-ddr5")
    short = make_plan(NEXT, profile, None, ctx=8192, prompt_tokens=16).predicted
    long = make_plan(NEXT, profile, None, ctx=8192, prompt_tokens=8192).predicted
    assert short.prefill_strategy == "cpu" and long.prefill_strategy == "stream"
    assert 16 < short.stream_from_tokens < 8192
    assert long.prefill_bound == "host-to-device bandwidth"
    assert "routed experts" in short.decode_bound
    # decode cannot beat reading the active routed experts once per token from RAM
    routed_bytes = parameter_groups(NEXT)["routed experts"] * 10 / 512 * INT4_BYTES
    assert short.decode_tok_s < profile.cpu.ram_bandwidth / routed_bytes
    slower_ram = make_plan(NEXT, load_profile("rtx3090-ddr4"), None, ctx=8192).predicted
    assert slower_ram.decode_tok_s < short.decode_tok_s
    # the bound `offload bench` reports against: every byte a token reads, at the memories' bandwidth
    assert short.decode_tok_s < short.decode_limit_tok_s < profile.cpu.ram_bandwidth / routed_bytes
    cpu_only = make_plan(NEXT, profile, 0, ctx=8192)
    read = routed_bytes + sum(p.nbytes for p in cpu_only.placement
                              if p.group in ("mixers", "routers", "shared experts", "lm_head"))
    read += 2 * next(p.nbytes for p in cpu_only.placement if p.group == "DeltaNet state")  # read and written
    assert math.isclose(cpu_only.predicted.decode_limit_tok_s, profile.cpu.ram_bandwidth / read, rel_tol=1e-9)


def test_plan_command_fits_and_fails():
    runner = CliRunner()
    result = runner.invoke(main, ["plan", "--preset", "qwen3-next-80b-a3b", "--gpu-mem", "8G", "--ctx", "32768"])
    assert result.exit_code == 0, result.output
    assert "routed experts" in result.stdout and result.stdout.rstrip().endswith("fits")
    as_json = runner.invoke(main, ["plan", "--preset", "qwen3-next-80b-a3b", "--gpu-mem", "8G", "--ctx", "32768",
                                   "--json"])
    plan = json.loads(as_json.stdout)
    assert plan["fits"] and plan["gpu_bytes"] <= 8 * 2**30 and plan["ram_bytes"] > 40e9
    assert plan["predicted"]["decode_tok_s"] > 0 and plan["predicted"]["prefill_tok_s"] > 0
    experts = [p for p in plan["placement"] if p["group"] == "routed experts"][0]
    assert 40e9 <= experts["nbytes"] <= 46e9
    small = runner.invoke(main, ["plan", "--preset", "qwen3-next-80b-a3b", "--gpu-mem", "2G", "--ctx", "32768"])
    assert small.exit_code == 1
    assert small.stderr.startswith("error: needs at least 4.1GiB of GPU memory")  # with an int8 KV cache


def test_plan_command_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["plan", "--preset", "qwen3-30b-a3b", "--gpu-mem", "eight"])
    assert result.exit_code == 1 and "--gpu-mem: 'eight' is not a size" in result.stderr
    result = runner.invoke(main, ["plan", "--preset", "qwen3-30b-a3b", "--profile", "cpu-only-2core", "--gpu-mem", "8G"])
    assert result.exit_code == 1 and "has no GPU; pass --gpu-mem 0" in result.stderr
    result = runner.invoke(main, ["plan", "--model", str(tmp_path)])
    assert result.exit_code == 1 and "not a model directory" in result.stderr


@pytest.mark.parametrize("name", ["next", "moe-hub"])
def test_the_plans_cache_bytes_are_the_caches_an_engine_allocates(hf_checkpoint, name):
    """The architecture's byte counts (KV cache, DeltaNet state) against the caches a loaded engine
    holds: the recurrent state exactly, the KV cache to within its tiles' rounding (positions are
    allocated sixteen at a time)."""
    import offload
    from offload.models.cache import KVCache, cache_nbytes

    engine = offload.load(hf_checkpoint(name).path, quant="int4", ctx=300)
    planned = {p.group.split(" (")[0]: p.nbytes for p in engine.plan.placement}
    kv = cache_nbytes([c for c in engine.caches if isinstance(c, KVCache)])
    assert cache_nbytes([c for c in engine.caches if not isinstance(c, KVCache)]) == planned.get("DeltaNet state", 0)
    per_position = kv / (-(-300 // 16) * 16)
    assert planned["KV cache"] <= kv < planned["KV cache"] + 16 * per_position

