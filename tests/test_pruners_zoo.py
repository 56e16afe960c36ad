"""ZOO-Prune: finite-difference sensitivity against analytic directional derivatives, and its selection rule."""

from __future__ import annotations

import copy

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.pruners.zoo import ZooPrune, mlp_sensitivity, random_directions, sensitivity
from vlmkit.runtime.hooks import GenerationContext, Intervention


def test_linear_projector_gives_the_analytic_directional_derivative():
    torch.manual_seed(1)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(10, 24) * 5
    directions = random_directions(16, 24, seed=3)
    expected = (directions @ linear.weight.T).norm(dim=-1).mean()  # ||W u_j||, the same for every token
    torch.testing.assert_close(sensitivity(linear, x, directions, step=0.01), expected.expand(10), rtol=1e-3, atol=1e-4)


def test_nonlinear_projector_matches_jvp():
    torch.manual_seed(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(12, 16)
    directions = random_directions(8, 16, seed=0)
    exact = torch.stack([
        torch.func.jvp(mlp, (x,), (u.expand_as(x),))[1].norm(dim=-1) for u in directions
    ]).mean(dim=0)
    estimate = sensitivity(mlp, x, directions, step=1e-3)
    torch.testing.assert_close(estimate, exact, rtol=1e-3, atol=1e-4)
    assert exact.std() > 1e-3  # the GELU makes sensitivity token-dependent


@pytest.mark.parametrize("last_dtype", [torch.float32, torch.bfloat16])
def test_mlp_sensitivity_equals_the_direct_differences(last_dtype):
    torch.manual_seed(4)
    first, act, last = torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 24)
    x = torch.randn(20, 16) * 3
    directions = random_directions(12, 16, seed=1)
    with torch.no_grad():
        project, x64 = copy.deepcopy(torch.nn.Sequential(first, act, last)).double(), x.double()
        direct = torch.stack([(project(x64 + 0.01 * u) - project(x64 - 0.01 * u)).norm(dim=-1) / 0.02
                              for u in directions.double()]).mean(dim=0)  # the definition, in float64
        estimate = mlp_sensitivity(first.float(), act, last.to(last_dtype), x, directions, 0.01, chunk=5)
    torch.testing.assert_close(estimate.double(), direct, rtol=5e-5 if last_dtype == torch.float32 else 2e-3, atol=0)
    assert direct.std() > 1e-2 * direct.mean()  # a token-dependent signal, which the tolerance resolves


class Tokens(Intervention):
    def select_visual(self, ctx, tokens):
        self.tokens, self.ctx = tokens, ctx

    def prepare(self, ctx, inputs):
        self.first_visual = inputs.is_visual.long().argmax(dim=1)

    def attention(self, ctx, layer, state):
        if ctx.step < 0 and layer == 0:
            self.kept = [set((state.source_index[b][state.is_visual[b]] - self.first_visual[b]).tolist())
                         for b in range(state.valid.shape[0])]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_selection_is_sensitivity_weighted_max_min(tiny, images, prompts, family):
    recorder = Tokens()
    pruner = ZooPrune(keep=5, directions=8)
    outputs = vlmkit.wrap(*tiny(family), pruner=pruner, decoders=[recorder]).generate(images, prompts, max_new_tokens=2)
    assert all(g.stats["visual_tokens_kept"] == 5 for g in outputs)
    project = pruner.projector(recorder.ctx)
    directions = random_directions(8, recorder.tokens[0].features.shape[1], seed=0).double()
    for row, image in enumerate(recorder.tokens):
        torch.testing.assert_close(project(image.features), image.embeds, atol=1e-5, rtol=1e-5)  # right projector
        x, h = image.features.double(), 0.01
        with torch.no_grad():
            project64 = pruner_projector_float64(recorder.ctx)
            s = torch.stack([(project64(x + h * u) - project64(x - h * u)).norm(dim=-1) / (2 * h)
                             for u in directions]).mean(0)
        s = (s - s.min()) / (s.max() - s.min())
        unit = torch.nn.functional.normalize(image.embeds.double(), dim=-1)
        distance = 1 - unit @ unit.T
        picked = [int(s.argmax())]
        while len(picked) < 5:
            rest = [i for i in range(len(s)) if i not in picked]
            picked.append(max(rest, key=lambda i: float(s[i] * distance[i, picked].min())))
        assert recorder.kept[row] == set(picked)


def pruner_projector_float64(ctx: GenerationContext):
    module = copy.deepcopy(ctx.adapter.projector).double()
    if ctx.adapter.family == "qwen2_vl":
        return lambda x: module(x.reshape(x.shape[0] * ctx.adapter.merge_size**2, -1))
    return module


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_all_same_seed_and_budgets(tiny, images, prompts, family):
    model, processor = tiny(family)
    dense = [g.token_ids for g in vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=5)]
    full = vlmkit.wrap(model, processor, pruner="zoo:keep=1.0,directions=4").generate(images, prompts, max_new_tokens=5)
    assert [g.token_ids for g in full] == dense
    runs = [vlmkit.wrap(model, processor, pruner=f"zoo:keep=0.5,directions=4,seed={s}").generate(
        images, prompts, max_new_tokens=5) for s in (0, 0)]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    assert [g.stats["visual_tokens_kept"] for g in runs[0]] == [g.stats["visual_tokens_in"] // 2 for g in runs[0]]
    with pytest.raises(ConfigError, match="larger than"):
        vlmkit.wrap(model, processor, pruner="zoo:keep=17").generate(images, prompts, max_new_tokens=1)
    with pytest.raises(ConfigError):
        vlmkit.pruners.create("zoo", keep=0)
