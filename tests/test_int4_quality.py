"""The int4 format's accuracy on real trained weights, against llama.cpp's Q4_0."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int4_is_at_least_as_accurate_as_q4_0_on_minilm_ffn_weights():
    bench = load_bench()
    weights = bench.minilm_ffn_weights()
    assert len(weights) == 12 and {w.shape for w in weights} == {(1536, 384), (384, 1536)}
    ours, q4_0, bits = bench.quality_vs_q4_0()
    assert bits <= 5.0
    assert 0.05 < q4_0 < 0.15  # the reference quantiser really ran
    assert ours <= q4_0
