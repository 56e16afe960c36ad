"""VISTA: neutral settings reproduce greedy; the steered state keeps its norm and turns toward the VSV."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.decoders.vista import Vista


def tokens_of(outputs):
    return [g.token_ids for g in outputs]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_neutral_is_greedy_and_each_part_acts(tiny, images, prompts, family):
    model, processor = tiny(family)
    run = lambda spec: tokens_of(vlmkit.wrap(model, processor, decoders=[spec] if spec else []).generate(
        images, prompts, max_new_tokens=6))
    greedy = run(None)
    assert run("vista:strength=0,gamma=0") == greedy
    assert run("vista:strength=1.0,gamma=0") != greedy  # VSV alone
    assert run("vista:strength=0,gamma=0.5,window=2") != greedy  # SLA alone


@pytest.mark.parametrize("formula", ["paper", "code"])
def test_steering_keeps_norm_and_moves_toward_vector(formula):
    torch.manual_seed(1)
    hidden, vector = torch.randn(4, 7, 32), torch.randn(4, 1, 32)
    steered = Vista.steer(hidden, vector, 0.3, formula)
    torch.testing.assert_close(steered.norm(dim=-1), hidden.norm(dim=-1))
    cos = lambda h: torch.nn.functional.cosine_similarity(h, vector.expand_as(h), dim=-1)
    assert torch.all(cos(steered) > cos(hidden))


def test_negative_context_drops_image_tokens(tiny, images, prompts):
    vlm = vlmkit.wrap(*tiny("qwen2_vl"))
    batch = vlm.adapter.prepare(images, prompts)
    ctx = vlmkit.runtime.hooks.GenerationContext(adapter=vlm.adapter, prompts=prompts, images=images)
    state = Vista.text_only_state(ctx, batch, mrope=True)
    config = vlm.adapter.config
    text = [[t for t in row if t not in (config.image_token_id, config.vision_start_token_id,
                                         config.vision_end_token_id)]
            for row in (batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(len(prompts)))]
    embeds = vlm.adapter.embed_tokens(torch.tensor(text[1]))
    torch.testing.assert_close(state.hidden[1, -len(text[1]):], embeds)
    assert state.valid.sum(dim=1).tolist() == [len(t) for t in text]
    assert state.positions.shape[0] == 3 and state.positions[0, 1, -1] == len(text[1]) - 1


def test_beam_search_sampling_and_pruner(tiny, images, prompts):
    model, processor = tiny("llava")
    spec = "vista:strength=1.0,gamma=0.3,window=2"
    beams = vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=4, num_beams=2)
    steered = vlmkit.wrap(model, processor, decoders=[spec]).generate(images, prompts, max_new_tokens=4, num_beams=2)
    assert tokens_of(steered) != tokens_of(beams)
    vlm = vlmkit.wrap(model, processor, decoders=[spec])
    first = vlm.generate(images, prompts, max_new_tokens=4, do_sample=True, seed=3)
    assert tokens_of(first) == tokens_of(vlm.generate(images, prompts, max_new_tokens=4, do_sample=True, seed=3))
    pruned = vlmkit.wrap(model, processor, pruner="uniform:keep=5", decoders=[spec]).generate(
        images, prompts, max_new_tokens=4)
    assert [g.stats["visual_tokens_kept"] for g in pruned] == [5, 5, 5]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_decode_runs_on_the_static_cache_with_the_dynamic_tokens(tiny, images, prompts, family):
    model, processor = tiny(family)
    spec = ["vista:strength=1.0,gamma=0.3,window=2"]
    static = vlmkit.wrap(model, processor, decoders=spec, decode="static")
    dynamic = vlmkit.wrap(model, processor, decoders=spec, decode="dynamic")
    for options in ({}, {"num_beams": 2}):
        for order in (slice(None), slice(None, None, -1)):  # other vectors through the same static decoder
            assert tokens_of(static.generate(images[order], prompts[order], max_new_tokens=6, **options)) == \
                tokens_of(dynamic.generate(images[order], prompts[order], max_new_tokens=6, **options))
    assert static.engine.static_decoders.items  # the steering ran inside the static step
