"""What adapters expose: visual spans, prompts, vision features and attention, projector access."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import vlmkit
from vlmkit.runtime.hooks import VisualTokens
from vlmkit.testing import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_tokens_and_features(tiny, images, prompts, family):
    vlm = vlmkit.wrap(*tiny(family))
    adapter = vlm.adapter
    batch = adapter.prepare(images, prompts)
    tokens = adapter.encode_images(batch, with_attention=True)
    assert [t.embeds.shape[0] for t in tokens] == batch.is_visual.sum(dim=1).tolist()
    for image in tokens:
        rows, cols = image.grid
        assert rows * cols == image.embeds.shape[0]
        assert image.features is not None and image.features.shape[0] == image.embeds.shape[0]
    if family == "llava":
        # the projector maps the features to exactly the embeddings the LM receives
        torch.testing.assert_close(adapter.projector(tokens[0].features), tokens[0].embeds)
        attention = tokens[0].attention
        assert attention.shape == (adapter.vision_tower.config.num_attention_heads, tokens[0].embeds.shape[0])
        assert torch.all(attention > 0) and torch.all(attention.sum(-1) < 1)  # [CLS] keeps some mass on itself
    else:
        assert tokens[0].attention is None
        features, merger = tokens[0].features, adapter.projector
        patches = features.reshape(-1, features.shape[-1] // adapter.merge_size**2)
        merged = merger.mlp(merger.ln_q(patches).view(features.shape[0], -1))
        torch.testing.assert_close(merged, tokens[0].embeds)


def test_cls_attention_matches_eager_vision_attention(tiny, images, prompts):
    """The [CLS] attention the adapter computes equals the vision tower's own eager attention weights."""
    model, processor = tiny("llava")
    adapter = vlmkit.wrap(model, processor).adapter
    batch = adapter.prepare(images[:1], prompts[:1])
    ours = adapter.encode_images(batch, with_attention=True)[0].attention
    tower = adapter.vision_tower
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        output = tower(batch.vision_inputs["pixel_values"], output_attentions=True)
    finally:
        tower.set_attn_implementation(previous)
    layer = model.config.vision_feature_layer % (len(output.attentions) + 1) - 1
    torch.testing.assert_close(ours, output.attentions[layer][0, :, 0, 1:].float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_contains_one_image_placeholder(tiny, family):
    adapter = vlmkit.wrap(*tiny(family)).adapter
    prompt = adapter.build_prompt("What is this?")
    assert "What is this?" in prompt
    ids = adapter.tokenizer(prompt)["input_ids"]
    assert ids.count(adapter.image_token_id) == 1


def test_vision_attention_reaches_pruners(tiny, images, prompts):
    seen = {}

    class Probe(vlmkit.pruners.Pruner):
        needs_vision_attention = True

        def select_visual(self, ctx, tokens: list[VisualTokens]):
            seen["attention"] = [t.attention for t in tokens]

    vlmkit.wrap(*tiny("llava"), pruner=Probe(keep=4)).generate(images, prompts, max_new_tokens=1)
    assert len(seen["attention"]) == 3 and all(a is not None for a in seen["attention"])


class _CountingProcessor:
    """A processor that records how many images each call processed."""

    def __init__(self, processor):
        self.processor, self.calls = processor, []

    def __call__(self, images, **kwargs):
        self.calls.append(len(images))
        return self.processor(images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokenize_rows", [True, False])
def test_repeated_images_are_processed_once(tiny, images, prompts, family, tokenize_rows, monkeypatch):
    """Rows asking about one image object get the processor's own tensors, from one pass over the distinct images
    (or, when the rows cannot be tokenized on their own, from the processor over every row)."""
    adapter = vlmkit.wrap(*tiny(family)).adapter
    rows = [images[0], images[1], images[0], images[0]]
    questions = [prompts[0], prompts[1], prompts[2], "Is there a cat in the image? Answer yes or no."]
    processor = adapter.processor
    processor.tokenizer.padding_side = "left"
    expected = processor(images=rows, text=[adapter.build_prompt(q) for q in questions], return_tensors="pt",
                         padding=True)
    counting = _CountingProcessor(processor)
    monkeypatch.setattr(adapter, "processor", counting)
    if not tokenize_rows:
        monkeypatch.setattr(adapter, "_tokenize_rows", lambda *args: None)
    batch = adapter.prepare(rows, questions)
    assert counting.calls == ([2] if tokenize_rows else [2, 4])
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    for key, value in batch.vision_inputs.items():
        assert torch.equal(value, expected[key]), key
    assert batch.vision_inputs.keys() == expected.keys() - {"input_ids", "attention_mask", "mm_token_type_ids"}


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_get_the_cache_under_their_own_argument_name(tiny, images, prompts, family):
    """transformers 5.24 renamed the layers' ``past_key_values`` to ``cache`` and deprecated the old name (a removed
    name would silently drop the cache into ``**kwargs``): vlmkit passes whichever the installed layers take."""
    vlm = vlmkit.wrap(*tiny(family))
    name = next(iter(vlm.adapter.cache_argument(None)))
    assert name in inspect.signature(vlm.adapter.layers[0].forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        vlm.generate(images[:1], prompts[:1], max_new_tokens=2)



@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tower_with_a_precomputed_layout_gives_get_image_features_tokens(tiny, images, prompts, family,
                                                                               monkeypatch):
    """The ViT run with its grid layout precomputed (and cached per set of grids) gives the tokens and merger inputs
    of transformers' own ``get_image_features``."""
    adapter = vlmkit.wrap(*tiny(family)).adapter
    batch = adapter.prepare(images, prompts)
    with torch.no_grad():
        fast = adapter.encode_images(batch)
        again = adapter.encode_images(batch)
        monkeypatch.setattr(type(adapter), "_vision_layout", lambda self, grid_thw, grids: None)
        plain = adapter.encode_images(batch)
    assert len(adapter._vision_layouts.items) == 1  # one set of grids, computed once
    for mine, repeat, theirs in zip(fast, again, plain):
        assert mine.grid == theirs.grid
        assert torch.equal(mine.embeds, theirs.embeds) and torch.equal(repeat.embeds, theirs.embeds)
        assert torch.equal(mine.features, theirs.features)
