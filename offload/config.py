"""Model configuration: a checkpoint's config.json as a validated `ModelArgs`.

Two spellings of the same architecture exist in the wild and both are accepted:
- the hub style of the original Qwen releases: top-level `rope_theta`, `partial_rotary_factor`,
  `full_attention_interval`, `num_experts` (Qwen3-Next) or `num_local_experts`;
- the transformers >= 5 style: `layer_types`, a nested `rope_parameters` dict.
A multimodal release (Qwen3.5) nests the language model's keys in `text_config`: they are read
from there, over the file's top level.
Keys offload does not use are ignored. This module does not import torch: the planner reads
`ModelArgs` for models that are not on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from offload.errors import ConfigError, OffloadError

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"

DEFAULT_CONTEXT = 4096  # positions the KV cache holds unless `ctx` says otherwise
PREFILL_CHUNK = 512  # prompt tokens per forward pass (bounds activation and attention memory)
# a streamed prompt (routed experts copied to the device layer by layer) runs in passes of up to
# this many tokens: every chunk of a pass goes through layer l before any enters layer l + 1, so
# each layer's experts cross to the device once per pass, and a pass's activations stay resident
STREAM_PASS_TOKENS = 8192
STREAM_EXPERT_BATCH = 16  # streamed experts dequantised at once on the device, and copied there as a block
STAGING_BLOCKS = 4  # pinned buffers of one block each that streamed experts pass through on their way
DECODE_MAX_TOKENS = 8  # routed experts of calls up to this many tokens take the decode kernels
# a CPU DeltaNet mixer runs calls of up to this many tokens by the fused step, one token after another
# (a short prompt: 8 tokens 1.3 vs 8.5 ms a layer); longer ones by the chunked form, as transformers does
DELTANET_STEP_MAX_TOKENS = 16
GRAPH_SPAN = 256  # positions a captured decode step attends over at first; doubled as a sequence grows


@dataclass(frozen=True)
class Yarn:
    """YaRN rotary scaling (arXiv 2309.00071) as transformers' `yarn` rope type computes it: positions
    interpolated by `factor` in the low-frequency channels, kept in the high-frequency ones, with a
    linear ramp between the channels that turn `beta_slow` and `beta_fast` times over the original
    context; cos and sin are scaled by `attention_factor`."""

    factor: float
    original_max_position_embeddings: int
    attention_factor: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # round the ramp's ends out to whole channels

    @property
    def context(self) -> int:
        """The positions it extends the model to: factor x the original context."""
        return int(self.factor * self.original_max_position_embeddings)


@dataclass(kw_only=True)
class ModelArgs:
    """What every supported architecture shares: a decoder of attention + (mostly) MoE blocks."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width, for the layers in `mlp_only_layers`
    moe_intermediate_size: int  # one routed expert's width
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: Yarn | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # (rows, cols) of one scale block when the checkpoint stores FP8 weights, else None
    fp8_block_size: tuple[int, int] | None = None
    # config.json keys only this architecture reads, as SCHEMA's: key -> (kind, lowest, highest)
    SCHEMA: ClassVar[dict[str, tuple[str, float, float]]] = {}

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def max_context(self) -> int:
        """The most positions the model is meant to see: its max_position_embeddings, or with YaRN
        factor x the original context when that is more."""
        scaled = self.rope_scaling.context if self.rope_scaling else 0
        return max(self.max_position_embeddings, scaled)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def config_values(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The fields this architecture reads from config.json in its own way (the others are read
        by name)."""
        return {}

    def layer_type(self, layer: int) -> str:
        return FULL_ATTENTION

    @property
    def attention_layers(self) -> int:
        """Layers that attend over the context (and so keep a KV cache)."""
        return sum(self.layer_type(layer) == FULL_ATTENTION for layer in range(self.num_hidden_layers))

    @property
    def attention_window(self) -> int | None:
        """Positions a query attends to at most (None: the whole context)."""
        return None

    def state_bytes(self, dtype_bytes: int) -> int:
        """Bytes of the per-sequence state beside the KV cache (a recurrent mixer's), with the
        compute dtype's `dtype_bytes` where it is kept in it."""
        return 0

    def widest_activation(self) -> int:
        """The widest activation row a layer makes (features): what a prefill chunk's work scales by."""
        return max(2 * self.num_attention_heads * self.head_dim, 4 * self.hidden_size,
                   self.num_experts_per_tok * self.moe_intermediate_size)

    def norm_is_zero_centred(self, name: str) -> bool:
        """Whether the RMSNorm weight `name` is stored as scale - 1 (so 0 is the identity)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "decoder_sparse_step"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                 f"num_key_value_heads ({self.num_key_value_heads})")
        require(0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0,
                 f"partial_rotary_factor {self.partial_rotary_factor} gives an odd or empty "
                 f"rotary dimension for head_dim {self.head_dim}")
        if self.num_experts > 0:
            require(0 < self.num_experts_per_tok <= self.num_experts,
                     f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                     f"num_experts ({self.num_experts})")
            require(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        require(not bad, f"mlp_only_layers names layers {bad} outside 0..{self.num_hidden_layers - 1}")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.json: {message}")


def load_config(model_dir: str | Path, rope_scaling: str | dict[str, Any] | None = None) -> ModelArgs:
    """Read and validate `model_dir/config.json`; `rope_scaling` replaces its rope scaling
    (`parse_rope_scaling`: "yarn:4", "none", or a dict in config.json's spelling)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ConfigError(f"{model_dir}: no such directory; pass the folder of a Hugging Face checkpoint")
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a directory; pass the folder that holds config.json "
                          "and the *.safetensors files")
    path = model_dir / "config.json"
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a regular file; a checkpoint is made of plain files")
    if not path.is_file():
        raise ConfigError(f"{model_dir}: not a model directory (no config.json); pass the folder "
                          "of a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); restore the file from the model's "
                          "original download") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return args_from_dict(config, rope_scaling)


# What offload reads from config.json: key -> (kind, lowest, highest). Checked before anything
# is computed from the values, so a wrong type or an absurd size is one line naming the key, not
# a traceback, an allocation of terabytes or a loop over a hundred million layers.
_SIZE = 1 << 20
SCHEMA: dict[str, tuple[str, float, float]] = {
    "vocab_size": ("int", 1, 1 << 24), "hidden_size": ("int", 1, 1 << 16), "num_hidden_layers": ("int", 1, 1024),
    "num_attention_heads": ("int", 1, 1024), "num_key_value_heads": ("int", 1, 1024), "head_dim": ("int", 1, 4096),
    "intermediate_size": ("int", 1, _SIZE), "moe_intermediate_size": ("int", 1, _SIZE),
    "num_experts": ("int", 0, 1 << 14), "num_local_experts": ("int", 0, 1 << 14),
    "num_experts_per_tok": ("int", 1, 1 << 14), "decoder_sparse_step": ("int", 1, 1024),
    "max_position_embeddings": ("int", 1, 1 << 24), "bos_token_id": ("int", 0, 1 << 24),
    "rms_norm_eps": ("float", 0, 1), "rope_theta": ("float", 0, 1e15), "partial_rotary_factor": ("float", 0, 1),
    "norm_topk_prob": ("bool", 0, 0), "tie_word_embeddings": ("bool", 0, 0), "attention_bias": ("bool", 0, 0),
    "eos_token_id": ("ids", 0, 1 << 24), "mlp_only_layers": ("ids", 0, 1024),
    "torch_dtype": ("dtype", 0, 0), "dtype": ("dtype", 0, 0),
    "rope_scaling": ("mapping", 0, 0), "rope_parameters": ("mapping", 0, 0), "quantization_config": ("mapping", 0, 0),
    "text_config": ("mapping", 0, 0),
    "original_max_position_embeddings": ("int", 1, 1 << 24),
}
_FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def schema() -> dict[str, tuple[str, float, float]]:
    """Every key offload reads from config.json: SCHEMA and each architecture's own (Args.SCHEMA)."""
    from offload.models import ARCHITECTURES

    return {**SCHEMA, **{key: kind for module in ARCHITECTURES.values() for key, kind in module.Args.SCHEMA.items()}}


def _check_schema(config: dict[str, Any], keys: dict[str, tuple[str, float, float]] = SCHEMA) -> None:
    """Each of `keys` that config.json sets (null counts as unset) has its kind and range."""
    for key, (kind, lowest, highest) in keys.items():
        value = config.get(key)
        if value is None:
            continue
        if kind == "int":
            ok = type(value) is int and lowest <= value <= highest
            expected = f"a whole number from {lowest} to {highest}"
        elif kind == "float":  # lowest < value <= highest, finite (JSON allows NaN and Infinity)
            ok = type(value) in (int, float) and lowest < value <= highest
            expected = f"a number above {lowest:g} and at most {highest:g}"
        elif kind == "bool":
            ok, expected = type(value) is bool, "true or false"
        elif kind == "ids":
            items = value if isinstance(value, list) else [value] if key == "eos_token_id" else None
            ok = items is not None and all(type(i) is int and lowest <= i <= highest for i in items)
            expected = f"{'a token id or ' if key == 'eos_token_id' else ''}a list of whole numbers from {lowest}"
        elif kind == "names":
            ok = isinstance(value, list) and all(isinstance(name, str) for name in value)
            expected = "a list of layer type names"
        elif kind == "dtype":
            ok, expected = value in _FLOAT_DTYPES, f"one of {', '.join(_FLOAT_DTYPES)}"
        else:
            ok, expected = isinstance(value, dict), "an object"
        if not ok:
            raise ConfigError(f"config.json: {key} is {_shown(value)}; expected {expected}")
    if config.get("rope_parameters") or config.get("rope_scaling"):
        _check_schema({k: v for k, v in (config.get("rope_parameters") or config.get("rope_scaling")).items()
                       if k in ("rope_theta", "partial_rotary_factor")})
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(type(b) is int and 1 <= b <= 4096 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size is {_shown(block)}; expected "
                          "two whole numbers, e.g. [128, 128]")


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def args_from_dict(config: dict[str, Any], rope_scaling: str | dict[str, Any] | None = None) -> ModelArgs:
    """Build the `ModelArgs` subclass named by `config["model_type"]` from a config.json dict (with
    `rope_scaling` instead of its own, if given)."""
    from offload.models import ARCHITECTURES  # each architecture's module: its Args among the rest

    model_type = config.get("model_type")
    if isinstance(config.get("text_config"), dict):  # a multimodal release: the language model's keys are nested
        config = {**{k: v for k, v in config.items() if not k.endswith("_config") or k == "quantization_config"},
                  **{k: v for k, v in config["text_config"].items() if v is not None}, "model_type": model_type,
                  # the wrapper ties its lm_head to the embeddings by its own flag, as transformers does
                  "tie_word_embeddings": config.get("tie_word_embeddings", False)}
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; offload runs "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    config = {key: value for key, value in config.items() if value is not None}  # null: unset, as HF reads it
    cls = ARCHITECTURES[model_type].Args
    _check_schema(config, {**SCHEMA, **cls.SCHEMA})
    known = {f.name for f in dataclasses.fields(cls)}
    values = {key: value for key, value in config.items() if key in known and value is not None}  # null: unset
    values.update(_rope_values(config, cls))
    values.update(_common_values(config))
    values.update(cls.config_values(config))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and values.get(f.name) is None]
    if missing:
        raise ConfigError(f"config.json: missing required key(s) {', '.join(missing)} for {model_type}")
    args = with_rope_scaling(cls(**values), rope_scaling, config)
    args.validate()
    return args


def _common_values(config: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    num_experts = config.get("num_experts")
    num_experts = config.get("num_local_experts") if num_experts is None else num_experts
    if num_experts is not None:
        values["num_experts"] = num_experts
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim = config.get("head_dim")
    if not head_dim and heads and hidden:
        head_dim = hidden // heads
    if head_dim:
        values["head_dim"] = head_dim
    if config.get("num_key_value_heads") is None and heads:
        values["num_key_value_heads"] = heads
    values["mlp_only_layers"] = tuple(config.get("mlp_only_layers") or ())
    eos = config.get("eos_token_id")
    values["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype is not None:
        values["torch_dtype"] = dtype
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"config.json: quantization method {method!r} is not supported; use the "
                              "model's bf16 or FP8 release")
        values["fp8_block_size"] = tuple(quant.get("weight_block_size") or (128, 128))
    return values


def _rope_values(config: dict[str, Any], cls: type[ModelArgs]) -> dict[str, Any]:
    # transformers >= 5 nests rope settings in `rope_parameters`; the hub configs keep them flat
    # and describe scaling in `rope_scaling`.
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = dict(config.get("rope_scaling") or {})
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in config:
                params[key] = config[key]
    values: dict[str, Any] = {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if params.get(key) is not None:
            values[key] = float(params[key])
    values["rope_scaling"] = rope_scaling_from(params, config, "config.json")
    return values


ROPE_TYPES = ("default", "yarn")


def rope_scaling_from(params: dict[str, Any], config: dict[str, Any], source: str) -> Yarn | None:
    """The scaling a rope settings dict asks for (`rope_type` or `type`: "default" or "yarn"), with
    transformers' defaults: `original_max_position_embeddings` from the config's top level, else its
    max_position_embeddings; a missing factor is their ratio; `attention_factor` from `mscale` and
    `mscale_all_dim` when both are set, else 0.1 ln(factor) + 1."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope scaling {rope_type!r} is not supported; offload runs "
                          f"{' and '.join(ROPE_TYPES)} (remove it to run at the model's native context)")

    def number(key: str, lowest: float, highest: float, default=None):
        value = params.get(key)
        if value is None:
            return default
        if type(value) not in (int, float) or not lowest <= value <= highest:
            raise ConfigError(f"{source}: yarn {key} is {_shown(value)}; expected a number from {lowest:g} "
                              f"to {highest:g}")
        return float(value)

    original = config.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
    original = config.get("max_position_embeddings", 32768) if original is None else original
    if type(original) is not int or not 1 <= original <= 1 << 24:
        raise ConfigError(f"{source}: yarn original_max_position_embeddings is {_shown(original)}; expected a "
                          f"whole number from 1 to {1 << 24}")
    factor = number("factor", 1, 1024)
    if factor is None:
        factor = config.get("max_position_embeddings", original) / original
    attention = number("attention_factor", 0, 100)
    if attention is None:
        mscale, mscale_all_dim = number("mscale", 0, 100), number("mscale_all_dim", 0, 100)
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor, 1.0)
    beta_fast = number("beta_fast", -1e6, 1e6) or 32.0  # transformers: a 0 is unset too
    beta_slow = number("beta_slow", -1e6, 1e6) or 1.0
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"{source}: yarn truncate is {_shown(truncate)}; expected true or false")
    return Yarn(factor=factor, original_max_position_embeddings=original, attention_factor=attention,
                beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def parse_rope_scaling(text: str) -> dict[str, Any]:
    """A rope scaling given on the command line or to `load`: "yarn:FACTOR[:ORIGINAL_CONTEXT]"
    (e.g. "yarn:4", "yarn:4:32768"), "none" (no scaling, whatever config.json says), or a JSON
    object in config.json's spelling."""
    text = text.strip()
    if text.startswith("{"):
        try:
            params = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--rope-scaling: not valid JSON ({e.msg}); write e.g. yarn:4") from None
        if not isinstance(params, dict):
            raise ConfigError("--rope-scaling: expected a JSON object, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4}'")
        return params
    kind, _, rest = text.partition(":")
    if kind in ("none", "default") and not rest:
        return {"rope_type": "default"}
    parts = rest.split(":") if rest else []
    try:
        if kind != "yarn" or not 1 <= len(parts) <= 2:
            raise ValueError
        params = {"rope_type": "yarn", "factor": float(parts[0])}
        if len(parts) == 2:
            params["original_max_position_embeddings"] = int(parts[1])
    except ValueError:
        raise ConfigError(f"--rope-scaling {text!r}: write yarn:FACTOR or yarn:FACTOR:ORIGINAL_CONTEXT (e.g. "
                          "yarn:4 or yarn:4:32768), or none") from None
    return params


def with_rope_scaling(args: ModelArgs, scaling: str | dict[str, Any] | None, config: dict[str, Any]) -> ModelArgs:
    """`args` with the rope scaling `scaling` (`parse_rope_scaling`'s forms) instead of config.json's."""
    if scaling is None:
        return args
    params = parse_rope_scaling(scaling) if isinstance(scaling, str) else dict(scaling)
    if "original_max_position_embeddings" in params:  # said here, it outranks config.json's top-level one
        config = {k: v for k, v in config.items() if k != "original_max_position_embeddings"}
    return dataclasses.replace(args, rope_scaling=rope_scaling_from(params, config, "--rope-scaling"))


def check_context(args: ModelArgs, ctx: int) -> None:
    """Refuse a context of `ctx` positions that the model's rotary embedding does not reach."""
    if ctx <= 0:
        raise OffloadError(f"ctx must be positive, got {ctx}")
    if ctx <= args.max_context:
        return
    yarn = args.rope_scaling
    if yarn is not None:
        raise OffloadError(f"--ctx {ctx} is more than this model reaches with YaRN x{yarn.factor:g} ({args.max_context} "
                           f"positions); pass at most that, or a larger factor: --rope-scaling "
                           f"yarn:{math.ceil(ctx / yarn.original_max_position_embeddings)}")
    native = args.max_position_embeddings
    raise OffloadError(f"--ctx {ctx} is more than this model's {native} positions (max_position_embeddings); "
                       f"pass at most that, or extend the context with --rope-scaling yarn:{math.ceil(ctx / native)}")
