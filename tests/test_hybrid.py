"""The plan executed: GPU groups on the execution device, routed experts through the host lanes
to the int4 kernels. Without CUDA the CPU stands in for the GPU (device="cpu" with a GPU budget):
the same code, the same crossings, checked against transformers. `gpu`-marked tests run the
CUDA-only parts (pinned lanes, events, streams, the memory cap)."""

from __future__ import annotations

import copy

import pytest
import torch

import offload
from offload.dense import QuantizedLinear
from offload.experts import Int4Experts
from offload.host import OnHost
from offload.planner import PREFETCH_GROUP, STAGING_GROUP
from conftest import parity_bound, stepped_reference
from test_int4_engine import dequantized_reference

STAND_IN = dict(gpu_mem="8G", profile="rtx4060-ddr5", device="cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))


def executor_of(engine):
    return next(m for m in engine.model.modules() if isinstance(m, Int4Experts)).executor


def assert_placement_agrees(engine, torch_device: str) -> None:
    planned, executed = engine.plan.placement, engine.placement
    assert [e["group"] for e in executed] == [p.group for p in planned]
    for plan_entry, done in zip(planned, executed):
        assert done["device"] == plan_entry.device and done["format"] == plan_entry.format, done
        assert done["torch_device"] == (torch_device if plan_entry.device == "gpu" else "cpu")
        if plan_entry.group != STAGING_GROUP or torch_device.startswith("cuda"):  # staging is CUDA's
            assert done["nbytes"] == plan_entry.nbytes, (plan_entry, done)


@pytest.mark.parametrize("name", ["next", "moe-hub", "q35"])
def test_stand_in_places_every_group_as_planned(hf_checkpoint, name):
    engine = offload.load(hf_checkpoint(name).path, quant="int4", **STAND_IN)
    assert engine.plan.gpu_budget > 0 and engine.device == torch.device("cpu")
    assert_placement_agrees(engine, "cpu")
    on_gpu = {p.group for p in engine.plan.placement if p.device == "gpu"}
    assert {"mixers", "routers", "norms", "lm_head"} <= on_gpu
    # the GPU groups run in the checkpoint's precision, through torch (no CPU kernels swapped in)
    assert not any(isinstance(m, QuantizedLinear) for m in engine.model.modules())
    assert not any(type(m).__name__ == "FusedDeltaNet" for m in engine.model.modules())
    assert executor_of(engine).lanes  # routed experts cross through the host lanes
    if name != "moe-hub":
        assert PREFETCH_GROUP in {p["group"] for p in engine.placement}
        assert executor_of(engine).streamer is not None  # allocated at load: it is in the budget


def test_a_short_budget_moves_shared_experts_and_lm_head_to_the_cpu(hf_checkpoint):
    """The shared experts then run in the host lanes' CPU work beside the routed experts (no
    crossing of their own), and the logits are still transformers'."""
    checkpoint = hf_checkpoint("next")
    roomy = offload.load(checkpoint.path, quant="int4", **STAND_IN)
    engine = offload.load(checkpoint.path, quant="int4", **{**STAND_IN, "gpu_mem": roomy.plan.minimum_gpu_bytes})
    where = {p["group"]: p for p in engine.placement}
    assert where["shared experts"]["device"] == where["lm_head"]["device"] == "cpu"
    assert where["lm_head"]["format"] == "int6" and engine.model.lm_head.format == "int6"
    # this model's shared expert (48 wide) has no int4 shape: it stays float, as the plan says
    assert where["shared experts"]["format"] == "fp32"
    assert_placement_agrees(engine, "cpu")
    assert engine.generate(list(range(1, 30)), max_new_tokens=8)  # runs end to end
    exact_options = dict(quant="int4", dense_quant=None, exact=True, kv_cache="f32")
    smallest = offload.load(checkpoint.path, **exact_options, **STAND_IN).plan.minimum_gpu_bytes
    exact = offload.load(checkpoint.path, **exact_options, **{**STAND_IN, "gpu_mem": smallest})
    assert all(layer.mlp.shared_on_host for layer in exact.model.layers)
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (120,), generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    bound = parity_bound(reference, ids, prefix=100)
    assert (exact.logits(ids) - expected).abs().max().item() <= bound
    exact.reset()
    stepped = torch.cat([exact.feed(ids[:100])] + [exact.feed(ids[i:i + 1]) for i in range(100, 120)])
    assert (stepped - stepped_reference(reference, ids, 100)).abs().max().item() <= bound


def test_ram_resident_modules_are_the_ones_wrapped_for_a_gpu(hf_checkpoint):
    """On CUDA each largest module whose groups the plan keeps in RAM runs through `OnHost`; the
    choice is made here with the CPU as the target, where the wrappers change no result."""
    from offload.placement import _wrap_host_modules

    path = hf_checkpoint("next").path
    roomy = offload.load(path, quant="int4", **STAND_IN)
    engine = offload.load(path, quant="int4", **{**STAND_IN, "gpu_mem": roomy.plan.minimum_gpu_bytes})
    ids = torch.arange(40) % 160
    before = engine.logits(ids)
    host_groups = {p.group for p in engine.plan.placement if p.device == "cpu"}
    _wrap_host_modules(engine.model, host_groups, torch.device("cpu"))
    wrapped = sorted(name for name, m in engine.model.named_modules() if isinstance(m, OnHost))
    layers = range(len(engine.model.layers))
    assert wrapped == ["embed_tokens", "lm_head"]  # the shared experts run in the host lanes' work
    # the logits stay in RAM, where they are wanted; the embedded tokens go to the device
    assert engine.model.lm_head.output_in_ram and not engine.model.embed_tokens.output_in_ram
    assert all(engine.model.layers[i].mlp.shared_on_host for i in layers)
    assert torch.equal(engine.logits(ids), before)


def test_a_plan_that_does_not_fit_fails_before_loading(hf_checkpoint):
    path = hf_checkpoint("moe").path
    minimum = offload.load(path, quant="int4", **STAND_IN).plan.minimum_gpu_bytes
    with pytest.raises(offload.OffloadError, match="does not fit: needs at least .* of GPU memory"):
        offload.load(path, quant="int4", **{**STAND_IN, "gpu_mem": minimum - 1})


@pytest.mark.parametrize("name", ["next", "next-hub", "moe", "moe-hub", "moe-window", "q35-release"])
@pytest.mark.parametrize("prefill", ["cpu", "stream"])
def test_stand_in_matches_transformers(hf_checkpoint, name, prefill):
    """Prefill by path (a) or (b), then step-by-step decode, which on the stand-in runs the torch
    decode step a GPU runs (`gated_delta_step` for Qwen3-Next), against transformers."""
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, prefill=prefill, exact=True, **STAND_IN)
    assert engine.streams(150) == (prefill == "stream")
    bound = parity_bound(reference, ids, prefix=100)
    assert (engine.logits(ids) - expected).abs().max().item() <= bound
    engine.reset()
    stepped = torch.cat([engine.feed(ids[:100])] + [engine.feed(ids[i:i + 1]) for i in range(100, 150)])
    assert (stepped - stepped_reference(reference, ids, 100)).abs().max().item() <= bound


def test_a_streamed_prompt_copies_each_layer_once_and_matches_transformers(hf_checkpoint, monkeypatch):
    """Path (b) runs layer by layer: a prompt of two chunks copies every MoE layer's experts to
    the device once (counted) and dequantises them once, not once per chunk, with the same logits
    as transformers."""
    from offload import transfer
    from offload.config import PREFILL_CHUNK
    from offload.transfer import ARRAYS, _host_arrays

    dequantized = []
    dequantize = transfer.dequantize_int4
    monkeypatch.setattr(transfer, "dequantize_int4", lambda *args: dequantized.append(1) or dequantize(*args))

    checkpoint = hf_checkpoint("next")
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (2 * PREFILL_CHUNK - 100,), generator=torch.Generator().manual_seed(27))
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, prefill="stream", exact=True, **STAND_IN)
    store = executor_of(engine).store
    one_pass = sum(_host_arrays(store, layer)[name].nbytes for layer in store.layers for name in ARRAYS)
    assert engine.counters["h2d_expert_bytes"] == 0
    logits = engine.logits(ids)
    assert engine.counters["h2d_expert_bytes"] == one_pass
    batches = -(-engine.args.num_experts // transfer.STREAM_EXPERT_BATCH)
    assert len(dequantized) == 2 * batches * len(store.layers)  # gate_up and down, per batch, per pass
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert (logits - expected).abs().max().item() <= parity_bound(reference, ids)
    engine.reset()
    engine.feed(ids[:PREFILL_CHUNK + 1], all_logits=False)  # the next prompt: one more pass
    assert engine.counters["h2d_expert_bytes"] == 2 * one_pass
    # a pass a chunk: each pass copies every layer once, the next pass's first during the last layer
    monkeypatch.setattr(offload.engine, "STREAM_PASS_TOKENS", PREFILL_CHUNK)
    streamer, early = executor_of(engine).streamer, []
    get = streamer.get

    def watched(layer):
        copy = get(layer)
        if layer == streamer.order[-1]:  # is the next pass's first layer already on its way?
            early.append(streamer.order[0] in streamer.pending)
        return copy
    monkeypatch.setattr(streamer, "get", watched)
    engine.reset()
    assert torch.allclose(engine.logits(ids), logits, rtol=0, atol=1e-5 * logits.abs().max().item())
    assert engine.counters["h2d_expert_bytes"] == 4 * one_pass and not streamer.wrap
    assert early == [True, False]  # the second pass is the last
    # a last pass of a few tokens runs on the CPU's kernels: nothing is copied for it
    engine.reset()
    engine.feed(ids[:PREFILL_CHUNK + 3], all_logits=False)
    assert engine.counters["h2d_expert_bytes"] == 5 * one_pass and early[2:] == [False]


def test_a_streamed_layer_is_computed_as_its_blocks_land(hf_checkpoint, monkeypatch):
    """A layer crosses in blocks of experts, and a batch of experts is computed as soon as its block
    has landed: with the copy slowed down, the first layer's first batches run while later blocks
    are still on their way, and the logits are transformers'."""
    import time

    from offload import transfer

    monkeypatch.setattr(transfer, "STREAM_EXPERT_BATCH", 4)  # several blocks per layer of the tiny model
    view = transfer.torch_view
    monkeypatch.setattr(transfer, "torch_view", lambda array: time.sleep(0.003) or view(array))
    landed_when_queued = []
    ready = transfer.StreamedLayer.ready

    def watched(self, block):
        ready(self, block)
        landed_when_queued.append((sum(flag.is_set() for flag in self.staged), len(self.staged)))
    monkeypatch.setattr(transfer.StreamedLayer, "ready", watched)
    checkpoint = hf_checkpoint("next")
    reference = dequantized_reference(checkpoint.model)
    engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, prefill="stream", exact=True, **STAND_IN)
    ids = torch.randint(0, 160, (600,), generator=torch.Generator().manual_seed(30))
    logits = engine.logits(ids)
    assert landed_when_queued and landed_when_queued[0][1] > 2
    assert any(landed < blocks for landed, blocks in landed_when_queued)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert (logits - expected).abs().max().item() <= parity_bound(reference, ids)


def test_streamed_experts_read_the_device_once_a_layer(hf_checkpoint, monkeypatch):
    """Path (b)'s routed experts (grouping by expert, dequantisation, grouped matmuls) read one
    thing on the host per layer: the chunks' group ends, in one call. Every call that would read a
    device value (item, tolist, cpu, numpy, nonzero, bool, int) is trapped while a streamed layer
    runs."""
    from offload import transfer

    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, prefill="stream",
                          **STAND_IN)
    inside, trapped, calls = [False], [], []
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def trap(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                trapped.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, trap)
    streamed = transfer.streamed_experts

    def watched(*args):
        inside[0] = True
        calls.append(len(args[1]))
        try:
            return streamed(*args)
        finally:
            inside[0] = False
    monkeypatch.setattr(transfer, "streamed_experts", watched)
    ids = torch.randint(0, 160, (700,), generator=torch.Generator().manual_seed(28))
    engine.feed(ids, all_logits=False)
    assert engine.counters["h2d_expert_bytes"] > 0 and calls
    assert trapped == ["tolist"] * len(calls)


@pytest.mark.parametrize("graphed", [False, True])
def test_a_layer_reads_nothing_from_the_device_but_the_lane_hand_off(hf_checkpoint, monkeypatch, graphed):
    """Inside the layers of a decode step and of a prompt chunk (path a, two chunks in flight),
    every call that would read a device value on the host (item, tolist, cpu, numpy, nonzero,
    bool, int) is trapped; the only ones allowed are the host lane's own buffers, which the CPU
    kernels read by design after the lane's event. With `graphed`, decode steps take the
    graph-ready path (`DevicePosition`)."""
    from offload.graphs import GraphedDecode
    from offload.models.decoder import CausalLM

    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, prefill="cpu", **STAND_IN)
    engine.pipelined = True
    if graphed:
        engine.graphs = GraphedDecode(engine, capture=False)
    lanes = {buffer.untyped_storage().data_ptr() for lane in executor_of(engine).lanes
             for buffer in (lane.x, lane.expert_ids, lane.weights, lane.out)}
    inside, trapped, handed_off = [False], [], []
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def trap(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                (handed_off if self.untyped_storage().data_ptr() in lanes else trapped).append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, trap)
    layer_stages = CausalLM.layer_stages

    def watched(self, *args, **kwargs):  # the trap is armed while the layers run, not around them
        stages = layer_stages(self, *args, **kwargs)
        while True:
            inside[0] = True
            try:
                next(stages)
            except StopIteration as done:
                return done.value
            finally:
                inside[0] = False
            yield
    monkeypatch.setattr(CausalLM, "layer_stages", watched)
    ids = torch.randint(0, 160, (700,), generator=torch.Generator().manual_seed(32))
    engine.feed(ids, all_logits=False)
    for token in range(1, 6):
        engine.feed([token], all_logits=False)
    assert trapped == [] and "numpy" in handed_off  # the trap was armed where the kernels read the lanes


def test_streamed_chunks_of_overlapping_calls_keep_their_own_results(hf_checkpoint):
    """A layer's streamed chunks run as one call when the first finishes; chunks that start the
    layer after that go to a new call, and every chunk gets its own result, whatever the order."""
    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, prefill="stream",
                          **STAND_IN)
    executor = executor_of(engine)
    executor.stream = True
    layer = sorted(executor.store.layers)[0]
    generator = torch.Generator().manual_seed(30)
    inputs = [(torch.randn(tokens, engine.args.hidden_size, generator=generator),
               torch.randint(0, engine.args.num_experts, (tokens, engine.args.num_experts_per_tok), generator=generator),
               torch.rand(tokens, engine.args.num_experts_per_tok, generator=generator)) for tokens in (20, 33, 17, 40)]
    alone = [executor.start(layer, *chunk)() for chunk in inputs]
    first, second = executor.start(layer, *inputs[0]), executor.start(layer, *inputs[1])
    results = {0: first()}
    third, fourth = executor.start(layer, *inputs[2]), executor.start(layer, *inputs[3])
    results[1], results[3], results[2] = second(), fourth(), third()
    for index, expected in enumerate(alone):
        assert torch.allclose(results[index], expected, atol=1e-5), index
    assert not executor.calls  # nothing left waiting


def test_streamed_experts_without_a_grouped_kernel_agree(hf_checkpoint, monkeypatch):
    """Cards whose grouped matmul would read offsets on the host take the expert-by-expert path
    (one host read per call): the same logits."""
    from offload import transfer

    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, prefill="stream",
                          exact=True, **STAND_IN)
    ids = torch.randint(0, 160, (600,), generator=torch.Generator().manual_seed(29))
    grouped = engine.logits(ids)
    monkeypatch.setattr(transfer, "grouped_kernel", lambda device, dtype: False)
    assert (engine.logits(ids) - grouped).abs().max().item() <= 1e-4 * grouped.abs().max().item()


def test_the_gpu_memory_cap_takes_out_what_lies_outside_the_allocator():
    """What the context (and anything else) holds outside torch's allocator comes out of the
    budget; a budget a little above the card is clamped with a note, far above it refused."""
    from offload.engine import gpu_memory_cap
    from offload.errors import OffloadError

    gib = 2**30
    fraction, outside, note = gpu_memory_cap(8 * gib, 24 * gib, 23 * gib + gib // 2, 0)  # a context of 0.5 GiB
    assert outside == gib // 2 and fraction == pytest.approx(7.5 / 24) and note is None
    fraction, outside, note = gpu_memory_cap(8 * gib, int(7.6 * gib), int(7.1 * gib), 0)  # "8 GB" card
    assert fraction == pytest.approx(7.1 / 7.6) and "more than the GPU" in note
    fraction, outside, note = gpu_memory_cap(8 * gib, 24 * gib, 18 * gib, gib)  # 5 GiB held by others
    assert outside == gib // 2 and fraction == pytest.approx(7.5 / 24)  # only our context's share
    fraction, outside, note = gpu_memory_cap(8 * gib, 24 * gib, 4 * gib, gib)  # others hold most of it
    assert fraction == pytest.approx(5 / 24)  # no more than is free
    with pytest.raises(OffloadError, match="lower --gpu-mem"):
        gpu_memory_cap(16 * gib, 8 * gib, 8 * gib, 0)
    with pytest.raises(OffloadError, match="free the GPU"):
        gpu_memory_cap(2 * gib, 24 * gib, 0, 0)


def test_stand_in_with_float_experts_in_ram_matches_transformers(hf_checkpoint):
    """quant=None: the routed experts stay float, in RAM as the plan says, computed by torch there."""
    checkpoint = hf_checkpoint("next")
    ids = torch.randint(0, 160, (60,), generator=torch.Generator().manual_seed(26))
    engine = offload.load(checkpoint.path, quant=None, **STAND_IN)
    experts = next(p for p in engine.placement if p["group"] == "routed experts")
    assert experts["device"] == "cpu" and experts["format"] == "fp32"
    assert_placement_agrees(engine, "cpu")
    assert (engine.logits(ids) - checkpoint.logits(ids)).abs().max().item() <= parity_bound(checkpoint.model, ids)


def test_pipelined_prefill_is_the_sequential_prefill(hf_checkpoint):
    """Two prompt chunks in flight (chunk c+1's mixers while chunk c's experts run) changes no bit:
    every layer still sees its chunks in order."""
    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, prefill="cpu", **STAND_IN)
    ids = torch.randint(0, 160, (1000,), generator=torch.Generator().manual_seed(22))  # two chunks of 512
    sequential = engine.logits(ids)
    engine.pipelined = True
    assert torch.equal(engine.logits(ids), sequential)
    engine.reset()
    engine.feed(ids[:1000], all_logits=False)
    after_pipelined = engine.feed(ids[:1])  # the caches were left as a sequential prefill leaves them
    engine.pipelined = False
    engine.reset()
    engine.feed(ids[:1000], all_logits=False)
    assert torch.equal(engine.feed(ids[:1]), after_pipelined)


def test_streamed_prefill_stays_inside_the_plan(hf_checkpoint):
    """Streaming needs the device slots the plan counts: asked for where the budget leaves no room
    for them, it is refused at load; an engine without them never streams."""
    path = hf_checkpoint("next").path
    roomy = offload.load(path, quant="int4", **STAND_IN)
    with pytest.raises(offload.OffloadError, match="prefill='stream' needs room on the GPU"):
        offload.load(path, quant="int4", prefill="stream", **{**STAND_IN, "gpu_mem": roomy.plan.minimum_gpu_bytes})
    tight = offload.load(path, quant="int4", **{**STAND_IN, "gpu_mem": roomy.plan.minimum_gpu_bytes})
    tight.prefill = "stream"
    assert not tight.streams(2000) and executor_of(tight).streamer is None


def test_the_engine_chooses_the_prefill_path_per_prompt(hf_checkpoint):
    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, **STAND_IN)
    threshold = engine.plan.predicted.stream_from_tokens
    assert threshold is not None and 8 < threshold < engine.ctx
    assert not engine.streams(threshold - 1) and engine.streams(threshold)
    executor = executor_of(engine)
    engine.logits(torch.arange(threshold - 1) % 150)
    assert not executor.streamer.pending  # the kernels ran it
    engine.logits(torch.arange(threshold) % 150)
    assert executor.streamer.pending  # whole layers were streamed


@pytest.mark.parametrize("name", ["next", "moe"])
def test_bf16_stand_in_agrees_with_fp32_as_transformers_in_bf16_does(hf_checkpoint, tmp_path, name):
    """A bf16 checkpoint computes in bf16 on the (stand-in) GPU. Its distance from fp32 on the same
    weights is bf16's own: within 1.5x of transformers' bf16 distance (these random models
    amplify rounding, so no fixed tolerance would say more)."""
    rounded = copy.deepcopy(hf_checkpoint(name).model).to(torch.bfloat16)
    rounded.save_pretrained(tmp_path / "bf16")
    fp32 = dequantized_reference(copy.deepcopy(rounded).to(torch.float32))  # the same weights in fp32
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(0, 160, (100,), generator=torch.Generator().manual_seed(23))
    engine = offload.load(tmp_path / "bf16", quant="int4", dense_quant=None, exact=True, **STAND_IN)
    assert engine.dtype == torch.bfloat16
    assert next(p for p in engine.placement if p["group"] == "mixers")["format"] == "bf16"
    prefilled = engine.logits(ids)
    engine.reset()
    stepped = torch.cat([engine.feed(ids[:60])] + [engine.feed(ids[i:i + 1]) for i in range(60, 100)])
    with torch.no_grad():
        cases = [(prefilled, fp32(ids[None]).logits[0], bf16(ids[None]).logits[0].float()),
                 (stepped, stepped_reference(fp32, ids, 60), stepped_reference(bf16, ids, 60))]
    for ours, exact, theirs in cases:
        assert (ours - exact).abs().mean() <= 1.5 * (theirs - exact).abs().mean()
        assert (ours - exact).abs().max() <= 1.5 * (theirs - exact).abs().max()


def test_cpu_only_plans_run_the_cpu_kernels(hf_checkpoint):
    engine = offload.load(hf_checkpoint("next").path, quant="int4", gpu_mem=0)
    assert engine.plan.gpu_budget == 0 and all(p["device"] == "cpu" for p in engine.placement)
    assert_placement_agrees(engine, "cpu")
    assert engine.dtype == torch.float32  # int8 dense layers: the CPU computes in fp32
    assert sum(type(m).__name__ == "FusedDeltaNet" for m in engine.model.modules()) == 3
    assert not executor_of(engine).lanes


def test_float_experts_widened_with_the_rest_are_planned_as_placed(tmp_path):
    """Float routed experts of a bf16 checkpoint beside quantised dense layers on the CPU compute in
    fp32 like the rest: the plan counts them at 4 bytes a weight, as placed."""
    from offload.synthetic import preset_config, synthesize

    path = synthesize(tmp_path / "bf16", preset_config("tiny-qwen3-moe", dtype="bf16"))
    engine = offload.load(path, quant=None, dense_quant="int8", gpu_mem=0)
    routed = next(p for p in engine.placement if p["group"] == "routed experts")
    assert routed["format"] == "fp32"
    assert_placement_agrees(engine, "cpu")


def test_without_cuda_a_gpu_budget_falls_back_to_the_cpu_with_a_notice(hf_checkpoint, capfd):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = offload.load(hf_checkpoint("moe").path, quant="int4", gpu_mem="8G", profile="rtx4060-ddr5")
    assert "no CUDA device" in capfd.readouterr().err
    assert engine.plan.gpu_budget == 0 and engine.device.type == "cpu"
    with pytest.raises(offload.OffloadError, match="torch sees no CUDA device"):
        offload.load(hf_checkpoint("moe").path, quant="int4", gpu_mem="8G", device="cuda")
    with pytest.raises(offload.OffloadError, match="is not a device"):
        offload.load(hf_checkpoint("moe").path, quant="int4", gpu_mem="8G", device="gpu0")


# --- CUDA ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["next", "moe"])
def test_cuda_matches_transformers_and_the_plan(hf_checkpoint, name):
    checkpoint = hf_checkpoint(name)
    reference = dequantized_reference(checkpoint.model)
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    bound = parity_bound(reference, ids, prefix=100)
    for prefill in ("cpu", "stream"):
        engine = offload.load(checkpoint.path, quant="int4", dense_quant=None, prefill=prefill, exact=True,
                              gpu_mem="8G", profile="rtx4060-ddr5")
        assert engine.device.type == "cuda"
        assert_placement_agrees(engine, f"cuda:{torch.cuda.current_device()}")
        assert engine.model.norm.weight.is_cuda and isinstance(engine.model.embed_tokens, OnHost)
        lanes = executor_of(engine).lanes
        assert all(lane.x.is_pinned() and lane.out.is_pinned() for lane in lanes)
        assert (engine.logits(ids) - expected).abs().max().item() <= bound  # TF32-free; cuBLAS sums differently
        engine.reset()
        stepped = torch.cat([engine.feed(ids[:100])] + [engine.feed(ids[i:i + 1]) for i in range(100, 150)])
        assert (stepped - expected).abs().max().item() <= bound


@pytest.mark.gpu
@cuda
def test_cuda_pipelined_prefill_and_the_memory_cap(hf_checkpoint):
    engine = offload.load(hf_checkpoint("next").path, quant="int4", dense_quant=None, prefill="cpu",
                          gpu_mem="8G", profile="rtx4060-ddr5")
    assert engine.pipelined
    ids = torch.randint(0, 160, (1000,), generator=torch.Generator().manual_seed(25))
    pipelined = engine.logits(ids)
    engine.pipelined = False
    sequential = engine.logits(ids)
    assert (pipelined - sequential).abs().max().item() <= 1e-4  # same work, same order per layer
    assert engine.gpu_peak_bytes <= engine.plan.gpu_bytes * 1.05
    total = torch.cuda.get_device_properties(0).total_memory
    if total > 16 * 2**30:  # the cap holds: a big card behaves like the planned 8 GB one
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(9 * 2**30, dtype=torch.uint8, device="cuda")


@pytest.mark.gpu
@cuda
def test_cuda_the_smallest_budget_that_works_holds_a_load_and_its_work(hf_checkpoint):
    """The plan's smallest budget is enough for what a load then does on the card (prefill by
    both paths, decode), and the peak stays inside it."""
    path = hf_checkpoint("next").path
    roomy = offload.load(path, quant="int4", gpu_mem="8G", profile="rtx4060-ddr5")
    smallest = roomy.plan.minimum_gpu_bytes
    del roomy
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = offload.load(path, quant="int4", gpu_mem=smallest, profile="rtx4060-ddr5")
    ids = torch.randint(0, 160, (1000,), generator=torch.Generator().manual_seed(26))
    for prefill in ("cpu", "stream"):
        engine.prefill = prefill
        engine.reset()
        engine.feed(ids, all_logits=False)
        for i in range(8):
            engine.feed([i + 1], all_logits=False)
    assert engine.gpu_peak_bytes <= smallest * 1.05
