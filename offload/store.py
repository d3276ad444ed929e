"""The quantised expert store: each MoE layer's routed experts as int4, one file per layer.

Built once from a checkpoint (`build_store`, `offload quantize`) and opened by mmap
(`ExpertStore`), handing the kernels zero-copy arrays.

File `layer-NNN.int4`:
    bytes 0..8      magic b"OFFLDI4\\0"
    bytes 8..16     little-endian u64: length H of the JSON header that follows
    bytes 16..16+H  JSON: store version, int4 format (group size, block rows, scale dtype),
                    source fingerprint, layer, and for each array its dtype, shape and offset
    then            the arrays (gate_up packed, gate_up scales, down packed, down scales), each
                    starting at a 4096-byte boundary, in `kernels.int4` layout
`store.json` lists the layers and the fingerprint; it is written last, so a store without it is
incomplete. Every file is written to a temporary name, flushed, then renamed: a file under its
final name is always whole. An interrupted build resumes: layers already written for the same
fingerprint are kept, the rest are built. A store of another fingerprint, version or format is
rebuilt, never read.

The fingerprint covers config.json and, for every weight file, its name, size, modification
time and safetensors header (tensor names, dtypes, shapes, offsets); hashing 160 GB of weights
on every start would cost more than it protects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock, Timeout

from offload.kernels import int4, int6, int8
from offload.checkpoint import Checkpoint, LazyTensor, require_finite
from offload.config import ModelArgs
from offload.errors import OffloadError
from offload.models import ARCHITECTURES
from offload.models.hub import checkpoint_name
from offload.pages import map_in
from offload.paths import cache_root

MAGIC = b"OFFLDI4\0"
VERSION = 1
ALIGN = 4096
QUANTIZE_CHUNK = 16  # experts read, converted and quantised at a time (bounds peak RAM)
_ARRAYS = ("gate_up_packed", "gate_up_scales", "down_packed", "down_scales")


class StoreError(OffloadError):
    """The expert store cannot be built or read."""


def fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    digest.update((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(min(length, 1 << 26)))
    return digest.hexdigest()[:32]


def format_description() -> dict:
    return {"name": "int4", "group_size": int4.GROUP, "block_rows": int4.BLOCK, "scale_dtype": "bfloat16"}


def default_store_dir(model_dir: Path) -> Path:
    return cache_root() / "stores" / f"{Path(model_dir).resolve().name}-int4"


@dataclass
class LayerExperts:
    gate_up: int4.Int4Weights  # [E, 2I, D]
    down: int4.Int4Weights  # [E, D, I]


def _moe_layers(args: ModelArgs) -> list[int]:
    return [layer for layer in range(args.num_hidden_layers) if args.is_moe_layer(layer)]


def _layer_path(store_dir: Path, layer: int) -> Path:
    return store_dir / f"layer-{layer:03d}.int4"


def _read_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            if f.read(8) != MAGIC:
                return None
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None


def _layer_is_current(path: Path, source: str, layer: int) -> bool:
    """The layer file is whole and of this checkpoint: its header matches, it is a regular file,
    and its size is what the header's arrays need (a truncated or padded file is rebuilt)."""
    header = _read_header(path)
    return (header is not None and header.get("version") == VERSION and header.get("format") == format_description()
            and header.get("fingerprint") == source and header.get("layer") == layer
            and path.is_file() and path.stat().st_size == _file_size(header))


def _file_size(header: dict) -> int:
    """The bytes a layer file holds: up to the end of its last array, rounded up to ALIGN."""
    try:
        ends = [spec["offset"] + int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
                for spec in header["arrays"].values()]
    except (KeyError, TypeError, ValueError):
        return -1
    return -(-max(ends) // ALIGN) * ALIGN


def _digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """A checksum of each array's bytes (BLAKE2b-128), written at build time for `verify_store`."""
    digests = {}
    for name, array in arrays.items():
        hasher = hashlib.blake2b(digest_size=16)
        flat = array.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, 1 << 26):
            hasher.update(flat[start:start + (1 << 26)])
        digests[name] = hasher.hexdigest()
    return digests


def verify_store(store_dir: Path, model_dir: Path, args: ModelArgs,
                 progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Problems found in a store, one line each (none: it is whole and every layer's arrays match
    the checksums written when it was built)."""
    if not store_is_current(store_dir, model_dir, args):
        return [f"{store_dir}: incomplete, damaged or of another checkpoint; `offload quantize` rebuilds it"]
    problems = []
    layers = _moe_layers(args)
    for done, layer in enumerate(layers):
        path = _layer_path(store_dir, layer)
        header = _read_header(path)
        arrays = {name: np.memmap(path, dtype=spec["dtype"], mode="r", offset=spec["offset"],
                                  shape=tuple(spec["shape"])) for name, spec in header["arrays"].items()}
        expected = header.get("checksums")
        if expected is None:
            problems.append(f"{path.name}: has no checksums (built by an older offload); rebuild the store")
        else:
            damaged = [name for name, digest in _digests(arrays).items() if expected.get(name) != digest]
            if damaged:
                problems.append(f"{path.name}: {', '.join(damaged)} differ from their checksums: the file is damaged; "
                                "delete it and run `offload quantize` to rebuild it")
        if progress:
            progress(done + 1, len(layers))
    return problems


def store_is_current(store_dir: Path, model_dir: Path, args: ModelArgs) -> bool:
    manifest = store_dir / "store.json"
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
    except ValueError:
        return False
    source = fingerprint(model_dir)
    return (meta.get("version") == VERSION and meta.get("format") == format_description()
            and meta.get("fingerprint") == source and meta.get("layers") == _moe_layers(args)
            and all(_layer_is_current(_layer_path(store_dir, layer), source, layer) for layer in meta["layers"]))


BUILD_LOCK = "build.lock"  # in the store: held while a process builds it


def build_store(model_dir: str | Path, args: ModelArgs, store_dir: str | Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantise the routed experts of `model_dir` into `store_dir`; returns the store's path.

    Reads QUANTIZE_CHUNK experts at a time, so peak RAM is a few experts plus one layer's output
    buffers, whatever the model's size. `progress(done_bytes, total_bytes)` after each chunk.
    """
    model_dir = Path(model_dir)
    store_dir = Path(store_dir) if store_dir else default_store_dir(model_dir)
    layers = _moe_layers(args)
    if not layers:
        raise StoreError(f"{model_dir}: no MoE layers, nothing to quantise")
    for dim, name in ((args.hidden_size, "hidden_size"), (args.moe_intermediate_size, "moe_intermediate_size")):
        if dim % int4.GROUP:
            raise StoreError(f"{name} {dim} is not a multiple of {int4.GROUP}, which int4 experts need; "
                             "run in the checkpoint's precision (--quant none, or quant=None)")
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        # one builder at a time: another process building the same store (two first runs of a
        # model at once) is waited for, and its layers are then found current, not written again
        lock = FileLock(store_dir / BUILD_LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"{store_dir}: another process is building it; waiting for it ...", file=sys.stderr)
            lock.acquire()
        try:
            return _build(model_dir, args, store_dir, layers, progress)
        finally:
            lock.release()
    except OSError as e:
        raise StoreError(f"{store_dir}: cannot write the expert store ({e.strerror or e}); choose another "
                         "place with --out (offload quantize) or OFFLOAD_CACHE") from None


def _build(model_dir: Path, args: ModelArgs, store_dir: Path, layers: list[int],
           progress: Callable[[int, int], None] | None) -> Path:
    source = fingerprint(model_dir)
    manifest = store_dir / "store.json"
    if manifest.exists():
        manifest.unlink()  # the store is incomplete until the manifest is rewritten
    for leftover in store_dir.glob("*.tmp"):
        leftover.unlink()
    checkpoint = Checkpoint(model_dir, args.fp8_block_size)
    # every tensor's dtype a weight type (headers only), under our names: the experts stacked [E, ...]
    weights = ARCHITECTURES[args.model_type].sanitize(checkpoint.lazy_all(), args)
    experts, hidden, intermediate = args.num_experts, args.hidden_size, args.moe_intermediate_size
    layer_bytes = experts * 3 * hidden * intermediate * int4.FORMAT.bits_per_weight / 8
    total = int(layer_bytes * len(layers))
    done = 0
    for layer in layers:
        path = _layer_path(store_dir, layer)
        if not _layer_is_current(path, source, layer):
            _write_layer(path, checkpoint, weights, layer, args, source, lambda n: progress and progress(done + n, total))
        done += int(layer_bytes)
        if progress:
            progress(done, total)
    meta = {"version": VERSION, "format": format_description(), "fingerprint": source, "layers": layers,
            "source": str(model_dir.resolve())}
    temp = manifest.with_suffix(".json.tmp")
    temp.write_text(json.dumps(meta, indent=2))
    os.replace(temp, manifest)
    return store_dir


def _write_layer(path: Path, checkpoint: Checkpoint, weights: dict[str, LazyTensor], layer: int, args: ModelArgs,
                 source: str, progress: Callable[[int], None]) -> None:
    experts, hidden, intermediate = args.num_experts, args.hidden_size, args.moe_intermediate_size
    shapes = {"gate_up_packed": ((experts, 2 * intermediate // int4.BLOCK, hidden * 16), "uint8"),
              "gate_up_scales": ((experts, 2 * intermediate // int4.BLOCK, hidden), "uint16"),
              "down_packed": ((experts, hidden // int4.BLOCK, intermediate * 16), "uint8"),
              "down_scales": ((experts, hidden // int4.BLOCK, intermediate), "uint16")}
    header = {"version": VERSION, "format": format_description(), "fingerprint": source, "layer": layer,
              "arrays": {}}
    offset = ALIGN  # the header fits the first page for any realistic model
    for name, (shape, dtype) in shapes.items():
        header["arrays"][name] = {"shape": list(shape), "dtype": dtype, "offset": offset}
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    encoded = json.dumps(header).encode()
    if 16 + len(encoded) > ALIGN:
        raise StoreError(f"store header of layer {layer} does not fit {ALIGN} bytes")
    temp = path.with_suffix(".int4.tmp")
    try:
        _fill_layer(temp, path, header, encoded, offset, checkpoint, weights, layer, args, progress)
    except BaseException:
        temp.unlink(missing_ok=True)  # a failed or interrupted layer leaves nothing behind
        raise


def _fill_layer(temp: Path, path: Path, header: dict, encoded: bytes, offset: int, checkpoint: Checkpoint,
                weights: dict[str, LazyTensor], layer: int, args: ModelArgs, progress: Callable[[int], None]) -> None:
    experts, hidden, intermediate = args.num_experts, args.hidden_size, args.moe_intermediate_size
    with open(temp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(offset)
    arrays = {name: np.memmap(temp, dtype=spec["dtype"], mode="r+", offset=spec["offset"], shape=tuple(spec["shape"]))
              for name, spec in header["arrays"].items()}
    # [E, 2I, D] and [E, D, I]: stacked in the checkpoint (as transformers 5 writes them) or by `sanitize`
    # from one tensor per expert; either way only a chunk's bytes are read at a time
    prefix = f"layers.{layer}.mlp.experts"
    for name in (f"{prefix}.gate_up_proj", f"{prefix}.down_proj"):
        if name not in weights:
            raise StoreError(f"{checkpoint.model_dir}: tensor {checkpoint_name(name, weights)} (layer {layer}'s "
                             "routed experts, one per expert or stacked) is missing from the checkpoint; download it again")
    gate_up, down = weights[f"{prefix}.gate_up_proj"], weights[f"{prefix}.down_proj"]
    done = 0
    for first in range(0, experts, QUANTIZE_CHUNK):
        chunk = range(first, min(first + QUANTIZE_CHUNK, experts))
        quantized = int4.quantize(_rows_float32(gate_up, chunk))
        arrays["gate_up_packed"][chunk.start:chunk.stop] = quantized.packed
        arrays["gate_up_scales"][chunk.start:chunk.stop] = quantized.scales
        quantized = int4.quantize(_rows_float32(down, chunk))
        arrays["down_packed"][chunk.start:chunk.stop] = quantized.packed
        arrays["down_scales"][chunk.start:chunk.stop] = quantized.scales
        done += len(chunk) * 3 * hidden * intermediate * int4.FORMAT.bits_per_weight / 8
        progress(int(done))
    checkpoint.release()  # unmap this layer's source pages
    for array in arrays.values():
        array.flush()
    header["checksums"] = _digests(arrays)
    del arrays
    encoded = json.dumps(header).encode()
    if 16 + len(encoded) > ALIGN:
        raise StoreError(f"store header of layer {layer} does not fit {ALIGN} bytes")
    with open(temp, "rb+") as f:
        f.write(MAGIC + struct.pack("<Q", len(encoded)) + encoded)  # the header again, with the checksums
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _rows_float32(tensor: LazyTensor, rows: range) -> np.ndarray:
    """Experts `rows` of a stacked tensor as fp32; one holding NaN or infinity refused by its name."""
    chunk = tensor.rows(rows.start, rows.stop)
    for i, expert in enumerate(chunk):
        require_finite(expert, tensor.where_of(rows.start + i))
    return chunk.to(torch.float32).numpy()


class ExpertStore:
    """An opened store: per MoE layer, the int4 experts as read-only views of its memory-mapped file."""

    def __init__(self, store_dir: Path, args: ModelArgs):
        self.path = store_dir
        self.layers: dict[int, LayerExperts] = {}
        experts, hidden, intermediate = args.num_experts, args.hidden_size, args.moe_intermediate_size
        maps = []
        for layer in _moe_layers(args):
            path = _layer_path(store_dir, layer)
            header = _read_header(path)
            try:
                whole = np.memmap(path, dtype=np.uint8, mode="r")  # one map a file: 2 MiB pages span its arrays
                arrays = {name: _stored_array(whole, spec) for name, spec in header["arrays"].items()}
                self.layers[layer] = LayerExperts(
                    int4.Int4Weights(arrays["gate_up_packed"], arrays["gate_up_scales"],
                                     (experts, 2 * intermediate, hidden)),
                    int4.Int4Weights(arrays["down_packed"], arrays["down_scales"], (experts, hidden, intermediate)))
            except (OSError, ValueError, TypeError, KeyError) as error:
                raise StoreError(f"{path}: unreadable ({error}); delete it and run `offload quantize` to rebuild "
                                 "it") from None
            maps.append(whole)
        # read ahead, as llama.cpp does with its mapped weights: else each expert a token first
        # picks is read from disk on that token, and the first hundreds of tokens after a load
        # decode at the disk's speed
        map_in(maps, "the expert store")

    @property
    def nbytes(self) -> int:
        return sum(layer.gate_up.nbytes + layer.down.nbytes for layer in self.layers.values())


def _stored_array(whole: np.ndarray, spec: dict) -> np.ndarray:
    """The array a layer header's entry describes, as a view of its file's map."""
    offset, shape, dtype = spec["offset"], tuple(spec["shape"]), np.dtype(spec["dtype"])
    if dtype not in (np.uint8, np.uint16) or not all(type(n) is int and n >= 0 for n in (offset, *shape)):
        raise ValueError(f"array {shape} at byte {offset}: not a place in the file")
    end = offset + math.prod(shape) * dtype.itemsize
    if offset % dtype.itemsize or end > whole.size:
        raise ValueError(f"array {shape} at byte {offset} lies outside the file's {whole.size} bytes")
    return whole[offset:end].view(dtype).reshape(shape)


def open_store(model_dir: str | Path, args: ModelArgs, store_dir: str | Path | None = None,
               progress: Callable[[int, int], None] | None = None,
               announce: Callable[[str], None] | None = None) -> ExpertStore:
    """Open the current store for `model_dir`, building (or finishing) it first when needed."""
    model_dir = Path(model_dir)
    store_dir = Path(store_dir) if store_dir else default_store_dir(model_dir)
    if not store_is_current(store_dir, model_dir, args):
        if announce:
            announce(f"building the int4 expert store for {model_dir} in {store_dir} (once) ...")
        build_store(model_dir, args, store_dir, progress)
    return ExpertStore(store_dir, args)


# --- the dense matrices a CPU plan quantises, kept beside the experts --------------------------------

DENSE_MAGIC = b"OFFLDD1\0"
DENSE_VERSION = 1  # bump when a dense format's layout or its quantiser's numbers change: old files are then rebuilt
DENSE_WEIGHTS = {"int4": int4.Int4Weights, "int6": int6.Int6Weights, "int8": int8.Int8Weights}
DENSE_HEADER_LIMIT = 16 * 2**20  # a longer header is not one of ours
DENSE_ALIGN = 64  # each array starts on a cache line


@dataclass(frozen=True)
class DenseLayer:
    """What a stored layer must be: its format, [out, in], and whether it has a bias."""
    format: str
    out_features: int
    in_features: int
    bias: bool


class DenseStore:
    """The dense matrices a plan quantises for the CPU (`offload.placement.quantized_layers`),
    kept in the store directory as one file per format (`dense-int4.bin`, ...), so that a later
    load maps them instead of reading their float weights from the checkpoint and quantising them
    again (most of a load's time). A layer is taken from a file only if the file is whole, of this
    checkpoint (its fingerprint) and of this DENSE_VERSION, and holds the layer with its shape and
    bias; the rest are quantised now and the format's file written again (`save`: a temp file,
    then rename). Memory-mapped read-only, like the experts; a layer joined with others
    (`QuantizedLinear.joined`) is copied into the joined one."""

    def __init__(self, store_dir: Path, model_dir: Path, wanted: dict[str, DenseLayer]):
        self.store_dir, self.wanted = Path(store_dir), wanted
        self.source = fingerprint(Path(model_dir))
        self.stored: dict[str, tuple] = {}  # name -> (weights, float32 bias or None), from the files
        self.made: dict[str, object] = {}  # name -> QuantizedLinear quantised in this load
        for fmt in sorted({layer.format for layer in wanted.values()}):
            self.stored.update(self._read(fmt, {name: layer for name, layer in wanted.items() if layer.format == fmt}))

    @property
    def loaded_names(self) -> set[str]:
        """The parameters the checkpoint need not give: the stored layers' weights and biases."""
        return {f"{name}.{leaf}" for name in self.stored for leaf in ("weight", "bias")}

    def get(self, name: str) -> tuple | None:
        return self.stored.get(name)

    def put(self, name: str, layer) -> None:
        self.made[name] = layer

    def save(self) -> None:
        """Write each format some of whose layers were quantised now (with those read from its
        file); where the store cannot be written, say so: the next load quantises them again."""
        for fmt in sorted({self.wanted[name].format for name in self.made}):
            layers = {name: _Stored(*self.stored[name]) for name, layer in self.wanted.items()
                      if layer.format == fmt and name in self.stored}
            layers.update({name: layer for name, layer in self.made.items() if self.wanted[name].format == fmt})
            try:
                self._write(fmt, layers)
            except (OSError, MemoryError) as error:
                print(f"note: the quantised dense layers could not be kept in {self.store_dir} ({error}); "
                      "the next load quantises them again", file=sys.stderr)

    def _path(self, fmt: str) -> Path:
        return self.store_dir / f"dense-{fmt}.bin"

    def _read(self, fmt: str, wanted: dict[str, DenseLayer]) -> dict[str, tuple]:
        """The layers of `wanted` that the format's file holds as they must be; {} when the file is
        missing, not ours, torn, or of another checkpoint or version. Never reads outside it."""
        try:
            fd = os.open(self._path(fmt), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO: no wait
        except OSError:
            return {}
        with os.fdopen(fd, "rb") as f:
            try:
                info = os.fstat(fd)
                size = info.st_size
                if not stat.S_ISREG(info.st_mode) or f.read(8) != DENSE_MAGIC:
                    return {}
                (length,) = struct.unpack("<Q", f.read(8))
                if length > min(DENSE_HEADER_LIMIT, size):
                    return {}
                header = json.loads(f.read(length))
                start = -(-(16 + length) // ALIGN) * ALIGN
                if not isinstance(header, dict) or header.get("version") != DENSE_VERSION \
                        or header.get("format") != _dense_format(fmt) or header.get("fingerprint") != self.source \
                        or size != start + header.get("bytes", -1) or not isinstance(header.get("matrices"), dict):
                    return {}
                whole = np.memmap(f, dtype=np.uint8, mode="r")  # the file read above, whatever is renamed over it
                with contextlib.suppress(OSError):  # handed a descriptor, np.memmap names no file: name it
                    named = os.stat(self._path(fmt))  # for map_in, where it is still the file mapped
                    if (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino):
                        whole.filename = os.path.abspath(self._path(fmt))
                stored = {}
                for name, layer in wanted.items():
                    entry = header["matrices"].get(name)
                    if isinstance(entry, dict):
                        stored[name] = self._layer(entry, layer, whole, start)
            except Exception:  # a header that does not describe its file: not ours
                return {}
        map_in([whole], "the dense layers")  # every token reads all of it: in now, in 2 MiB pages
        return {name: layer for name, layer in stored.items() if layer is not None}

    @staticmethod
    def _layer(entry: dict, layer: DenseLayer, whole: np.ndarray, start: int) -> tuple | None:
        """(weights, bias) of a file's entry, or None where it is not `layer` as it must be."""
        def array(spec, dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
            offset, count = int(spec["offset"]), int(np.prod(spec["shape"])) * np.dtype(dtype).itemsize
            if spec["dtype"] != dtype or (shape is not None and tuple(spec["shape"]) != shape) \
                    or offset < 0 or offset % DENSE_ALIGN or start + offset + count > whole.size:
                raise ValueError("an array that is not the layer's")
            return whole[start + offset:start + offset + count].view(dtype).reshape(spec["shape"])

        if tuple(entry.get("shape", ())) != (1, layer.out_features, layer.in_features) \
                or bool(entry.get("bias")) != layer.bias:
            return None
        kind = DENSE_WEIGHTS[layer.format]
        weights = kind(packed=array(entry["packed"], "int8" if kind is int8.Int8Weights else "uint8"),
                       scales=array(entry["scales"], "uint16"), shape=(1, layer.out_features, layer.in_features))
        bias = torch.from_numpy(np.array(array(entry["bias"], "float32", (layer.out_features,)))) if layer.bias \
            else None
        return weights, bias

    def _write(self, fmt: str, layers: dict) -> None:
        matrices, pieces, offset = {}, [], 0
        for name, layer in sorted(layers.items()):
            entry = {"shape": list(layer.weight.shape)}
            parts = [("packed", layer.weight.packed), ("scales", layer.weight.scales)]
            if layer.bias is not None:
                parts.append(("bias", layer.bias.numpy()))
            for key, array in parts:
                entry[key] = {"shape": list(array.shape), "dtype": array.dtype.name, "offset": offset}
                pieces.append((offset, array))
                offset += -(-array.nbytes // DENSE_ALIGN) * DENSE_ALIGN
            matrices[name] = entry
        header = {"version": DENSE_VERSION, "format": _dense_format(fmt), "fingerprint": self.source,
                  "bytes": offset, "matrices": matrices}
        encoded = json.dumps(header).encode()
        start = -(-(16 + len(encoded)) // ALIGN) * ALIGN
        fd, temp = tempfile.mkstemp(dir=self.store_dir, prefix=f"dense-{fmt}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(DENSE_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
                for at, array in pieces:
                    f.seek(start + at)
                    np.ascontiguousarray(array).tofile(f)
                f.truncate(start + offset)
                os.fsync(f.fileno())
            os.replace(temp, self._path(fmt))
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


@dataclass
class _Stored:
    """A stored layer's weights and bias, in the shape `DenseStore._write` reads from a layer."""
    weight: object
    bias: torch.Tensor | None


def _dense_format(fmt: str) -> dict:
    return {"name": fmt, "group_size": int4.GROUP, "block_rows": int4.BLOCK, "scale_dtype": "bfloat16"}
