"""offload's torch models against transformers on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch

import offload
from conftest import MOE_CONFIGS, NEXT_CONFIGS, QWEN35_CONFIGS, parity_bound

ALL_CONFIGS = [*NEXT_CONFIGS, *MOE_CONFIGS, *QWEN35_CONFIGS]


def prompt(length: int, vocab: int = 160, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_logits_match_transformers(hf_checkpoint, name):
    checkpoint = hf_checkpoint(name)
    ids = prompt(150)  # more than two DeltaNet chunks of 64
    expected = checkpoint.logits(ids)
    engine = offload.load(checkpoint.path)
    logits = engine.logits(ids)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= parity_bound(checkpoint.model, ids)
    assert expected.std() > 0.1  # the comparison means something


@pytest.mark.parametrize("name", ["next", "moe"])
def test_parity_bound_catches_a_perturbed_weight(hf_checkpoint, tmp_path, name):
    """The bound is tight enough to mean something: one element of one norm off by 1% fails it
    many times over."""
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = hf_checkpoint(name)
    shutil.copytree(checkpoint.path, tmp_path / "perturbed")
    tensors = load_file(tmp_path / "perturbed" / "model.safetensors")
    tensors["model.layers.1.post_attention_layernorm.weight"][5] *= 1.01
    save_file(tensors, tmp_path / "perturbed" / "model.safetensors", metadata={"format": "pt"})
    ids = prompt(150)
    bound = parity_bound(checkpoint.model, ids)
    moved = (offload.load(tmp_path / "perturbed").logits(ids) - checkpoint.logits(ids)).abs().max().item()
    assert moved > 10 * bound


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_prefill_then_decode_matches_full_forward(hf_checkpoint, name):
    checkpoint = hf_checkpoint(name)
    engine = offload.load(checkpoint.path)
    ids = prompt(140, seed=2)
    full = engine.logits(ids)
    engine.reset()
    pieces = [engine.feed(ids[:70]), engine.feed(ids[70:103])]  # prefill continuing from state
    pieces += [engine.feed(ids[i:i + 1]) for i in range(103, 140)]  # one token at a time
    stepped = torch.cat(pieces)
    assert engine.position == 140
    # The chunked delta rule (prefill) and the recurrence (decode) round differently: the bound
    # is the larger of transformers' own errors in the two (full forward, cached steps from 70).
    assert (stepped - full).abs().max().item() <= parity_bound(checkpoint.model, ids, prefix=70)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_greedy_generate_matches_transformers(hf_checkpoint, name):
    checkpoint = hf_checkpoint(name)
    ids = prompt(20, seed=3)
    with torch.no_grad():
        expected = checkpoint.model.generate(ids[None], max_new_tokens=32, do_sample=False)[0, 20:].tolist()
    engine = offload.load(checkpoint.path)
    assert engine.generate(ids, max_new_tokens=32, temperature=0.0) == expected
    if not checkpoint.model.config.tie_word_embeddings:  # random tied models repeat their input
        assert len(set(expected)) > 3  # not a degenerate repeat of one token


def test_decode_does_not_grow_caches(hf_checkpoint):
    engine = offload.load(hf_checkpoint("next").path, ctx=256)
    before = [(id(t), t.shape) for c in engine.caches for t in vars(c).values() if torch.is_tensor(t)]
    engine.generate(prompt(10), max_new_tokens=8)
    after = [(id(t), t.shape) for c in engine.caches for t in vars(c).values() if torch.is_tensor(t)]
    assert before == after
    assert engine.cache_nbytes > 0


def test_sampling_is_reproducible_with_a_seed(hf_checkpoint):
    engine = offload.load(hf_checkpoint("moe").path)
    first = engine.generate(prompt(5), max_new_tokens=16, temperature=1.0, seed=7)
    assert engine.generate(prompt(5), max_new_tokens=16, temperature=1.0, seed=7) == first
    assert engine.generate(prompt(5), max_new_tokens=16, temperature=0.0) != first


def test_bad_prompts_are_explained(hf_checkpoint):
    engine = offload.load(hf_checkpoint("moe").path, ctx=32)
    with pytest.raises(offload.OffloadError, match="empty"):
        engine.logits([])
    with pytest.raises(offload.OffloadError, match=r"token ids must be in \[0, 160\)"):
        engine.logits([1, 2, 160])
    with pytest.raises(offload.OffloadError, match="do not fit the context of 32"):
        engine.generate(list(range(30)), max_new_tokens=8)
