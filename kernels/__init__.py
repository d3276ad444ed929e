"""Numba kernels for the routed experts and the CPU's dense layers: int4 / int8 storage, the
decode / prefill expert MLPs (exact: fp32 activations; fast: int8 activations and integer dot
products, `q8`, on the path `isa` picks for this CPU), dense linears and the fused DeltaNet
decode step.

Pure functions over NumPy arrays; nothing here imports torch or `offload`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where Numba keeps the compiled kernels (cache=True): beside them, or under NUMBA_CACHE_DIR in
    the folder Numba's locator names for this one."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if not configured:
        return Path(__file__).parent / "__pycache__"
    from numba.core.caching import UserProvidedCacheLocator

    return Path(configured) / UserProvidedCacheLocator.get_suitable_cache_subpath(__file__)


def compiled() -> bool:
    """Whether the default (fast) decode kernel has been compiled and cached here before (a first
    run compiles the kernels it uses, ~20 s on 2 cores)."""
    return any(cache_dir().glob("q8._moe_decode_fast-*.nbi"))
