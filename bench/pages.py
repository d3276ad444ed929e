"""Mapped experts in 4 KiB against 2 MiB pages, and what `offload.pages.map_in` makes of them.

    python bench/pages.py [--layers 6] [--rounds 40]

Writes --layers files of random int4 experts shaped as Qwen3-30B-A3B's (128 experts of 2048 x
768, 340 MB a layer) under the cache (not /tmp, which may be memory), then brings the first half
into the page cache in 4 KiB pieces (read through a map with readahead off) and the second half
in 2 MiB folios (read through a map advised MADV_HUGEPAGE), as the store's files can find
themselves after other reads and writes. Maps each file whole, as the store does, and times the
fast expert decode kernel (one token, 8 random experts a layer) over each half in turn, --rounds
rounds: the median GB/s of each, and their ratio. Then `map_in` on every file (which reads the
small-paged half back in 2 MiB pages) and the same again. Prints the share of each half mapped in
2 MiB pages, this run's RAM read bandwidth beside the rates, and the CPU. Linux only; on a kernel
or filesystem that maps no file in 2 MiB pages both halves read alike and `map_in` leaves them.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(Path(__file__).resolve().parents[1]))  # would shadow the `kernels` package transformers imports)

from offload.hardware import cpu_model  # noqa: E402
from offload.kernels import int4, q8  # noqa: E402
from offload.kernels.membw import read_bandwidth  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.pages import huge_mapped, map_in  # noqa: E402
from offload.paths import cache_root  # noqa: E402

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2048, 768, 128, 8
SHAPES = {"gate_up": (EXPERTS, 2 * INTERMEDIATE, HIDDEN), "down": (EXPERTS, HIDDEN, INTERMEDIATE)}


def layout(shape) -> tuple[tuple, tuple]:
    experts, out_features, in_features = shape
    return (experts, out_features // int4.BLOCK, in_features * 16), (experts, out_features // int4.BLOCK, in_features)


def write_layer(path: Path, rng: np.random.Generator) -> None:
    with open(path, "wb") as f:
        for shape in SHAPES.values():
            packed, scales = layout(shape)
            rng.integers(0, 256, packed, dtype=np.uint8).tofile(f)
            np.full(scales, 0x3C00, np.uint16).tofile(f)  # bf16 0.0078125
        f.flush()
        os.fsync(f.fileno())


def read_in(path: Path, advice: int) -> None:
    """Drop the file from the page cache and read it back through a map advised `advice`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapping:
            mapping.madvise(advice)
            data = np.frombuffer(mapping, np.uint8)
            int(data[::mmap.PAGESIZE].sum())
            del data
    finally:
        os.close(fd)


def weights(whole: np.memmap) -> tuple[int4.Int4Weights, int4.Int4Weights]:
    views, at = [], 0
    for shape in SHAPES.values():
        arrays = []
        for part, dtype in zip(layout(shape), (np.uint8, np.uint16)):
            size = int(np.prod(part)) * np.dtype(dtype).itemsize
            arrays.append(whole[at:at + size].view(dtype).reshape(part))
            at += size
        views.append(int4.Int4Weights(arrays[0], arrays[1], shape))
    return views[0], views[1]


def huge_share(maps: list[np.memmap]) -> float:
    spans = [(m.ctypes.data, m.ctypes.data + -(-m.size // mmap.PAGESIZE) * mmap.PAGESIZE) for m in maps]  # whole pages
    return sum(huge_mapped(spans)) / sum(m.size for m in maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="files of experts, half of them in 4 KiB pages")
    parser.add_argument("--rounds", type=int, default=40)
    options = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("bench/pages.py measures Linux's page cache; this is not Linux")
    folder = cache_root() / "bench" / "pages"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        measure(folder, options)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(folder: Path, options) -> None:
    rng = np.random.default_rng(0)
    paths = [folder / f"layer-{i:03d}.int4" for i in range(max(2, options.layers // 2 * 2))]
    print(f"writing {len(paths)} layers of random int4 experts ({len(paths) * 340} MB) in {folder} ...", flush=True)
    for path in paths:
        write_layer(path, rng)
    half = len(paths) // 2
    for i, path in enumerate(paths):
        read_in(path, mmap.MADV_RANDOM if i < half else mmap.MADV_HUGEPAGE)
    maps = [np.memmap(path, dtype=np.uint8, mode="r") for path in paths]
    layers = [weights(whole) for whole in maps]
    small, large = layers[:half], layers[half:]

    scratch = q8.FastScratch(1, TOP_K, HIDDEN, INTERMEDIATE)
    x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    out = np.zeros((1, HIDDEN), np.float32)
    mix = np.full((1, TOP_K), 1 / TOP_K, np.float32)
    read = half * TOP_K * 3 * HIDDEN * INTERMEDIATE * int4.FORMAT.bits_per_weight / 8  # bytes a pass over a half

    def one_pass(group) -> float:
        began = time.perf_counter()
        for gate_up, down in group:
            ids = rng.choice(EXPERTS, TOP_K, replace=False).reshape(1, TOP_K)
            q8.moe_decode_fast(x, ids, mix, gate_up, down, out, scratch)
        return time.perf_counter() - began

    def rates() -> tuple[float, float, int]:
        """(GB/s of half A, of half B, the pages read from disk meanwhile: 0, or the page cache
        turned over and the figures are the disk's)."""
        for _ in range(3):
            one_pass(small), one_pass(large)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        seconds = [(one_pass(small), one_pass(large)) for _ in range(options.rounds)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
        return *(read / statistics.median(s[i] for s in seconds) / 1e9 for i in (0, 1)), faults

    for whole in maps:  # mapped, as a store is; the bytes were read in above
        int(whole[::mmap.PAGESIZE].sum())
    shares = huge_share(maps[:half]), huge_share(maps[half:])
    before = rates()
    began = time.perf_counter()
    map_in(maps)
    mended_s = time.perf_counter() - began
    for whole in maps:
        int(whole[::mmap.PAGESIZE].sum())
    after_shares = huge_share(maps[:half]), huge_share(maps[half:])
    after = rates()
    probe = np.ones(2**30 // 4, np.float32)  # 1 GiB, as the pool of each half
    bandwidth = read_bandwidth(probe, physical_cores()) / 1e9

    print(f"\n{cpu_model()}, {physical_cores()} threads; Qwen3-30B-A3B experts (2048 x 768, top-{TOP_K}), "
          f"{half} layers a half, {options.rounds} rounds")
    print(f"{'':<30} {'half A':>18} {'half B':>18}  A / B")
    print(f"{'read in as':<30} {'4 KiB pieces':>18} {'2 MiB folios':>18}")
    print(f"{'mapped in 2 MiB pages':<30} {shares[0]:>18.0%} {shares[1]:>18.0%}")
    print(f"{'expert decode GB/s':<30} {before[0]:>18.1f} {before[1]:>18.1f}  {before[0] / before[1]:.2f}x  "
          f"({before[2]} pages read from disk)")
    print(f"{'after map_in: in 2 MiB pages':<30} {after_shares[0]:>18.0%} {after_shares[1]:>18.0%}  "
          f"(map_in {mended_s:.2f} s)")
    print(f"{'after map_in: GB/s':<30} {after[0]:>18.1f} {after[1]:>18.1f}  {after[0] / after[1]:.2f}x  "
          f"({after[2]} pages read from disk)")
    print(f"RAM read bandwidth {bandwidth:.1f} GB/s (1 GiB, this run): the bound of both")


if __name__ == "__main__":
    main()
