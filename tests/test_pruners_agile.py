"""AgilePruner: erank, attention-ordered suppression of near-duplicates, budgets on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.pruners.agile import erank, suppress_select


def test_erank_of_known_spectra():
    assert erank(torch.eye(8)) == pytest.approx(8.0)
    assert erank(torch.ones(6, 4)) == pytest.approx(1.0)


def test_erank_equals_the_svd_definition_on_random_features():
    torch.manual_seed(2)
    for features in (torch.randn(40, 24), torch.randn(24, 40), torch.randn(40, 3) @ torch.randn(3, 24)):
        sigma = torch.linalg.svdvals(features.double())
        p = sigma / sigma.sum()
        assert erank(features) == pytest.approx(float(torch.exp(-(p * p.clamp(min=1e-300).log()).sum())), rel=1e-6)


def reference_suppress_select(scores, features, count, complexity, scale, tau_max, order):
    """The method as written: take the best remaining candidate, drop the candidates within tau of it, repeat."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    ranking = scores.argsort(descending=True, stable=True).tolist()
    alive, picked = set(ranking), []
    while len(picked) < count and alive:
        best = next(token for token in ranking if token in alive)
        picked.append(best)
        position = len(picked) if order == "selected" else ranking.index(best) + 1
        tau = min(position * complexity * scale, tau_max)
        alive = {t for t in alive if t != best and float(1 - unit[t] @ unit[best]) >= tau}
    return picked + [t for t in ranking if t not in picked][: count - len(picked)]


@pytest.mark.parametrize("order", ["selected", "rank"])
def test_suppression_matches_the_reference_walk(order):
    torch.manual_seed(3)
    for trial in range(6):
        features = torch.randn(48, 8) + 2.0 * torch.randn(8)  # a shared direction: many near neighbours
        scores, count = torch.rand(48), int(torch.randint(1, 48, ()))
        expected = reference_suppress_select(scores, features, count, 1.0 + trial, 0.01, 0.5, order)
        assert suppress_select(scores, features, count, 1.0 + trial, 0.01, 0.5, order).tolist() == expected


def test_near_duplicates_of_a_pick_are_suppressed():
    torch.manual_seed(0)
    features = torch.randn(10, 16)
    features[1] = features[0] + 1e-3 * torch.randn(16)  # a near-copy of token 0
    scores = torch.linspace(1.0, 0.1, 10)  # attention order 0, 1, 2, ...
    assert suppress_select(scores, features, 3, complexity=1.0, scale=0.01, tau_max=0.5).tolist() == [0, 2, 3]
    # without suppression it is plain top attention
    assert suppress_select(scores, features, 3, complexity=1.0, scale=0.0, tau_max=0.5).tolist() == [0, 1, 2]


def test_threshold_grows_with_complexity_and_refills():
    torch.manual_seed(1)
    features = torch.randn(6, 32)
    features[1] = features[0] + 0.25 * features[0].norm() / 32**0.5 * torch.randn(32)  # cosine distance ~0.03
    scores = torch.arange(6, 0, -1).float()
    distance = float(1 - torch.nn.functional.cosine_similarity(features[0], features[1], dim=0))
    assert 0.005 < distance < 0.1
    simple = suppress_select(scores, features, 3, complexity=0.5, scale=0.01, tau_max=0.5)  # tau_1 = 0.005
    complex_ = suppress_select(scores, features, 3, complexity=10.0, scale=0.01, tau_max=0.5)  # tau_1 = 0.1
    assert simple.tolist() == [0, 1, 2] and complex_.tolist() == [0, 2, 3]
    same = torch.ones(6, 4)  # every candidate duplicates the first pick: the rest refill in attention order
    assert suppress_select(scores, same, 4, complexity=1.0, scale=0.01, tau_max=0.5).tolist() == [0, 1, 2, 3]


def test_pipeline_budget_keep_all_and_qwen(tiny, images, prompts):
    model, processor = tiny("llava")
    dense = [g.token_ids for g in vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=5)]
    full = vlmkit.wrap(model, processor, pruner="agile:keep=1.0").generate(images, prompts, max_new_tokens=5)
    assert [g.token_ids for g in full] == dense
    vlm = vlmkit.wrap(model, processor, pruner="agile:keep=5,erank_mean=3.0")
    first, again = vlm.generate(images, prompts, max_new_tokens=5), vlm.generate(images, prompts, max_new_tokens=5)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.stats["visual_tokens_kept"] for g in first] == [5, 5, 5]
    with pytest.raises(ConfigError, match="larger than"):
        vlmkit.wrap(model, processor, pruner="agile:keep=17").generate(images, prompts, max_new_tokens=1)
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        vlmkit.wrap(*tiny("qwen2_vl"), pruner="agile:keep=4").generate(images, prompts, max_new_tokens=1)
