"""Which integer dot-product instructions the fast kernels use, chosen from the CPU's features.

The fast kernels multiply unsigned 8-bit weights (int4 codes) by signed 8-bit activations and
sum them four at a time into 32-bit lanes. Paths, best first:

    VNNI512   AVX512-VNNI `vpdpbusd` on zmm: 64 multiply-adds per instruction
    AVXVNNI   `vpdpbusd` on ymm (AVX-VNNI, or AVX512-VNNI with AVX512-VL)
    AVX2      `vpmaddubsw` + `vpmaddwd` on ymm (no saturation: a pair of products is at most
              2 x 63 x 127 for int6 codes, 2 x 127 x 127 for int8's |w|)
    PORTABLE  plain vector IR that LLVM lowers for any CPU

A path is an integer so that kernels can take it as a compile-time literal: each path is its own
compiled (and cached) specialisation. Numba compiles for the host CPU, so only paths this CPU
can run may be compiled here.
"""

from __future__ import annotations

import functools
import os

VNNI512, AVXVNNI, AVX2, PORTABLE = 0, 1, 2, 3
NAMES = {VNNI512: "avx512-vnni", AVXVNNI: "avx-vnni", AVX2: "avx2", PORTABLE: "portable"}


def supported(features: set[str]) -> list[int]:
    """The paths a CPU with these LLVM feature names (e.g. "avx512vnni") can run, best first."""
    paths = []
    if {"avx512vnni", "avx512bw", "avx512f"} <= features:
        paths.append(VNNI512)
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        paths.append(AVXVNNI)
    if "avx2" in features:
        paths.append(AVX2)
    paths.append(PORTABLE)
    return paths


@functools.cache
def host_features() -> frozenset[str]:
    """The features Numba compiles for: this machine's, or, when NUMBA_CPU_NAME names another CPU
    (portable builds), those NUMBA_CPU_FEATURES lists (none if it lists none: portable only)."""
    import numba
    from llvmlite import binding

    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        listed = numba.config.CPU_FEATURES or ""
    else:
        listed = binding.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in listed.split(",") if f.startswith("+"))


def available() -> list[int]:
    """This machine's paths, best first."""
    return supported(set(host_features()))


def best() -> int:
    """The path the kernels use: the best available, or OFFLOAD_ISA (a name in NAMES) if set and
    available here."""
    wanted = os.environ.get("OFFLOAD_ISA")
    if wanted:
        chosen = next((path for path, name in NAMES.items() if name == wanted), None)
        if chosen is None or chosen not in available():
            names = ", ".join(NAMES[p] for p in available())
            raise ValueError(f"OFFLOAD_ISA={wanted!r} is not a path this CPU runs; use one of {names}")
        return chosen
    return available()[0]
