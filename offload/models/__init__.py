"""Torch model definitions, one architecture per file, named after its Hugging Face model_type.

Each architecture module provides `Model(args)`, `sanitize(weights, args)` (checkpoint names ->
parameter names) and `make_cache(args, max_len, dtype, device, kv_format)`.
"""

from types import ModuleType

from offload.models import qwen3_moe, qwen3_next

ARCHITECTURES: dict[str, ModuleType] = {
    "qwen3_moe": qwen3_moe,
    "qwen3_next": qwen3_next,
}
