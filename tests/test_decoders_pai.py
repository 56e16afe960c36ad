"""PAI: alpha=0, gamma=1 is greedy; the image-attention gain matches an eager attention with a + α|a| written by hand
(PAI's code: the last query row of every forward, layers 2..L-1); the logit refinement matches explicit HF forwards
with and without the image; batches, beams and pruners."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.runtime.sampling import BeamSearch
from vlmkit.testing import tiny_model, tokens_of

HAND = {"alpha": 0.0, "layers": (), "first_row": 0, "visual": None}


def attention_by_hand(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention for one unpadded sample, in float64; in the layers ``HAND["layers"]`` the logits of the
    query rows from ``HAND["first_row"]`` on (the prompt's last row and every decoded row: in a cached decode each is
    the last row of its forward) on the image keys become ``a + alpha |a|``."""
    groups = query.shape[1] // key.shape[1]
    keys, values = (t.repeat_interleave(groups, dim=1).double() for t in (key, value))
    logits = query.double() @ keys.transpose(-1, -2) * scaling
    length = logits.shape[-1]
    if module.layer_idx in HAND["layers"]:
        rows = torch.arange(length) >= HAND["first_row"]
        cols = torch.nn.functional.pad(HAND["visual"], (0, length - HAND["visual"].shape[0]))
        edit = rows[:, None] & cols[None, :]
        logits = torch.where(edit, logits + HAND["alpha"] * logits.abs(), logits)
    logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return (logits.softmax(dim=-1) @ values).transpose(1, 2).to(query.dtype).contiguous(), None


AttentionInterface.register("pai_by_hand", attention_by_hand)
ALL_MASK_ATTENTION_FUNCTIONS.register("pai_by_hand", sdpa_mask)


def hand_model(family: str):
    model, _ = tiny_model(family)  # the same seed, so the same weights as the ``tiny`` fixture's model
    model.set_attn_implementation({"text_config": "pai_by_hand"})
    return model


def guided(image: torch.Tensor, text: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    cond, uncond = image.log_softmax(-1), text.log_softmax(-1)
    out = gamma * (cond - uncond) + uncond
    return out.masked_fill(cond < math.log(beta) + cond.max(), float("-inf"))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_neutral_is_greedy(tiny, decode, images, prompts, family):
    model, processor = tiny(family)
    greedy = decode(model, processor, images, prompts)
    assert decode(model, processor, images, prompts, "pai:alpha=0,gamma=1") == greedy
    if family == "qwen2_5_vl":  # the tiny LLaVA's tokens do not move (its logits do)
        for spec in ["pai:alpha=3,gamma=1", "pai:alpha=0,gamma=3"]:
            assert decode(model, processor, images, prompts, spec) != greedy


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_attention_gain_matches_eager_attention_by_hand(tiny, hf_refs, images, prompts, family):
    """Layers 2..3 of the 4-layer tiny models; teacher-forced on vlmkit's tokens, 3 steps (prefill + 2 decodes)."""
    model, processor = tiny(family)
    spy = hf_refs.Spy()
    vlm = vlmkit.wrap(model, processor, decoders=["pai:alpha=3,gamma=1", spy])
    generated = vlm.generate(images[0], prompts[0], max_new_tokens=3)[0].token_ids
    batch = vlm.adapter.prepare([images[0]], [prompts[0]])
    pixels = batch.vision_inputs["pixel_values"]
    reference = hand_model(family)
    HAND.update(layers=(2, 3), first_row=batch.input_ids.shape[1] - 1, visual=batch.is_visual[0])
    for step, ours in enumerate(spy.seen):
        HAND["alpha"] = 3.0
        edited = hf_refs.image_logits(reference, batch, generated[:step], pixels)
        torch.testing.assert_close(ours[0], edited, atol=1e-4, rtol=1e-4)
        HAND["alpha"] = 0.0
        plain = hf_refs.image_logits(reference, batch, generated[:step], pixels)
        stock = hf_refs.image_logits(model, batch, generated[:step], pixels)
        torch.testing.assert_close(plain, stock, atol=1e-4, rtol=1e-4)  # the hand-written attention is attention
        assert (edited - plain).abs().max() > 1e-3  # the gain matters


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_refinement_is_cfg_of_hf_forwards_with_and_without_image(tiny, hf_refs, images, prompts, family):
    """beta=0.9 makes the plausibility cut bite on the tiny models' flat distributions."""
    model, processor = tiny(family)
    before, after = hf_refs.Spy(), hf_refs.Spy()
    vlm = vlmkit.wrap(model, processor, decoders=[before, "pai:alpha=0,gamma=1.5,beta=0.9", after])
    generated = vlm.generate(images[1], prompts[1], max_new_tokens=3)[0].token_ids
    batch = vlm.adapter.prepare([images[1]], [prompts[1]])
    assert len(after.seen) == 3
    for step, (incoming, edited) in enumerate(zip(before.seen, after.seen)):
        image = hf_refs.image_logits(model, batch, generated[:step], batch.vision_inputs["pixel_values"])
        text = hf_refs.text_logits(model, batch, generated[:step])
        torch.testing.assert_close(incoming[0], image, atol=1e-4, rtol=1e-4)
        want = guided(image, text, 1.5, 0.9)
        kept = torch.isfinite(want)
        assert 0 < int(kept.sum()) < kept.numel()
        assert torch.equal(torch.isfinite(edited[0]), kept)
        torch.testing.assert_close(edited[0][kept], want[kept], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_equals_one_at_a_time(tiny, hf_refs, images, prompts, family):
    hf_refs.batch_equals_single(*tiny(family), "pai:alpha=1", images, prompts)


def test_beam_search_with_gain_and_refinement(tiny, hf_refs, images, prompts):
    """Beam search over guided logits, each beam's with- and without-image logits re-run from scratch (the image
    branch with the gain by hand). The beams reorder (parents [0, 0], [1, 0], [0, 1], ...)."""
    model, processor = tiny("qwen2_5_vl")
    vlm = vlmkit.wrap(model, processor, decoders=["pai:alpha=1,gamma=1.5"])
    ours = vlm.generate(images[0], prompts[0], max_new_tokens=5, num_beams=2)[0].token_ids
    batch = vlm.adapter.prepare([images[0]], [prompts[0]])
    reference = hand_model("qwen2_5_vl")
    HAND.update(alpha=1.0, layers=(2, 3), first_row=batch.input_ids.shape[1] - 1, visual=batch.is_visual[0])

    @functools.cache
    def logits_of(history):
        image = hf_refs.image_logits(reference, batch, history, batch.vision_inputs["pixel_values"])
        return guided(image, hf_refs.text_logits(model, batch, history), 1.5, 0.1)

    search = BeamSearch(1, 2, 5, vlm.adapter.eos_token_ids, 1.0, torch.device("cpu"))
    histories, logits = [()] * 2, logits_of(()).expand(2, -1)
    for _ in range(5):
        parents, tokens = search.step(logits)
        histories = [histories[p] + (t,) for p, t in zip(parents.tolist(), tokens.tolist())]
        if search.done:
            break
        logits = torch.stack([logits_of(h) for h in histories])
    assert ours == search.best()[0]


def test_with_a_pruner_and_options(tiny, hf_refs, images, prompts):
    model, processor = tiny("qwen2_5_vl")
    plain, spy = hf_refs.Spy(), hf_refs.Spy()
    pruned = vlmkit.wrap(model, processor, pruner="uniform:keep=4", decoders=[plain]).generate(
        images, prompts, max_new_tokens=4)
    neutral = vlmkit.wrap(model, processor, pruner="uniform:keep=4", decoders=["pai:alpha=0,gamma=1"]).generate(
        images, prompts, max_new_tokens=4)
    assert tokens_of(neutral) == tokens_of(pruned)
    both = vlmkit.wrap(model, processor, pruner="uniform:keep=4", decoders=["pai:alpha=1", spy]).generate(
        images, prompts, max_new_tokens=4)
    assert [g.stats["visual_tokens_kept"] for g in both] == [4, 4, 4]
    finite = torch.isfinite(spy.seen[0])
    assert (spy.seen[0] - plain.seen[0].log_softmax(-1))[finite].abs().max() > 1e-3
    for spec in ["pai:alpha=-1", "pai:beta=2", "pai:layers=9"]:
        with pytest.raises(ConfigError):
            vlmkit.wrap(model, processor, decoders=[spec]).generate(images[0], prompts[0], max_new_tokens=1)
