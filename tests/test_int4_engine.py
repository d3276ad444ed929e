"""quant="int4": the engine with routed experts from the int4 store, against transformers run on
exactly the weights the int4 format decodes to."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import offload
from offload.kernels import int4, int8
from conftest import parity_bound
from offload.dense import QuantizedLinear


def dequantized_reference(model):
    """A copy of the transformers model whose routed experts are int4-rounded."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in getattr(reference.model, "language_model", reference.model).layers:  # (a release's wrapper)
            experts = getattr(layer.mlp, "experts", None)
            if experts is None or not hasattr(experts, "gate_up_proj"):
                continue
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, name)
                weight.copy_(torch.from_numpy(int4.dequantize(int4.quantize(weight.numpy()))))
    return reference


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["next", "next-hub", "moe", "moe-hub", "q35-release"])
def test_int4_logits_match_transformers_on_dequantized_experts(hf_checkpoint, name):
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
        unquantized = checkpoint.model(ids[None]).logits[0]
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, exact=True)
    bound = parity_bound(reference, ids, prefix=100)
    logits = engine.logits(ids)  # prefill: experts through the grouped prefill kernel
    assert (logits - expected).abs().max().item() <= bound
    assert (unquantized - expected).abs().max().item() > 10 * bound  # int4 really is in use
    engine.reset()
    stepped = torch.cat([engine.feed(ids[:100])] + [engine.feed(ids[i:i + 1]) for i in range(100, 150)])
    assert (stepped - expected).abs().max().item() <= bound  # decode: one token at a time, decode kernel


def test_int4_greedy_generation_matches_transformers(hf_checkpoint):
    checkpoint = hf_checkpoint("moe")
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (20,), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = reference.generate(ids[None], max_new_tokens=32, do_sample=False)[0, 20:].tolist()
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, exact=True)
    assert engine.generate(ids, max_new_tokens=32) == expected


@pytest.mark.parametrize("name", ["next", "moe"])
def test_fast_kernels_are_the_default_and_cost_a_fraction_of_int4(hf_checkpoint, name):
    """The fast kernels' int8 activations move the logits by a small part of what rounding the
    experts to int4 does (these random models amplify any rounding, so a fixed bound would say
    little: on "next" int4 experts move the logits by ~50%)."""
    checkpoint = hf_checkpoint(name)
    ids = torch.randint(0, 160, (120,), generator=torch.Generator().manual_seed(17))
    fast = offload.load(checkpoint.path, quant="int4", dense_quant=None, kv_cache="f32")  # the kernels alone
    exact = offload.load(checkpoint.path, quant="int4", dense_quant=None, exact=True)
    assert not fast.executor.exact and exact.executor.exact

    def moved(a, b):
        return ((a - b).norm() / b.norm()).item()

    exact_logits = exact.logits(ids)
    int4_cost = moved(exact_logits, checkpoint.logits(ids))
    assert 1e-5 < moved(fast.logits(ids), exact_logits) < 0.3 * int4_cost  # prefill kernels
    fast.reset()
    exact.reset()
    stepped = [moved(fast.feed(ids[i:i + 1]), exact.feed(ids[i:i + 1])) for i in range(12)]  # decode kernels
    assert 1e-5 < max(stepped) < 0.3 * int4_cost


def test_unknown_quant_is_explained(hf_checkpoint):
    with pytest.raises(offload.OffloadError, match="quant='int8' is not a format offload has"):
        offload.load(hf_checkpoint("moe").path, quant="int8")


def round_dense(model, dense_quant: str) -> set[str]:
    """Round every dense matrix the way `dense_quant` does (same eligibility rule and formats);
    returns the formats used."""
    from torch import nn

    from offload.kernels import int6
    from offload.planner import dense_format, group_of, quantizable

    modules = {"int4": int4, "int6": int6, "int8": int8}
    if model.config.tie_word_embeddings:  # the head gets its own rounded copy; embeddings stay exact
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    used = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and quantizable(f"{name}.weight", tuple(module.weight.shape)):
                fmt = dense_format(group_of(f"{name}.weight"), dense_quant)
                rounded = modules[fmt].dequantize(modules[fmt].quantize(module.weight.numpy()))[0]
                module.weight.copy_(torch.from_numpy(rounded))
                used.add(fmt)
    return used


@pytest.mark.parametrize("name, dense_quant", [("next", "auto"), ("moe-hub", "auto"), ("next", "int4"),
                                               ("moe-hub", "int4"), ("next", "int8"), ("moe", "int8")])
def test_quantized_dense_layers_match_transformers_on_rounded_weights(hf_checkpoint, name, dense_quant):
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    formats = round_dense(reference, dense_quant)
    assert formats == ({"int4", "int6"} if dense_quant == "auto" else {dense_quant})
    ids = torch.randint(0, 160, (80,), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    # "auto" is the default for the dense layers once the experts are int4
    engine = offload.load(checkpoint.path, quant="int4", exact=True,
                          **({} if dense_quant == "auto" else {"dense_quant": dense_quant}))
    swapped = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) >= 3 * engine.args.num_hidden_layers  # mixers' projections, lm_head, ...
    assert {m.format for m in swapped} == formats
    assert engine.model.lm_head.format == ("int6" if dense_quant == "auto" else dense_quant)
    assert engine.dtype == torch.float32
    # every projection now sums in the kernel's order rather than BLAS's: still fp32 rounding
    bound = parity_bound(reference, ids, prefix=60)
    logits = engine.logits(ids)
    assert (logits - expected).abs().max().item() <= bound
    engine.reset()
    stepped = torch.cat([engine.feed(ids[:60])] + [engine.feed(ids[i:i + 1]) for i in range(60, 80)])
    assert (stepped - expected).abs().max().item() <= bound


def test_overlap_on_a_worker_thread_changes_nothing(hf_checkpoint):
    checkpoint = hf_checkpoint("next")  # has shared experts: computed while the worker runs
    ids = torch.randint(0, 160, (90,), generator=torch.Generator().manual_seed(14))
    serial = offload.load(checkpoint.path, quant="int4")
    overlapped = offload.load(checkpoint.path, quant="int4", overlap=True)  # both with int8 dense layers
    executor = next(m for m in overlapped.model.modules() if type(m).__name__ == "Int4Experts").executor
    assert executor.worker is not None
    assert torch.equal(serial.logits(ids), overlapped.logits(ids))
    assert serial.generate(ids[:10], max_new_tokens=16) == overlapped.generate(ids[:10], max_new_tokens=16)


@pytest.mark.parametrize("name", ["next", "moe"])
def test_streamed_prefill_matches_transformers(hf_checkpoint, name):
    """Prefill path (b): layers streamed to the device (the CPU here), dequantised by torch."""
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    streamed = offload.load(checkpoint.path, quant="int4", dense_quant=None, prefill="stream", exact=True)
    assert (streamed.logits(ids) - expected).abs().max().item() <= parity_bound(reference, ids)
    executor = next(m for m in streamed.model.modules() if type(m).__name__ == "Int4Experts").executor
    assert executor.streamer is not None  # the streamed path ran
    kernels = offload.load(checkpoint.path, quant="int4", dense_quant=None, prefill="cpu", exact=True)
    prompt = ids[:40]
    assert streamed.generate(prompt, max_new_tokens=16) == kernels.generate(prompt, max_new_tokens=16)


def test_only_a_prompts_last_chunk_reads_the_output_head(hf_checkpoint):
    """A prompt of several chunks, fed for its last token's logits, runs the output head once
    (the earlier chunks only fill the caches), and those logits are the last row of all of them."""
    from offload.config import PREFILL_CHUNK

    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None)
    calls = []
    engine.model.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    ids = torch.randint(0, 160, (PREFILL_CHUNK + 50,), generator=torch.Generator().manual_seed(33))
    last = engine.feed(ids, all_logits=False)
    assert calls == [1]
    engine.reset()
    every = engine.feed(ids)
    assert calls[1:] == [PREFILL_CHUNK, 50] and every.shape[0] == ids.shape[0]
    assert torch.allclose(last[0], every[-1], rtol=1e-5, atol=1e-5 * every[-1].abs().max().item())


def test_streamer_double_buffers_layers_in_order(hf_checkpoint):
    from offload.store import open_store
    from offload.transfer import ExpertStreamer, dequantize_int4

    checkpoint = hf_checkpoint("next")
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None)
    store = open_store(checkpoint.path, engine.args)
    streamer = ExpertStreamer(store, torch.device("cpu"))
    assert len(streamer.order) >= 2
    for wrap in (False, True):  # two passes: every layer comes back right, through two slots
        streamer.wrap = wrap  # True: another pass follows, and the first layer's copy starts early
        for layer in streamer.order:
            copy = streamer.get(layer)
            for block in range(len(streamer.blocks)):
                copy.ready(block)
            arrays = copy.arrays
            host = store.layers[layer]
            assert np.array_equal(arrays["gate_up_packed"].numpy(), host.gate_up.packed)
            assert np.array_equal(arrays["down_scales"].numpy().view(np.uint16), host.down.scales)
            weight = dequantize_int4(arrays["down_packed"], arrays["down_scales"], torch.float32)
            assert torch.equal(weight, torch.from_numpy(int4.dequantize(host.down)))
        assert (streamer.order[0] in streamer.pending) == wrap  # on its way before the next pass asks
    assert len({id(slot["gate_up_packed"]) for slot in streamer.slots}) == 2


def test_bad_prefill_is_explained(hf_checkpoint):
    with pytest.raises(offload.OffloadError, match="not a prefill path"):
        offload.load(hf_checkpoint("moe").path, quant="int4", prefill="gpu")
    with pytest.raises(offload.OffloadError, match="use it with quant='int4'"):
        offload.load(hf_checkpoint("moe").path, prefill="stream")


@pytest.mark.gpu
def test_streamer_on_cuda_matches_the_cpu(hf_checkpoint):
    """Path (b) with a real device: pinned staging, the copy stream and events."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from offload.store import open_store
    from offload.transfer import ExpertStreamer, streamed_experts

    checkpoint = hf_checkpoint("next")
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None)
    store = open_store(checkpoint.path, engine.args)
    gpu, cpu = ExpertStreamer(store, torch.device("cuda")), ExpertStreamer(store, torch.device("cpu"))
    generator = torch.Generator().manual_seed(16)
    for _ in range(2):
        for layer in gpu.order:
            x = torch.randn(64, engine.args.hidden_size, generator=generator)
            ids = torch.randint(0, engine.args.num_experts, (64, engine.args.num_experts_per_tok), generator=generator)
            weights = torch.rand(ids.shape, generator=generator)
            on_gpu = streamed_experts(gpu.get(layer), [(x.cuda(), ids, weights)])[0]
            gpu.release(layer)
            on_cpu = streamed_experts(cpu.get(layer), [(x, ids, weights)])[0]
            assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["next", "moe"])
def test_a_snapshot_resumes_a_sequence_exactly(hf_checkpoint, name):
    """`Engine.snapshot` / `restore`: DeltaNet's states come back from RAM, keys and values are
    still in the KV cache by position; a restored sequence continues bit for bit, and one whose
    positions another sequence has overwritten is refused."""
    engine = offload.load(hf_checkpoint(name).path, quant="int4")
    ids = torch.randint(0, 160, (60,), generator=torch.Generator().manual_seed(21)).tolist()
    engine.reset()
    engine.append(ids[:30])
    snapshot = engine.snapshot()
    expected = engine.append(ids[30:45])
    engine.append(ids[45:])  # the sequence goes on past the snapshot ...
    engine.restore(snapshot)  # ... and comes back to it
    assert engine.position == 30 and engine.history == ids[:30]
    assert torch.equal(engine.append(ids[30:45]), expected)
    engine.reset()
    engine.append(ids[40:50])  # another sequence writes over positions 0-9
    assert not engine.can_restore(snapshot)
    with pytest.raises(offload.OffloadError, match="overwritten"):
        engine.restore(snapshot)
