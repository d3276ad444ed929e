"""Hostile input: a checkpoint, a template, a prompt or a flag can't crash, hang or fool offload.

Every case runs the real command line on a tiny checkpoint (`offload synth`) damaged one way, and
asserts: the exit code (1 for an error, 2 for click's usage errors), one line on stderr naming
the problem, no traceback, no hang (an alarm per case), and nothing left behind. Property-based
cases (hypothesis) throw arbitrary values at config.json's keys and arbitrary safetensors headers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from offload.checkpoint import Checkpoint
from offload.cli import main
from offload.config import args_from_dict, schema
from offload.errors import OffloadError
from offload.synthetic import preset_config

CASE_SECONDS = 60


class Hung(Exception):
    pass


def _alarm(*_):
    raise Hung("the command did not finish in time")


def attack(args: list[str], input: bytes | str | None = None, code: int = 1, env: dict | None = None):
    """Run `offload ARGS`; assert it fails with `code` in one line (click's usage errors print a
    usage block, then one error line) and no traceback, in bounded time. Returns the error line."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        result = CliRunner().invoke(main, args, input=input, env=env)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not _is_progress(line)]
    if code == 2:
        assert lines[-1].startswith("Error: ")
        return lines[-1]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    return errors[0]


def _is_progress(line: str) -> bool:
    return line.startswith(("loading", "building", "note:", "quantising", "\r")) or "it/s" in line or "w/s" in line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "tiny"
    assert CliRunner().invoke(main, ["synth", "tiny-qwen3-next", str(path)]).exit_code == 0
    return path


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint to damage."""
    copy = tmp_path / "model"
    shutil.copytree(tiny, copy)
    return copy


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))  # json.dumps writes NaN / Infinity as JSON5 does


def run(model: Path, *more: str) -> list[str]:
    return ["run", "--model", str(model), "--quant", "none", "--max-tokens", "2", *more]


# --- config.json ---------------------------------------------------------------------------------

BAD_CONFIG = [
    ("hidden_size", "64", "hidden_size is \"64\""), ("hidden_size", 64.5, "hidden_size is 64.5"),
    ("hidden_size", True, "hidden_size is true"), ("hidden_size", -64, "hidden_size is -64"),
    ("full_attention_interval", 0, "full_attention_interval is 0"), ("rope_theta", "abc", "rope_theta"),
    ("rms_norm_eps", math.nan, "rms_norm_eps is nan"), ("rms_norm_eps", -1e-6, "rms_norm_eps"),
    ("rope_theta", math.inf, "rope_theta is inf"), ("num_hidden_layers", 100_000_000, "num_hidden_layers"),
    ("num_experts_per_tok", 10_000, "num_experts_per_tok"), ("vocab_size", 0, "vocab_size is 0"),
    ("head_dim", 0, "head_dim is 0"), ("max_position_embeddings", 0, "max_position_embeddings"),
    ("eos_token_id", "x", "eos_token_id"), ("eos_token_id", [1, -2], "eos_token_id"),
    ("layer_types", ["linear_attention"], "layer_types has 1 entries"), ("layer_types", [1, 2], "layer_types"),
    ("mlp_only_layers", [99], "mlp_only_layers"), ("torch_dtype", "int8", "torch_dtype"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings"), ("rope_scaling", {"rope_type": "yarn", "factor": -4}, "yarn factor"),
    ("rope_scaling", "big", "rope_scaling"), ("rope_scaling", {"type": "dynamic"}, "'dynamic' is not supported"),
    ("rope_scaling", {"type": "yarn", "factor": 2, "original_max_position_embeddings": 1.5}, "original_max"),
    ("quantization_config", {"quant_method": "awq"}, "awq"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [0, 1]}, "weight_block_size"),
    ("model_type", "llama", "model_type 'llama' is not supported"), ("num_key_value_heads", 3, "multiple of"),
    ("linear_num_value_heads", 5, "linear_num_value_heads"), ("partial_rotary_factor", 2, "partial_rotary_factor"),
]


@pytest.mark.parametrize("key, value, expected", BAD_CONFIG, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIG])
def test_a_bad_config_value_is_one_line(model, key, value, expected):
    edit_config(model, **{key: value})
    line = attack(["plan", "--model", str(model), "--gpu-mem", "0", "--profile", "cpu-only-2core"])
    assert expected in line and "config.json" in line


@pytest.mark.parametrize("text, expected", [(b"[1, 2]", "JSON object"), (b"{not json", "not valid JSON"),
                                            (b"", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON")])
def test_a_config_that_is_not_a_json_object(model, text, expected):
    (model / "config.json").write_bytes(text)
    assert expected in attack(run(model, "-p", "hi"))


def test_a_config_that_says_more_layers_than_the_weights_hold(model):
    edit_config(model, num_hidden_layers=8, layer_types=None)
    line = attack(run(model, "-p", "hi"))
    assert "missing from the checkpoint" in line


def test_a_config_that_disagrees_with_the_weights_is_refused_before_the_store(model):
    edit_config(model, moe_intermediate_size=64)
    line = attack(["run", "--model", str(model), "--max-tokens", "2", "-p", "hi"])  # int4: the store would be built
    assert "does not match config.json" in line
    assert not list((model.parent / "cache").rglob("*.int4"))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                              children, max_size=4),
                           max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(schema())), JSON_VALUES, min_size=1, max_size=4))
def test_any_config_values_give_a_model_or_one_config_error(changes):
    assert_a_model_or_one_config_error(preset_config("tiny-qwen3-next") | changes)


@settings(max_examples=150, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(schema())), JSON_VALUES, min_size=1, max_size=4))
def test_any_values_in_a_release_text_config_give_a_model_or_one_config_error(changes):
    """The same for a multimodal release, whose language model's keys are nested in text_config."""
    config = preset_config("tiny-qwen3.5-moe")
    assert_a_model_or_one_config_error(config | {"text_config": config["text_config"] | changes})


def assert_a_model_or_one_config_error(config: dict) -> None:
    try:
        args = args_from_dict(config)
    except OffloadError as error:
        assert "\n" not in str(error) and str(error).startswith("config.json")
        return
    assert args.num_hidden_layers <= 1024 and math.isfinite(args.rms_norm_eps) and args.rms_norm_eps > 0


# --- checkpoint files ------------------------------------------------------------------------------

def weights_of(model: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = next(model.glob("*.safetensors"))
    return path, load_file(path)


def test_an_embedding_stored_as_integers(model):
    path, tensors = weights_of(model)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.int32)
    save_file(tensors, path)
    line = attack(run(model, "-p", "hi"))
    assert "model.embed_tokens.weight" in line and "I32" in line


@pytest.mark.parametrize("name, quant", [("model.layers.0.linear_attn.in_proj_qkvz.weight", "none"),
                                         ("model.norm.weight", "none"),
                                         ("model.layers.1.mlp.experts.3.down_proj.weight", "int4")])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_named(model, name, quant, value):
    path, tensors = weights_of(model)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    save_file(tensors, path)
    line = attack(["run", "--model", str(model), "--quant", quant, "--max-tokens", "2", "-p", "hi"])
    assert name in line and "NaN or infinite" in line
    assert not list((model.parent / "cache").rglob("*.tmp"))  # a failed store layer leaves nothing


def sharded(model: Path, weight_map) -> None:
    path = next(model.glob("*.safetensors"))
    shard = model / "model-00001-of-00001.safetensors"
    path.rename(shard)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("make_map, expected", [
    (lambda names: [list(names)], "weight_map must map"),
    (lambda names: {name: 7 for name in names}, "weight_map must map"),
    (lambda names: {name: "../outside.safetensors" for name in names}, "points outside the model folder"),
    (lambda names: {name: "/etc/passwd" for name in names}, "points outside the model folder"),
    (lambda names: {name: "" for name in names}, "points outside the model folder"),
    (lambda names: {name: "missing.safetensors" for name in names}, "shard missing"),
])
def test_a_hostile_index(model, make_map, expected):
    names = load_file(next(model.glob("*.safetensors"))).keys()
    sharded(model, make_map(names))
    outside = model.parent / "outside.safetensors"
    shutil.copy(model / "model-00001-of-00001.safetensors", outside)  # there to be read, if it were allowed
    assert expected in attack(run(model, "-p", "hi"))


def test_an_index_that_is_not_json(model):
    sharded(model, {})
    (model / "model.safetensors.index.json").write_text("{")
    assert "not a valid safetensors index" in attack(run(model, "-p", "hi"))


def test_symlinked_shards_as_in_the_hugging_face_cache_still_load(model, tmp_path):
    """A snapshot folder whose files are symlinks to blobs elsewhere: allowed."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for path in list(model.iterdir()):
        target = blobs / path.name
        path.rename(target)
        path.symlink_to(target)
    result = CliRunner().invoke(main, run(model, "-p", "hi"))
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("which", ["model.safetensors", "config.json"])
def test_a_fifo_is_not_opened(model, which):
    target = model / which if which == "config.json" else next(model.glob("*.safetensors"))
    target.unlink()
    os.mkfifo(target)  # opening it for reading would block forever
    assert "not a regular file" in attack(run(model, "-p", "hi"))


@pytest.mark.parametrize("keep", [0, 7, 100, -64])
def test_a_truncated_weights_file(model, keep):
    path = next(model.glob("*.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    line = attack(run(model, "-p", "hi"))
    assert path.name in line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=4), tail=st.binary(max_size=64))
def test_any_safetensors_header_is_read_or_refused(tmp_path, header, tail):
    folder = tmp_path / "headers"
    folder.mkdir(exist_ok=True)
    encoded = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + tail)
    try:
        checkpoint = Checkpoint(folder)
        checkpoint.lazy_all()
    except OffloadError as error:
        assert "\n" not in str(error)


# --- chat templates ------------------------------------------------------------------------------

TEMPLATES = [
    ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    ("{{ 'x' * 300000000 }}", "too long"),
    ("{{ 2 ** 1000000 }}", "too large"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses without end"),
    ("{{ 1 // 0 }}", "division"),
    ("{% for %}", "Expected an expression"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
    # doubling a string: stopped by the memory limit, or by the clock on a machine slow to allocate
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "memory|ran for more than"),
    ("{{ raise_exception('no system messages allowed') }}", "no system messages allowed"),
]


@pytest.mark.parametrize("template, expected", TEMPLATES, ids=[e for _, e in TEMPLATES])
def test_a_hostile_chat_template_is_stopped_in_one_line(model, template, expected):
    (model / "chat_template.jinja").write_text(template)
    line = attack(run(model, "-p", "hi"))
    assert "chat template" in line and any(part in line for part in expected.split("|"))


def test_a_template_file_that_is_not_utf8(model):
    (model / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    assert "not a readable UTF-8 template" in attack(run(model, "-p", "hi"))


# --- prompts and flags ----------------------------------------------------------------------------

def test_a_prompt_that_is_not_utf8_is_replaced_with_a_notice(model, tmp_path):
    for args, stdin in ((run(model, "-f", "-"), b"caf\xe9 \xff story"), (run(model), b"\xc3\x28 hello")):
        result = CliRunner().invoke(main, args, input=stdin)
        assert result.exit_code == 0 and "not valid UTF-8" in result.stderr and "Traceback" not in result.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\x80\x81 tell me")
    result = CliRunner().invoke(main, run(model, "-f", str(prompt)))
    assert result.exit_code == 0 and "not valid UTF-8" in result.stderr
    chat = CliRunner().invoke(main, ["chat", "--model", str(model), "--quant", "none", "--max-tokens", "2"],
                              input=b"hello \xff\xfe there\n/stats\n")
    assert chat.exit_code == 0 and "not valid UTF-8" in chat.stderr and "Traceback" not in chat.stderr


@pytest.mark.parametrize("flags, code, expected", [
    (["--ids", "-1 3"], 2, "token ids are 0 or more"),
    (["--ids", "1 999999999"], 2, "below the vocabulary size"),
    (["--ids", "1 two"], 2, "not a list of token ids"),
    (["--ids", "1 2", "--ctx", "1000000000000"], 1, "max_position_embeddings"),
    (["--ids", "1 2", "--seed", str(2**70)], 1, "seed must be between"),
    (["--ids", "1 2", "--temperature", "inf"], 1, "temperature must be a finite number"),
    (["--ids", "1 2", "--temperature", "nan"], 1, "temperature must be a finite number"),
    (["--ids", "1 2", "--top-p", "nan"], 1, "top_p must be a finite number"),
    (["--ids", "1 2", "--repeat-penalty", "inf"], 1, "repetition_penalty must be a finite number"),
    (["--ids", "1 2", "--gpu-mem", "lots"], 1, "is not a size"),
    (["--ids", "1 2", "--profile", "/etc/passwd"], 1, "expected a mapping"),  # a file named by the user: read, refused
    (["--ids", "1 2", "--device", "tpu"], 1, "not a device"),
])
def test_bad_flags_are_one_line(model, flags, code, expected):
    line = attack(run(model, *flags), code=code)
    assert expected in line


# --- the expert store ------------------------------------------------------------------------------

def built_store(model: Path) -> Path:
    result = CliRunner().invoke(main, ["quantize", str(model)])
    assert result.exit_code == 0, result.stderr
    return next((model.parent / "cache" / "stores").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "pad", "empty"])
def test_a_damaged_store_layer_is_rebuilt(model, damage):
    store = built_store(model)
    layer = sorted(store.glob("layer-*.int4"))[0]
    size = layer.stat().st_size
    with open(layer, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        elif damage == "pad":
            f.seek(size)
            f.write(b"\0" * 4096)
        else:
            f.truncate(0)
    result = CliRunner().invoke(main, ["run", "--model", str(model), "--max-tokens", "2", "-p", "hi"])
    assert result.exit_code == 0 and "Traceback" not in result.stderr
    assert layer.stat().st_size == size
    assert CliRunner().invoke(main, ["quantize", str(model), "--verify"]).exit_code == 0


def test_silent_bit_damage_is_found_by_verify(model):
    store = built_store(model)
    assert "every layer matches" in CliRunner().invoke(main, ["quantize", str(model), "--verify"]).output
    layer = sorted(store.glob("layer-*.int4"))[-1]
    with open(layer, "r+b") as f:
        f.seek(4096 + 100)  # inside the first array (the header has the first page)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    line = attack(["quantize", str(model), "--verify"])
    assert layer.name in line and "checksums" in line


def test_verify_of_a_missing_store_says_so(model):
    assert "incomplete, damaged or of another checkpoint" in attack(["quantize", str(model), "--verify"])


def test_the_engine_still_matches_after_a_rebuild(model):
    """A rebuilt layer holds the same int4 bits as the first build."""
    store = built_store(model)
    layer = sorted(store.glob("layer-*.int4"))[0]
    before = np.fromfile(layer, np.uint8)
    layer.write_bytes(layer.read_bytes()[:5000])
    assert CliRunner().invoke(main, ["quantize", str(model)]).exit_code == 0
    assert np.array_equal(np.fromfile(layer, np.uint8), before)
