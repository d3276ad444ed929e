"""The int4 expert store: reuse, staleness, foreign files, interrupted builds, bounded memory."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import offload
from offload.config import args_from_dict, load_config
from offload import pages, store as store_module
from offload.pages import map_in
from offload.store import BUILD_LOCK, build_store, open_store, store_is_current
from offload.synthetic import preset_config, synthesize


def wide_config(layers: int) -> dict:
    """Experts large enough that quantising a layer takes a noticeable moment (12.6M weights)."""
    return {**preset_config("tiny-qwen3-next", layers=layers), "hidden_size": 256, "moe_intermediate_size": 256,
            "num_experts": 64, "full_attention_interval": 4, "torch_dtype": "bfloat16"}


@pytest.fixture
def tiny(tmp_path):
    return synthesize(tmp_path / "tiny", preset_config("tiny-qwen3-next"))


def layer_files(store_dir):
    return sorted(store_dir.glob("layer-*.int4"))


def test_store_is_built_once_and_reused(tiny, tmp_path):
    store_dir = tmp_path / "store"
    first = offload.load(tiny, quant="int4", store_dir=store_dir).logits([1, 2, 3, 4, 5])
    stamps = [f.stat().st_mtime_ns for f in layer_files(store_dir)]
    assert len(stamps) == 4 and (store_dir / "store.json").is_file()
    second = offload.load(tiny, quant="int4", store_dir=store_dir).logits([1, 2, 3, 4, 5])
    assert [f.stat().st_mtime_ns for f in layer_files(store_dir)] == stamps
    assert np.array_equal(first.numpy(), second.numpy())


def file_mappings(under) -> list[tuple[str, list[str], int]]:
    """(path, VmFlags, bytes mapped as 2 MiB pages) of every mapping of this process onto a file
    under the folder or file `under`."""
    maps, path = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            path = line.split()[-1] if len(line.split()) > 5 else None
            if path and path.startswith(str(under)):
                maps.append([path, [], 0])
            else:
                path = None
        elif path and line.startswith("FilePmdMapped:"):
            maps[-1][2] = int(line.split()[1]) * 1024
        elif path and line.startswith("VmFlags:"):
            maps[-1][1] = line.split(":", 1)[1].split()
    return [tuple(m) for m in maps]


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="a Linux kernel with transparent huge pages")
def test_opened_store_asks_for_huge_pages(tiny, tmp_path):
    store_dir = tmp_path / "store"
    store = open_store(tiny, load_config(tiny), store_dir)
    maps = file_mappings(store_dir)
    assert sorted(path for path, _, _ in maps) == sorted(str(p) for p in layer_files(store_dir))  # one map a file
    assert len(maps) == len(store.layers) and all("hg" in flags for _, flags, _ in maps)  # MADV_HUGEPAGE on each


def read_in(path: Path, advice: int) -> int:
    """Drop `path` from the page cache, read it back through a map advised `advice`, and return
    the bytes that map held in 2 MiB pages."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
        m.madvise(advice)
        data = np.frombuffer(m, np.uint8)
        int(data[::mmap.PAGESIZE].sum())
        huge = sum(pmd for _, _, pmd in file_mappings(path))
        del data
    os.close(fd)
    return huge


needs_file_thp = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text() or not hasattr(os, "posix_fadvise"),
                                    reason="a Linux kernel with transparent huge pages")


def random_file(path: Path, size: int) -> Path:
    np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tofile(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path


@needs_file_thp
def test_weights_cached_in_small_pages_are_read_back_in_2mib_pages(tmp_path, monkeypatch):
    """A mapped file the page cache holds in 4 KiB pieces (here: read in with readahead off) is
    dropped and read back by `map_in`, so that its map is 2 MiB pages; a file held in 2 MiB pages
    (of a size no multiple of a page, as the dense files are) is left as it is."""
    size = 32 << 20
    small, whole = random_file(tmp_path / "small.bin", size), random_file(tmp_path / "whole.bin", size + 100)
    if read_in(whole, mmap.MADV_HUGEPAGE) < size * 7 // 8:
        pytest.skip("this kernel or filesystem does not map files in 2 MiB pages")
    if read_in(small, mmap.MADV_RANDOM) >= size // 4:
        pytest.skip("this kernel reads files in large folios even with readahead off")
    dropped = []
    drop = pages._drop
    monkeypatch.setattr(pages, "_drop", lambda array: dropped.append(array.filename) or drop(array))
    monkeypatch.setattr(pages, "_mending", True)
    maps = [np.memmap(path, dtype=np.uint8, mode="r") for path in (small, whole)]
    map_in(maps)
    assert [str(name) for name in dropped] == [str(small)]
    for weights in maps:
        int(weights[::mmap.PAGESIZE].sum())
    assert sum(pmd for _, _, pmd in file_mappings(small)) >= size // 2
    assert np.array_equal(maps[0][:4096], np.fromfile(small, np.uint8, 4096))


def test_map_in_takes_maps_it_cannot_mend(tmp_path, monkeypatch):
    """A map handed a file descriptor (no file name), a private (copy-on-write) one and a small
    file's are read in and left otherwise: none is one `map_in` would drop, nothing raises, nothing
    they hold changes."""
    monkeypatch.setattr(pages, "_mending", True)
    path = random_file(tmp_path / "weights.bin", (4 << 20) + 100)
    expected = np.fromfile(path, np.uint8)
    with os.fdopen(os.open(path, os.O_RDONLY), "rb") as f:
        described = np.memmap(f, dtype=np.uint8, mode="r")
    private = np.memmap(path, dtype=np.uint8, mode="c")
    private[:10] = 7
    tiny = np.memmap(random_file(tmp_path / "tiny.bin", 1000), dtype=np.uint8, mode="r")
    assert described.filename is None and not any(pages._mendable(m) for m in (described, private))
    map_in([described, private, tiny])
    assert np.array_equal(described, expected) and np.array_equal(private[10:], expected[10:])
    assert (private[:10] == 7).all()


def test_experts_stacked_as_transformers_5_writes_them_make_the_same_store(tiny, tmp_path):
    """A checkpoint whose experts are stacked ([E, 2I, D] gate_up_proj and [E, D, I] down_proj
    per layer, read a few experts at a time) quantises to the same int4 experts, so the same
    logits, as the hub's one tensor per expert."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    stacked_dir = tmp_path / "stacked"
    shutil.copytree(tiny, stacked_dir)
    (file,) = stacked_dir.glob("*.safetensors")
    tensors = load_file(file)
    args = load_config(tiny)
    for layer in range(args.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(args.num_experts)
        gate_up = [torch.cat([tensors.pop(f"{prefix}.{e}.gate_proj.weight"), tensors.pop(f"{prefix}.{e}.up_proj.weight")])
                   for e in experts]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack([tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
    save_file(tensors, file, metadata={"format": "pt"})
    prompt = [1, 2, 3, 4, 5]
    expected = offload.load(tiny, quant="int4", store_dir=tmp_path / "store").logits(prompt)
    assert torch.equal(offload.load(stacked_dir, quant="int4", store_dir=tmp_path / "stacked-store").logits(prompt),
                       expected)


def test_stale_and_foreign_stores_are_rebuilt(tiny, tmp_path):
    store_dir = tmp_path / "store"
    args = load_config(tiny)
    build_store(tiny, args, store_dir)
    assert store_is_current(store_dir, tiny, args)
    expected = offload.load(tiny, quant="int4", store_dir=store_dir).logits([7, 8, 9])
    # stale: the checkpoint changed after the store was built
    os.utime(tiny / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not store_is_current(store_dir, tiny, args)
    before = layer_files(store_dir)[0].stat().st_mtime_ns
    assert np.array_equal(offload.load(tiny, quant="int4", store_dir=store_dir).logits([7, 8, 9]).numpy(),
                          expected.numpy())
    assert layer_files(store_dir)[0].stat().st_mtime_ns != before
    # foreign: a layer file of another version, and one that is not a store file at all
    path = layer_files(store_dir)[1]
    data = bytearray(path.read_bytes())
    header = data[16:16 + int.from_bytes(data[8:16], "little")]
    data[16:16 + len(header)] = header.replace(b'"version": 1', b'"version": 9')
    path.write_bytes(bytes(data))
    layer_files(store_dir)[2].write_bytes(b"not a store")
    assert not store_is_current(store_dir, tiny, args)
    assert np.array_equal(offload.load(tiny, quant="int4", store_dir=store_dir).logits([7, 8, 9]).numpy(),
                          expected.numpy())
    assert store_is_current(store_dir, tiny, args)


def test_a_killed_build_leaves_no_torn_file_and_resumes(tmp_path):
    model = synthesize(tmp_path / "wide", wide_config(layers=12))
    store_dir = tmp_path / "store"
    process = subprocess.Popen([sys.executable, "-m", "offload", "quantize", str(model),
                                "--out", str(store_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not layer_files(store_dir) and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = layer_files(store_dir)
    assert 1 <= len(written) < 12 and not (store_dir / "store.json").exists()
    args = load_config(model)
    assert not store_is_current(store_dir, model, args)
    for path in written:  # every file under its final name is whole: its header and size check out
        header = json.loads(path.read_bytes()[16:16 + int.from_bytes(path.read_bytes()[8:16], "little")])
        last = header["arrays"]["down_scales"]
        assert path.stat().st_size >= last["offset"] + np.prod(last["shape"]) * 2
    kept = {path.name: path.stat().st_mtime_ns for path in written}
    build_store(model, args, store_dir)  # resumes: keeps the finished layers
    assert store_is_current(store_dir, model, args)
    assert all(store_dir.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in kept.items())
    assert not list(store_dir.glob("*.tmp"))


def test_a_build_waits_for_another_building_the_same_store(tmp_path):
    """Two first runs of a model at once: while one builds the store (holding the lock beside it,
    here this test), another says it waits and writes nothing; then it finds what the first left
    and ends with the store whole."""
    from filelock import FileLock

    model = synthesize(tmp_path / "wide", wide_config(layers=2))
    store_dir = tmp_path / "store"
    command = [sys.executable, "-m", "offload", "quantize", str(model), "--out", str(store_dir)]
    store_dir.mkdir()
    with FileLock(store_dir / BUILD_LOCK):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120, process.kill)  # a build that never says it waits fails, not hangs
        watchdog.start()
        said = ""
        while "waiting" not in said and process.poll() is None:  # past the progress bar's first output
            said = process.stderr.readline()
        assert "another process is building it; waiting" in said, said
        time.sleep(0.5)
        assert process.poll() is None and not layer_files(store_dir)
    _, rest = process.communicate(timeout=300)
    watchdog.cancel()
    assert process.returncode == 0, rest
    assert store_is_current(store_dir, model, load_config(model)) and len(layer_files(store_dir)) == 2


def peak_rss_of_quantize(model, store_dir) -> int:
    """Peak RSS (bytes) of an `offload quantize` process."""
    script = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-m', "
              "'offload', 'quantize', sys.argv[1], '--out', sys.argv[2]], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", script, str(model), str(store_dir)], capture_output=True,
                            text=True, check=True)
    return int(result.stdout.split()[-1]) * 1024


def test_quantize_memory_does_not_grow_with_the_model(tmp_path):
    small = synthesize(tmp_path / "small", wide_config(layers=2))
    large = synthesize(tmp_path / "large", wide_config(layers=14))  # 7x the experts, 350 MB of bf16
    layer_bytes = 64 * 3 * 256 * 256 * 2  # one layer's experts in the checkpoint: 25 MB
    small_peak = peak_rss_of_quantize(small, tmp_path / "s")
    large_peak = peak_rss_of_quantize(large, tmp_path / "l")
    assert large_peak - small_peak < 2 * layer_bytes, (small_peak, large_peak)
    args = args_from_dict(json.loads((large / "config.json").read_text()))
    assert store_is_current(tmp_path / "l", large, args)


def test_unwritable_store_and_odd_shapes_are_explained(tiny, tmp_path):
    from click.testing import CliRunner

    from offload.cli import main

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's parent directory should be")
    result = CliRunner().invoke(main, ["quantize", str(tiny), "--out", str(blocked / "store")])
    assert result.exit_code == 1 and "cannot write the expert store" in result.stderr
    assert "Traceback" not in result.output
    odd = synthesize(tmp_path / "odd", {**preset_config("tiny-qwen3-moe"), "moe_intermediate_size": 48})
    result = CliRunner().invoke(main, ["run", "--model", str(odd), "--max-tokens", "2"])
    assert result.exit_code == 1
    assert "moe_intermediate_size 48 is not a multiple of 32" in result.stderr and "--quant none" in result.stderr
    assert CliRunner().invoke(main, ["run", "--model", str(odd), "--max-tokens", "2", "--quant", "none"]).exit_code == 0


def test_dense_layers_are_kept_beside_the_experts_and_mapped_on_the_next_load(tiny, tmp_path, monkeypatch):
    """A CPU plan's quantised dense layers are written to the store on the first load; the next
    load maps them (no float weight of theirs read, no quantising) and computes the same logits; a
    checkpoint that changed, or a torn file, has them quantised and written again."""
    from offload.checkpoint import LazyTensor

    store_dir = tmp_path / "store"
    ids = [1, 2, 3, 4, 5]
    first = offload.load(tiny, quant="int4", store_dir=store_dir)
    expected = first.logits(ids)
    files = sorted(p.name for p in store_dir.glob("dense-*.bin"))
    assert files == ["dense-int4.bin", "dense-int6.bin"]  # the mixers and shared experts int4, lm_head int6

    quantized = set()  # the layers the files hold, by the model's module names
    for path in store_dir.glob("dense-*.bin"):
        with open(path, "rb") as f:
            f.read(8)
            quantized |= set(json.loads(f.read(int.from_bytes(f.read(8), "little")))["matrices"])
    assert any("in_proj_qkvz" in name for name in quantized) and "lm_head" in quantized
    read = []
    load = LazyTensor.load
    monkeypatch.setattr(LazyTensor, "load", lambda self, *a, **k: read.append(self.where) or load(self, *a, **k))
    mapped = []  # the files map_in is handed, by the names it would drop them by
    monkeypatch.setattr(store_module, "map_in", lambda arrays, *a: mapped.extend(Path(m.filename).name for m in arrays)
                        or map_in(arrays, *a))
    second = offload.load(tiny, quant="int4", store_dir=store_dir)
    assert np.array_equal(second.logits(ids).numpy(), expected.numpy())
    assert weight_types(second) == weight_types(first)  # the kernels compiled on the first load serve the next
    assert read and not [where for where in read for name in quantized if f"{name}.weight" in where]
    assert {"dense-int4.bin", "dense-int6.bin"} <= set(mapped) and "layer-000.int4" in mapped
    monkeypatch.undo()
    stamp = (store_dir / "dense-int4.bin").stat().st_mtime_ns
    int8 = offload.load(tiny, quant="int4", store_dir=store_dir, dense_quant="int8")  # another format: its own file
    assert (store_dir / "dense-int8.bin").is_file() and (store_dir / "dense-int4.bin").stat().st_mtime_ns == stamp
    assert int8.logits(ids).shape == expected.shape

    with open(store_dir / "dense-int4.bin", "rb+") as f:  # torn: quantised again, the same bits
        f.truncate(f.seek(0, 2) - 64)
    again = offload.load(tiny, quant="int4", store_dir=store_dir)
    assert np.array_equal(again.logits(ids).numpy(), expected.numpy())
    assert (store_dir / "dense-int4.bin").stat().st_mtime_ns != stamp and not list(store_dir.glob("*.tmp"))

    exact = offload.load(tiny, quant="int4", store_dir=store_dir, exact=True).logits(ids)  # mapped, exact kernels
    fresh = offload.load(tiny, quant="int4", store_dir=tmp_path / "fresh", exact=True).logits(ids)
    assert np.array_equal(exact.numpy(), fresh.numpy())


def weight_types(engine) -> dict:
    """The Numba types of every quantised dense layer's arrays: what the kernels are compiled for."""
    import numba

    from offload.dense import QuantizedLinear

    return {name: [numba.typeof(a) for a in vars(module.weight).values() if isinstance(a, np.ndarray)]
            for name, module in engine.model.named_modules() if isinstance(module, QuantizedLinear)}


def rewrite_header(path, edit) -> None:
    """Give a dense file the header `edit(header)` returns, its arrays where they were."""
    data = path.read_bytes()
    length = int.from_bytes(data[8:16], "little")
    start = -(-(16 + length) // 4096) * 4096  # the arrays' bytes begin on the page after the header
    encoded = edit(json.loads(data[16:16 + length]))
    encoded = encoded if isinstance(encoded, bytes) else json.dumps(encoded).encode()
    assert 16 + len(encoded) <= start
    path.write_bytes(data[:8] + len(encoded).to_bytes(8, "little") + encoded.ljust(start - 16) + data[start:])


def test_a_dense_file_that_lies_is_quantised_again(tiny, tmp_path):
    """Headers that do not describe their file, or layers of another shape, are not used: the load
    quantises those layers again and computes what it computed before."""
    store_dir = tmp_path / "store"
    ids = [1, 2, 3, 4, 5]
    expected = offload.load(tiny, quant="int4", store_dir=store_dir).logits(ids).numpy()
    path = store_dir / "dense-int6.bin"
    original = path.read_bytes()

    def entry(key, field, value):
        def edit(header):
            header["matrices"]["lm_head"][key][field] = value
            return header
        return edit

    def shape(header):
        header["matrices"]["lm_head"]["shape"] = [1, 32, 32]
        return header

    edits = [entry("packed", "offset", 1 << 40), entry("packed", "offset", 1e300), entry("scales", "offset", 3),
             entry("packed", "dtype", "complex64"), entry("packed", "shape", [1, 1]), shape,
             lambda header: b"[]", lambda header: b"1", lambda header: b"[" * 1900 + b"]" * 1900]
    for edit in edits:
        path.write_bytes(original)
        rewrite_header(path, edit)
        assert np.array_equal(offload.load(tiny, quant="int4", store_dir=store_dir).logits(ids).numpy(), expected)
    path.write_bytes(original[:8] + (1 << 62).to_bytes(8, "little") + original[16:])  # a header longer than the file
    assert np.array_equal(offload.load(tiny, quant="int4", store_dir=store_dir).logits(ids).numpy(), expected)


@pytest.mark.parametrize("name", ["next-hub", "moe-hub", "q35"])
@pytest.mark.parametrize("gpu_mem", [0, "8G"], ids=["cpu", "stand-in"])
def test_mapped_dense_layers_compute_what_quantised_ones_do(hf_checkpoint, tmp_path, name, gpu_mem):
    """Tied heads (next-hub, moe-hub), Qwen3.5's regrouped projections, CPU-only and a GPU plan on
    the CPU stand-in (its shared experts and head may stay in RAM, quantised): a load from the
    store's dense files gives the logits of the load that wrote them."""
    path = hf_checkpoint(name).path
    options = dict(quant="int4", store_dir=tmp_path / "store", gpu_mem=gpu_mem,
                   **({"profile": "rtx4060-ddr5", "device": "cpu"} if gpu_mem else {}))
    ids = list(range(3, 40, 3))
    first = offload.load(path, **options).logits(ids)
    second = offload.load(path, **options).logits(ids)
    assert np.array_equal(first.numpy(), second.numpy())
    assert bool(list((tmp_path / "store").glob("dense-*.bin"))) == (gpu_mem == 0)  # the stand-in keeps all on "gpu"
