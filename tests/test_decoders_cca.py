"""CCA: ring ids, positions and mask against the spec's formula on grids written out by hand."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.decoders.cca import concentric_positions, ring_ids
from vlmkit.errors import ConfigError
from vlmkit.kernels.interface import LayerAttention, vlmkit_attention
from vlmkit.kernels.masks import ring_table_mask
from vlmkit.kernels.reference import attention_reference


def test_ring_ids_square_and_general_grids():
    assert ring_ids(4, 4).view(4, 4).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert ring_ids(3, 5).view(3, 5).tolist() == [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert ring_ids(24, 24).bincount().tolist() == [92, 84, 76, 68, 60, 52, 44, 36, 28, 20, 12, 4]


def test_positions_follow_the_formula():
    # row 0: 3 prefix tokens, a 3x4 image (rings 0/1, n = 2), 2 text tokens; row 1: one pad token in front
    rings = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, -1, -1],
                          [-1, -1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, -1]])
    positions = torch.stack([torch.arange(17), (torch.arange(17) - 1).clamp(min=0)])
    paper = torch.tensor([[0, 1, 2, 3, 3, 3, 3, 3, 4, 4, 3, 3, 3, 3, 3, 5, 6]])  # p + ρ; text from p + n
    shift = 12 - 2  # N - n: decoding continues where the unpruned prompt ends
    out = concentric_positions(positions, rings)
    assert out[0].tolist() == (paper[0] + shift).tolist()
    assert out[1, 1:].tolist() == (paper[0, :16] + shift).tolist()
    mrope = concentric_positions(positions[None].expand(3, -1, -1), rings)  # M-RoPE: every component alike
    assert torch.equal(mrope, out[None].expand(3, -1, -1))


def test_mask_matches_the_formula():
    # 1 prefix token, a 3x3 image (centre = ring 1), 1 text token: 11 keys
    rings = torch.tensor([[-1, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1]])
    idx = torch.arange(11)
    allowed = ring_table_mask(rings)(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                              idx.view(1, 1, 11, 1), idx.view(1, 1, 1, 11))[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # prefix: causal
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],  # ring-0 queries: every ring-0 key, not the centre, not the text
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],  # the centre sees the whole image
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # text after the image: causal
    ])
    assert torch.equal(allowed, expected)


def test_stock_model_needs_the_opt_in(tiny, images, prompts):
    with pytest.raises(ConfigError, match="training_free"):
        vlmkit.wrap(*tiny("llava"), decoders=["cca"]).generate(images, prompts, max_new_tokens=2)


def test_runtime_applies_the_mask_without_extra_causality():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    mask = ring_table_mask(torch.tensor([[-1, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1]]))
    call = LayerAttention(torch.ones(1, 11, dtype=torch.bool), mask_mod=mask)
    out, _ = vlmkit_attention(None, q, k, v, None, vlmkit_attention=call)
    expected, _ = attention_reference(q, k, v, causal=False, mask_mod=mask)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_training_free_generation_with_a_pruner(tiny, images, prompts, family):
    model, processor = tiny(family)
    greedy = vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=4)
    out = vlmkit.wrap(model, processor, decoders=["cca:training_free=true"], pruner="uniform:keep=4").generate(
        images, prompts, max_new_tokens=4)
    assert [g.stats["visual_tokens_kept"] for g in out] == [4, 4, 4]
    assert [g.token_ids for g in out] != [g.token_ids for g in greedy]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_decode_runs_on_the_static_cache_with_the_dynamic_tokens(tiny, images, prompts, family):
    model, processor = tiny(family)
    cca = ["cca:training_free=true"]
    dynamic = vlmkit.wrap(model, processor, decoders=cca, decode="dynamic").generate(images, prompts, max_new_tokens=8)
    vlm = vlmkit.wrap(model, processor, decoders=cca, decode="static")
    static = vlm.generate(images, prompts, max_new_tokens=8)
    assert len(vlm.engine.static_decoders.items) == 1  # CCA acts in the prefill only
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]
    greedy = vlmkit.wrap(model, processor, decode="static").generate(images, prompts, max_new_tokens=8)
    assert [g.token_ids for g in static] != [g.token_ids for g in greedy]  # and it does act there
