"""What both architectures' attention layers share: rotary embedding and cached causal attention."""

from __future__ import annotations

import math

import torch
from torch import nn

from offload.config import Yarn
from offload.models.cache import DevicePosition, KVCache


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotating the first `rotary_dim` channels of each head, optionally
    YaRN-scaled. Computed in fp32 in transformers' order of operations, so tables are bit-equal."""

    def __init__(self, rotary_dim: int, theta: float, yarn: Yarn | None = None):
        super().__init__()
        # Created on the CPU explicitly, so that a model built on the meta device still has it.
        inv_freq, self.scale = rotary_frequencies(rotary_dim, theta, yarn)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_dim/2]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rotary_dim] in `dtype`."""
        if self.inv_freq.device != positions.device:  # moved once: a copy per call would wait for the device
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def rotary_frequencies(rotary_dim: int, theta: float, yarn: Yarn | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim/2] fp32 on the CPU, the factor on cos and sin).

    YaRN: channel i turns 2 pi / inv_freq_i times less often with interpolation (frequency / factor);
    channels that turn more than `beta_fast` times over the original context keep their frequency,
    those turning fewer than `beta_slow` times are interpolated, and a linear ramp blends between."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
    powers = theta**exponents  # [rotary_dim/2]
    if yarn is None:
        return 1.0 / powers, 1.0

    def channel(turns: float) -> float:  # the channel that turns `turns` times over the original context
        return rotary_dim * math.log(yarn.original_max_position_embeddings / (turns * 2 * math.pi)) \
            / (2 * math.log(theta))

    low, high = channel(yarn.beta_fast), channel(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a ramp of one channel
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    kept = 1 - ramp  # the share of each channel's original frequency
    interpolated, original = 1.0 / (yarn.factor * powers), 1.0 / powers
    return interpolated * (1 - kept) + original * kept, yarn.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, Dh]; rotates channels [0, rotary_dim) in half-split pairs, passes the rest."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, passed], dim=-1)


def cached_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache: KVCache,
                     start: int | DevicePosition, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens over everything cached so far.

    query [H, T, Dh] for positions start..start+T (or one token at a `DevicePosition`); keys,
    values [Hkv, T, Dh] (written to `cache`). Returns [T, H * Dh].
    """
    cache.write(keys, values, start)
    return cache.attend(query, start, sliding_window)
