"""The hook points: residual and logit edits, candidate checks, attention statistics; sampling, stops, streaming."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.runtime.hooks import AttentionRequest, Intervention
from vlmkit.testing import FAMILIES


class AddToResidual(Intervention):
    def __init__(self, strength: float, layer: int = 1):
        self.strength, self.layer = strength, layer

    def edit_residual(self, ctx, layer, state):
        if layer == self.layer:
            return state.hidden + self.strength * torch.ones_like(state.hidden)


class BanToken(Intervention):
    """Rejects one token id as a candidate."""

    max_candidate_tries = 5

    def __init__(self, token: int):
        self.token = token

    def accept(self, ctx, logits, tokens):
        return tokens != self.token


class MaskToken(Intervention):
    def __init__(self, token: int):
        self.token = token

    def edit_logits(self, ctx, logits, hidden_by_layer):
        logits = logits.clone()
        logits[:, self.token] = float("-inf")
        return logits


class EarlyExitLogits(Intervention):
    """Replaces the logits with those of an earlier layer's hidden state (DoLa/VISTA-style access)."""

    logit_hidden_layers = (1,)

    def edit_logits(self, ctx, logits, hidden_by_layer):
        adapter = ctx.adapter
        return adapter.lm_head(adapter.final_norm(hidden_by_layer[1])).float()


def tokens_of(outputs):
    return [g.token_ids for g in outputs]


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_edit(tiny, images, prompts, family):
    model, processor = tiny(family)
    greedy = tokens_of(vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=8))
    unchanged = vlmkit.wrap(model, processor, decoders=[AddToResidual(0.0)]).generate(images, prompts, max_new_tokens=8)
    steered = vlmkit.wrap(model, processor, decoders=[AddToResidual(5.0)]).generate(images, prompts, max_new_tokens=8)
    assert tokens_of(unchanged) == greedy
    assert tokens_of(steered) != greedy


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_candidate_rejection_equals_masking(tiny, images, prompts, family):
    model, processor = tiny(family)
    greedy = tokens_of(vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=8))
    banned = greedy[0][0]
    rejected = vlmkit.wrap(model, processor, decoders=[BanToken(banned)]).generate(images, prompts, max_new_tokens=8)
    masked = vlmkit.wrap(model, processor, decoders=[MaskToken(banned)]).generate(images, prompts, max_new_tokens=8)
    assert tokens_of(rejected) == tokens_of(masked)
    assert all(banned not in row for row in tokens_of(rejected))


def test_logits_see_intermediate_hidden_states(tiny, images, prompts):
    model, processor = tiny("llava")
    greedy = tokens_of(vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=6))
    early = tokens_of(vlmkit.wrap(model, processor, decoders=[EarlyExitLogits()]).generate(images, prompts, max_new_tokens=6))
    assert early != greedy


class MassProbe(Intervention):
    """Asks for the attention mass of the question tokens at layer 1 and keeps what comes back."""

    def attention(self, ctx, layer, state):
        if ctx.step < 0 and layer == 1:
            self.rows = state.text_after_visual
            self.valid = state.valid
            return AttentionRequest(mass_queries=self.rows)

    def after_layer(self, ctx, layer, state, attention):
        if layer == 1:
            self.mass = attention.key_mass


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mass_statistics(tiny, images, prompts, family):
    probe = MassProbe()
    vlmkit.wrap(*tiny(family), decoders=[probe]).generate(images, prompts, max_new_tokens=1)
    mass, rows, valid = probe.mass, probe.rows, probe.valid
    assert mass.shape[0] == len(prompts) and mass.shape[2] == valid.shape[1]
    # every selected query row spreads probability 1 over the keys
    expected = rows.sum(dim=1, keepdim=True).float().expand(-1, mass.shape[1])
    torch.testing.assert_close(mass.sum(dim=-1), expected, atol=1e-4, rtol=1e-4)
    assert torch.all(mass.masked_select(~valid[:, None, :].expand_as(mass)) == 0)  # padding gets nothing
    assert torch.all(mass >= 0)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sampling_is_seeded(tiny, images, prompts, family):
    vlm = vlmkit.wrap(*tiny(family))
    first = vlm.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=7)
    again = vlm.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=7)
    other = vlm.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=8)
    assert tokens_of(first) == tokens_of(again)
    assert tokens_of(first) != tokens_of(other)
    greedy = vlm.generate(images, prompts, max_new_tokens=8)
    top1 = vlm.generate(images, prompts, max_new_tokens=8, do_sample=True, top_k=1, seed=3)
    nucleus = vlm.generate(images, prompts, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3)
    assert tokens_of(top1) == tokens_of(greedy) == tokens_of(nucleus)


def test_stop_strings_and_streaming(tiny, images, prompts):
    vlm = vlmkit.wrap(*tiny("llava"))
    full = vlm.generate(images[0], prompts[0], max_new_tokens=12)[0]
    words = full.text.split()
    assert len(words) >= 4
    stop = words[3]
    cut = vlm.generate(images[0], prompts[0], max_new_tokens=12, stop=[stop])[0]
    assert cut.text == full.text[: full.text.find(stop)].strip()
    assert len(cut.token_ids) < len(full.token_ids)
    pieces: list[tuple[int, str]] = []
    streamed = vlm.generate(images, prompts, max_new_tokens=12, stream=lambda row, text: pieces.append((row, text)))
    for row, generation in enumerate(streamed):
        assert "".join(text for r, text in pieces if r == row).strip() == generation.text


class GradientCheck(Intervention):
    """A candidate check that runs its own forward and backward pass (as saliency-guided sampling does)."""

    def accept(self, ctx, logits, tokens):
        with torch.enable_grad():
            embeds = ctx.adapter.embed_tokens(tokens[:, None]).detach().requires_grad_(True)
            layer = ctx.adapter.layers[0]
            positions = torch.zeros(tokens.shape[0], 1, dtype=torch.long)
            if ctx.adapter.family == "qwen2_vl":
                positions = positions[None].expand(3, -1, -1)
            hidden = layer(embeds, attention_mask=None, position_embeddings=ctx.adapter.rotary(embeds, positions))
            hidden.square().sum().backward()
        self.gradient_norm = float(embeds.grad.norm())
        return torch.ones_like(tokens, dtype=torch.bool)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_candidate_hook_can_run_backward_passes(tiny, images, prompts, family):
    check = GradientCheck()
    vlm = vlmkit.wrap(*tiny(family), decoders=[check])
    greedy = vlmkit.wrap(*tiny(family)).generate(images, prompts, max_new_tokens=4)
    assert tokens_of(vlm.generate(images, prompts, max_new_tokens=4)) == tokens_of(greedy)
    assert check.gradient_norm > 0


class FollowSteps(Intervention):
    def __init__(self):
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_step(self, ctx, tokens, parents):
        self.steps.append((tokens.clone(), parents.clone()))


def test_after_step_sees_final_tokens_and_beam_parents(tiny, images, prompts):
    follower = FollowSteps()
    vlm = vlmkit.wrap(*tiny("llava"), decoders=[follower])
    outputs = vlm.generate(images, prompts, max_new_tokens=5)
    seen = torch.stack([tokens for tokens, _ in follower.steps], dim=1)
    assert seen.tolist() == [g.token_ids for g in outputs]
    assert all(torch.equal(parents, torch.arange(3)) for _, parents in follower.steps)
    follower.steps.clear()
    vlm.generate(images, prompts, max_new_tokens=5, num_beams=3)
    for tokens, parents in follower.steps:
        assert tokens.shape == parents.shape == (9,)
        assert torch.equal(parents // 3, torch.arange(9) // 3)  # a beam only continues a beam of its own sample


class ReportStats(Intervention):
    """Reports one per-sample stat early (filled in later) and tries to overwrite an engine key."""

    def prepare(self, ctx, inputs):
        self.seen = [0] * len(ctx.prompts)
        ctx.report("probe_steps", self.seen)
        ctx.report("new_tokens", ["not mine"] * len(ctx.prompts))

    def after_step(self, ctx, tokens, parents):
        for row in range(len(self.seen)):
            self.seen[row] += 1


def test_method_stats_reach_generation_stats(tiny, images, prompts):
    outputs = vlmkit.wrap(*tiny("llava"), decoders=[ReportStats()]).generate(images, prompts, max_new_tokens=3)
    assert [g.stats["probe_steps"] for g in outputs] == [3, 3, 3]
    assert [g.stats["new_tokens"] for g in outputs] == [len(g.token_ids) for g in outputs]  # engine keys win
    ctx = vlmkit.runtime.hooks.GenerationContext(adapter=None, prompts=prompts, images=images)
    with pytest.raises(ValueError, match="3 samples"):
        ctx.report("short", [1])


class RejectAllPickLast(Intervention):
    """Rejects every candidate; the fallback emits the token id ``fallback_token``."""

    max_candidate_tries = 3

    def __init__(self, fallback_token: int):
        self.fallback_token, self.checked = fallback_token, []

    def accept(self, ctx, logits, tokens):
        self.checked.append(tokens.clone())
        return torch.zeros_like(tokens, dtype=torch.bool)

    def fallback(self, ctx, logits, first):
        return torch.full_like(first, self.fallback_token)


def test_fallback_decides_after_the_last_rejected_try(tiny, images, prompts):
    model, processor = tiny("llava")
    greedy = tokens_of(vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=1))
    check = RejectAllPickLast(fallback_token=7)
    outputs = vlmkit.wrap(model, processor, decoders=[check]).generate(images, prompts, max_new_tokens=1)
    assert tokens_of(outputs) == [[7]] * 3
    assert len(check.checked) == 3  # three distinct candidates per row, no redraw after the last one
    assert check.checked[0].tolist() == [row[0] for row in greedy]
    assert all(len({int(c[row]) for c in check.checked}) == 3 for row in range(3))


class Answer(Intervention):
    def __init__(self, answers):
        self.answers = answers

    def early_exit(self, ctx, inputs):
        return self.answers


def test_early_exit_skips_the_model_only_when_every_row_is_answered(tiny, images, prompts):
    model, processor = tiny("llava")
    dense = vlmkit.wrap(model, processor).generate(images[:2], prompts[:2], max_new_tokens=4)
    ids = dense[0].token_ids[:2]
    exited = vlmkit.wrap(model, processor, decoders=[Answer([ids, ids])]).generate(images[:2], prompts[:2],
                                                                                   max_new_tokens=4)
    assert tokens_of(exited) == [ids, ids] and exited[0].stats["visual_tokens_kept"] == 0
    partial = vlmkit.wrap(model, processor, decoders=[Answer([ids, None])]).generate(images[:2], prompts[:2],
                                                                                    max_new_tokens=4)
    assert tokens_of(partial) == tokens_of(dense)
