"""``compile=True``: prefill walks through torch.compile'd decoder layers give the eager walk's tokens."""

from __future__ import annotations

import pytest

import vlmkit
from vlmkit.runtime import engine
from vlmkit.testing import tokens_of


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
