"""SGRS: neutral settings are greedy; the saliency is |A * dLoss/dA| as the paper defines it (checked against eager
attention maps and autograd); rejections change the emitted token exactly where the threshold fires."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.decoders.sgrs import SaliencyRejection
from vlmkit.errors import ConfigError
from vlmkit.testing import tiny_model, tokens_of


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_neutral_settings_are_greedy(tiny, decode, images, prompts, family):
    model, processor = tiny(family)
    greedy = decode(model, processor, images, prompts, max_new_tokens=8)
    assert decode(model, processor, images, prompts, "sgrs:strength=0", max_new_tokens=8) == greedy
    # checks run (top-K restriction and saliency passes) but a threshold near 0 never rejects
    checked = vlmkit.wrap(model, processor, decoders=["sgrs:strength=1e-9,context=query"]).generate(
        images, prompts, max_new_tokens=8)
    assert tokens_of(checked) == greedy
    assert [g.stats["sgrs_rejections"] for g in checked] == [0, 0, 0]


def eager_saliency(image, prompt, token: int, layers: list[int]) -> float:
    """S(token) at the prompt's last position from HF eager attention maps and autograd (paper Eq. 1-5, J = the
    question after the image)."""
    model, processor = tiny_model("llava")
    model.set_attn_implementation("eager")
    batch = vlmkit.wrap(*tiny_model("llava")).adapter.prepare([image], [prompt])
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True,
                **batch.vision_inputs)
    attentions = [out.attentions[l] for l in layers]
    loss = -out.logits[0, -1].float().log_softmax(-1)[token]
    grads = torch.autograd.grad(loss, attentions)
    last_visual = int(batch.is_visual[0].nonzero().max())
    length = batch.input_ids.shape[1]
    context = torch.zeros(length, dtype=torch.bool)
    context[last_visual + 1: length - 1] = True
    values = []
    for a, g in zip(attentions, grads):
        row = (a[0, :, -1] * g[0, :, -1]).abs().mean(dim=0).detach()
        values.append(float((row / row.norm())[context].mean()))
    return sum(values) / len(values)


def test_saliency_matches_attention_times_gradient(images, prompts):
    decoder = SaliencyRejection(strength=0.6, context="query")
    vlmkit.wrap(*tiny_model("llava"), decoders=[decoder]).generate(images[1], prompts[1], max_new_tokens=2)
    first = decoder.trace[0]
    assert first["step"] == 0 and first["accepted"]  # the threshold is 0 at the first step
    layers = decoder.target_layers(4)
    expected = eager_saliency(images[1], prompts[1], first["token"], layers)
    assert first["saliency"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rejection_changes_the_token_where_the_threshold_fires(tiny, images, prompts, family):
    model, processor = tiny(family)
    greedy = tokens_of(vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=10))
    decoder = SaliencyRejection(strength=1.5, context="query", window=3)
    outputs = vlmkit.wrap(model, processor, decoders=[decoder]).generate(images, prompts, max_new_tokens=10)
    assert sum(g.stats["sgrs_rejections"] for g in outputs) > 0
    for row, generation in enumerate(outputs):
        history: list[float] = []
        for step, token in enumerate(generation.token_ids):
            entries = [c for c in decoder.trace if c["row"] == row and c["step"] == step]
            checks = [c for c in entries if not c.get("fallback")]
            assert checks, "every step of a running row is checked"
            assert all(c["threshold"] == pytest.approx(1.5 * sum(history[-3:]) / len(history[-3:]))
                       if history else c["threshold"] == 0.0 for c in checks)
            accepted = [c for c in checks if c["accepted"]]
            if accepted:  # the first accepted candidate is emitted; every earlier one was rejected
                assert token == accepted[0]["token"] and all(not c["accepted"] for c in checks[:-1])
            else:  # every try rejected: the fallback emits the top-K token of largest saliency
                assert len(checks) == decoder.max_candidate_tries
                assert entries[-1].get("fallback") and entries[-1]["token"] == token
                assert entries[-1]["saliency"] >= max(c["saliency"] for c in checks)
            emitted = [c for c in entries if c["token"] == token]
            if emitted and emitted[0]["saliency"] == emitted[0]["saliency"]:  # not NaN
                history.append(emitted[0]["saliency"])
        prefix = next((s for s, (a, b) in enumerate(zip(generation.token_ids, greedy[row])) if a != b), None)
        if prefix is not None:  # the first difference from greedy is a step where greedy's token was rejected
            first_check = [c for c in decoder.trace if c["row"] == row and c["step"] == prefix][0]
            assert first_check["token"] == greedy[row][prefix] and not first_check["accepted"]
    assert tokens_of(outputs) != greedy


def test_batch_rows_are_independent(tiny, images, prompts):
    model, processor = tiny("llava")
    spec = "sgrs:strength=1.5,context=query,window=3"
    batched = tokens_of(vlmkit.wrap(model, processor, decoders=[spec]).generate(images, prompts, max_new_tokens=8))
    single = [tokens_of(vlmkit.wrap(model, processor, decoders=[spec]).generate(i, p, max_new_tokens=8))[0]
              for i, p in zip(images, prompts)]
    assert batched == single


def test_composes_with_pruner_and_locore(tiny, images, prompts):
    model, processor = tiny("qwen2_vl")
    outputs = vlmkit.wrap(model, processor, pruner="uniform:keep=0.5",
                          decoders=["sgrs:strength=1.5,context=query", "locore:strength=0.5"]).generate(
        images, prompts, max_new_tokens=6)
    assert all(len(g.token_ids) >= 1 and "sgrs_rejections" in g.stats for g in outputs)


def test_errors(tiny, images, prompts):
    with pytest.raises(ConfigError, match="retries"):
        SaliencyRejection(top_k=3, retries=3)
    with pytest.raises(ConfigError, match="context"):
        SaliencyRejection(context="all")
    with pytest.raises(ConfigError, match="out of range"):
        vlmkit.wrap(*tiny("llava"), decoders=["sgrs:layers=9"]).generate(images[0], prompts[0], max_new_tokens=2)
    with pytest.raises(ConfigError, match="beam search"):
        vlmkit.wrap(*tiny("llava"), decoders=["sgrs"]).generate(images[0], prompts[0], max_new_tokens=3, num_beams=2)
