"""Decode steps from CUDA graphs (`offload.graphs`). A captured step reads its position from the
device (`DevicePosition`: the KV write index, rotary angles and attention mask are computed
there) and attends over a fixed span of the cache. On the CPU stand-in the same code runs eagerly
(`GraphedDecode(capture=False)`) and is checked against transformers; capture and replay are
checked on CUDA by the `gpu`-marked tests."""

from __future__ import annotations

import pytest
import torch

import offload
from offload.config import GRAPH_SPAN
from offload.graphs import GraphedDecode
from offload.models.cache import DevicePosition, KVCache
from conftest import parity_bound, stepped_reference
from test_int4_engine import dequantized_reference

STAND_IN = dict(gpu_mem="8G", profile="rtx4060-ddr5", device="cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["next", "moe", "moe-window"])
def test_device_position_steps_match_transformers_across_spans(hf_checkpoint, name):
    """Decode steps through the graph-ready code (KV written at a device index, attention over the
    span with later positions masked; a sliding window masked the same way) from a prompt ending
    just before the first span's end, so the steps cross into the next span."""
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    prefix, total = GRAPH_SPAN - 6, GRAPH_SPAN + 10
    ids = torch.randint(0, 160, (total,), generator=torch.Generator().manual_seed(41))
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, exact=True, ctx=4 * GRAPH_SPAN,
                          **STAND_IN)
    engine.graphs = GraphedDecode(engine, capture=False)
    assert engine.graphs.span(prefix) == GRAPH_SPAN and engine.graphs.span(total - 1) == 2 * GRAPH_SPAN
    engine.reset()
    stepped = torch.cat([engine.feed(ids[:prefix])] + [engine.feed(ids[i:i + 1]) for i in range(prefix, total)])
    expected = stepped_reference(reference, ids, prefix)
    assert (stepped - expected).abs().max().item() <= parity_bound(reference, ids, prefix=prefix)
    assert engine.position == total and engine.written == ids.tolist()


def test_a_device_position_writes_and_reads_every_kv_format_as_an_int_position():
    """KVCache at a DevicePosition: the same stored rows and the same attention as at the int
    position, in every format and layout (tiled CPU caches included)."""
    generator = torch.Generator().manual_seed(42)
    heads, kv_heads, width, length = 4, 2, 32, 64
    keys, values = (torch.randn(kv_heads, 40, width, generator=generator) for _ in range(2))
    query = torch.randn(heads, 1, width, generator=generator)
    for format in ("f32", "bf16", "f16", "int8"):
        at_int, at_device = KVCache(length, kv_heads, width, format), KVCache(length, kv_heads, width, format)
        for cache in (at_int, at_device):
            cache.write(keys[:, :39], values[:, :39], 0)
        at_int.write(keys[:, 39:], values[:, 39:], 39)
        position = DevicePosition(torch.tensor([39]), span=length)
        at_device.write(keys[:, 39:], values[:, 39:], position)
        for name in ("keys", "values", *(("key_scales", "value_scales") if format == "int8" else ())):
            assert torch.equal(getattr(at_int, name), getattr(at_device, name)), (format, name)
        for window in (None, 8):
            dtype = torch.float32 if format in ("f32", "int8") else KVCache(1, 1, width, format).values.dtype
            expected = at_int.attend(query.to(dtype), 39, window).float()
            got = at_device.attend(query.to(dtype), position, window).float()
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            assert (got - expected).abs().max().item() <= tolerance, (format, window)


def test_graphs_stay_off_without_cuda_or_with_a_kv_cache_they_cannot_read(hf_checkpoint, capfd):
    path = hf_checkpoint("next").path
    engine = offload.load(path, quant="int4", cuda_graphs=True, **STAND_IN)
    assert engine.graphs is None
    assert "note: CUDA graphs are off: they need a CUDA device" in capfd.readouterr().err
    int8 = offload.load(path, quant="int4", kv_cache="int8", **STAND_IN)
    assert "kv_cache='f32'" in GraphedDecode.refusal(int8)
    assert GraphedDecode.refusal(offload.load(path, quant="int4", kv_cache="f32", **STAND_IN)) is None


# --- CUDA ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["next", "moe"])
def test_cuda_graphs_replay_the_eager_decode(hf_checkpoint, name):
    """Captured steps give the eager steps' logits, across a span boundary; the chain is cut once
    per MoE layer (the host lane) and ends with the logits."""
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    prefix, total = GRAPH_SPAN - 6, GRAPH_SPAN + 10
    ids = torch.randint(0, 160, (total,), generator=torch.Generator().manual_seed(43))
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, exact=True, kv_cache="auto",
                          ctx=4 * GRAPH_SPAN, gpu_mem="8G", profile="rtx4060-ddr5", cuda_graphs=True)
    assert engine.graphs is not None

    def decode() -> torch.Tensor:
        engine.reset()
        return torch.cat([engine.feed(ids[:prefix])] + [engine.feed(ids[i:i + 1]) for i in range(prefix, total)])

    graphed = decode()
    assert engine.graphs is not None, "the capture failed (see the note on stderr)"
    chains = engine.graphs.chains
    assert sorted(chains) == [GRAPH_SPAN, 2 * GRAPH_SPAN]
    moe_layers = sum(engine.args.is_moe_layer(layer) for layer in range(engine.args.num_hidden_layers))
    assert all(len(chain.pieces) == moe_layers + 1 for chain in chains.values())
    graphs, engine.graphs = engine.graphs, None
    eager = decode()
    engine.graphs = graphs
    assert (graphed - eager).abs().max().item() <= parity_bound(reference, ids, prefix=prefix)
    assert (graphed - stepped_reference(reference, ids, prefix)).abs().max().item() \
        <= parity_bound(reference, ids, prefix=prefix)


def test_a_scheduled_single_answer_steps_through_the_graphs(hf_checkpoint):
    """A server's lone answer on the first slot replays its decode steps from the graph path (as
    `offload serve --cuda-graphs` needs): the same tokens as the eager batched step."""
    from offload.sampling import Sampler, SamplingParams
    from offload.scheduler import Request, Scheduler

    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, exact=True, slots=2,
                          **STAND_IN)
    ids = torch.randint(0, 160, (12,), generator=torch.Generator().manual_seed(43)).tolist()

    def answer() -> list[int]:
        tokens, ended = [], []
        scheduler = Scheduler(engine)
        scheduler.submit(Request(ids, Sampler(SamplingParams()), 8, tokens.append, ended.append))
        while not ended:
            scheduler.tick()
        return tokens

    eager = answer()
    engine.graphs = GraphedDecode(engine, capture=False)
    replayed, step = [], engine.graphs.step
    engine.graphs.step = lambda token, position: replayed.append(position) or step(token, position)
    assert answer() == eager and replayed == list(range(12, 19))  # every decode step but the first draw's
