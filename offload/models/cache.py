"""Per-layer decoding state, preallocated once per engine and written in place.

Two kinds, one small protocol (`reset()`, `snapshot()` / `restore()`, `nbytes`):
- `KVCache` for full attention: keys and values for up to `max_len` positions;
- `LinearAttentionCache` for Gated DeltaNet: the causal-conv tail and the fp32 recurrent state.
Positions are passed explicitly by the caller (`start`); nothing here grows per token.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer. keys, values: [Hkv, max_len, Dh]."""

    def __init__(self, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.keys = torch.zeros(num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(num_kv_heads, max_len, head_dim, dtype=dtype, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [Hkv, T, Dh] at positions start..start+T; return views of 0..start+T."""
        end = start + keys.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.keys[:, start:end] = keys
        self.values[:, start:end] = values
        return self.keys[:, :end], self.values[:, :end]

    def reset(self) -> None:
        pass  # positions past `start` are never read, so stale entries need no clearing

    def snapshot(self) -> None:
        return None  # keys and values are written by position: rolling back needs no copy

    def restore(self, state: None) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class LinearAttentionCache:
    """State of one Gated DeltaNet layer.

    conv_state:      [C, K-1]    the last K-1 inputs of the depthwise causal conv (C = conv channels)
    recurrent_state: [Hv, Dk, Dv] fp32, the delta-rule memory
    """

    def __init__(self, conv_dim: int, conv_kernel: int, num_heads: int, key_dim: int, value_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.conv_state = torch.zeros(conv_dim, conv_kernel - 1, dtype=dtype, device=device)
        self.recurrent_state = torch.zeros(num_heads, key_dim, value_dim, dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.conv_state.zero_()
        self.recurrent_state.zero_()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of both states, in RAM."""
        return self.conv_state.to("cpu", copy=True), self.recurrent_state.to("cpu", copy=True)

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv_state.copy_(state[0])
        self.recurrent_state.copy_(state[1])

    @property
    def nbytes(self) -> int:
        return self.conv_state.nbytes + self.recurrent_state.nbytes


Cache = KVCache | LinearAttentionCache


def cache_nbytes(caches: list[Cache]) -> int:
    return sum(cache.nbytes for cache in caches)
