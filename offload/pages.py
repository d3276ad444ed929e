"""Mapped weights in 2 MiB pages.

The expert store and the dense file are memory-mapped, and every token reads gigabytes of them
at places no one can predict: how the kernel maps them matters as much as the kernels do. On a
Zen 4 the expert kernels read a Qwen3-30B-A3B layer's experts at 17-18 GB/s through 4 KiB pages
and at 26-29 GB/s through 2 MiB ones (the hardware prefetchers stop at every 4 KiB page, and
every 4 KiB page is a TLB entry).

Linux maps a file in 2 MiB pages where the page cache holds it in 2 MiB folios. It reads a file
in so when a mapping advised MADV_HUGEPAGE faults it in or reads it ahead, but folios other
reads and writes left in 4 KiB pieces stay so until the file leaves the cache, and a mapping of
them is 4 KiB pages for good. `map_in` advises huge pages, finds the files whose cached part
is held in small folios, drops those from the cache so they come back in 2 MiB folios, and reads
everything ahead. Only where the kernel shows it can: a file read back in small folios again
ends the mending (a kernel or filesystem without large folios, or memory too fragmented for
them), so a load pays for it at most once, one file. Elsewhere (not Linux) it only reads ahead.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from typing import Iterable

import numpy as np

HUGE = 2 << 20  # a PMD page on x86-64 and arm64 (4 KiB base pages)
SMALL_SHARE = 1 / 8  # a file with more of its cached 2 MiB stretches than this in small folios is read back


def map_in(arrays: Iterable[np.ndarray], what: str = "weights") -> None:
    """Bring whole-file memory maps (`np.memmap`s of a file from offset 0) into memory in 2 MiB
    pages where the kernel allows them, in the background; see the module docstring."""
    maps = [a for a in arrays if isinstance(getattr(a, "_mmap", None), mmap.mmap)]
    for array in maps:
        _advise(array, "MADV_HUGEPAGE")
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no mincore, smaps or fadvise: only read ahead
        _mend(maps, what)
    for array in maps:
        _advise(array, "MADV_WILLNEED")


def _advise(array: np.memmap, advice: str) -> None:
    if hasattr(mmap, advice):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages says EINVAL
            array._mmap.madvise(getattr(mmap, advice))


def _mend(maps: list[np.memmap], what: str) -> None:
    if not sys.platform.startswith("linux") or not maps:
        return
    small = [array for array, share in zip(maps, _small_shares(maps)) if share > SMALL_SHARE]
    if not small:
        return
    total = sum(len(array._mmap) for array in small)
    if total >= 2**30:
        print(f"reading {total / 2**30:.1f} GiB of {what} back into the page cache in 2 MiB pages (once) ...",
              file=sys.stderr)
    first, rest = small[0], small[1:]
    _drop(first)
    if _small_shares([first], touch_all=True)[0] > SMALL_SHARE:
        return  # read back, it is in small folios again: this kernel or filesystem cannot do better
    for array in rest:
        _drop(array)  # MADV_WILLNEED reads them back, in 2 MiB folios as the first came


def _small_shares(maps: list[np.memmap], touch_all: bool = False) -> list[float]:
    """For each map, the share of its 2 MiB stretches, among those the page cache holds whole,
    that it cannot map as 2 MiB pages. Maps each such stretch first (one byte read: a fault that
    maps the whole stretch, from memory); with `touch_all`, reads in every stretch."""
    spans, held = [], []
    for array in maps:
        data = np.frombuffer(array._mmap, np.uint8)
        start = data.ctypes.data
        skip = -start % HUGE  # the map's first 2 MiB boundary (Linux aligns large file maps to one)
        stretches = max(0, (data.size - skip) // HUGE)
        if touch_all:
            whole = np.arange(stretches)
        else:
            resident = _resident(start + skip, stretches * HUGE).reshape(stretches, HUGE // mmap.PAGESIZE)
            whole = np.flatnonzero(resident.all(axis=1))
        int(data[skip + whole * HUGE].sum())  # fault each in
        spans.append((start, start + data.size))
        held.append(whole.size * HUGE)
    mapped = _pmd_mapped(spans)
    return [max(0.0, 1 - huge / cached) if cached else 0.0 for huge, cached in zip(mapped, held)]


def _resident(address: int, length: int) -> np.ndarray:
    """mincore(2): one byte per base page of [address, address + length), bit 0 set where cached."""
    pages = length // mmap.PAGESIZE
    vector = np.zeros(pages, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(address, length, vector.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return vector & 1


def _pmd_mapped(spans: list[tuple[int, int]]) -> list[int]:
    """For each [first, end) of this process's address space, the bytes it maps as 2 MiB file
    pages (/proc/self/smaps, read once)."""
    totals, inside = [0] * len(spans), None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(bound, 16) for bound in head.split("-"))
                inside = next((i for i, (first, end) in enumerate(spans) if first <= low and high <= end), None)
            elif inside is not None and head == "FilePmdMapped:":
                totals[inside] += int(line.split()[1]) * 1024
    return totals


def _drop(array: np.memmap) -> None:
    """Unmap `array`'s pages from this process and drop the file from the page cache (pages other
    processes map stay); the mapping stays valid and faults the file back in."""
    array._mmap.madvise(mmap.MADV_DONTNEED)  # a read-only shared map: the pages stay the file's
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
