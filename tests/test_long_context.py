"""Long context: YaRN against transformers, the context limit it lifts, and the flag that turns it on."""

from __future__ import annotations

import json

import numpy as np

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


# --- KV cache formats ------------------------------------------------------------------------------

from offload.kernels import attention as attention_kernel  # noqa: E402
from offload.models import cache as cache_module  # noqa: E402
from offload.models.cache import KVCache  # noqa: E402


def stored(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """What `cache` holds, widened to fp32 (every position)."""
    return cache.read(0, cache.max_len, torch.float32)


def quantized_query(rows: np.ndarray, group: int) -> np.ndarray:
    """rows as the int8 kernel sees them: quantised per group of the keys' channels, widened."""
    codes, scales = attention_kernel.quantize_rows(rows, group)
    grouped = codes.reshape(*codes.shape[:-1], -1, group).astype(np.float32) * scales[..., None]
    return grouped.reshape(rows.shape)


@pytest.mark.parametrize("fmt, width", [("f32", 64), ("bf16", 64), ("int8", 64), ("int8", 128), ("int8", 80)])
@pytest.mark.parametrize("tokens, window", [(1, None), (3, None), (8, 100)])
def test_the_decode_kernel_reads_each_format_as_the_reference(fmt, width, tokens, window):
    """kernels.attention on the stored format against NumPy softmax attention over the same
    values widened; GQA rows (8 per KV head and more: 8, 4, 2 and 1 at a time), several spans, a
    sliding window. Keys are read from tiles, int8 ones scored by integer dot products with the query
    quantised per group; int8 with 80 channels (groups of 40) takes the row-at-a-time kernel instead."""
    from offload.attention import CpuDecodeAttention

    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, start = 8, 2, 1500
    cache = KVCache(2048 - 7, kv_heads, width, fmt)
    assert cache.tiled == (fmt != "int8" or width != 80)
    cache.write(torch.randn(kv_heads, start + tokens, width, generator=generator),
                torch.randn(kv_heads, start + tokens, width, generator=generator), 0)
    query = torch.randn(heads, tokens, width, generator=generator)
    out = CpuDecodeAttention(heads, kv_heads, width)(cache, query, start, window)
    keys, values = stored(cache)
    rows = (query * width**-0.5).reshape(kv_heads, -1, width).numpy()
    if cache.tiled and fmt == "int8":
        rows = quantized_query(rows, cache.group)
    limits = np.tile(np.arange(start, start + tokens), heads // kv_heads)
    expected = attention_kernel.attend_reference(rows, keys.numpy(), values.numpy(), limits, window or 0)
    expected = torch.from_numpy(expected).reshape(heads, tokens, width).transpose(0, 1).reshape(tokens, -1)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_int8_writes_are_the_reference_quantiser():
    cache = KVCache(16, 2, 128, "int8")
    keys, values = torch.randn(2, 5, 128), torch.randn(2, 5, 128) * 30
    cache.write(keys, values, 3)
    codes, scales = attention_kernel.quantize_rows(values.numpy(), 64)
    assert np.array_equal(cache.values[:, 3:8].numpy(), codes) and np.allclose(cache.value_scales[:, 3:8], scales)
    widened = cache.read(3, 8, torch.float32)[1]
    assert (widened - values).abs().max() <= values.abs().max() / 127  # half a step per group, at most
    assert cache.nbytes == 2 * 2 * 16 * (128 + 2 * 4)
    # keys in RAM: biased codes in tiles of TILE positions (the integer kernel's layout)
    codes, scales = attention_kernel.quantize_rows(keys.numpy(), 64)
    padded = np.zeros((2, 16, 128), np.int8)
    padded[:, 3:8] = codes
    def positions(tiles):  # [Hkv, 1, Dh * TILE] -> [Hkv, Dh / 4, TILE, 4]
        return tiles.reshape(2, 128 // 4, attention_kernel.TILE, 4)

    assert cache.tiled and np.array_equal(positions(cache.keys.numpy())[:, :, 3:8],
                                          positions(attention_kernel.tile_keys(padded))[:, :, 3:8])
    assert np.allclose(cache.key_scales[:, 3:8], scales)
    assert torch.equal(cache.read(4, 7, torch.float32)[0], cache.read(3, 8, torch.float32)[0][:, 1:4])


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_float_keys_are_stored_in_tiles_and_read_back_as_rows(fmt):
    cache = KVCache(40, 2, 32, fmt)  # 48 positions stored: three tiles
    keys = torch.randn(2, 40, 32)
    cache.write(keys[:, :37], torch.randn(2, 37, 32), 0)
    cache.write(keys[:, 37:], torch.randn(2, 3, 32), 37)
    padded = torch.zeros(2, 48, 32, dtype=cache.keys.dtype)
    padded[:, :40] = keys
    bits = (lambda t: t.view(torch.int16).numpy()) if fmt == "bf16" else (lambda t: t.numpy())
    assert cache.tiled and np.array_equal(bits(cache.keys), attention_kernel.tile_keys(bits(padded)))
    assert torch.equal(cache.read(5, 38, torch.float32)[0], keys[:, 5:38].to(padded.dtype).float())


def test_the_int8_kernel_gives_the_same_bits_on_every_path():
    """Integer dot products are exact and the float part is one code for all: each instruction
    path this CPU runs (and the portable IR) gives the same output."""
    from offload.kernels import isa

    generator = torch.Generator().manual_seed(11)
    kv_heads, rows, width, length = 2, 5, 128, 700
    cache = KVCache(length, kv_heads, width, "int8")
    cache.write(torch.randn(kv_heads, length, width, generator=generator),
                torch.randn(kv_heads, length, width, generator=generator), 0)
    query = torch.randn(kv_heads, rows, width, generator=generator).numpy()
    limits = np.full(rows, length - 1, np.int64)
    groups, spans = width // cache.group, 3
    outputs = []
    for path in isa.available():
        out = np.empty((kv_heads, rows, width), np.float32)
        attention_kernel.attend_decode_tiled(
            path, attention_kernel.INT8, query, limits, 0, cache.keys.numpy(), cache.key_scales.numpy(), cache.values.numpy(),
            cache.value_scales.numpy(), np.empty((kv_heads, rows, width), np.int8),
            np.empty((kv_heads, rows, groups), np.float32), np.empty((kv_heads, rows, groups), np.int32),
            np.empty((kv_heads, spans, rows), np.float32), np.empty((kv_heads, spans, rows), np.float32),
            np.empty((kv_heads, spans, rows, width), np.float32),
            np.empty((kv_heads * spans, rows, attention_kernel.BLOCK), np.float32), out)
        outputs.append(out)
    assert len(outputs) >= 1 and all(np.array_equal(outputs[0], other) for other in outputs[1:])
    keys, values = stored(cache)
    expected = attention_kernel.attend_reference(quantized_query(query, cache.group), keys[:, :length].numpy(),
                                                 values[:, :length].numpy(), limits, 0)
    assert np.abs(outputs[0] - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("path", ["cpu", "device", "whole"])
def test_prefill_attention_in_blocks_is_attention_over_the_whole_cache(monkeypatch, fmt, window, path):
    """The blockwise path (blocks of 64 here), merged by log-sum-exp, equals one softmax over every
    stored position; a continuing chunk sees its prefix. "device": the blocks' own arithmetic a GPU
    runs for an int8 cache, here on the CPU; "whole": the one SDPA call over the cache a GPU makes
    when it is stored in the query's dtype (heads folded into rows)."""
    monkeypatch.setattr(cache_module, "CPU_BLOCK", 64)
    if path == "device":
        block = cache_module._block
        monkeypatch.setattr(cache_module, "_block", lambda *args: block(*args[:-1], False))
    generator = torch.Generator().manual_seed(4)
    heads, kv_heads, width, start, tokens = 4, 2, 32, 150, 70
    cache = KVCache(256, kv_heads, width, fmt)
    cache.write(torch.randn(kv_heads, start + tokens, width, generator=generator),
                torch.randn(kv_heads, start + tokens, width, generator=generator), 0)
    query = torch.randn(heads, tokens, width, generator=generator)
    keys, values = (t[:, :start + tokens] for t in stored(cache))
    if path == "whole":
        out = cache_module._attend_whole(query, keys, values, start, window)
    else:
        out = cache.attend(query, start, window)
    visible = torch.arange(start + tokens)[None, :] <= torch.arange(start, start + tokens)[:, None]
    if window:
        visible &= torch.arange(start + tokens)[None, :] > torch.arange(start, start + tokens)[:, None] - window
    expected = torch.nn.functional.scaled_dot_product_attention(query[None], keys[None], values[None],
                                                                attn_mask=visible, enable_gqa=True)
    assert (out - expected[0].transpose(0, 1).reshape(tokens, -1)).abs().max() <= 1e-5


def test_half_precision_chunks_take_the_lower_right_causal_bias_with_grouped_heads():
    """A GPU's prompt chunk over a bf16 cache: SDPA with a causal bias aligned to the last key and
    grouped heads (the flash kernel's case: no mask, no repeated keys), the same attention."""
    generator = torch.Generator().manual_seed(5)
    heads, kv_heads, width, start, tokens = 8, 2, 64, 150, 70
    query = torch.randn(heads, tokens, width, generator=generator)
    keys, values = (torch.randn(kv_heads, start + tokens, width, generator=generator) for _ in range(2))
    visible = torch.arange(start + tokens)[None, :] <= torch.arange(start, start + tokens)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(query[None], keys[None], values[None],
                                                                attn_mask=visible, enable_gqa=True)
    out = cache_module._attend_whole(query.bfloat16(), keys.bfloat16(), values.bfloat16(), start, None)
    assert (out.float() - expected[0].transpose(0, 1).reshape(tokens, -1)).abs().max() <= 3e-2


def test_each_format_is_what_the_plan_says(hf_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    path = hf_checkpoint("next").path
    for options, expected in [({}, "f32"), ({"quant": "int4"}, "int8"), ({"quant": "int4", "exact": True}, "f32"),
                              ({"quant": "int4", "kv_cache": "bf16"}, "bf16"),
                              ({"quant": "int4", "gpu_mem": "8G", "device": "cpu", "profile": "rtx4060-ddr5"}, "bf16")]:
        engine = offload.load(path, **options)
        kv = [c for c in engine.caches if isinstance(c, KVCache)]
        entry = next(p for p in engine.plan.placement if p.group.startswith("KV cache"))
        assert engine.plan.kv_format == entry.format == expected and {c.format for c in kv} == {expected}, options
        assert entry.nbytes == sum(c.nbytes for c in kv)
        assert any(f"KV cache {expected}" in note for note in engine.plan.notes)
    with pytest.raises(OffloadError, match="kv_cache='fp8' is not a KV cache format"):
        offload.load(path, kv_cache="fp8")


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    return {name: synthesize(tmp_path_factory.mktemp(name) / "m", preset_config(name))
            for name in ("tiny-qwen3-next", "tiny-qwen3-moe")}


@pytest.mark.parametrize("name", ["tiny-qwen3-next", "tiny-qwen3-moe"])
def test_what_each_format_costs_at_depth(presets, name, tmp_path, monkeypatch):
    """64 decode steps after 2100 tokens: bf16 and int8 keys and values move the logits by a small
    part of what int4 experts do (on these random models: 1-3% against 14-32%) and keep the top
    token nearly everywhere."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    ids = torch.randint(1, 500, (2164,), generator=torch.Generator().manual_seed(0))

    def decoded(**options) -> torch.Tensor:
        engine = offload.load(presets[name], ctx=2200, **options)
        engine.feed(ids[:2100], all_logits=False)
        return torch.cat([engine.feed(ids[i:i + 1]) for i in range(2100, 2164)])

    def moved(a, b):
        return ((a - b).norm() / b.norm()).item()

    full = decoded(quant=None, kv_cache="f32")
    exact = {fmt: decoded(quant="int4", kv_cache=fmt) for fmt in ("f32", "bf16", "int8")}
    int4_cost = moved(exact["f32"], full)
    for fmt in ("bf16", "int8"):
        assert moved(exact[fmt], exact["f32"]) < 0.3 * int4_cost, fmt
        assert (exact[fmt].argmax(-1) == exact["f32"].argmax(-1)).float().mean() >= 0.9


def test_what_each_format_costs_on_real_keys_and_values():
    """all-MiniLM-L6-v2's attention on real sentences: int8 keys and values err by about a tenth of
    what int4 weights do to its matrices (~6%, test_int4_quality.py), bf16 by less; the decode
    kernel's int8 queries add less than int8 keys and values cost."""
    from conftest import load_bench

    quality = load_bench("kernel_rates").kv_format_quality()
    assert 0 < quality["bf16"] < quality["int8"] < quality["int8 decode"] < min(0.01, 2 * quality["int8"])


def test_the_planner_owns_the_kv_format():
    runner = CliRunner()
    native = ["plan", "--preset", "qwen3-next-80b-a3b", "--gpu-mem", "8G", "--ctx", "262144",
              "--profile", "rtx4060-ddr5"]
    result = runner.invoke(main, native)
    assert result.exit_code == 0 and result.stdout.rstrip().endswith("fits"), result.output
    assert "KV cache int8" in result.stdout and "bf16 would take 6.0GiB" in result.stdout
    assert "at depth 262144" in result.stdout
    plan = json.loads(runner.invoke(main, [*native, "--json"]).stdout)
    assert plan["kv_format"] == "int8" and plan["gpu_bytes"] <= 8 * 2**30
    assert plan["predicted"]["decode_tok_s_at_ctx"] < plan["predicted"]["decode_tok_s"]
    forced = runner.invoke(main, [*native, "--kv-cache", "bf16"])
    assert forced.exit_code == 1 and "bf16 KV cache" in forced.stderr


# --- long prompts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_moe(tmp_path_factory):
    """A tiny Qwen3-MoE whose context reaches 32768 positions."""
    config = dict(preset_config("tiny-qwen3-moe"), max_position_embeddings=32768)
    return synthesize(tmp_path_factory.mktemp("long") / "m", config)


def peak_rss_while(work) -> int:
    """The highest RSS (bytes) sampled every millisecond while `work()` runs."""
    import threading
    import time

    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak[0]


@pytest.mark.parametrize("kv_cache", ["int8", "f32"])
def test_a_long_prompt_prefills_in_memory_that_does_not_grow_with_it(long_moe, tmp_path, monkeypatch, kv_cache):
    """Beyond the caches (allocated at load), prefill holds one chunk's work: a 16384-token prompt
    peaks within a few MiB of a 4096-token one. Attention scores over the whole prompt would be
    heads x 512 x 16384 x 4 bytes = 128 MiB per layer, all-token logits 32 MiB."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    engine = offload.load(long_moe, quant="int4", ctx=16400, kv_cache=kv_cache)
    ids = torch.randint(1, 500, (16384,), generator=torch.Generator().manual_seed(6))
    peaks = {}
    for length in (4096, 16384, 4096):  # the first short run warms up what is allocated once
        engine.reset()
        peaks[length] = peak_rss_while(lambda: engine.feed(ids[:length], all_logits=False))
    assert peaks[16384] - peaks[4096] < 16 * 2**20, peaks


def test_ctrl_c_stops_a_long_prefill_within_a_second_and_the_next_turn_works(long_moe, tmp_path, monkeypatch):
    import signal
    import time

    from offload.conversation import Conversation
    from offload.tokenizer import Tokenizer

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    engine = offload.load(long_moe, quant="int4", ctx=20000)
    chat = Conversation(engine, Tokenizer(long_moe), max_tokens=4)
    seen = []
    chat.progress = lambda done, total: seen.append((done, total))
    list(chat.ask("warm up"))
    raised_at = []

    def report(done, total):  # the alarm is set once the long prompt's prefill is under way
        if not seen or seen[-1][1] != total:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
        seen.append((done, total))

    def interrupt(*_):
        raised_at.append(time.perf_counter())
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    chat.progress = report
    try:
        with pytest.raises(KeyboardInterrupt):
            list(chat.ask("word " * 3700))  # ~15000 tokens: about 2 s of prefill on 2 cores
        stopped = time.perf_counter()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert raised_at and stopped - raised_at[0] < 1.0
    total = seen[-1][1]
    assert total > 12000 and 0 < seen[-1][0] < total  # progress was reported, the prompt not finished
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # the interrupted turn is gone
    answer = "".join(chat.ask("and now?"))  # a fresh sequence: the same as a new conversation's
    fresh = Conversation(offload.load(long_moe, quant="int4", ctx=20000), Tokenizer(long_moe), max_tokens=4)
    list(fresh.ask("warm up"))
    assert answer == "".join(fresh.ask("and now?"))


def test_int8_groups_divide_any_head_dim_and_fp16_keys_take_the_blockwise_path():
    from offload.attention import CpuDecodeAttention
    from offload.models.cache import kv_bytes_per_position, kv_group

    assert [kv_group(d) for d in (16, 64, 80, 96, 128, 192, 256)] == [16, 64, 40, 48, 64, 64, 64]
    generator = torch.Generator().manual_seed(8)
    cache = KVCache(64, 2, 80, "int8")
    keys, values = torch.randn(2, 40, 80, generator=generator), torch.randn(2, 40, 80, generator=generator)
    cache.write(keys, values, 0)
    assert (cache.read(0, 40, torch.float32)[0] - keys).abs().max() <= keys.abs().max() / 127
    assert cache.nbytes == 64 * kv_bytes_per_position(2, 80, "int8")
    half = KVCache(64, 2, 32, "f16")
    half.write(keys[..., :32].half(), values[..., :32].half(), 0)
    query = torch.randn(4, 1, 32, generator=generator).half()
    assert CpuDecodeAttention(4, 2, 32)(half, query, 39, None) is None  # the kernel reads f32, bf16, int8
    assert half.attend(query, 39).shape == (1, 4 * 32)


def test_the_cpu_int8_writer_stores_what_the_caches_own_path_stores():
    """`Int8Writer` (one Numba call) against `KVCache.write`'s torch quantiser: the same bits in
    the tiles, the values and both scales, for a prompt crossing a tile and single steps, an
    all-zero group included."""
    from offload.attention import Int8Writer

    generator = torch.Generator().manual_seed(8)
    plain, written = KVCache(80, 2, 128, "int8"), KVCache(80, 2, 128, "int8")
    written.writer = Int8Writer()
    assert plain.tiled and written.tiled
    keys, values = torch.randn(2, 40, 128, generator=generator) * 3, torch.randn(2, 40, 128, generator=generator)
    values[1, 7, :64] = 0
    for cache in (plain, written):
        cache.write(keys[:, :37], values[:, :37], 0)
        for position in range(37, 40):
            cache.write(keys[:, position:position + 1], values[:, position:position + 1], position)
    for name in ("keys", "values", "key_scales", "value_scales"):
        assert torch.equal(getattr(written, name), getattr(plain, name)), name
