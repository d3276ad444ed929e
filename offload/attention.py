"""Decode attention on the CPU: `kernels.attention` plugged into each KV cache of a CPU-only plan.

A decode step (up to DECODE_MAX_TOKENS tokens) reads every cached key and value of each attention
layer; the kernels read them in the stored format and never copy the cache: keys in tiles
(`attend_decode_tiled`; int8 ones by integer dot products with the query quantised per step),
and int8 caches whose groups do not tile a row at a time (`attend_decode`).
Longer inputs (prompts) go through the cache's own blockwise path. Scratch is allocated once per
engine and shared by every layer.
"""

from __future__ import annotations

import numpy as np
import torch

from offload.config import DECODE_MAX_TOKENS
from offload.host import numpy_view
from offload.kernels import attention as kernel
from offload.kernels import isa
from offload.kernels.threads import kernel_threads, physical_cores
from offload.models.cache import KVCache

_KINDS = {"f32": kernel.F32, "bf16": kernel.BF16, "int8": kernel.INT8}  # the stored forms the kernel reads
_EMPTY = {np.float32: np.empty((0, 0, 0), np.float32), np.uint16: np.empty((0, 0, 0), np.uint16),
          np.int8: np.empty((0, 0, 0), np.int8)}


class CpuDecodeAttention:
    """`KVCache.decode` for the CPU: (cache, query [H, T, Dh], start, window) -> [T, H * Dh], or
    None for more than DECODE_MAX_TOKENS tokens."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.threads = physical_cores()
        self.path = isa.best()
        self.scratch: dict[tuple, tuple[np.ndarray, ...]] = {}  # (spans, rows), ("query", ...), ("limits", ...)
        self.views: dict[int, tuple[np.ndarray, ...]] = {}  # id(cache) -> the kernel's arguments

    def __call__(self, cache: KVCache, query: torch.Tensor, start: int, window: int | None) -> torch.Tensor | None:
        if not self.serves(cache, query.shape[1]):
            return None  # a prompt, or fp16 keys and values: the cache's own blockwise path
        return torch.from_numpy(self.rows(cache, numpy_view(query), start, window)).to(query.dtype)

    def serves(self, cache: KVCache, tokens: int) -> bool:
        """Whether `rows` takes `tokens` new tokens over `cache`."""
        return tokens <= DECODE_MAX_TOKENS and cache.format in _KINDS

    def rows(self, cache: KVCache, query: np.ndarray, start: int, window: int | None,
             scaled: bool = False) -> np.ndarray:
        """`__call__` on NumPy arrays (a lean step's, without a torch tensor between): query float32
        [H, T, Dh], T at most DECODE_MAX_TOKENS, already times Dh ** -0.5 if `scaled` -> a new
        float32 [T, H * Dh]. Between kernels that stream the weights through every cache, each
        NumPy operation here costs microseconds: there are few."""
        heads, tokens, width = query.shape
        per_kv_head = heads // self.kv_heads
        rows = per_kv_head * tokens
        query = query.reshape(self.kv_heads, rows, width)
        if not scaled:
            query = np.multiply(query, np.float32(width**-0.5))
        offsets, limits = self._limits(rows, tokens)
        np.add(offsets, start, out=limits)  # row i * T + t sees positions up to start + t
        spans = kernel.spans_for(self.kv_heads, start + tokens, self.threads)
        part_max, part_sum, part_out, scores, widened, out = self._scratch(spans, rows)
        kind, group, stored = self._views(cache)
        with kernel_threads(self.threads):
            if cache.tiled:
                codes, factors, biases = self._query_scratch(kind, rows, width // group)
                kernel.attend_decode_tiled(self.path, kind, query, limits, window or 0, *stored, codes, factors,
                                           biases, part_max, part_sum, part_out, scores, out)
            else:
                kernel.attend_decode(query, limits, window or 0, kind, group, *stored,
                                     part_max, part_sum, part_out, scores, widened, out)
        # a new array: `out` is scratch the next layer overwrites; [H, T, Dh] -> [T, H * Dh]
        if tokens == 1:
            return out.reshape(1, heads * width).copy()
        return out.reshape(heads, tokens, width).transpose(1, 0, 2).copy().reshape(tokens, heads * width)

    def _limits(self, rows: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(row i * T + t -> t, scratch for the rows' last visible positions), int64 [rows]."""
        key = ("limits", rows, tokens)
        if key not in self.scratch:
            self.scratch[key] = (np.arange(rows, dtype=np.int64) % tokens, np.empty(rows, np.int64))
        return self.scratch[key]

    def _scratch(self, spans: int, rows: int) -> tuple[np.ndarray, ...]:
        key = (spans, rows)
        if key not in self.scratch:
            kv_heads, width = self.kv_heads, self.head_dim
            self.scratch[key] = (np.empty((kv_heads, spans, rows), np.float32),
                                 np.empty((kv_heads, spans, rows), np.float32),
                                 np.empty((kv_heads, spans, rows, width), np.float32),
                                 np.empty((kv_heads * spans, rows, kernel.BLOCK), np.float32),
                                 np.empty((kv_heads * spans, 4, width), np.uint32),
                                 np.empty((kv_heads, rows, width), np.float32))
        return self.scratch[key]

    def _query_scratch(self, kind: int, rows: int, groups: int) -> tuple[np.ndarray, ...]:
        """The tiled kernel's query in its form: int8 codes, scales and biases per group; or fp32."""
        key = ("query", kind, rows)
        if key not in self.scratch:
            shape = (self.kv_heads, rows)
            self.scratch[key] = ((np.empty((*shape, self.head_dim), np.int8), np.empty((*shape, groups), np.float32),
                                  np.empty((*shape, groups), np.int32)) if kind == kernel.INT8 else
                                 (np.empty((*shape, 0), np.int8), np.empty((*shape, self.head_dim), np.float32),
                                  np.empty((*shape, 0), np.int32)))
        return self.scratch[key]

    def _views(self, cache: KVCache) -> tuple[int, int, tuple[np.ndarray, ...]]:
        """(stored form, group, the key/value arrays in the kernel's order) for `cache`: four for
        `attend_decode_tiled` (keys, key scales, values, value scales), eight for `attend_decode`."""
        if id(cache) not in self.views and cache.tiled:
            kind = _KINDS[cache.format]
            keys, values = (_numpy(cache.keys), _numpy(cache.values))
            none = np.empty((*cache.values.shape[:2], 0), np.float32)  # f32 and bf16 have no scales
            scales = tuple(s.numpy() for s in cache.scales) or (none, none)
            self.views[id(cache)] = (kind, cache.group, (keys, scales[0], values, scales[1]))
        if id(cache) not in self.views:
            kind = _KINDS[cache.format]
            arrays = []
            for stored, scales in ((cache.keys, cache.scales[:1]), (cache.values, cache.scales[1:])):
                slots = [_EMPTY[np.float32], _EMPTY[np.uint16], _EMPTY[np.int8], _EMPTY[np.float32]]
                slots[kind] = _numpy(stored)
                if scales:
                    slots[3] = scales[0].numpy()
                arrays += slots
            self.views[id(cache)] = (kind, cache.group, tuple(arrays))
        return self.views[id(cache)]


def _numpy(stored: torch.Tensor) -> np.ndarray:
    """A NumPy view of stored keys or values; bf16 as its bits (uint16)."""
    return stored.view(torch.int16).numpy().view(np.uint16) if stored.dtype == torch.bfloat16 else stored.numpy()


class Int8Writer:
    """`KVCache.writer` for an int8 cache in tiles: rows quantised and stored by one Numba call
    (`kernels.attention.write_int8_tiled`) instead of ~15 torch operations."""

    def __init__(self):
        self.views: dict[int, tuple[np.ndarray, ...]] = {}  # id(cache) -> the kernel's arrays

    def __call__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        self.rows(cache, numpy_view(keys), numpy_view(values), start)

    def rows(self, cache: KVCache, keys: np.ndarray, values: np.ndarray, start: int) -> None:
        """`__call__` on NumPy arrays: keys, values float32 [Hkv, T, Dh] at positions start..start+T."""
        cache.check_room(start + keys.shape[1])
        if id(cache) not in self.views:
            kv_heads, _, width = cache.values.shape
            self.views[id(cache)] = (cache.keys.view(kv_heads, -1, width // 4, kernel.TILE, 4).numpy(),
                                     cache.key_scales.numpy(), cache.values.numpy(), cache.value_scales.numpy())
        kernel.write_int8_tiled(keys, values, start, *self.views[id(cache)])


def plug_into(caches: list, args) -> None:
    """Give every KV cache in `caches` (CPU tensors) the CPU decode kernel, with shared scratch, and
    an int8 cache in tiles its writer."""
    decoder = CpuDecodeAttention(args.num_attention_heads, args.num_key_value_heads, args.head_dim)
    writer = Int8Writer()
    for cache in caches:
        if isinstance(cache, KVCache):
            cache.decode = decoder
            if cache.format == "int8" and cache.tiled:
                cache.writer = writer
