"""The language-model prefill in fixed-shape buffers, replayed as CUDA graphs, segment by segment.

The eager prefill walk is launch-bound: the issue's anchor is that HF prefills 140 and 652 tokens in about the same
time. A run of layers at which no intervention acts is the same fixed sequence of kernels for every sequence of the
same packed shape, so the engine copies the packed sequence into buffers of ``LENGTH_BUCKET``-rounded length,
right-padded with invalid tokens, and on CUDA replays one captured graph per (layers, batch, bucket): a *segment*.

Which layers are free of hooks: an intervention that overrides a layer hook (:data:`LAYER_HOOKS`) says at which
layers it may act with :meth:`~vlmkit.runtime.hooks.Intervention.prefill_layers` (FastV: layer K-1, PDrop: its stage
boundaries, ...). The engine calls their hooks eagerly and replays the layers between them as segments; with no
such intervention the whole prefill is one segment. An acting layer itself runs in the same padded buffers, as a
one-layer :class:`ActingLayer` that also hands out its attention statistics (the LSE and, when a hook asks for them,
the key mass of the query rows it names, padding rows weighted 0), when its attention request asks for nothing else;
a request that biases, masks or edits the attention runs that layer eagerly. An intervention that cannot say (None),
or any ``edit_logits`` hook, keeps the whole prefill on the dynamic walk.

Right padding leaves every real token's computation as it was: causal attention never lets a real query see the
padded keys after it, and the real keys keep their offsets (the Triton kernel's key blocks are the same). A segment
hands on the hidden states of the real tokens and writes its layers' cache cut back to the real length, so the
following layers and decoding see the dynamic walk's layout. The matrix products see a longer sequence, so cuBLAS
could round a row differently; ``benchmarks/e2e.py`` checks the greedy tokens against the eager walk
(``tokens_match_dynamic``; docs/performance.md).

A shared-prefix prefill (several prompts about one image packed as ``[prefix, rest 1, rest 2, ...]``, engine.py)
runs as one segment over all layers with a static table of each token's segment, from which the captured run builds
its :func:`~vlmkit.kernels.masks.segment_mask`; the padded tail's entries do not matter (causality hides it).

On the CPU (``prefill="static"``), and for a model spread over several GPUs, the same padded segments run eagerly;
the tests compare them with the dynamic walk.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING

import torch

from vlmkit.kernels.masks import segment_mask
from vlmkit.kernels.reference import AttentionStats
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.graphs import capture_graph, round_up
from vlmkit.runtime.hooks import GenerationContext, LayerState

if TYPE_CHECKING:
    from vlmkit.runtime.engine import Engine

#: hooks that act at a layer of the language model; ``Intervention.prefill_layers`` says at which ones
LAYER_HOOKS = ("attention", "after_layer", "edit_residual")
LENGTH_BUCKET = 64  # the packed length is rounded up to a multiple of this (the Triton kernel's key block divides it)
MAX_GRAPH_TOKENS = 4096  # "auto": batch x bucketed length up to this (a 7B segment's cache: 2 GiB); longer
# prefills are compute-bound
MAX_GRAPH_IMAGES = 16  # the vision forward replays as a graph (adapters that allow it) for up to this many images
SEGMENT_POOL_SIZE = 8  # segments (each with its graph's own memory pool) kept per engine, least recently used dropped


def bucketed(length: int) -> int:
    return round_up(length, LENGTH_BUCKET)


def bucketed_tokens(state: LayerState) -> int:
    """Batch x bucketed length: the size of a prefill's static segment (``MAX_GRAPH_TOKENS`` bounds it)."""
    batch, length = state.valid.shape
    return batch * bucketed(length)


class StaticSegment:
    """Layers ``start`` to ``stop`` for one (batch, bucketed length): input buffers and, on CUDA, the graph and the
    outputs it writes."""

    def __init__(self, engine: Engine, like: LayerState, length: int, start: int, stop: int, segmented: bool):
        batch, _, width = like.hidden.shape
        self.engine = weakref.proxy(engine)  # the engine owns this object: no reference cycle
        self.start, self.stop = start, stop
        self.graphed = engine.graphs_allowed
        self.hidden = like.hidden.new_zeros(batch, length, width)
        self.valid = like.valid.new_zeros(batch, length)
        self.positions = like.positions.new_zeros(*like.positions.shape[:-1], length)
        self.segments = like.valid.new_zeros(batch, length, dtype=torch.long) if segmented else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[LayeredKVCache, torch.Tensor, AttentionStats | None] | None = None

    def _buffered_state(self) -> LayerState:
        return LayerState(hidden=self.hidden, valid=self.valid, is_visual=torch.zeros_like(self.valid),
                          positions=self.positions, source_index=torch.zeros_like(self.valid, dtype=torch.long))

    def _run(self, ctx: GenerationContext) -> tuple[LayeredKVCache, torch.Tensor, AttentionStats | None]:
        engine = self.engine
        cache = LayeredKVCache(len(engine.adapter.layers))
        mask_mod = None if self.segments is None else segment_mask(self.segments)  # read from the buffer per replay
        state, _, _ = engine.run_layers(ctx, self._buffered_state(), cache, set(), start=self.start, stop=self.stop,
                                        hooks=False, mask_mod=mask_mod, compiled=engine.compile)
        return cache, state.hidden, None

    def run(self, ctx: GenerationContext, state: LayerState, cache: LayeredKVCache,
            segments: torch.Tensor | None = None) -> LayerState:
        """Run the segment's layers on the packed ``state`` (with ``segments``, each token's segment of a shared
        prefix, for a segment built ``segmented``): write their keys, values and validity (cut to the real length)
        into ``cache`` and return the state after them."""
        return self._replay(ctx, state, cache, segments)[0]

    def _replay(self, ctx: GenerationContext, state: LayerState, cache: LayeredKVCache,
                segments: torch.Tensor | None) -> tuple[LayerState, AttentionStats | None]:
        length = state.valid.shape[1]
        if segments is not None:
            self.segments[:, :length].copy_(segments)
        self.hidden[:, :length].copy_(state.hidden)
        self.hidden[:, length:].zero_()
        self.valid[:, :length].copy_(state.valid)
        self.valid[:, length:] = False
        self.positions[..., :length].copy_(state.positions)
        self.positions[..., length:] = 0
        if not self.graphed:
            written, hidden, stats = self._run(ctx)
        else:
            if self.graph is None:
                self.graph, self.outputs = capture_graph(lambda: self._run(ctx))
            self.graph.replay()
            written, hidden, stats = self.outputs
        for layer in range(self.start, self.stop):
            cache.keys[layer] = written.keys[layer][..., :length, :]
            cache.values[layer] = written.values[layer][..., :length, :]
            cache.valid[layer] = written.valid[layer][:, :length]
        if stats is not None:  # the real rows and keys
            stats = AttentionStats(lse=stats.lse[..., :length].clone(),
                                   key_mass=None if stats.key_mass is None else stats.key_mass[..., :length].clone())
        return dataclasses.replace(state, hidden=hidden[:, :length].clone(), key_valid=None), stats


class ActingLayer(StaticSegment):
    """One layer at which interventions act (their hooks run eagerly around it), with its attention statistics:
    ``lse`` and, for a layer built with ``statistics``, the key mass of the query rows it is given."""

    def __init__(self, engine: Engine, like: LayerState, length: int, layer: int, statistics: bool):
        super().__init__(engine, like, length, layer, layer + 1, segmented=False)
        self.mass_queries = like.valid.new_zeros(like.valid.shape[0], length, dtype=torch.float32) \
            if statistics else None

    def _run(self, ctx: GenerationContext) -> tuple[LayeredKVCache, torch.Tensor, AttentionStats | None]:
        engine = self.engine
        cache = LayeredKVCache(len(engine.adapter.layers))
        state = self._buffered_state()
        state.key_valid = cache.extend_valid(self.start, state.valid)
        call = engine.attention_call(ctx, self.start, state, cache)
        call.mass_queries = self.mass_queries
        rotary = engine.adapter.rotary(state.hidden, state.positions)
        hidden = engine.forward_layer(self.start, state, cache, call, rotary, compiled=engine.compile)
        return cache, hidden, call.stats

    def run_with_statistics(self, ctx: GenerationContext, state: LayerState, cache: LayeredKVCache,
                            mass_queries: torch.Tensor | None) -> tuple[LayerState, AttentionStats | None]:
        """The layer on the packed ``state``, as :meth:`StaticSegment.run`, and its attention statistics (None where
        the attention path gives none); ``mass_queries [B, L]``: the query rows' weights, for a layer built with
        ``statistics``."""
        if self.mass_queries is not None:
            length = state.valid.shape[1]
            self.mass_queries[:, :length].copy_(mass_queries)
            self.mass_queries[:, length:] = 0  # the padding rows add nothing to any key's mass
        return self._replay(ctx, state, cache, None)


def static_segment(engine: Engine, state: LayerState, start: int, stop: int, segmented: bool = False) -> StaticSegment:
    """The engine's static segment for these layers, batch size and bucketed length; ``segmented``: with a
    segment table (a shared-prefix prefill)."""
    layout = _layout(state)
    key = (start, stop, *layout, segmented)
    return engine.static_prefills.get(key, lambda: StaticSegment(engine, state, layout[1], start, stop, segmented))


def acting_layer(engine: Engine, state: LayerState, layer: int, statistics: bool) -> ActingLayer:
    """The engine's :class:`ActingLayer` for this layer, batch size and bucketed length; ``statistics``: with the
    key mass of query rows."""
    layout = _layout(state)
    key = (layer, layer + 1, *layout, "acting", statistics)
    return engine.static_prefills.get(key, lambda: ActingLayer(engine, state, layout[1], layer, statistics))


def _layout(state: LayerState) -> tuple:
    """What a static segment is specialised to: batch size, bucketed length, position layout, dtype and device."""
    return (state.valid.shape[0], bucketed(state.valid.shape[1]), state.positions.dim(), state.hidden.dtype,
            str(state.hidden.device))
