"""The static KV cache (the CUDA-graph decode path, run eagerly on the CPU) decodes exactly what the dynamic cache
decodes. Parity with HF ``generate`` for both modes is in test_parity.py."""

from __future__ import annotations

import collections
import gc
import weakref

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.runtime.engine import Engine
from vlmkit.runtime.hooks import Intervention
from vlmkit.runtime.static_decode import CAPACITY_BUCKET, StaticDecoder
from vlmkit.testing import tiny_model, tokens_of


def _generate(tiny, family, images, prompts, decode, **kwargs):
    vlm = vlmkit.wrap(*tiny(family), decode=decode, **kwargs)
    return vlm, vlm.generate(images, prompts, max_new_tokens=12)


@pytest.mark.parametrize("family,pruner", [("llava", "fastv:keep=8"), ("llava", "visionzip:keep=6"),
                                           ("qwen2_5_vl", "pdrop:keep=4"), ("qwen2_vl", "divprune:keep=5")])
def test_pruned_layouts_decode_the_same(tiny, images, prompts, family, pruner):
    _, dynamic = _generate(tiny, family, images, prompts, "dynamic", pruner=pruner)
    vlm, static = _generate(tiny, family, images, prompts, "static", pruner=pruner)
    assert tokens_of(static) == tokens_of(dynamic)
    assert all(len(g.token_ids) > 1 for g in static)
    # one static decoder, whose layers hold fewer slots after an in-LLM pruner's layer than before it
    (decoder,) = vlm.engine.static_decoders.items.values()
    capacities = [keys.shape[-2] for keys in decoder.cache.keys]
    assert all(c % CAPACITY_BUCKET == 0 for c in capacities)
    lengths = decoder.cache.base.tolist()
    assert all(length + 12 <= c for length, c in zip(lengths, capacities))
    if pruner.startswith(("fastv", "pdrop")):
        assert lengths[-1] < lengths[0]


def test_static_decoders_are_reused_and_give_the_same_tokens(tiny, images, prompts):
    vlm = vlmkit.wrap(*tiny("llava"), decode="static")
    first = vlm.generate(images, prompts, max_new_tokens=8)
    (decoder,) = vlm.engine.static_decoders.items.values()
    # other prompts of similar length: same batch size and capacity bucket, so the same buffers (and graph)
    other = vlm.generate(images[::-1], prompts[::-1], max_new_tokens=8)
    assert list(vlm.engine.static_decoders.items.values()) == [decoder]
    again = vlm.generate(images, prompts, max_new_tokens=8)
    assert tokens_of(again) == tokens_of(first)
    reference = vlmkit.wrap(*tiny("llava"), decode="dynamic").generate(images[::-1], prompts[::-1], max_new_tokens=8)
    assert tokens_of(other) == tokens_of(reference)


def test_decoders_keep_the_dynamic_cache(tiny, images, prompts):
    vlm = vlmkit.wrap(*tiny("llava"), decode="static", decoders=["vcd"])
    vlm.generate(images[:1], prompts[:1], max_new_tokens=4)
    assert not vlm.engine.static_decoders.items


def test_sampling_with_a_seed_matches(tiny, images, prompts):
    runs = [vlmkit.wrap(*tiny("qwen2_vl"), decode=mode).generate(images, prompts, max_new_tokens=10, do_sample=True,
                                                                  temperature=1.5, seed=3)
            for mode in ("dynamic", "static")]
    assert tokens_of(runs[0]) == tokens_of(runs[1])


def test_unknown_decode_mode(tiny):
    with pytest.raises(ConfigError, match="decode mode"):
        vlmkit.wrap(*tiny("llava"), decode="graphs")


def test_static_cache_writes_one_slot_per_step(tiny, images, prompts):
    from vlmkit.runtime.cache import LayeredKVCache
    from vlmkit.runtime.static_decode import StaticKVCache

    source = LayeredKVCache(2)
    for layer, length in enumerate([5, 3]):
        source.update(torch.randn(2, 1, length, 4), torch.randn(2, 1, length, 4), layer)
        source.extend_valid(layer, torch.tensor([[True] * length, [False] + [True] * (length - 1)]))
    cache = StaticKVCache(source, [8, 8])
    cache.load(source)
    cache.step.fill_(2)
    key, value = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    keys, _ = cache.update(key, value, 1)
    valid = cache.extend_valid(1, torch.ones(2, 1, dtype=torch.bool))
    assert torch.equal(keys[..., :3, :], source.keys[1]) and torch.equal(keys[..., 5:6, :], key)
    assert valid.tolist() == [[True] * 3 + [False, False, True, False, False],
                              [False, True, True, False, False, True, False, False]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("pruner,decoders", [(None, []), ("fastv:keep=8", []), (None, ["cca:training_free=true"]),
                                             (None, ["vista:strength=1.0,gamma=0.3,window=2"])])
def test_cuda_graph_decode_gives_the_dynamic_tokens(images, prompts, family, pruner, decoders):
    model, processor = tiny_model(family, dtype=torch.bfloat16)
    model.cuda()
    graphed = vlmkit.wrap(model, processor, pruner=pruner, decoders=decoders)  # decode="auto": CUDA graphs on a GPU
    eager = vlmkit.wrap(model, processor, pruner=pruner, decoders=decoders, decode="dynamic")
    for order in (slice(None), slice(None, None, -1)):  # the second call replays the first one's graph
        fast = graphed.generate(images[order], prompts[order], max_new_tokens=16)
        (decoder,) = graphed.engine.static_decoders.items.values()
        assert decoder.graph is not None
        assert tokens_of(fast) == tokens_of(eager.generate(images[order], prompts[order], max_new_tokens=16))


def test_auto_graphs_short_answers_when_their_layout_recurs(tiny, images, prompts, monkeypatch):
    """Answers under MIN_NEW_TOKENS decode dynamically the first time a layout is seen (a capture would cost more
    than it saves) and in the static decoder when the previous call had the same layout (an evaluation's batches)."""
    reference = tokens_of(vlmkit.wrap(*tiny("llava"), decode="dynamic").generate(images, prompts, max_new_tokens=3))
    vlm = vlmkit.wrap(*tiny("llava"), prefill="dynamic")  # decode="auto"
    monkeypatch.setattr(Engine, "graphs_allowed", property(lambda self: True))
    make = StaticDecoder.__init__

    def eager(decoder, *args):  # no CUDA here: the static steps run eagerly
        make(decoder, *args)
        decoder.graphed = False

    monkeypatch.setattr(StaticDecoder, "__init__", eager)
    decoded = []
    for batch in ([images, prompts], [images, prompts], [images[:2], prompts[:2]], [images, prompts]):
        tokens = tokens_of(vlm.generate(*batch, max_new_tokens=3))
        decoded.append(len(vlm.engine.static_decoders.items))
        assert tokens == reference[:len(tokens)]
    assert decoded == [0, 1, 1, 1]  # the second call of a layout gets a static decoder; new layouts do not
    vlm.generate(images, prompts, max_new_tokens=1)  # one new token: no step, no decoder
    assert len(vlm.engine.static_decoders.items) == 1


def test_dropping_a_vlm_frees_its_static_buffers_at_once(tiny, images, prompts):
    """Static decoders and prefill segments do not keep their engine alive: the buffers (a batch of 64 holds GBs)
    go with the last reference to the VLM, without waiting for the cycle collector."""
    vlm = vlmkit.wrap(*tiny("llava"), decode="static", prefill="static")
    vlm.generate(images, prompts, max_new_tokens=3)
    owned = [weakref.ref(vlm.engine), *map(weakref.ref, vlm.engine.static_decoders.items.values()),
             *map(weakref.ref, vlm.engine.static_prefills.items.values())]
    assert len(owned) == 3
    gc.disable()
    try:
        del vlm
        assert all(ref() is None for ref in owned)
    finally:
        gc.enable()


class _InOrder(Intervention):
    """Changes nothing, but as an intervention that may act during decoding it keeps the decode loop in order: the
    host reads each step's tokens before the next step starts."""

    name = "in-order"


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_decoding_a_step_ahead_stops_and_streams_as_the_in_order_loop(tiny, images, prompts, decode):
    """Without interventions in decoding, the next step is queued before the host reads this step's tokens; stop
    strings end the same rows at the same tokens and the same text is streamed."""
    model, processor = tiny("llava")
    reference = vlmkit.wrap(model, processor, decode=decode).generate(images, prompts, max_new_tokens=12)
    longest = max(reference, key=lambda g: len(g.text)).text
    assert len(longest) >= 6
    stop = [longest[3:6]]  # ends that row (at least) early
    runs = []
    for decoders in ([], [_InOrder()]):
        streamed = collections.defaultdict(str)

        def collect(row: int, text: str) -> None:
            streamed[row] += text

        vlm = vlmkit.wrap(model, processor, decode=decode, decoders=decoders)
        generations = vlm.generate(images, prompts, max_new_tokens=12, stop=stop, stream=collect)
        runs.append(([(g.token_ids, g.text) for g in generations], dict(streamed)))
    assert runs[0] == runs[1]
    assert any(len(ids) < len(g.token_ids) for (ids, _), g in zip(runs[0][0], reference))
