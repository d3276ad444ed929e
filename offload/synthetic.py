"""Random checkpoints of the real architectures, written without transformers.

Tests, the demo and the benchmarks need checkpoints that have the real models' file layout,
names, shapes and config.json, but not their weights. `synthesize()` writes one from a preset
(the real models' configs, or tiny ones), optionally with fewer layers or experts, as sharded
safetensors with an index when larger than one shard. Every parameter is random (norm weights,
`A_log`, `dt_bias` too), drawn from a generator seeded by (seed, tensor name): the same call
writes the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from offload.checkpoint import INDEX_FILE
from offload.config import ModelArgs, args_from_dict
from offload.errors import OffloadError

def _presets() -> dict[str, dict[str, Any]]:
    from offload.models import ARCHITECTURES

    return {name: config for module in ARCHITECTURES.values() for name, config in module.PRESETS.items()}


PRESETS: dict[str, dict[str, Any]] = _presets()  # every architecture's, by name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# "fp8": as the official FP8 releases store it: every projection's weight e4m3 with one fp32 scale
# per 128 x 128 block beside it (`<name>_scale_inv`, weight = code x scale); the rest in bf16
FP8_BLOCK = 128
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
DEFAULT_SHARD_BYTES = 2 * 2**30


def preset_config(preset: str, layers: int | None = None, experts: int | None = None,
                  dtype: str | None = None) -> dict[str, Any]:
    """The config.json of `preset`, with the number of layers / routed experts / dtype overridden."""
    if preset not in PRESETS:
        raise OffloadError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[preset])
    text = config  # where the language model's keys are: a multimodal wrapper's text_config
    if isinstance(config.get("text_config"), dict):
        text = config["text_config"] = dict(config["text_config"])
    if layers is not None:
        if layers <= 0:
            raise OffloadError(f"--layers must be positive, got {layers}")
        text["num_hidden_layers"] = layers
        if "layer_types" in text:  # the pattern, continued or cut
            pattern = text["layer_types"]
            text["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    if experts is not None:
        if experts <= 0:
            raise OffloadError(f"--experts must be positive, got {experts}")
        text["num_experts"] = experts
        text["num_experts_per_tok"] = min(text["num_experts_per_tok"], experts)
    if dtype is not None:
        if dtype not in DTYPES:
            raise OffloadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        for section in {id(config): config, id(text): text}.values():
            section.pop("dtype", None)
            section["torch_dtype"] = _DTYPE_NAMES.get(DTYPES[dtype], "bfloat16")
        if dtype == "fp8":
            config["quantization_config"] = dict(FP8_CONFIG)
    return config


def _fp8(config: dict[str, Any]) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "fp8"


def stored_as_fp8(name: str, shape: tuple[int, ...]) -> bool:
    """Whether an FP8 checkpoint stores this tensor in e4m3: the projections' weights (attention,
    DeltaNet's input and output, experts, shared expert); embeddings, lm_head, norms, the routers
    and DeltaNet's small b/a projections stay bf16."""
    return len(shape) == 2 and (name.endswith("_proj.weight")
                                or name.endswith(("in_proj_qkvz.weight", "in_proj_qkv.weight", "in_proj_z.weight")))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [R, C] -> (e4m3 codes [R, C], fp32 scales [ceil(R / 128), ceil(C / 128)]), one scale
    per block (its largest magnitude / 448); `checkpoint.dequantize_fp8` is the inverse."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % FP8_BLOCK, 0, -rows % FP8_BLOCK))
    blocks = padded.unflatten(0, (-1, FP8_BLOCK)).unflatten(2, (-1, FP8_BLOCK))  # [Rb, 128, Cb, 128]
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (blocks / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:rows, :cols].to(torch.float8_e4m3fn)
    return codes, scale


def _stored_bytes(config: dict[str, Any], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = math.prod(shape)
    if _fp8(config) and stored_as_fp8(name, shape):
        return count + 4 * math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
    return count * dtype.itemsize


def random_tensor(args: ModelArgs, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor for parameter `name`, scaled like a trained one of its kind."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std + mean

    if name.endswith("A_log"):  # decay rates A in [1, 16)
        return torch.empty(shape).uniform_(1, 16, generator=generator).log()
    if name.endswith("dt_bias"):
        return torch.empty(shape).uniform_(-1, 2, generator=generator)
    if name.endswith("conv1d.weight"):
        return normal(shape[-1] ** -0.5)
    if len(shape) == 1 and "norm" in name:
        return normal(0.1, 0.0 if args.norm_is_zero_centred(name) else 1.0)
    if name.endswith(".bias"):
        return normal(0.02)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    return normal(shape[-1] ** -0.5)  # projections: unit-variance outputs for unit inputs


def synthesize(out_dir: str | Path, config: dict[str, Any], seed: int = 0,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
               progress: Callable[[int], None] | None = None) -> Path:
    """Write a random checkpoint for `config` to `out_dir`; return its path.

    The checkpoint is built in a sibling temporary directory and renamed into place, so `out_dir`
    is either absent, the old content, or complete. `progress(bytes)` is called after each tensor.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OffloadError(f"{out_dir} already exists and is not empty; choose a new directory or "
                           "pass --force to replace it")
    args = args_from_dict(config)
    dtype = _dtype(args)
    shapes = checkpoint_shapes(args)
    sizes = {name: _stored_bytes(config, name, shape, dtype) for name, shape in shapes.items()}
    shards = _assign_shards(sizes, max_shard_bytes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        weight_map = {}
        for shard_name, names in shards:
            tensors = {}
            for name in names:
                weight = random_tensor(args, name, shapes[name], seed)
                if _fp8(config) and stored_as_fp8(name, shapes[name]):
                    tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(weight)
                    weight_map[name + "_scale_inv"] = shard_name
                else:
                    tensors[name] = weight.to(dtype).contiguous()
                weight_map[name] = shard_name
                if progress:
                    progress(sizes[name])
            save_file(tensors, partial / shard_name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(partial, args.vocab_size)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


# What the synthetic tokenizer learns its merges from: a few sentences, so that words become
# tokens and the demo's text looks like text (the model's weights are random all the same).
_CORPUS = """\
offload runs huge sparse mixture-of-experts language models on ordinary machines.
The routed experts stay in RAM as int4 and are computed by Numba kernels on the CPU, while the
attention and DeltaNet mixers, the norms, the router and the shared expert run on the GPU.
Decode speed is bounded by the bytes of expert weights read per token: with ten experts of
five hundred and twelve active per token, most of the model is never read for a given token.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Tell me a story about a small robot who learns to read, one page at a time.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2026
def main():\n    print("hello, world")\n    return 0
"""


def _corpus() -> list[str]:
    """_CORPUS and lines of pronounceable made-up words: enough distinct pairs for a few thousand
    merges, so that every id of a demo model's vocabulary decodes to letters (a random model
    picks ids uniformly; ids the tokenizer lacks would print nothing)."""
    rng = random.Random(0)
    syllables = [consonant + vowel for consonant in "bdfghklmnprstvz" for vowel in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(4000)]
    made_up = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(".,?!") for _ in range(3000)]
    return _CORPUS.splitlines() * 4 + made_up


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML, as Qwen models use it
CHAT_TEMPLATE = (  # ChatML with tools as Qwen3's template renders them (calls in the json form)
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' }}"
    "{{- function['arguments'] if function['arguments'] is string else function['arguments'] | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tokenizer_current(directory: Path) -> bool:
    """Whether `directory` holds the tokenizer files `write_tokenizer` writes now (the chat template
    included: a demo model cached by an older version is given the current one)."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (directory / "tokenizer.json").is_file() and config.get("chat_template") == CHAT_TEMPLATE


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A small byte-level BPE tokenizer (trained here, deterministic) with ChatML special tokens
    and chat template: tokenizer.json, tokenizer_config.json and generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4096), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise OffloadError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer; use >= 300")
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 131072}, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": False}, indent=2) + "\n")


def _assign_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    count = len(groups)
    return [(f"model-{i + 1:05d}-of-{count:05d}.safetensors", names) for i, names in enumerate(groups)]


def _dtype(args: ModelArgs) -> torch.dtype:
    return {name: dtype for dtype, name in _DTYPE_NAMES.items()}.get(args.torch_dtype, torch.bfloat16)


def checkpoint_nbytes(config: dict[str, Any]) -> int:
    """Bytes of weights a checkpoint of `config` holds (FP8 ones: codes and scales)."""
    args = args_from_dict(config)
    dtype = _dtype(args)
    return sum(_stored_bytes(config, name, shape, dtype) for name, shape in checkpoint_shapes(args).items())


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """What a release of this model holds, hub name -> shape (its architecture's layout)."""
    from offload.models import ARCHITECTURES

    return ARCHITECTURES[args.model_type].checkpoint_shapes(args)
