"""Safetensors checkpoints: tensors by name, read lazily, one at a time.

A checkpoint directory holds either `model.safetensors.index.json` plus the shards it names, or
one or more `*.safetensors` files. Opening a checkpoint reads only the shard headers; a tensor's
bytes are read when its `LazyTensor.load()` is called, so no more than one tensor (or one stack of
expert tensors) is in RAM on its way into the model.

FP8 checkpoints (e4m3 weights with a `<name>_scale_inv` tensor of one scale per block of
`fp8_block_size` = (rows, cols), 128x128 in the Qwen releases) are dequantised on read to bf16:
    weight[r, c] = fp8[r, c] * scale_inv[r // rows, c // cols]
The scale tensors are not listed as tensors of their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from offload.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
FP8_SCALE_SUFFIX = "_scale_inv"

# what a model's weights may be stored as (safetensors dtype code -> torch dtype)
WEIGHT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}


def _require_regular(path: Path) -> None:
    """Only regular files are opened (a FIFO or a device would block or stream forever)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; a checkpoint is made of plain files")


def require_finite(tensor: torch.Tensor, where: str) -> None:
    """Refuse weights holding NaN or infinity (they load silently and generate garbage). One
    reduction pass: the smallest and largest values are finite only if every value is (NaN
    propagates through both), ~90x faster than an elementwise isfinite on a bf16 lm_head."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        lowest, highest = torch.aminmax(tensor)
        finite = bool(lowest.isfinite() & highest.isfinite())
    else:  # FP8 and the like: no min/max kernel on the CPU
        finite = bool(torch.isfinite(tensor.float()).all())
    if not finite:
        raise CheckpointError(f"{where}: holds NaN or infinite values; the file is corrupt: download it again")


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose shape and dtype are known and whose data is read on `load()`; `rows(start,
    stop)` reads a slice of its first dimension (e.g. a few experts of a stacked [E, ...] tensor),
    only those bytes where the source allows."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str  # "<file>: <tensor name>", for error messages
    read: Callable[[], torch.Tensor]
    read_rows: Callable[[int, int], torch.Tensor] | None = None
    row_where: Callable[[int], str] | None = None  # where one row comes from, when the rows are tensors of their own

    def load(self) -> torch.Tensor:
        return self.read()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.read_rows(start, stop) if self.read_rows is not None else self.read()[start:stop]

    def where_of(self, row: int) -> str:
        return self.row_where(row) if self.row_where is not None else self.where

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def lazy_stack(parts: list[LazyTensor], where: str) -> LazyTensor:
    """Stack equally shaped lazy tensors along a new leading dim, read in one pass."""
    first = parts[0]
    for part in parts[1:]:
        if part.shape != first.shape:
            raise CheckpointError(f"{part.where}: shape {list(part.shape)} differs from "
                                  f"{list(first.shape)} of {first.where}; the checkpoint is inconsistent")

    def rows(start: int, stop: int) -> torch.Tensor:
        chosen = parts[start:stop]
        out = torch.empty((len(chosen), *first.shape), dtype=first.dtype)
        for i, part in enumerate(chosen):
            out[i] = part.load()
        return out

    return LazyTensor((len(parts), *first.shape), first.dtype, where, lambda: rows(0, len(parts)), rows,
                      lambda row: parts[row].where)


def lazy_cat(parts: list[LazyTensor], where: str) -> LazyTensor:
    """Concatenate lazy tensors along dim 0."""
    rows = sum(part.shape[0] for part in parts)
    shape = (rows, *parts[0].shape[1:])
    return LazyTensor(shape, parts[0].dtype, where, lambda: torch.cat([p.load() for p in parts]))


def lazy_rearrange(parts: list[LazyTensor], shape: tuple[int, ...], rearrange: Callable[..., torch.Tensor],
                   where: str) -> LazyTensor:
    """`rearrange(*loaded parts)` when read: a tensor of `shape` made from the parts' values (e.g. one
    projection's rows assembled from a checkpoint's several)."""
    return LazyTensor(shape, parts[0].dtype, where, lambda: rearrange(*(p.load() for p in parts)))


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, by name."""

    def __init__(self, model_dir: str | Path, fp8_block_size: tuple[int, int] | None = None):
        self.model_dir = Path(model_dir)
        self.fp8_block_size = fp8_block_size or (128, 128)
        self._handles: dict[Path, object] = {}  # shard path -> open safetensors handle
        self._files = self._weight_map()  # tensor name -> shard path
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype code)
        for path in sorted(set(self._files.values())):
            handle = self._open(path)
            for name in handle.keys():
                piece = handle.get_slice(name)
                self._headers[name] = (tuple(piece.get_shape()), piece.get_dtype())
        for name, path in self._files.items():
            if name not in self._headers:
                raise CheckpointError(f"{path}: does not hold tensor {name} that {INDEX_FILE} places "
                                      "there; download the checkpoint again")

    def _weight_map(self) -> dict[str, Path]:
        index = self.model_dir / INDEX_FILE
        if index.exists():
            _require_regular(index)
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); download "
                                      "it again") from None
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) and isinstance(shard, str)
                                                           for name, shard in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names; "
                                      "download it again")
            files = {name: self._shard(shard, index) for name, shard in weight_map.items()}
            for name, path in files.items():
                if not path.exists():
                    raise CheckpointError(f"{path}: shard missing (it holds {name}, says {INDEX_FILE}); "
                                          "download it again")
                _require_regular(path)
            return files
        shards = sorted(self.model_dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.model_dir}: no *.safetensors weights here; download the "
                                  "model's safetensors files next to its config.json")
        files: dict[str, Path] = {}
        for path in shards:
            _require_regular(path)
            for name in self._open(path).keys():
                files[name] = path
        return files

    def _shard(self, name: str, index: Path) -> Path:
        """An index's shard name as a path in the model folder: plain relative names only (a
        symlink there may point anywhere, as in the Hugging Face cache; `..` or an absolute
        name may not)."""
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"{index}: shard name {name!r} points outside the model folder; only names "
                                  "of files in it are allowed")
        return self.model_dir / name

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                reason = " ".join(str(e).removeprefix("Error while deserializing header: ").split())[:200]
                raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); it may be "
                                      "truncated or corrupt: download it again") from None
            self._handles[path] = handle
        return handle

    def release(self) -> None:
        """Close the open files; their memory maps (and the page-cache pages they keep counted
        in this process's RSS) go with them. Later reads reopen what they need."""
        self._handles.clear()

    def names(self) -> list[str]:
        """Tensor names, without the FP8 scale tensors."""
        return [name for name in self._files if not self._is_fp8_scale(name)]

    def __contains__(self, name: str) -> bool:
        return name in self._files and not self._is_fp8_scale(name)

    def _is_fp8_scale(self, name: str) -> bool:
        return name.endswith(FP8_SCALE_SUFFIX) and name.removesuffix(FP8_SCALE_SUFFIX) in self._files

    def where(self, name: str) -> str:
        return f"{self._files[name].name}: {name}"

    def lazy(self, name: str) -> LazyTensor:
        if name not in self:
            raise CheckpointError(f"{self.model_dir}: tensor {name} is missing from the checkpoint; "
                                  "download the model again")
        shape, code = self._headers[name]
        if code not in WEIGHT_DTYPES:
            raise CheckpointError(f"{self.where(name)}: dtype {code} is not a weight type ({', '.join(WEIGHT_DTYPES)}); "
                                  "the file is not a checkpoint of this model")
        dtype = WEIGHT_DTYPES[code]
        if dtype == torch.float8_e4m3fn:
            dtype = torch.bfloat16
        return LazyTensor(shape, dtype, self.where(name), lambda: self.read(name),
                          lambda start, stop: self.read_rows(name, start, stop))

    def lazy_all(self) -> dict[str, LazyTensor]:
        return {name: self.lazy(name) for name in self.names()}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the tensor `name` along its first dimension (e.g. some experts of
        a stacked [E, ...] tensor), reading only those bytes. Not for FP8 weights."""
        if self._headers[name][1] == "F8_E4M3":
            raise CheckpointError(f"{self.where(name)}: FP8 weights stacked over experts are not supported; use the "
                                  "model's bf16 release")
        try:
            return self._open(self._files[name]).get_slice(name)[start:stop]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.where(name)}: unreadable ({e}); download the file again") from None

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype (FP8 weights: dequantised to bf16)."""
        path = self._files[name]
        try:
            tensor = self._open(path).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.where(name)}: unreadable ({e}); download the file again") from None
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = name + FP8_SCALE_SUFFIX
            if scale_name not in self._files:
                raise CheckpointError(f"{self.where(name)}: FP8 weight without its {scale_name}; "
                                      "download the checkpoint again")
            scale = self._open(self._files[scale_name]).get_tensor(scale_name)
            tensor = dequantize_fp8(tensor, scale, self.fp8_block_size, self.where(name))
        return tensor


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int],
                   where: str = "fp8 weight") -> torch.Tensor:
    """FP8 e4m3 `weight` [rows, cols] with one fp32 scale per block -> bf16 [rows, cols].

    `scale_inv` is [ceil(rows / block_rows), ceil(cols / block_cols)]; edge blocks may be partial.
    """
    if weight.dim() != 2:
        raise CheckpointError(f"{where}: an FP8 weight of {weight.dim()} dimensions (experts stacked in one "
                              "tensor) is not supported; use the model's bf16 release")
    block_rows, block_cols = block_size
    rows, cols = weight.shape
    expected = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"{where}: FP8 scale has shape {list(scale_inv.shape)}, expected "
                              f"{list(expected)} for blocks of {block_rows}x{block_cols}")
    # blocks side by side ([row blocks, rows, col blocks, cols], edge blocks padded): each scale
    # multiplies its block by broadcasting, written straight to bf16 (no full-size scale tensor)
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % block_cols, 0, -rows % block_rows))
    out = torch.empty(padded.shape, dtype=torch.bfloat16)
    blocks = (expected[0], block_rows, expected[1], block_cols)
    torch.mul(padded.view(blocks), scale_inv.float()[:, None, :, None], out=out.view(blocks))
    return out[:rows, :cols].contiguous() if out.shape != (rows, cols) else out
