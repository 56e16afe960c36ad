"""SGL: a small tiny model (another seed: same tokenizer and grid) guides the large one; keep-all is dense; the kept
tokens are the small model's top-k by its attention (checked against eager attention maps); early exit returns the
small model's answer; impossible budgets and grids fail clearly."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.pruners.select import top_indices
from vlmkit.pruners.sgl import SmallGuidance
from vlmkit.runtime.hooks import GenerationContext
from vlmkit.testing import tiny_model


@pytest.fixture(scope="module")
def pair():
    """``pair(family)`` -> (large, small) tiny models of one family, seeds 0 and 1."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = (tiny_model(family, seed=0), tiny_model(family, seed=1))
        return cache[family]

    return get


def tokens_of(outputs):
    return [g.token_ids for g in outputs]


def test_pair_shares_tokenizer_and_grid(pair):
    (large, large_proc), (small, small_proc) = pair("llava")
    assert large_proc.tokenizer.get_vocab() == small_proc.tokenizer.get_vocab()
    assert large.config.image_seq_length == small.config.image_seq_length
    assert not torch.equal(large.lm_head.weight, small.lm_head.weight)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_all_is_dense(pair, images, prompts, family):
    large, small = pair(family)
    dense = vlmkit.wrap(*large).generate(images, prompts, max_new_tokens=6)
    guided = vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=1.0, layer=2)).generate(
        images, prompts, max_new_tokens=6)
    assert tokens_of(guided) == tokens_of(dense)


def guidance(small, images, prompts, max_new_tokens=6) -> dict:
    pruner = SmallGuidance(small=small)
    ctx = GenerationContext(adapter=None, prompts=prompts, images=images, max_new_tokens=max_new_tokens)
    return pruner.guidance(ctx)


def test_scores_are_the_small_models_attention(pair, images, prompts):
    _, small = pair("llava")
    guide = guidance(small, images[:1], prompts[:1])
    answer = guide["answers"][0]
    model, _ = tiny_model("llava", seed=1)
    model.set_attn_implementation("eager")
    batch = vlmkit.wrap(*small).adapter.prepare(images[:1], prompts[:1])
    ids = torch.cat([batch.input_ids, torch.tensor([answer[:-1]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                    **batch.vision_inputs)
    visual = batch.is_visual[0].nonzero().squeeze(-1)
    rows = slice(int(visual.max()) + 1, ids.shape[1])
    expected = sum(a[0, :, rows][..., visual].sum(dim=(0, 1)) for a in out.attentions)
    torch.testing.assert_close(guide["scores"][0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("layer", [0, 2])
def test_kept_tokens_are_the_small_models_top_k(pair, images, prompts, family, layer):
    large, small = pair(family)
    guide = guidance(small, images, prompts)
    outputs = vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=0.25, layer=layer)).generate(
        images, prompts, max_new_tokens=6)
    for generation, scores in zip(outputs, guide["scores"]):
        budget = max(1, int(0.25 * scores.numel()))
        assert generation.stats["kept_visual_indices"] == top_indices(scores, budget).tolist()
        by_layer = generation.stats["visual_tokens_by_layer"]
        assert by_layer[:layer] == [scores.numel()] * layer and by_layer[layer:] == [budget] * (4 - layer)
    segmented = vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=0.25, layer=layer), prefill="static")
    again = segmented.generate(images, prompts, max_new_tokens=6)
    assert tokens_of(again) == tokens_of(outputs)  # deterministic, and the same with the prefill in static segments
    # layer 1, where the small model's ranking prunes, runs alone (ActingLayer) between the two segments
    assert {key[:2] for key in segmented.engine.static_prefills.items} == ({(0, 1), (1, 2), (2, 4)} if layer
                                                                           else {(0, 4)})


def test_early_exit_returns_the_small_answer(pair, images, prompts):
    large, small = pair("llava")
    small_answers = vlmkit.wrap(*small).generate(images, prompts, max_new_tokens=6)
    exited = vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=0.25, exit_threshold=0.0)).generate(
        images, prompts, max_new_tokens=6)
    assert tokens_of(exited) == tokens_of(small_answers)
    assert all(g.stats["sgl_exit"] and g.stats["visual_tokens_kept"] == 0 for g in exited)
    assert all(0.0 <= g.stats["sgl_consistency"] <= 1.0 for g in exited)
    stay = vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=0.25, exit_threshold=1.0)).generate(
        images, prompts, max_new_tokens=6)
    pruned = vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=0.25)).generate(
        images, prompts, max_new_tokens=6)
    assert tokens_of(stay) == tokens_of(pruned)
    assert not any(g.stats["sgl_exit"] for g in stay) and all(g.stats["visual_tokens_kept"] > 0 for g in stay)


def test_errors(pair, images, prompts):
    large, small = pair("llava")
    with pytest.raises(ConfigError, match="small model"):
        SmallGuidance()
    with pytest.raises(ConfigError, match="keep"):
        SmallGuidance(small=small, keep=0)
    with pytest.raises(ConfigError, match="layer"):
        SmallGuidance(small=small, layer=1.5)
    with pytest.raises(ConfigError, match="larger than the 16"):
        vlmkit.wrap(*large, pruner=SmallGuidance(small=small, keep=17)).generate(images, prompts, max_new_tokens=2)
    with pytest.raises(ConfigError, match="no layer to prune"):
        vlmkit.wrap(*large, pruner=SmallGuidance(small=small, layer=4)).generate(images, prompts, max_new_tokens=2)
    with pytest.raises(ConfigError, match="visual grid"):
        vlmkit.wrap(*large, pruner=SmallGuidance(small=pair("qwen2_vl")[1])).generate(
            images, prompts, max_new_tokens=2)
