"""How fast the kernels run here: random expert pools and a decode timing loop, and dense matrices
in each format (`dense_throughput`).

Kernel speed does not depend on the weights' values, so pools are a tiled random pattern with
plausible bf16 scales (cheap to build at any size). Every call routes to fresh random experts,
so with a pool far larger than the caches the weights come from RAM.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from offload.kernels import gemv, int4, q8
from offload.kernels.int4 import BLOCK, FORMAT, Int4Weights
from offload.kernels.membw import read_blocks, read_experts


def random_pool(experts: int, out_features: int, in_features: int, seed: int = 0) -> Int4Weights:
    rng = np.random.default_rng(seed)
    packed = np.empty((experts, out_features // BLOCK, in_features * 16), np.uint8)
    pattern = rng.integers(0, 256, 1 << 24, dtype=np.uint8)
    flat = packed.reshape(-1)
    for start in range(0, flat.size, pattern.size):
        flat[start:start + pattern.size] = pattern[: flat.size - start]
    scales = rng.integers(0x3C00, 0x3C80, (experts, out_features // BLOCK, in_features), dtype=np.uint16)
    return Int4Weights(packed, scales, (experts, out_features, in_features))


def pool_for(hidden: int, intermediate: int, pool_bytes: int, minimum_experts: int) -> tuple[Int4Weights, Int4Weights]:
    """(gate_up, down) pools of about `pool_bytes` together."""
    expert_bytes = 3 * hidden * intermediate * FORMAT.bits_per_weight / 8
    experts = max(int(pool_bytes / expert_bytes), minimum_experts)
    return random_pool(experts, 2 * intermediate, hidden, seed=1), random_pool(experts, hidden, intermediate, seed=2)


def median_seconds(run, calls: int) -> float:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_throughput(gate_up: Int4Weights, down: Int4Weights, batch: int, top_k: int, calls: int,
                      seed: int = 0, exact: bool = False) -> float:
    """Weights/s of the decode kernel (median call), distinct random experts per call: the fast
    one (`q8.moe_decode_fast`, this CPU's best path), or with `exact` `gemv.moe_decode`."""
    rng = np.random.default_rng(seed)
    experts, _, hidden = gate_up.shape
    intermediate = down.shape[2]
    x = rng.standard_normal((batch, hidden)).astype(np.float32)
    out = np.empty_like(x)
    weights = np.full((batch, top_k), 1 / top_k, np.float32)
    if exact:
        scratch = gemv.DecodeScratch(batch, top_k, hidden, intermediate)
        kernel = gemv.moe_decode
    else:
        scratch = q8.FastScratch(batch, top_k, hidden, intermediate)
        kernel = q8.moe_decode_fast
    routes = [rng.choice(experts, batch * top_k, replace=False).reshape(batch, top_k) for _ in range(calls)]
    for route in routes[: max(1, calls // 4)]:  # warm-up: page tables, huge pages, clocks
        kernel(x, route, weights, gate_up, down, out, scratch)
    seconds = median_seconds(lambda i: kernel(x, routes[i], weights, gate_up, down, out, scratch), calls)
    return batch * top_k * 3 * hidden * intermediate / seconds


def experts_reading_throughput(gate_up: Int4Weights, down: Int4Weights, batch: int, top_k: int, calls: int,
                               seed: int = 0) -> float:
    """Weights/s of merely reading (`membw.read_experts`) as many distinct random experts a call
    as `decode_throughput` computes with: what the decode kernel's bytes cost without its
    arithmetic."""
    rng = np.random.default_rng(seed)
    experts, _, hidden = gate_up.shape
    routes = [rng.choice(experts, batch * top_k, replace=False).astype(np.int64) for _ in range(calls)]

    def run(i):
        read_experts(routes[i], gate_up.packed, gate_up.scales, down.packed, down.scales)

    for i in range(max(1, calls // 4)):
        run(i)
    return batch * top_k * 3 * hidden * down.shape[2] / median_seconds(run, calls)


DENSE_SHAPE = (8192, 2048)  # a Qwen3-Next mixer projection: [out, in]


def dense_against_reading(tokens: int, pool_bytes: int, rounds: int = 5, calls: int = 20) -> tuple[float, float]:
    """(kernel GB/s, bare read GB/s): an int4 matrix of DENSE_SHAPE times `tokens` tokens
    (`q8.linear_fast`) over a pool of `pool_bytes` of copies, against `membw.read_blocks` summing
    the same bytes in the same order; rounds of one then the other (a shared machine's speed moves),
    medians of the rounds."""
    rng = np.random.default_rng(0)
    first = int4.quantize(rng.standard_normal(DENSE_SHAPE, dtype=np.float32) * 0.02)
    pool = [first] + [Int4Weights(first.packed.copy(), first.scales.copy(), first.shape)
                      for _ in range(max(1, pool_bytes // first.nbytes) - 1)]
    x = rng.standard_normal((tokens, DENSE_SHAPE[1]), dtype=np.float32)
    out = np.empty((tokens, DENSE_SHAPE[0]), np.float32)
    activations = q8.Activations(tokens, DENSE_SHAPE[1])
    kernel, reading = [], []
    for _ in range(rounds):
        kernel.append(pool_rate(pool, lambda matrix: q8.linear_fast(x, matrix, out, activations), first.nbytes, calls))
        reading.append(pool_rate(pool, lambda matrix: read_blocks(matrix.packed, matrix.scales), first.nbytes, calls))
    return statistics.median(kernel), statistics.median(reading)


def pool_rate(pool: list, run, weights: int, calls: int) -> float:
    """Weights/s of `run(matrix)` over `pool` taken in turn (median call, after a warm-up), each
    call doing `weights` multiply-adds: with a pool far larger than the caches, every call reads RAM."""
    for i in range(max(1, calls // 4)):  # warm-up: compilation, page tables, clocks
        run(pool[i % len(pool)])
    return weights / median_seconds(lambda i: run(pool[i % len(pool)]), calls)


def dense_throughput(fmt: str, tokens: int, pool_bytes: int, calls: int = 20) -> float:
    """Weights/s of one dense matrix times `tokens` tokens in "int4" / "int6" / "int8" through the
    fast kernels (`q8.linear_fast`); the pool holds copies of one random matrix, `pool_bytes` in all."""
    from offload.kernels import int4, int6, int8

    out_features, in_features = DENSE_SHAPE
    rng = np.random.default_rng(0)
    first = {"int4": int4, "int6": int6, "int8": int8}[fmt].quantize(
        rng.standard_normal(DENSE_SHAPE, dtype=np.float32) * 0.02)
    pool = [first] + [type(first)(first.packed.copy(), first.scales.copy(), first.shape)
                      for _ in range(max(1, pool_bytes // first.nbytes) - 1)]
    x = rng.standard_normal((tokens, in_features), dtype=np.float32)
    out = np.empty((tokens, out_features), np.float32)
    activations = q8.Activations(tokens, in_features)
    return pool_rate(pool, lambda matrix: q8.linear_fast(x, matrix, out, activations),
                     tokens * out_features * in_features, calls)
