"""Torch model definitions, one architecture per file, named after its Hugging Face model_type.

Each architecture module provides `Args` (a `config.ModelArgs`: its fields, the config.json keys
it reads its own way, its state's bytes), `Model(args)`, `sanitize(weights, args)` (checkpoint
names -> parameter names), `checkpoint_shapes(args)` (what its releases hold, for `offload synth`:
derived from the modules, `hub.parameter_shapes`), `make_cache(args, max_len, dtype, device,
kv_format)`, `fuse_cpu_steps(model)` (its CPU step executors swapped in) and `PRESETS` (config.json
dicts for `offload synth`: the released models', small ones for tests). `ARCHITECTURES` is the one
registry: config.json's model_type -> module.
"""

from types import ModuleType

from offload.models import qwen3_5_moe, qwen3_moe, qwen3_next

ARCHITECTURES: dict[str, ModuleType] = {
    "qwen3_next": qwen3_next,
    "qwen3_moe": qwen3_moe,
    "qwen3_5_moe": qwen3_5_moe, "qwen3_5_moe_text": qwen3_5_moe,  # a release; its language model saved alone
}
