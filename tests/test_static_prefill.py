"""The bucketed, right-padded prefill (the CUDA-graph prefill path, run eagerly on the CPU) computes what the
dynamic layer walk computes: the same logits and cache, so the same tokens."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.kernels.interface import LayerAttention
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime import graphs
from vlmkit.runtime.graphs import GraphedCalls
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, Intervention
from vlmkit.runtime.static_prefill import LENGTH_BUCKET, acting_layer, static_segment
from vlmkit.testing import FAMILIES, tiny_model, tokens_of


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_segment_gives_the_walks_logits_and_cache(tiny, images, prompts, family):
    vlm = vlmkit.wrap(*tiny(family))
    engine, num_layers = vlm.engine, len(vlm.adapter.layers)
    batch = vlm.adapter.prepare(images, prompts)
    ctx = GenerationContext(adapter=vlm.adapter, prompts=prompts, images=images)
    state, _, _ = engine.initial_state(ctx, batch)
    length = state.valid.shape[1]
    segment = static_segment(engine, state, 0, num_layers)
    assert segment.hidden.shape[1] % LENGTH_BUCKET == 0 and segment.hidden.shape[1] > length
    cache = LayeredKVCache(num_layers)
    after = segment.run(ctx, state, cache)
    walked_cache = LayeredKVCache(num_layers)
    walked, collected, _ = engine.run_layers(ctx, state, walked_cache, set())
    torch.testing.assert_close(engine._logits(ctx, after.hidden[:, -1], {}),
                               engine._logits(ctx, walked.hidden[:, -1], collected),
                               rtol=1e-5, atol=1e-5)
    assert cache.lengths() == walked_cache.lengths() == [length] * num_layers
    for layer in range(num_layers):
        valid = walked_cache.valid[layer]
        assert torch.equal(cache.valid[layer], valid)
        for mine, theirs in ((cache.keys, walked_cache.keys), (cache.values, walked_cache.values)):
            # [B, H, L, D] -> the real tokens [n, H, D] (padding slots are masked and hold anything)
            torch.testing.assert_close(mine[layer].transpose(1, 2)[valid], theirs[layer].transpose(1, 2)[valid],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("statistics", [False, True])
def test_padded_acting_layer_gives_the_layers_output_and_statistics(tiny, images, prompts, family, statistics):
    vlm = vlmkit.wrap(*tiny(family))
    engine = vlm.engine
    batch = vlm.adapter.prepare(images, prompts)
    ctx = GenerationContext(adapter=vlm.adapter, prompts=prompts, images=images)
    state, _, _ = engine.initial_state(ctx, batch)
    queries = state.last_token if statistics else None
    layer = acting_layer(engine, state, 1, statistics)
    assert layer.hidden.shape[1] > state.valid.shape[1]  # padded
    padded_cache = LayeredKVCache(len(vlm.adapter.layers))
    after, stats = layer.run_with_statistics(ctx, state, padded_cache, queries)

    cache = LayeredKVCache(len(vlm.adapter.layers))
    call = LayerAttention(key_valid=cache.extend_valid(1, state.valid), mass_queries=queries)
    hidden = engine.forward_layer(1, state, cache, call, vlm.adapter.rotary(state.hidden, state.positions))
    valid = state.valid
    torch.testing.assert_close(after.hidden[valid], hidden[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(padded_cache.valid[1], cache.valid[1])
    torch.testing.assert_close(padded_cache.keys[1].transpose(1, 2)[valid], cache.keys[1].transpose(1, 2)[valid])
    if not statistics:  # on the CPU, plain attention runs through sdpa, which gives no statistics
        assert stats is None and call.stats is None
        return
    assert stats.lse.shape == call.stats.lse.shape
    torch.testing.assert_close(stats.lse.transpose(1, 2)[valid], call.stats.lse.transpose(1, 2)[valid])
    # every key's attention mass from each row's last token, the padding rows adding nothing
    assert stats.key_mass.shape == call.stats.key_mass.shape
    torch.testing.assert_close(stats.key_mass, call.stats.key_mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.key_mass.sum(dim=-1), torch.ones_like(stats.key_mass[..., 0]))


@pytest.mark.parametrize("family,pruner,num_beams,decode", [
    ("llava", None, 1, "dynamic"), ("qwen2_5_vl", None, 2, "dynamic"), ("qwen2_vl", "divprune:keep=5", 1, "static"),
    ("llava", "visionzip:keep=6", 1, "static"), ("qwen2_5_vl", "uniform:keep=6", 1, "dynamic"),
])
def test_static_prefill_decodes_the_dynamic_tokens(tiny, images, prompts, family, pruner, num_beams, decode):
    runs = {}
    for prefill in ("dynamic", "static"):
        vlm = vlmkit.wrap(*tiny(family), prefill=prefill, decode=decode, pruner=pruner)
        runs[prefill] = vlm.generate(images, prompts, max_new_tokens=10, num_beams=num_beams)
    assert len(vlm.engine.static_prefills.items) == 1
    assert tokens_of(runs["static"]) == tokens_of(runs["dynamic"])
    for mine, theirs in zip(runs["static"], runs["dynamic"]):
        for key in ("visual_tokens_kept", "visual_tokens_by_layer", "kept_visual_indices"):
            assert mine.stats[key] == theirs.stats[key]


def test_prompts_of_one_bucket_share_a_static_prefill(tiny, images, prompts):
    vlm = vlmkit.wrap(*tiny("llava"), prefill="static")
    first = vlm.generate(images, prompts, max_new_tokens=6)
    (prefill,) = vlm.engine.static_prefills.items.values()
    other = vlm.generate(images[::-1], ["What is this?", "Describe it.", "Any cups here?"], max_new_tokens=6)
    assert list(vlm.engine.static_prefills.items.values()) == [prefill]
    assert tokens_of(vlm.generate(images, prompts, max_new_tokens=6)) == tokens_of(first)
    reference = vlmkit.wrap(*tiny("llava"), prefill="dynamic").generate(
        images[::-1], ["What is this?", "Describe it.", "Any cups here?"], max_new_tokens=6)
    assert tokens_of(other) == tokens_of(reference)


def _segments(acting: set[int], num_layers: int) -> set[tuple[int, int]]:
    """The runs of layers between the acting ones."""
    runs, start = set(), 0
    for layer in sorted(acting) + [num_layers]:
        if layer > start:
            runs.add((start, layer))
        start = layer + 1
    return runs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruner,acting", [("fastv:keep=8,layer=2", {1}), ("pdrop:keep=8", {0, 1, 2}),
                                           ("dart:keep=8,layer=3", {2}), ("dyvte:exit_layer=1", {1}),
                                           ("fastv:keep=8,layer=2,debias=exp", {1})])
def test_in_llm_pruners_act_between_static_segments(tiny, images, prompts, family, pruner, acting, monkeypatch):
    runs, acted = {}, set()
    for prefill in ("dynamic", "static"):
        vlm = vlmkit.wrap(*tiny(family), prefill=prefill, pruner=pruner)
        if prefill == "dynamic":  # record the layers where the pruner's hooks return something
            for hook in ("attention", "after_layer"):
                def recording(ctx, layer, *args, original=getattr(vlm.pruner, hook)):
                    if (result := original(ctx, layer, *args)) is not None:
                        acted.add(layer)
                    return result

                monkeypatch.setattr(vlm.pruner, hook, recording)
        runs[prefill] = vlm.generate(images, prompts, max_new_tokens=8)
    num_layers = len(vlm.adapter.layers)
    assert vlm.pruner.prefill_layers(num_layers) == acting
    assert acted and acted <= acting
    keys = vlm.engine.static_prefills.items
    assert {key[:2] for key in keys if "acting" not in key} == _segments(acting, num_layers)
    statistics = pruner.startswith(("fastv", "pdrop"))  # they rank tokens by attention; dart and dyvte do not
    assert {key[0]: key[-1] for key in keys if "acting" in key} == dict.fromkeys(acting, statistics)
    assert tokens_of(runs["static"]) == tokens_of(runs["dynamic"])
    for mine, theirs in zip(runs["static"], runs["dynamic"]):
        for key in ("visual_tokens_kept", "visual_tokens_by_layer", "kept_visual_indices"):
            assert mine.stats[key] == theirs.stats[key]


class _Steer(Intervention):
    """Edits the residual stream at any layer (says nothing about which)."""

    name = "steer"

    def edit_residual(self, ctx, layer, state):
        return state.hidden * 1.01


@pytest.mark.parametrize("methods", [{"decoders": ["vcd"]}, {"decoders": ["vista:window=2"]}, {"decoders": [_Steer()]}])
def test_methods_that_may_act_at_any_layer_keep_the_walk(tiny, images, prompts, methods):
    vlm = vlmkit.wrap(*tiny("llava"), prefill="static", **methods)
    vlm.generate(images[:1], prompts[:1], max_new_tokens=3)
    assert not vlm.engine.static_prefills.items


class _BiasAtOneLayer(Intervention):
    """Biases the attention of layer 1 towards the visual tokens (says so), counting its hook's calls."""

    name = "bias-at-one-layer"

    def __init__(self):
        self.calls = 0

    def prefill_layers(self, num_layers):
        return {1}

    def attention(self, ctx, layer, state):
        if ctx.step < 0 and layer == 1:
            self.calls += 1
            return AttentionRequest(key_bias=state.is_visual[:, None].float() * 2.0)
        return None


def test_an_acting_layer_that_edits_attention_runs_eagerly_with_its_hooks_called_once(tiny, images, prompts):
    runs = {}
    for prefill in ("dynamic", "static"):
        bias = _BiasAtOneLayer()
        vlm = vlmkit.wrap(*tiny("qwen2_5_vl"), prefill=prefill, decoders=[bias])
        runs[prefill] = vlm.generate(images, prompts, max_new_tokens=8)
        assert bias.calls == 1
    keys = vlm.engine.static_prefills.items
    assert {key[:2] for key in keys} == {(0, 1), (2, len(vlm.adapter.layers))}  # no static copy of layer 1
    assert tokens_of(runs["static"]) == tokens_of(runs["dynamic"])
    assert tokens_of(runs["static"]) != tokens_of(vlmkit.wrap(*tiny("qwen2_5_vl")).generate(images, prompts,
                                                                                             max_new_tokens=8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("pruner", [None, "divprune:keep=8", "fastervlm:keep=8", "fastv:keep=8"])
def test_cuda_graph_prefill_gives_the_dynamic_tokens(images, prompts, family, pruner):
    if pruner == "fastervlm:keep=8" and family != "llava":
        pytest.skip("fastervlm needs a [CLS] token")
    model, processor = tiny_model(family, dtype=torch.bfloat16)
    model.cuda()
    graphed = vlmkit.wrap(model, processor, pruner=pruner)  # prefill="auto": CUDA graphs on a GPU
    fast = [graphed.generate(images, prompts, max_new_tokens=16) for _ in range(2)]  # capture, then replay
    segments = graphed.engine.static_prefills.items.values()
    # fastv: the layers before its ranking layer, that layer with its statistics, and the layers after it
    assert len(segments) == (3 if pruner == "fastv:keep=8" else 1) and all(s.graph is not None for s in segments)
    assert len(graphed.engine.vision_graphs.pool.items) == 1  # the vision tower replayed as a graph too
    slow = vlmkit.wrap(model, processor, pruner=pruner, prefill="dynamic", decode="dynamic").generate(
        images, prompts, max_new_tokens=16)
    assert tokens_of(fast[0]) == tokens_of(fast[1]) == tokens_of(slow)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_calls_replay_fresh_inputs_and_keep_earlier_outputs():
    calls = GraphedCalls()
    weight = torch.randn(8, 8, device="cuda")

    def forward(x):
        return (x @ weight).relu(), None

    calls.run("f", forward, torch.randn(3, 8, device="cuda"))  # first call of a shape: eager
    first, second = torch.randn(3, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    out_first, nothing = calls.run("f", forward, first)  # captured
    out_second, _ = calls.run("f", forward, second)  # replayed
    assert nothing is None and len(calls.pool.items) == 1
    torch.testing.assert_close(out_first, forward(first)[0])  # not overwritten by the second replay
    torch.testing.assert_close(out_second, forward(second)[0])
    for _ in range(2):
        calls.run("f", forward, torch.randn(5, 8, device="cuda"))  # another shape: another graph
    assert len(calls.pool.items) == 2


def test_a_shape_is_captured_on_its_second_call(monkeypatch):
    """The policy without a GPU: a stand-in for the captured call counts captures and replays."""
    captured = []

    class Captured:
        def __init__(self, fn, inputs):
            captured.append(inputs[0].shape)
            self.fn = fn

        def __call__(self, *inputs):
            return self.fn(*inputs)

    monkeypatch.setattr(graphs, "GraphedCall", Captured)
    calls = GraphedCalls()
    double = lambda x: (2 * x,)
    for rows in (3, 3, 3, 5, 4, 5):
        assert torch.equal(calls.run("f", double, torch.ones(rows, 2))[0], torch.full((rows, 2), 2.0))
    assert captured == [(3, 2), (5, 2)]  # (4, 2) was called once: eager, never captured


def test_graphs_only_for_a_model_on_one_gpu(tiny, monkeypatch):
    """A CUDA graph captures one device's stream: a model that device_map spread over GPUs runs eagerly."""
    vlm = vlmkit.wrap(*tiny("llava"))
    assert not vlm.engine.graphs_allowed  # the CPU
    monkeypatch.setattr(type(vlm.adapter), "device", property(lambda self: torch.device("cuda", 0)))
    assert vlm.engine.graphs_allowed
    monkeypatch.setattr(vlm.model, "hf_device_map", {"model.vision_tower": 0, "model.language_model": 1},
                        raising=False)
    assert not vlm.engine.graphs_allowed
    assert vlm.engine._vision_graphs(1) is None
