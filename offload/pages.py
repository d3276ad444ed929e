"""Mapped weights in 2 MiB pages, read in ahead of use.

The expert store and the dense file are memory-mapped, and every token reads gigabytes of them
at places no one can predict: how the kernel maps them matters as much as the kernels do. On a
Zen 4 the expert kernel read experts held in 4 KiB pages at 0.42-0.97x its rate on the same bytes
in 2 MiB pages (`bench/pages.py`; the more scattered the 4 KiB pages lie in physical memory, the
slower: the hardware prefetchers stop at every 4 KiB page, and each is a TLB entry).

Linux maps a file in 2 MiB pages where the page cache holds it in 2 MiB folios. It reads a file
in so when a map advised MADV_HUGEPAGE faults it in, but folios that other reads and writes left
in 4 KiB pieces stay so until the file leaves the cache, and a map of them is 4 KiB pages for
good. `map_in` advises huge pages; finds the files whose cached part is held in small folios
and drops them from the cache, so that they come back in 2 MiB folios; and reads every file in
on a thread of its own, a byte every 64 KiB (MADV_WILLNEED reads only the first few MiB of a
file, and those in small folios). The mending is for Linux with transparent huge pages, and only
where the kernel shows it works: the first file read back in small folios again ends it for this
process (a filesystem without large folios, memory too fragmented for them), so a load pays for
it with one file's read at most.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

from offload.kernels.membw import touch

READ_STEP = 64 << 10  # `_fault_in` reads a byte every this many
SMALL_SHARE = 1 / 8  # a file with more of its cached 2 MiB stretches than this in small folios is read back
THP = Path("/sys/kernel/mm/transparent_hugepage")
_mending = True  # False once a file read back came in small folios again: this process stops trying


def _huge() -> int:
    """The PMD page size (2 MiB with 4 KiB base pages; 32 MiB, 512 MiB on arm64's 16, 64 KiB)."""
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def _transparent_huge_pages() -> bool:
    """Whether this is Linux with transparent huge pages on (always, or where advised)."""
    try:
        return sys.platform.startswith("linux") and "[never]" not in (THP / "enabled").read_text()
    except OSError:
        return False


HUGE = _huge()
THP_ON = _transparent_huge_pages()


def map_in(arrays: Iterable[np.ndarray], what: str = "weights") -> None:
    """Bring whole-file read-only memory maps (`np.memmap(path, mode="r")`) into memory in 2 MiB
    pages where the kernel allows them; see the module docstring. Returns once the small-paged
    files are found and dropped (one of them read back, as the test of the kernel); the reading
    in goes on on a daemon thread."""
    maps = [a for a in arrays if isinstance(getattr(a, "_mmap", None), mmap.mmap)]
    for array in maps:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                array._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages says EINVAL
                pass
    try:
        _mend([a for a in maps if _mendable(a)], what)
    except Exception:  # page-cache housekeeping: whatever it meets, the weights are read as they are
        pass
    threading.Thread(target=_fault_in, args=(maps,), name="offload-read-ahead", daemon=True).start()


def _mendable(array: np.memmap) -> bool:
    """Whether `array` can be dropped and read back: a read-only map of a whole file, at a 2 MiB
    boundary, that this process may write (mincore reports every page of a file it may not write
    as cached)."""
    return (_mending and THP_ON and array.mode == "r" and array.offset == 0 and array.filename is not None
            and np.frombuffer(array._mmap, np.uint8).ctypes.data % HUGE == 0 and os.access(array.filename, os.W_OK))


def _mend(maps: list[np.memmap], what: str) -> None:
    global _mending
    small = [array for array, share in zip(maps, _small_shares(maps)) if share > SMALL_SHARE]
    for index, first in enumerate(small):
        _drop(first)
        if _cached_share(first) > 0.5:
            continue  # its pages stayed (dirty, or mapped by another process): no test of the kernel
        if _small_shares([first], touch_all=True)[0] > SMALL_SHARE:
            _mending = False  # read back, it is in small folios again: this kernel or filesystem cannot do better
            return
        rest = small[index + 1:]
        total = sum(len(array._mmap) for array in rest)
        if total >= 2**30:
            print(f"reading {total / 2**30:.1f} GiB of {what} back into memory in 2 MiB pages ...", file=sys.stderr)
        for array in rest:
            _drop(array)  # `_fault_in` reads them back, in 2 MiB folios as the first came
        return


def _cached_share(array: np.memmap) -> float:
    """The share of `array`'s pages the page cache holds."""
    data = np.frombuffer(array._mmap, np.uint8)
    return float(_resident(data.ctypes.data, data.size // mmap.PAGESIZE * mmap.PAGESIZE).mean()) if data.size else 0.0


def _small_shares(maps: list[np.memmap], touch_all: bool = False) -> list[float]:
    """For each map, the share of its 2 MiB stretches, among those the page cache holds whole,
    that it cannot map as 2 MiB pages. Maps each such stretch first (one byte read: a fault that
    maps the whole stretch, from memory); with `touch_all`, reads in every stretch."""
    spans, held = [], []
    for array in maps:
        data = np.frombuffer(array._mmap, np.uint8)
        start = data.ctypes.data  # a 2 MiB boundary (`_mendable`)
        stretches = data.size // HUGE
        if touch_all:
            whole = np.arange(stretches)
        else:
            resident = _resident(start, stretches * HUGE).reshape(stretches, HUGE // mmap.PAGESIZE)
            whole = np.flatnonzero(resident.all(axis=1))
        int(data[whole * HUGE].sum())  # fault each in
        spans.append((start, start + -(-data.size // mmap.PAGESIZE) * mmap.PAGESIZE))  # as the map: whole pages
        held.append(whole.size * HUGE)
    mapped = huge_mapped(spans) if any(held) else [0] * len(spans)
    return [max(0.0, 1 - huge / cached) if cached else 0.0 for huge, cached in zip(mapped, held)]


def _resident(address: int, length: int) -> np.ndarray:
    """mincore(2): one byte per base page of [address, address + length), bit 0 set where cached."""
    import ctypes

    vector = np.zeros(length // mmap.PAGESIZE, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(address, length, vector.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return vector & 1


def huge_mapped(spans: list[tuple[int, int]]) -> list[int]:
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
    """Unmap `array`'s pages from this process and drop its file from the page cache (pages other
    processes map stay); the map stays valid and faults the file back in."""
    array._mmap.madvise(mmap.MADV_DONTNEED)  # a read-only shared map: the pages stay the file's
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _fault_in(maps: list[np.ndarray]) -> None:
    """Read every map in (one byte every READ_STEP: a fault that maps a 2 MiB folio, or reads
    ahead around it)."""
    for array in maps:
        touch(np.frombuffer(array._mmap, np.uint8), READ_STEP)
