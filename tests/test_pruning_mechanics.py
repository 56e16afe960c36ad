"""Pruning mechanics: positions and the KV cache stay right when tokens leave the sequence."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.pruners.base import Pruner
from vlmkit.runtime.hooks import AttentionRequest, Intervention
from vlmkit.testing import FAMILIES


class KeepAll(Pruner):
    """Layer-side pruner that keeps every token."""

    def after_layer(self, ctx, layer, state, attention):
        return torch.ones_like(state.valid)


def odd_visual(is_visual: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: every second visual token of each row (by its order among the row's visual tokens)."""
    ordinal = is_visual.long().cumsum(dim=1)
    return is_visual & (ordinal % 2 == 1)


class DropAfter(Pruner):
    """Drop the odd visual tokens after ``layer``."""

    def __init__(self, layer: int):
        super().__init__(keep=1.0)
        self.layer = layer

    def after_layer(self, ctx, layer, state, attention):
        if layer != self.layer:
            return None
        dropped = odd_visual(ctx.scratch["prompt_is_visual"])
        return ~dropped.gather(1, state.source_index.clamp(min=0))


class MaskAfter(Intervention):
    """The same tokens stay in the sequence, but layers after ``layer`` cannot attend to them."""

    def __init__(self, layer: int):
        self.layer = layer

    def attention(self, ctx, layer, state):
        if layer <= self.layer:
            return None
        dropped = odd_visual(ctx.scratch["prompt_is_visual"])
        bias = torch.zeros(state.key_valid.shape, dtype=torch.float32)
        bias[:, : dropped.shape[1]] = torch.where(dropped, float("-inf"), 0.0)
        return AttentionRequest(key_bias=bias[:, None, :])


class RecordLogits(Intervention):
    def __init__(self):
        self.logits: list[torch.Tensor] = []

    def prepare(self, ctx, inputs):
        ctx.scratch["prompt_is_visual"] = inputs.is_visual

    def edit_logits(self, ctx, logits, hidden_by_layer):
        self.logits.append(logits.clone())


def run(vlm, interventions, images, prompts, steps):
    vlm.engine.interventions = interventions
    return vlm.generate(images, prompts, max_new_tokens=steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_identity(tiny, images, prompts, family):
    vlm = vlmkit.wrap(*tiny(family))
    reference = [g.token_ids for g in vlm.generate(images, prompts, max_new_tokens=10)]
    for pruner in (KeepAll(), vlmkit.pruners.create("uniform", keep=1.0), vlmkit.pruners.create("random", keep=1.0)):
        pruned = vlmkit.wrap(*tiny(family), pruner=pruner).generate(images, prompts, max_new_tokens=10)
        assert [g.token_ids for g in pruned] == reference
        assert all(g.stats["visual_tokens_kept"] == g.stats["visual_tokens_in"] for g in pruned)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 2])
def test_dropping_equals_masking(tiny, images, prompts, family, layer):
    """Dropping tokens after layer k == keeping them but masking their keys in layers > k (prefill + 20 steps)."""
    vlm = vlmkit.wrap(*tiny(family))
    images, prompts = images[:2], prompts[:2]
    dropped_log, masked_log = RecordLogits(), RecordLogits()
    dropped = run(vlm, [dropped_log, DropAfter(layer)], images, prompts, steps=21)
    masked = run(vlm, [masked_log, MaskAfter(layer)], images, prompts, steps=21)
    assert len(dropped_log.logits) == len(masked_log.logits) == 21
    for ours, theirs in zip(dropped_log.logits, masked_log.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert [g.token_ids for g in dropped] == [g.token_ids for g in masked]
    for generation in dropped:
        by_layer = generation.stats["visual_tokens_by_layer"]
        assert by_layer[layer + 1] < by_layer[layer]  # the tokens really left the sequence
    # and the masking changes the answer's logits, so the comparison above is not vacuous
    plain_log = RecordLogits()
    run(vlm, [plain_log], images, prompts, steps=1)
    assert not torch.allclose(plain_log.logits[0], masked_log.logits[0], atol=1e-4)


class RecordPositions(Intervention):
    """Keeps the unpruned position ids and what layer 0 of the prefill sees."""

    def prepare(self, ctx, inputs):
        self.full_positions, _ = ctx.adapter.position_ids(inputs)

    def attention(self, ctx, layer, state):
        if ctx.step < 0 and layer == 0:
            self.seen = (state.positions.clone(), state.source_index.clone(), state.valid.clone())


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_side_pruning_keeps_original_positions(tiny, images, prompts, family):
    recorder = RecordPositions()
    vlm = vlmkit.wrap(*tiny(family), pruner="uniform:keep=0.5", decoders=[recorder])
    outputs = vlm.generate(images, prompts, max_new_tokens=2)
    full, (positions, source, valid) = recorder.full_positions, recorder.seen
    index = source.clamp(min=0)
    if full.dim() == 3:  # M-RoPE [3, B, L]
        expected = full.gather(2, index.unsqueeze(0).expand(3, -1, -1))
        assert torch.equal(positions[:, valid], expected[:, valid])
    else:
        assert torch.equal(positions[valid], full.gather(1, index)[valid])
    for generation in outputs:
        assert generation.stats["visual_tokens_kept"] == generation.stats["visual_tokens_in"] // 2
        assert set(generation.stats["visual_tokens_by_layer"]) == {generation.stats["visual_tokens_kept"]}
