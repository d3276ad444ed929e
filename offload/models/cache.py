"""Per-layer decoding state, preallocated once per engine and written in place.

Two kinds, one small protocol (`reset()`, `snapshot()` / `restore()`, `nbytes`):
- `KVCache` for full attention: keys and values for up to `max_len` positions, in fp32, bf16 or
  int8, and the attention that reads them;
- `LinearAttentionCache` for Gated DeltaNet: the causal-conv tail and the fp32 recurrent state.
Positions are passed explicitly by the caller (`start`); nothing here grows per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from offload.kernels.attention import BF16, F32, INT8, TILE, tiled


KV_FORMATS = ("f32", "bf16", "f16", "int8")  # how a KVCache stores keys and values
KV_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "int8": torch.int8}
_KERNEL_FORMS = {"f32": F32, "bf16": BF16, "int8": INT8}  # the forms the CPU's decode kernel reads from tiles
KV_GROUP = 64  # int8: channels of one position and head that share a scale (at most)
CPU_BLOCK = 4096  # positions of keys and values widened at once when the stored form is not the query's
# Off the CPU a block's scores [Hkv, rows, n] fp32 and its widened keys and values are materialised:
# blocks are as long as these bounds allow (a decode step's usually covers the whole cache: few launches)
DEVICE_SCORES = 1 << 24  # score elements per block (64 MiB)
DEVICE_WIDENED = 1 << 26  # bytes of widened keys + values per block


@dataclass(frozen=True)
class DevicePosition:
    """The position of a one-token step, held on the device, so that a captured CUDA graph replays
    at any position (`offload.graphs`): `index` int64 [1] is the position; attention reads the
    first `span` cached positions (a bound on index + 1, fixed per graph), those after the token
    masked on the device."""

    index: torch.Tensor
    span: int


def kv_group(head_dim: int) -> int:
    """int8: channels per scale, the largest divisor of head_dim up to KV_GROUP."""
    return max(g for g in range(1, min(KV_GROUP, head_dim) + 1) if head_dim % g == 0)


class KVCache:
    """Keys and values of one attention layer, written by position, read in the stored format.

    "f32" / "bf16" / "f16": keys, values [Hkv, max_len, Dh] in that dtype.
    "int8": keys, values int8 [Hkv, max_len, Dh] and key_scales, value_scales fp32
    [Hkv, max_len, Dh / G]: symmetric codes, one scale (max |x| / 127) per position, head and group
    of G = kv_group(Dh) channels (64 for the usual 128 or 256), computed as each token is written.
    In RAM the keys are stored in tiles for the CPU's decode kernel (`tiled`; `kernels.attention`):
    [Hkv, L / TILE, Dh * TILE], sixteen positions side by side per channel (int8: per four
    channels, codes biased to uint8), L = max_len rounded up to TILE. f16, and int8 groups that
    are not a multiple of TILE channels, keep rows.

    `attend` runs attention over what is stored without widening the whole cache: on the CPU in
    blocks of CPU_BLOCK positions through torch's flash kernel, merged by their log-sum-exp; on a
    GPU by scaled_dot_product_attention over the cache itself when it is stored in the query's
    dtype, otherwise blockwise (int8, or bf16 keys for fp16 queries). A decoder for few tokens can
    be plugged in (`decode`, set by the engine: the CPU's kernel).
    """

    def __init__(self, max_len: int, num_kv_heads: int, head_dim: int, format: str = "f32",
                 device: torch.device | str = "cpu"):
        if format not in KV_FORMATS:
            raise ValueError(f"KV cache format {format!r} is not one of {KV_FORMATS}")
        self.max_len, self.format = max_len, format
        self.group = kv_group(head_dim)
        self.tiled = (torch.device(device).type == "cpu" and format in _KERNEL_FORMS
                      and tiled(_KERNEL_FORMS[format], head_dim, self.group))
        length = -(-max_len // TILE) * TILE if self.tiled else max_len
        dtype = KV_DTYPES[format]
        if self.tiled:
            stored = torch.uint8 if format == "int8" else dtype
            self.keys = torch.zeros(num_kv_heads, length // TILE, head_dim * TILE, dtype=stored)
        else:
            self.keys = torch.zeros(num_kv_heads, length, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(num_kv_heads, length, head_dim, dtype=dtype, device=device)
        if format == "int8":
            scales = (num_kv_heads, length, head_dim // self.group)
            self.key_scales = torch.zeros(scales, dtype=torch.float32, device=device)
            self.value_scales = torch.zeros(scales, dtype=torch.float32, device=device)
        self.decode = None  # (cache, query, start, window) -> [T, H * Dh], or None to use `attend`'s own path
        self.writer = None  # (cache, keys, values, start) storing CPU rows at an int position, if plugged in

    def check_room(self, end: int) -> None:
        """Refuse a write that would reach past the cache's last position (`end` exclusive)."""
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")

    def write(self, keys: torch.Tensor, values: torch.Tensor, start: int | DevicePosition) -> None:
        """Store keys/values [Hkv, T, Dh] at positions start..start+T (or at a DevicePosition)."""
        at = start if isinstance(start, DevicePosition) else None
        end = at.span if at else start + keys.shape[1]
        self.check_room(end)

        if self.writer is not None and not at:
            self.writer(self, keys, values, start)
            return

        def put(target: torch.Tensor, rows: torch.Tensor) -> None:  # target[:, start:end] = rows
            if at:
                target.index_copy_(1, at.index, rows.to(target.dtype))
            else:
                target[:, start:end] = rows

        if self.format == "int8":
            (keys, key_scales), (values, value_scales) = _quantized(keys, self.group), _quantized(values, self.group)
            put(self.key_scales, key_scales)
            put(self.value_scales, value_scales)
            keys = keys + 128 if self.tiled else keys  # biased for the dot-product instructions
        put(self.values, values)
        if not self.tiled:
            put(self.keys, keys)
            return
        kv_heads, tokens, width = keys.shape
        if not at and tokens == 1:  # a decode step: its tile and lane as numbers, a plain copy
            (tile, lane), keys = divmod(start, TILE), keys[:, 0]
        else:  # index tensors put the tokens first: [T, Hkv, Dh]
            positions = at.index if at else torch.arange(start, end)
            tile, lane, keys = positions // TILE, positions % TILE, keys.transpose(0, 1)
        if self.format == "int8":  # [Hkv, Dh / 4, 4] per token into [Hkv, tiles, Dh / 4, TILE, 4]
            self.keys.view(kv_heads, -1, width // 4, TILE, 4)[:, tile, :, lane, :] = \
                keys.unflatten(-1, (-1, 4)).to(torch.uint8)
        else:  # [Hkv, Dh] per token into [Hkv, tiles, Dh, TILE]
            self.keys.view(kv_heads, -1, width, TILE)[:, tile, :, lane] = keys.to(self.keys.dtype)

    def read(self, begin: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions begin..end [Hkv, n, Dh] in `dtype` (views of rows stored so;
        tiled keys are copied out)."""
        keys, values = self._key_rows(begin, end), self.values[:, begin:end]
        if self.format != "int8":
            return keys.to(dtype), values.to(dtype)
        return tuple((codes.unflatten(-1, (-1, self.group)).float() * scales[:, begin:end, :, None])
                     .flatten(-2).to(dtype)  # scales stay fp32 until the product
                     for codes, scales in ((keys, self.key_scales), (values, self.value_scales)))

    def _key_rows(self, begin: int, end: int) -> torch.Tensor:
        """Keys of positions begin..end [Hkv, n, Dh] as stored (int8: codes, in any integer dtype)."""
        if not self.tiled:
            return self.keys[:, begin:end]
        kv_heads, width = self.keys.shape[0], self.keys.shape[2] // TILE
        first, last = begin // TILE, -(-end // TILE)
        if self.format == "int8":
            tiles = self.keys[:, first:last].view(kv_heads, last - first, width // 4, TILE, 4).permute(0, 1, 3, 2, 4)
        else:
            tiles = self.keys[:, first:last].view(kv_heads, last - first, width, TILE).transpose(2, 3)
        rows = tiles.reshape(kv_heads, (last - first) * TILE, width)[:, begin - first * TILE:end - first * TILE]
        # channels contiguous (torch's CPU flash kernel needs it; a single tile reshapes to a strided view)
        return rows.to(torch.int16) - 128 if self.format == "int8" else rows.contiguous()

    def attend(self, query: torch.Tensor, start: int | DevicePosition, window: int | None = None) -> torch.Tensor:
        """Causal attention of query [H, T, Dh] (positions start..start+T, already written) over
        positions 0..start+T (the last `window` of them, if given). Returns [T, H * Dh]."""
        if isinstance(start, DevicePosition):
            return self._attend_at(query, start, window)
        if self.decode is not None:
            out = self.decode(self, query, start, window)
            if out is not None:
                return out
        heads, tokens, width = query.shape
        if query.device.type != "cpu" and self.keys.dtype == query.dtype:  # the cache itself, no copy
            return _attend_whole(query, self.keys[:, :start + tokens], self.values[:, :start + tokens], start, window)
        return _attend_blocks(self, query, start, window)

    def _attend_at(self, query: torch.Tensor, at: DevicePosition, window: int | None) -> torch.Tensor:
        """One token at a device-held position: attention over the first `at.span` positions, with
        those after the token (and before its window) masked, so the same launches serve every
        position up to the span. Two batched matmuls over the cache itself when it is stored in the
        query's dtype (spread over the span by the GEMM, where a fused kernel with a mask would give
        each KV head one block), scores and softmax in fp32."""
        heads, tokens, width = query.shape
        keys, values = self.read(0, at.span, query.dtype)
        kv_heads = keys.shape[0]
        rows = query.reshape(kv_heads, heads // kv_heads * tokens, width)  # row i * T + t: head g * rep + i
        scores = _fp32_bmm(rows, keys.transpose(1, 2)) * width**-0.5  # [Hkv, rows, span]
        visible = _visible(at.index, torch.arange(at.span, device=query.device), window)  # [1, span]
        probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)
        out = _fp32_bmm(probs.to(values.dtype), values)  # [Hkv, rows, Dh]
        return out.to(query.dtype).reshape(heads, tokens, width).transpose(0, 1).reshape(tokens, -1)

    def reset(self) -> None:
        pass  # positions past `start` are never read, so stale entries need no clearing

    def snapshot(self) -> None:
        return None  # keys and values are written by position: rolling back needs no copy

    def restore(self, state: None) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, *self.scales))

    @property
    def scales(self) -> tuple[torch.Tensor, ...]:
        return (self.key_scales, self.value_scales) if self.format == "int8" else ()


def kv_bytes_per_position(num_kv_heads: int, head_dim: int, format: str) -> float:
    """Bytes one position of one layer's keys and values takes in `format`."""
    if format == "int8":
        return 2 * num_kv_heads * (head_dim + 4 * head_dim // kv_group(head_dim))
    return 2 * num_kv_heads * head_dim * KV_DTYPES[format].itemsize


def _quantized(rows: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [Hkv, T, Dh] -> (int8 codes as int16 [Hkv, T, Dh], fp32 scales [Hkv, T, Dh / group]):
    symmetric, scale = max |x| / 127 per group (`kernels.attention.quantize_rows`)."""
    grouped = rows.float().unflatten(-1, (-1, group))
    scale = grouped.abs().amax(-1) / 127
    codes = (grouped / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).round_().clamp_(-127, 127)
    return codes.flatten(-2).to(torch.int16), scale


def _visible(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, n] whether the query at each position of `queries` [T] sees each key position of `keys` [n]."""
    visible = keys[None, :] <= queries[:, None]
    if window is not None:
        visible &= keys[None, :] > queries[:, None] - window
    return visible


_BMM_OUT_DTYPE = [True]  # whether this torch's CUDA bmm takes out_dtype (found out on first use)


def _fp32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) with fp32 results: half-precision inputs on CUDA accumulate and write fp32
    in the GEMM itself; elsewhere (the CPU stand-in, fp32, an older torch) widened first."""
    if a.dtype != torch.float32 and a.device.type == "cuda" and _BMM_OUT_DTYPE[0]:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):
            _BMM_OUT_DTYPE[0] = False
    return torch.bmm(a.float(), b.float())


def _flash_takes(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether CUDA's flash kernel serves a causal, grouped-head problem of these tensors (else
    SDPA's fallback for a lower-right bias would materialise the scores of every head)."""
    if query.device.type != "cuda":
        return True  # no flash kernel to miss: the bias is materialised as a [T, S] mask, no more
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    try:
        return can_use_flash_attention(SDPAParams(query, keys, values, None, 0.0, True, True))
    except (TypeError, RuntimeError):
        return False


def _attend_whole(query, keys, values, start: int, window: int | None) -> torch.Tensor:
    """scaled_dot_product_attention over the cached views (a GPU's fused kernels; the cache in the
    query's dtype). Several half-precision tokens: a causal bias aligned to the last key (lower
    right) with the heads grouped, which the flash kernel takes without any mask or repeated keys.
    Otherwise the query heads sharing a KV head are rows of one problem, so the fused kernels that
    take a mask but not grouped heads still apply, and nothing is repeated per head."""
    heads, tokens, width = query.shape
    kv_heads = keys.shape[0]
    if tokens > 1 and window is None and query.dtype in (torch.float16, torch.bfloat16) \
            and _flash_takes(query[None], keys[None], values[None]):
        bias = causal_lower_right(tokens, keys.shape[1])
        out = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=bias, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(tokens, -1)
    rows = query.reshape(kv_heads, heads // kv_heads * tokens, width)[None]  # row i * T + t: head g * rep + i
    mask = None
    if tokens > 1 or window is not None:
        mask = _visible(torch.arange(start, start + tokens, device=query.device),
                        torch.arange(keys.shape[1], device=query.device), window).repeat(heads // kv_heads, 1)
    out = F.scaled_dot_product_attention(rows, keys[None], values[None], attn_mask=mask)
    return out[0].reshape(heads, tokens, width).transpose(0, 1).reshape(tokens, -1)


def _attend_blocks(cache: KVCache, query: torch.Tensor, start: int, window: int | None) -> torch.Tensor:
    """Attention block by block of positions, each widened to the query's dtype on its own, merged
    by log-sum-exp as they come. The query heads sharing a KV head are rows of one problem:
    [Hkv, rep * T, Dh]."""
    heads, tokens, width = query.shape
    kv_heads = cache.keys.shape[0]
    per_kv_head = heads // kv_heads
    rows = query.reshape(kv_heads, per_kv_head * tokens, width)[None]  # row i * T + t: head g * rep + i
    positions = torch.arange(start, start + tokens, device=query.device)
    end = start + tokens
    first = max(0, start - window + 1) if window is not None else 0  # what no query sees
    on_cpu = query.device.type == "cpu"
    if on_cpu:
        block = CPU_BLOCK
    else:
        widened = 2 * kv_heads * width * query.element_size()
        block = max(1, min(DEVICE_SCORES // (kv_heads * rows.shape[2]), DEVICE_WIDENED // widened))
    out = total = None  # the merged output so far [1, Hkv, rows, Dh] fp32 and its log-sum-exp [1, Hkv, rows]
    # the prefix in blocks, then the new tokens' own positions as one block: only that one needs a
    # causal mask ([rows, T]; a sliding window may mask the prefix's first blocks too)
    bounds = [(begin, min(start, begin + block)) for begin in range(first, start, block)]
    for begin, stop in bounds + [(max(start, first), end)]:
        keys, values = cache.read(begin, stop, query.dtype)
        mask = None
        if stop > start + 1 or (window is not None and begin <= end - 1 - window):  # some key hidden from some query
            visible = _visible(positions, torch.arange(begin, stop, device=query.device), window)
            mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device) \
                .masked_fill_(~visible, float("-inf")).repeat(per_kv_head, 1)
        part, lse = _block(rows, keys[None], values[None], mask, width**-0.5, on_cpu)
        part, lse = part.float(), lse.float()
        # every row sees a key of the block unless a sliding window ends before it (decided from
        # positions on the host: no device sync); a row that sees nothing has no output, weight 0
        if window is not None and stop - 1 <= end - 1 - window:
            seen = visible.any(-1).repeat(per_kv_head)  # [rows]
            part = part.masked_fill(~seen[:, None], 0)
            lse = lse.masked_fill(~seen, float("-inf"))
        if out is None:
            out, total = part, lse
            continue
        merged = torch.logaddexp(total, lse)  # -inf for a row no block so far let see anything:
        weights = (torch.exp(total - merged).nan_to_num_(0.0), torch.exp(lse - merged).nan_to_num_(0.0))
        out = out * weights[0][..., None] + part * weights[1][..., None]  # -inf - -inf is NaN, its weight 0
        total = merged
    return out.to(query.dtype)[0].reshape(heads, tokens, width).transpose(0, 1).reshape(tokens, -1)


def _block(rows, keys, values, mask, scale: float, on_cpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of rows [1, Hkv, R, Dh] over one block [1, Hkv, n, Dh]: (out, log-sum-exp [1, Hkv, R])."""
    if on_cpu:  # torch's flash kernel: never the [R, n] score matrix
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(rows, keys, values, attn_mask=mask,
                                                                           scale=scale)
    scores = (rows.float() * scale) @ keys.float().transpose(-1, -2)  # fp32: no bf16 rounding or fp16 overflow
    if mask is not None:
        scores += mask
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]).to(values.dtype) @ values, lse


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
