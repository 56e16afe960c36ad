"""Baseline pruners (fastv, pdrop, divprune, visionzip, fastervlm, dart) on the tiny models at batch 3.

Generic properties for every method and family, then each method's defining rule checked against an independent
computation on what the runtime really saw (captured q/k, visual tokens, layer inputs).
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.runtime.hooks import Intervention

LLAVA_ONLY = {"visionzip", "fastervlm"}
# method -> (spec with a budget of 6 of each image's tokens, spec that keeps every token, layer where the budget holds)
METHODS = {
    "fastv": ("fastv:keep=6", "fastv:keep=1.0", 2),
    "fastv-debias": ("fastv:keep=6,query=last,debias=exp", "fastv:keep=1.0,debias=cubic", 2),
    "pdrop": ("pdrop:keep=6,lam=1.0,layers=1|3", "pdrop:keep=1.0,lam=1.0", 1),
    "pdrop-debias": ("pdrop:keep=6,lam=1.0,layers=2,debias=exp", "pdrop:keep=1.0,lam=1.0,debias=exp", 2),
    "divprune": ("divprune:keep=6", "divprune:keep=1.0", 0),
    "visionzip": ("visionzip:keep=6", "visionzip:keep=1.0", 0),
    "fastervlm": ("fastervlm:keep=6", "fastervlm:keep=1.0", 0),
    "dart": ("dart:keep=6", "dart:keep=1.0", 2),
}
CASES = [(m, f) for m in METHODS for f in ("llava", "qwen2_vl", "qwen2_5_vl") if not (m in LLAVA_ONLY and f != "llava")]


def ids(outputs):
    return [g.token_ids for g in outputs]


@pytest.fixture(scope="module")
def dense(tiny, images, prompts):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = ids(vlmkit.wrap(*tiny(family)).generate(images, prompts, max_new_tokens=6))
        return cache[family]

    return get


@pytest.mark.parametrize("method,family", CASES)
def test_budget_keep_all_and_determinism(tiny, images, prompts, dense, method, family):
    pruned_spec, keep_all_spec, layer = METHODS[method]
    model, processor = tiny(family)
    full = vlmkit.wrap(model, processor, pruner=keep_all_spec).generate(images, prompts, max_new_tokens=6)
    assert ids(full) == dense(family)
    assert all(set(g.stats["visual_tokens_by_layer"]) == {g.stats["visual_tokens_in"]} for g in full)
    vlm = vlmkit.wrap(model, processor, pruner=pruned_spec)
    first, again = vlm.generate(images, prompts, max_new_tokens=6), vlm.generate(images, prompts, max_new_tokens=6)
    assert ids(first) == ids(again)
    for generation in first:
        by_layer = generation.stats["visual_tokens_by_layer"]
        assert by_layer[:layer] == [generation.stats["visual_tokens_in"]] * layer
        assert by_layer[layer] == 6


@pytest.mark.parametrize("method", ["fastv", "pdrop", "divprune", "visionzip", "fastervlm", "dart"])
def test_impossible_budgets(tiny, images, prompts, method):
    with pytest.raises(ConfigError):
        vlmkit.pruners.create(method, keep=0)
    with pytest.raises(ConfigError):
        vlmkit.pruners.create(method, keep=1.5)
    with pytest.raises(ConfigError, match="larger than the 16 visual tokens") as error:
        vlmkit.wrap(*tiny("llava"), pruner=f"{method}:keep=17").generate(images, prompts, max_new_tokens=1)
    assert "\n" not in str(error.value)


def test_budget_above_a_rows_tokens_is_an_error_on_qwen(tiny, images, prompts):
    with pytest.raises(ConfigError, match="larger than the 12 visual tokens"):  # rows have 12, 16 and 12 tokens
        vlmkit.wrap(*tiny("qwen2_vl"), pruner="fastv:keep=13").generate(images, prompts, max_new_tokens=1)


@pytest.mark.parametrize("method", sorted(LLAVA_ONLY))
def test_cls_methods_reject_qwen(tiny, images, prompts, method):
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        vlmkit.wrap(*tiny("qwen2_vl"), pruner=f"{method}:keep=4").generate(images, prompts, max_new_tokens=1)


# -- recorders --------------------------------------------------------------------------------------------------------
class Recorder(Intervention):
    """Keeps the prefill state at every layer boundary and the vision-side tokens."""

    def __init__(self):
        self.states = {}

    def select_visual(self, ctx, tokens):
        self.tokens = tokens

    def attention(self, ctx, layer, state):
        if ctx.step < 0:
            self.states[layer] = {k: getattr(state, k).clone() for k in ("hidden", "valid", "is_visual", "source_index")}


def capture_qk(monkeypatch):
    """Record (query, key, scaling) of every prefill attention call, per layer."""
    captured = {}
    original = AttentionInterface._global_mapping["vlmkit"]

    def wrapper(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if query.shape[2] > 1:
            captured[module.layer_idx] = (query.detach().double(), key.detach().double(), scaling)
        return original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "vlmkit", wrapper)
    return captured


def attention_probs(query, key, scaling, valid):
    """Causal softmax attention ``[B, Hq, L, L]`` from captured q/k, computed here from scratch."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = query @ key.transpose(-1, -2) * scaling
    length = logits.shape[-1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)


def survivors(recorder, layer):
    """Per row, the set of prompt indices of the visual tokens present at ``layer``."""
    state = recorder.states[layer]
    return [set(state["source_index"][b][state["is_visual"][b]].tolist()) for b in range(state["valid"].shape[0])]


def expected_top(scores, state, budgets):
    out = []
    for b, budget in enumerate(budgets):
        visual = state["is_visual"][b].nonzero().squeeze(-1)
        top = visual[scores[b, visual].argsort(descending=True)[:budget]]
        out.append(set(state["source_index"][b, top].tolist()))
    return out


def run(tiny, family, pruner, images, prompts, monkeypatch=None):
    recorder = Recorder()
    vlm = vlmkit.wrap(*tiny(family), pruner=pruner, decoders=[recorder])
    captured = capture_qk(monkeypatch) if monkeypatch is not None else None
    outputs = vlm.generate(images, prompts, max_new_tokens=2)
    return recorder, captured, outputs


# -- method rules -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("query", ["all", "last", "text"])
def test_fastv_keeps_top_attended(tiny, images, prompts, monkeypatch, family, query):
    recorder, captured, _ = run(tiny, family, f"fastv:keep=5,layer=2,query={query}", images, prompts, monkeypatch)
    state = recorder.states[1]
    probs = attention_probs(*captured[1], state["valid"]).mean(dim=1)  # head average [B, Lq, Lk]
    if query == "all":
        scores = (probs * state["valid"][:, :, None]).sum(dim=1)
    elif query == "last":
        scores = probs[:, -1]
    else:
        index = torch.arange(state["valid"].shape[1])
        last_visual = torch.where(state["is_visual"], index, -1).amax(dim=1, keepdim=True)
        rows = state["valid"] & ~state["is_visual"] & (index > last_visual)
        scores = (probs * rows[:, :, None]).sum(dim=1)
    assert survivors(recorder, 2) == expected_top(scores, state, [5, 5, 5])
    assert survivors(recorder, 1) != survivors(recorder, 2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_debias_ranks_the_debiased_scores(tiny, images, prompts, monkeypatch, family):
    recorder, captured, _ = run(tiny, family, "fastv:keep=5,query=last,debias=exp,sink_ratio=0", images, prompts,
                                monkeypatch)
    state = recorder.states[1]
    scores = attention_probs(*captured[1], state["valid"]).mean(dim=1)[:, -1]
    prompt_visual = recorder.states[0]["is_visual"]
    raster = (prompt_visual.long().cumsum(1) - 1).gather(1, state["source_index"].clamp(min=0))
    # the exponential trend, fitted here with numpy per row on log scores vs relative raster index
    debiased = scores.clone()
    for b in range(scores.shape[0]):
        visual = state["is_visual"][b]
        x = raster[b, visual].double() / (int(prompt_visual[b].sum()) - 1)
        slope = torch.from_numpy(__import__("numpy").polyfit(x.numpy(), scores[b, visual].log().numpy(), 1))[0]
        debiased[b, visual] = scores[b, visual] * torch.exp(-slope * x)
    assert survivors(recorder, 2) == expected_top(debiased, state, [5, 5, 5])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_pdrop_stages(tiny, images, prompts, monkeypatch, family):
    recorder, captured, outputs = run(tiny, family, "pdrop:keep=0.5,lam=0.5", images, prompts, monkeypatch)
    for generation in outputs:  # 4 layers: boundaries 1, 2, 3
        n = generation.stats["visual_tokens_in"]
        assert generation.stats["visual_tokens_by_layer"] == [n, n // 2, n // 4, max(1, n // 8)]
    for layer in (0, 1, 2):  # each stage: the last token's attention ranks the survivors of the previous one
        state = recorder.states[layer]
        scores = attention_probs(*captured[layer], state["valid"]).mean(dim=1)[:, -1]
        budgets = [len(s) for s in survivors(recorder, layer + 1)]
        assert survivors(recorder, layer + 1) == expected_top(scores, state, budgets)


def greedy_diverse(embeds, count):
    """DivPrune's greedy max-min selection, written out with plain loops."""
    unit = torch.nn.functional.normalize(embeds.double(), dim=-1)
    distance = 1 - unit @ unit.T
    n = len(embeds)
    first = max(range(n), key=lambda i: min(distance[i, j] for j in range(n) if j != i))
    picked = [first]
    while len(picked) < count:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: min(distance[i, j] for j in picked)))
    return picked


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_divprune_is_greedy_max_min(tiny, images, prompts, family):
    recorder, _, _ = run(tiny, family, "divprune:keep=5", images, prompts)
    for row, tokens in enumerate(recorder.tokens):
        assert kept_visual_ordinals(recorder, row) == set(greedy_diverse(tokens.embeds, 5))
        assert int(recorder.states[0]["is_visual"][row].sum()) == 5


def kept_visual_ordinals(recorder, row):
    """Ordinals (among the image's tokens) of the visual tokens entering the LLM for ``row``."""
    state = recorder.states[0]
    sources = state["source_index"][row][state["is_visual"][row]]
    return set((sources - recorder.first_visual[row]).tolist())


@pytest.fixture(autouse=True)
def _first_visual(monkeypatch):
    """Recorder.prepare: the prompt index of each row's first visual token."""

    def prepare(self, ctx, inputs):
        self.first_visual = inputs.is_visual.long().argmax(dim=1).tolist()

    monkeypatch.setattr(Recorder, "prepare", prepare, raising=False)


def test_fastervlm_keeps_top_cls_attention(tiny, images, prompts):
    recorder, _, _ = run(tiny, "llava", "fastervlm:keep=5", images, prompts)
    for row, tokens in enumerate(recorder.tokens):
        assert tokens.attention.shape[0] == 2  # per head
        expected = set(tokens.attention.mean(dim=0).argsort(descending=True)[:5].tolist())
        assert kept_visual_ordinals(recorder, row) == expected


def test_visionzip_dominant_and_contextual(tiny, images, prompts):
    pruner = vlmkit.pruners.create("visionzip", keep=8, contextual=2)
    recorder, _, _ = run(tiny, "llava", pruner, images, prompts)
    adapter = vlmkit.wrap(*tiny("llava")).adapter
    for row, tokens in enumerate(recorder.tokens):
        dominant = tokens.attention.sum(dim=0).argsort(descending=True)[:6]
        kept = kept_visual_ordinals(recorder, row)
        assert set(dominant.tolist()) <= kept and len(kept) == 8
        anchors = sorted(kept - set(dominant.tolist()))
        rest = sorted(set(range(16)) - set(dominant.tolist()))
        assert anchors == [rest[0], rest[len(rest) // 2]]  # evenly spaced among the non-dominant tokens
        unit = torch.nn.functional.normalize(tokens.features.double(), dim=-1)
        groups = {a: [] for a in anchors}
        for token in rest:
            groups[token if token in anchors else max(anchors, key=lambda a: float(unit[token] @ unit[a]))].append(token)
        state = recorder.states[0]
        sources = state["source_index"][row]
        for anchor, members in groups.items():
            slot = int((sources == recorder.first_visual[row] + anchor).nonzero())
            expected = adapter.projector(tokens.features[members].mean(dim=0, keepdim=True))[0]
            torch.testing.assert_close(state["hidden"][row, slot], expected, atol=1e-5, rtol=1e-5)
        for token in dominant.tolist():  # dominant tokens keep their own embeddings
            slot = int((sources == recorder.first_visual[row] + token).nonzero())
            torch.testing.assert_close(state["hidden"][row, slot], tokens.embeds[token], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dart_single_pivot_keeps_least_similar(tiny, images, prompts, family):
    recorder, _, _ = run(tiny, family, "dart:keep=5,layer=2,pivot_image=1,pivot_text=0", images, prompts)
    adapter = vlmkit.wrap(*tiny(family)).adapter
    block = adapter.layers[1]
    before, after = recorder.states[1], recorder.states[2]
    with torch.no_grad():
        key_norm = block.self_attn.k_proj(block.input_layernorm(before["hidden"])).abs().sum(-1)
    # the survivors: the largest-key-norm visual token plus the 4 least cosine-similar to it in the layer-1 output
    recorder_out = LayerOutput()
    vlmkit.wrap(*tiny(family), decoders=[recorder_out]).generate(images, prompts, max_new_tokens=1)
    hidden = recorder_out.hidden
    for row in range(hidden.shape[0]):
        visual = before["is_visual"][row].nonzero().squeeze(-1)
        pivot = int(visual[key_norm[row, visual].argmax()])
        unit = torch.nn.functional.normalize(hidden[row].double(), dim=-1)
        others = visual[visual != pivot]
        least = others[(unit[others] @ unit[pivot]).argsort()[:4]]
        expected = {int(before["source_index"][row, pivot])} | set(before["source_index"][row, least].tolist())
        assert set(after["source_index"][row][after["is_visual"][row]].tolist()) == expected


class LayerOutput(Intervention):
    """The unpruned prefill's hidden states after layer 1."""

    def edit_residual(self, ctx, layer, state):
        if ctx.step < 0 and layer == 1:
            self.hidden = state.hidden.clone()


def test_bad_layer_options(tiny, images, prompts):
    with pytest.raises(ConfigError, match="inside the model"):
        vlmkit.wrap(*tiny("llava"), pruner="pdrop:layers=4").generate(images, prompts, max_new_tokens=1)
    with pytest.raises(ConfigError):
        vlmkit.pruners.create("pdrop", layers=[3, 2])
    with pytest.raises(ConfigError):
        vlmkit.pruners.create("fastv", layer=0)
    with pytest.raises(ConfigError, match="only 4 layers"):
        vlmkit.wrap(*tiny("llava"), pruner="fastv:layer=4").generate(images, prompts, max_new_tokens=1)
