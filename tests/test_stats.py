"""The runtime's per-sample cost statistics: the layer-averaged visual-token count and the prefill FLOPs estimate."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmkit
from vlmkit.testing import tiny_model


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_flops_estimate_matches_a_flop_counter(family):
    """``prefill_flops`` counts the matmuls of every layer and the last position's vocabulary projection, with causal
    attention at half of the full ``4 n^2 d`` that torch's FLOP counter charges."""
    model, processor = tiny_model(family)
    model.set_attn_implementation("eager")  # attention as plain matmuls, which the counter sees
    lm = model.model.language_model
    config = model.config.get_text_config()
    n = 37
    embeds = torch.randn(1, n, config.hidden_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        hidden = lm(inputs_embeds=embeds).last_hidden_state
        model.lm_head(hidden[:, -1:])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full_attention_excess = config.num_hidden_layers * 2 * n * n * config.num_attention_heads * head_dim
    vlm = vlmkit.wrap(model, processor)
    estimate = vlm.engine.prefill_flops([n] * config.num_hidden_layers)
    assert estimate == counter.get_total_flops() - full_attention_excess


def test_pruning_lowers_the_estimate_and_the_mean_count(images, prompts):
    model, processor = tiny_model("llava")
    dense = vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=2)
    pruned = vlmkit.wrap(model, processor, pruner="fastv:keep=4,layer=2").generate(images, prompts, max_new_tokens=2)
    for full, cut in zip(dense, pruned):
        assert full.stats["visual_tokens_mean_over_layers"] == full.stats["visual_tokens_in"] == 16
        by_layer = cut.stats["visual_tokens_by_layer"]
        assert by_layer == [16, 16, 4, 4]
        assert cut.stats["visual_tokens_mean_over_layers"] == sum(by_layer) / len(by_layer) == 10
        assert 0 < cut.stats["prefill_tflops"] < full.stats["prefill_tflops"]
