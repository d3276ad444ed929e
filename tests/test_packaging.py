"""Our top-level `kernels` package must not confuse transformers, which probes for the Hugging
Face package of the same name."""

from __future__ import annotations

from pathlib import Path

import torch


def test_kernels_is_ours_and_transformers_ignores_it():
    import kernels
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.utils.import_utils import is_kernels_available

    assert Path(kernels.__file__).parent.name == "kernels"
    assert not hasattr(kernels, "__version__")
    assert not is_kernels_available()
    config = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=8)
    with torch.no_grad():
        logits = Qwen3MoeForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32)
