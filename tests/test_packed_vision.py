"""The packed vision attention (``vlmkit_flash_packed``): one call per ViT layer, attention within each sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import vlmkit
from vlmkit.kernels import packed_vision

LENGTHS = [5, 17, 64, 3, 130]


def _reference(query, key, value, lengths, scaling):
    """float64 softmax attention within each sequence, ``[1, L, H, D]``."""
    outputs, start = [], 0
    for length in lengths:
        q, k, v = (t[0, :, start:start + length].double() for t in (query, key, value))
        outputs.append((torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1) @ v).transpose(0, 1))
        start += length
    return torch.cat(outputs)[None]


@pytest.mark.parametrize("device,dtype,tolerance", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 2e-2, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="varlen attention needs a GPU")),
])
def test_packed_attention_matches_a_float64_reference(device, dtype, tolerance):
    heads, dim = 4, 80  # Qwen's ViT head size
    query, key, value = (torch.randn(1, heads, sum(LENGTHS), dim, device=device, dtype=dtype) for _ in range(3))
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=device, dtype=torch.int32)
    scaling = dim**-0.5
    out, _ = packed_vision.packed_attention(torch.nn.Module(), query, key, value, scaling=scaling,
                                            cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=max(LENGTHS),
                                            max_length_k=max(LENGTHS), is_causal=False)
    expected = _reference(query, key, value, LENGTHS, scaling)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vit_runs_one_packed_call_per_layer_and_matches_sdpa(tiny, images, prompts, family, monkeypatch):
    """transformers hands the packed call to the implementation (one per ViT block, sequence lengths included), and
    the ViT's output is the sdpa implementation's."""
    model, processor = tiny(family)
    vlm = vlmkit.wrap(model, processor)
    assert model.config.vision_config._attn_implementation == packed_vision.PACKED_VISION_IMPLEMENTATION
    calls = []
    attend = packed_vision.packed_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q") is not None)
        return attend(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, packed_vision.PACKED_VISION_IMPLEMENTATION, counting)
    batch = vlm.adapter.prepare(images, prompts)
    packed = vlm.adapter.encode_images(batch)
    assert calls == [True] * len(vlm.adapter.vision_tower.blocks)
    model.set_attn_implementation({"vision_config": "sdpa"})
    try:
        per_sequence = vlm.adapter.encode_images(batch)
    finally:
        model.set_attn_implementation({"vision_config": packed_vision.PACKED_VISION_IMPLEMENTATION})
    for ours, theirs in zip(packed, per_sequence):
        torch.testing.assert_close(ours.embeds, theirs.embeds, atol=1e-6, rtol=1e-5)
