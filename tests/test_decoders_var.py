"""``var`` (visual attention redistribution): the redistribution rule, sink detection and its runtime wiring."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.decoders.var import redistribute, sink_tokens
from vlmkit.errors import ConfigError


def test_redistribution_rule():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 5, 8) * 2, dim=-1)
    visual = torch.zeros(2, 8, dtype=torch.bool)
    visual[:, 2:6] = True
    sink = torch.zeros(2, 8, dtype=torch.bool)
    sink[:, 0] = True  # a text sink
    sink[:, 2] = True  # a visual sink
    out = redistribute(probs, sink, visual, p=0.6, rho=0.5, summ=0.2)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 5))
    image = probs[..., 2:6].sum(-1)
    centric = (image >= 0.2) & (probs[..., 2] <= 0.5 * image)
    assert centric.any() and (~centric).any()
    torch.testing.assert_close(out[~centric], probs[~centric])
    kept, base = out[centric], probs[centric]
    torch.testing.assert_close(kept[:, [0, 2]], 0.6 * base[:, [0, 2]])  # every sink scaled by p
    torch.testing.assert_close(kept[:, [1, 6, 7]], base[:, [1, 6, 7]])  # other text keys untouched
    moved = 0.4 * base[:, [0, 2]].sum(-1, keepdim=True)
    targets = base[:, 3:6]
    torch.testing.assert_close(kept[:, 3:6], targets + moved * targets / targets.sum(-1, keepdim=True))


def test_sink_tokens_are_large_normalised_values_in_the_sink_dimensions():
    hidden = torch.randn(1, 4, 16) * 0.1
    hidden[0, 1, 3] = 50.0  # massive activation in dimension 3
    hidden[0, 2, 5] = 50.0  # in dimension 5, which is not a sink dimension
    valid = torch.tensor([[True, True, True, False]])
    hidden[0, 3, 3] = 50.0  # padding is never a sink
    sinks = sink_tokens(hidden, valid, torch.tensor([[3, 7]]), tau=3.0)
    assert sinks.tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_p_one_is_greedy(tiny, decode, images, prompts, family):
    model, processor = tiny(family)
    assert decode(model, processor, images, prompts, "var:p=1,tau=0.5") == decode(model, processor, images, prompts)


def test_redistribution_reaches_the_logits_and_batches(tiny, hf_refs, images, prompts):
    model, processor = tiny("qwen2_5_vl")
    spies = []
    for spec in ("var:p=1,tau=1.5", "var:p=0.6,tau=1.5"):
        spy = hf_refs.Spy()
        vlmkit.wrap(model, processor, decoders=[spec, spy]).generate(images[:1], prompts[:1], max_new_tokens=3)
        spies.append(spy.seen)
    assert not torch.allclose(spies[0][0], spies[1][0])
    hf_refs.batch_equals_single(model, processor, "var:tau=1.5", images, prompts)


def test_beams_and_a_pruner(tiny, images, prompts):
    model, processor = tiny("llava")
    vlm = vlmkit.wrap(model, processor, pruner="uniform:keep=8", decoders=["var:tau=1.5"])
    out = vlm.generate(images[:2], prompts[:2], max_new_tokens=4, num_beams=2)
    assert all(o.stats["visual_tokens_kept"] == 8 for o in out)


def test_bad_options(tiny, images, prompts):
    with pytest.raises(ConfigError, match="p must be"):
        vlmkit.decoders.create_from_spec("var:p=1.5")
    model, processor = tiny("llava")
    with pytest.raises(ConfigError, match="hidden size"):
        vlmkit.wrap(model, processor, decoders=["var:dims=999"]).generate(images[:1], prompts[:1], max_new_tokens=2)
