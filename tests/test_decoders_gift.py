"""GIFT and LocoRE: neutral settings reproduce greedy; GIFT's bias is the spec's post-softmax edit; LocoRE's window."""

from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from vlmkit.decoders.gift import enhancement_bias, gaze_saliency, informative_mask
from vlmkit.decoders.locore import LocalCoherence
from vlmkit.runtime.hooks import GenerationContext, LayerState
from vlmkit.testing import tokens_of


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_neutral_is_greedy_and_strength_acts(tiny, images, prompts, family):
    model, processor = tiny(family)
    run = lambda *specs: tokens_of(vlmkit.wrap(model, processor, decoders=list(specs)).generate(
        images, prompts, max_new_tokens=6))
    greedy = run()
    assert run("gift:strength=0", "locore:strength=0") == greedy
    assert run("gift:strength=5") != greedy
    assert run("locore:strength=3,window=2") != greedy


def test_bias_is_the_spec_edit_and_zero_off_salient_keys():
    torch.manual_seed(0)
    heads, keys = 4, 10
    logits = torch.randn(heads, keys)
    attention = logits.softmax(-1)
    visual = torch.tensor([0, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    query = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    saliency = torch.tensor([0, 0.0, 0.5, 1.0, 0.2, 0, 0, 0, 0, 0])
    weights = torch.where(visual, torch.exp(5 * saliency), torch.ones(keys))
    bias = enhancement_bias(attention, visual, query, weights.log())
    # the spec (decoders.md §2(a) 7-10), post-softmax
    edited = attention.clone()
    visual_heads = (attention * visual).sum(-1).topk(2).indices
    edited[visual_heads] = torch.where(visual, attention[visual_heads] * weights, attention[visual_heads])
    ratio = (edited[visual_heads] * visual).sum() / (attention[visual_heads] * visual).sum()
    query_heads = (attention * query).sum(-1).topk(2).indices
    edited[query_heads] = torch.where(query, edited[query_heads] * ratio, edited[query_heads])
    edited = edited / edited.sum(-1, keepdim=True)
    torch.testing.assert_close((logits + bias).softmax(-1), edited)
    # zero off the salient visual keys and the question, and following the saliency map on the image
    assert torch.all(bias[:, ~(visual | query)] == 0) and torch.all(bias[:, 1] == 0)
    torch.testing.assert_close(bias[visual_heads][:, visual & ~query], (5 * saliency[visual]).expand(2, -1))


def test_gaze_saliency_is_clamped_normalised_and_exponentiated():
    attention = torch.zeros(2, 2, 1, 4)  # heads, (previous row, row), rows, visual keys
    attention[0, 1, 0] = torch.tensor([0.1, 0.4, 0.0, 0.2])  # head 0 shifts towards keys 1 and 3
    attention[1, 0, 0] = torch.tensor([0.3, 0.0, 0.0, 0.0])  # head 1 only shifts away: no positive change
    weights, total = gaze_saliency(attention, strength=2.0)
    torch.testing.assert_close(weights, torch.exp(2.0 * torch.tensor([0.25, 1.0, 0.0, 0.5])))
    assert math.isclose(float(total), 0.7, rel_tol=1e-6)


def test_informative_words_rule():
    question = "How many red cups are on the table?"
    offsets = [(0, 3), (4, 8), (9, 12), (13, 17), (18, 21), (22, 24), (25, 28), (29, 34), (34, 35)]
    assert informative_mask(question, offsets, 0) == [False, True, True, True, False, False, False, True, False]


def test_locore_biases_only_the_recent_output_tokens():
    locore = LocalCoherence(strength=0.5, window=3)
    ctx = GenerationContext(adapter=None, prompts=[], images=[], step=5)
    state = LayerState(hidden=torch.zeros(2, 1, 4), valid=torch.ones(2, 1, dtype=torch.bool),
                       is_visual=torch.zeros(2, 1, dtype=torch.bool), positions=torch.zeros(2, 1),
                       source_index=torch.zeros(2, 1), key_valid=torch.ones(2, 20, dtype=torch.bool))
    bias = locore.attention(ctx, 0, state).key_bias[0, 0]
    torch.testing.assert_close(bias[16:19], torch.full((3,), math.log1p(0.5)))
    assert torch.all(bias[:16] == 0) and bias[19] == 0
    ctx.step = 0
    assert locore.attention(ctx, 0, state) is None  # the first decoded token has no earlier output


def test_gift_and_locore_with_a_pruner_and_beams(tiny, images, prompts):
    out = vlmkit.wrap(*tiny("qwen2_vl"), pruner="uniform:keep=4", decoders=["gift", "locore:strength=1"]).generate(
        images, prompts, max_new_tokens=3, num_beams=2)
    assert [g.stats["visual_tokens_kept"] for g in out] == [4, 4, 4]
