"""``compile=True``: torch.compile'd decoder layers (large eager prefills, static prefill segments, static decode
steps) and Qwen's compiled ViT give the uncompiled tokens."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.models import qwen2_vl
from vlmkit.runtime import engine
from vlmkit.testing import tiny_model, tokens_of


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_compiled_layers_give_the_eager_tokens(tiny, images, prompts, family, monkeypatch):
    """Shared image prefixes (rows 0 and 1 ask about one image), a pruner acting inside the walk (FastV), decoders
    (CCA's mask, GIFT's edits), beams. The tiny prompts are far below the size that compiles on a GPU."""
    monkeypatch.setattr(engine, "COMPILE_MIN_TOKENS", 0)
    compiled_calls = []
    compiled_forward = engine.compiled_layer_forward()

    def counted(*args, **kwargs):
        compiled_calls.append(1)
        return compiled_forward(*args, **kwargs)

    monkeypatch.setattr(engine, "compiled_layer_forward", lambda: counted)
    model, processor = tiny(family)
    rows = [images[0], images[0], images[1]]
    for options in ({"pruner": None}, {"pruner": "fastv:keep=4,layer=2"}, {"decoders": ["cca:training_free=true"]},
                    {"decoders": ["gift"]}):
        eager = vlmkit.wrap(model, processor, prefill="dynamic", **options)
        compiled = vlmkit.wrap(model, processor, prefill="dynamic", compile=True, **options)
        for beams in (1, 2):
            expected = eager.generate(rows, prompts[:3], max_new_tokens=6, num_beams=beams)
            assert tokens_of(compiled.generate(rows, prompts[:3], max_new_tokens=6, num_beams=beams)) == \
                tokens_of(expected)
    assert len(compiled_calls) >= 2 * 2 * model.config.get_text_config().num_hidden_layers  # every prefill layer


def test_small_prefills_stay_eager(tiny, images, prompts, monkeypatch):
    """Below ``COMPILE_MIN_TOKENS`` (batch x bucketed length) a walk is host-bound and keeps the eager layers."""
    def refuse():
        raise AssertionError("a small prefill reached the compiled layers")

    monkeypatch.setattr(engine, "compiled_layer_forward", refuse)
    vlm = vlmkit.wrap(*tiny("llava"), prefill="dynamic", compile=True)
    assert vlm.generate(images[:2], prompts[:2], max_new_tokens=3)
    monkeypatch.setattr(engine, "COMPILE_MIN_TOKENS", 0)
    with pytest.raises(AssertionError, match="small prefill"):
        vlm.generate(images[:2], prompts[:2], max_new_tokens=3)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_static_paths_compile_their_layers(tiny, images, prompts, family, monkeypatch):
    """Static prefill segments and static decode steps (CUDA graphs on a GPU, eager here) run compiled layers at any
    size, as does Qwen's ViT, and give the tokens of the uncompiled dynamic walk, with and without shared prefixes."""
    calls = {"layers": 0, "tower": 0}

    def counting(name, make):
        compiled_fn = make()

        def counted(*args, **kwargs):
            calls[name] += 1
            return compiled_fn(*args, **kwargs)
        return lambda: counted

    monkeypatch.setattr(engine, "compiled_layer_forward", counting("layers", engine.compiled_layer_forward))
    monkeypatch.setattr(qwen2_vl, "compiled_tower_forward", counting("tower", qwen2_vl.compiled_tower_forward))
    model, processor = tiny(family)
    eager = vlmkit.wrap(model, processor, prefill="dynamic", decode="dynamic")
    compiled = vlmkit.wrap(model, processor, prefill="static", decode="static", compile=True)
    for rows in ([images[0], images[1]], [images[0], images[0], images[1]]):
        questions = prompts[:len(rows)]
        expected = tokens_of(eager.generate(rows, questions, max_new_tokens=5))
        assert tokens_of(compiled.generate(rows, questions, max_new_tokens=5)) == expected
    layers = model.config.get_text_config().num_hidden_layers
    # every layer of both calls' prefill segments (the second one's over a shared prefix) and four decode steps
    assert calls["layers"] == (1 + 1 + 4 + 4) * layers
    assert calls["tower"] == (2 if family == "qwen2_5_vl" else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("pruner", [None, "fastv:keep=8"])
def test_compiled_graphs_give_the_dynamic_tokens(images, prompts, family, pruner):
    """On a GPU (fp32), the prefill segment and decode step graphs replay compiled layers (and Qwen's compiled ViT;
    FastV's ranking layer with its statistics) and give the uncompiled dynamic walk's tokens."""
    model, processor = tiny_model(family)
    model.cuda()
    compiled = vlmkit.wrap(model, processor, pruner=pruner, compile=True)
    fast = compiled.generate(images, prompts, max_new_tokens=16)
    (decoder,) = compiled.engine.static_decoders.items.values()
    assert decoder.graph is not None
    segments = compiled.engine.static_prefills.items.values()
    assert len(segments) == (3 if pruner else 1) and all(segment.graph is not None for segment in segments)
    slow = vlmkit.wrap(model, processor, pruner=pruner, prefill="dynamic", decode="dynamic").generate(
        images, prompts, max_new_tokens=16)
    assert tokens_of(fast) == tokens_of(slow)
