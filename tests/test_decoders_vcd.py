"""VCD: alpha=0 is greedy; each step's logits are (1+α)·l(v) - α·l(v') on the plausible set, with l(v) and l(v')
from two explicit HF forwards (clean and noised pixels, the noise written out here); batches, beams and pruners."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.runtime.sampling import BeamSearch
from vlmkit.testing import tokens_of


def noised_by_hand(pixels: torch.Tensor, sizes: list[int], step: int = 500, seed: int = 0) -> torch.Tensor:
    """VCD's ``add_diffusion_noise`` (sigmoid schedule over 1000 steps), one seeded draw per image."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    keep = float(torch.cumprod(1 - betas, dim=0)[step])
    noise = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in pixels.split(sizes)]
    return (math.sqrt(keep) * pixels + math.sqrt(1 - keep) * torch.cat(noise)).to(pixels.dtype)


def noised_for(batch) -> torch.Tensor:
    pixels = batch.vision_inputs["pixel_values"]
    grid = batch.vision_inputs.get("image_grid_thw")
    return noised_by_hand(pixels, grid.prod(-1).tolist() if grid is not None else [1] * pixels.shape[0])


def expected(clean: torch.Tensor, noisy: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    out = (1 + alpha) * clean - alpha * noisy
    return out.masked_fill(clean < math.log(beta) + clean.max(), float("-inf"))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_alpha_zero_is_greedy(tiny, decode, images, prompts, family):
    model, processor = tiny(family)
    greedy = decode(model, processor, images, prompts)
    assert decode(model, processor, images, prompts, "vcd:alpha=0") == greedy
    if family == "qwen2_5_vl":  # the tiny LLaVA's tokens do not move (its logits do)
        assert decode(model, processor, images, prompts, "vcd:alpha=3") != greedy


@pytest.mark.parametrize("family, pruner", [("llava", None), ("qwen2_5_vl", None), ("qwen2_5_vl", "uniform:keep=4")])
def test_logits_are_the_contrast_of_two_hf_forwards(tiny, hf_refs, images, prompts, family, pruner):
    """l(v) is what reaches the decoder (the pruned model's logits with a pruner); l(v') is the unmodified model on
    the noised pixels. beta=0.9 makes the plausibility cut bite on the tiny models' flat distributions."""
    model, processor = tiny(family)
    before, after = hf_refs.Spy(), hf_refs.Spy()
    vlm = vlmkit.wrap(model, processor, pruner=pruner, decoders=[before, "vcd:alpha=1.5,beta=0.9", after])
    generation = vlm.generate(images[0], prompts[0], max_new_tokens=3)[0]
    batch = vlm.adapter.prepare([images[0]], [prompts[0]])
    noised = noised_for(batch)
    assert len(after.seen) == len(generation.token_ids) == 3
    for step, (incoming, edited) in enumerate(zip(before.seen, after.seen)):
        history = generation.token_ids[:step]
        clean = hf_refs.image_logits(model, batch, history, batch.vision_inputs["pixel_values"])
        noisy = hf_refs.image_logits(model, batch, history, noised)
        assert (noisy - clean).abs().max() > 1e-3  # the noise matters
        if pruner is None:
            torch.testing.assert_close(incoming[0], clean, atol=1e-4, rtol=1e-4)
        want = expected(incoming[0], noisy, 1.5, 0.9)
        kept = torch.isfinite(want)
        assert 0 < int(kept.sum()) < kept.numel()  # the plausibility cut removes some tokens, not all
        assert torch.equal(torch.isfinite(edited[0]), kept)
        torch.testing.assert_close(edited[0][kept], want[kept], atol=1e-4, rtol=1e-4)
    if pruner is not None:
        assert generation.stats["visual_tokens_kept"] == 4 < generation.stats["visual_tokens_in"]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_equals_one_at_a_time(tiny, hf_refs, images, prompts, family):
    hf_refs.batch_equals_single(*tiny(family), "vcd", images, prompts)


def test_beam_search_follows_each_beams_history(tiny, hf_refs, images, prompts):
    """Beam search over contrasted logits, with both branches re-run from scratch on each beam's tokens."""
    model, processor = tiny("qwen2_5_vl")
    vlm = vlmkit.wrap(model, processor, decoders=["vcd"])
    ours = vlm.generate(images[2], prompts[2], max_new_tokens=5, num_beams=3)[0].token_ids
    batch = vlm.adapter.prepare([images[2]], [prompts[2]])
    noised = noised_for(batch)

    @functools.cache
    def contrasted(history):
        return expected(hf_refs.image_logits(model, batch, history, batch.vision_inputs["pixel_values"]),
                        hf_refs.image_logits(model, batch, history, noised), 1.0, 0.1)

    search = BeamSearch(1, 3, 5, vlm.adapter.eos_token_ids, 1.0, torch.device("cpu"))
    histories, logits = [()] * 3, contrasted(()).expand(3, -1)
    for _ in range(5):
        parents, tokens = search.step(logits)
        histories = [histories[p] + (t,) for p, t in zip(parents.tolist(), tokens.tolist())]
        if search.done:
            break
        logits = torch.stack([contrasted(h) for h in histories])
    assert ours == search.best()[0]


def test_sampling_is_seeded_and_options_are_checked(tiny, images, prompts):
    model, processor = tiny("qwen2_5_vl")
    vlm = vlmkit.wrap(model, processor, decoders=["vcd"])
    first = vlm.generate(images[:2], prompts[:2], max_new_tokens=4, do_sample=True, seed=5)
    assert tokens_of(first) == tokens_of(vlm.generate(images[:2], prompts[:2], max_new_tokens=4, do_sample=True,
                                                      seed=5))
    for spec in ["vcd:alpha=-1", "vcd:beta=0", "vcd:noise_step=1000", "vcd:schedule=cosine"]:
        with pytest.raises(ConfigError):
            vlmkit.wrap(model, processor, decoders=[spec])
