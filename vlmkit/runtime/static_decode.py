"""Decoding with a preallocated KV cache, replayed as a CUDA graph.

After the prefill, the engine copies each layer's keys, values and key validity into buffers sized for the whole
generation, rounded up to :data:`CAPACITY_BUCKET` slots so that prompts of similar length (and pruned layouts) share
one set of buffers. A decode step then has fixed shapes and fixed addresses: it writes the new token's key and value
at slot ``base[l] + step`` of layer ``l`` and attends over the whole buffer, the unwritten slots masked out as
invalid keys. On CUDA the step is captured once as a CUDA graph and replayed for every token: one graph launch
instead of several hundred kernel launches from Python. On the CPU (and for a model spread over several GPUs) the
same step runs eagerly; the tests compare it with the dynamic cache.

The engine uses it when every intervention that acts during decoding does so inside the step
(:attr:`Intervention.acts_in_decode`, :attr:`Intervention.decode_in_graph`): pruners work in the prefill; CCA too;
VISTA's steering and logit edits are tensor work that the graph captures with the step. The other decoders (extra
passes, candidate checks, per-step host logic) keep the dynamic :class:`~vlmkit.runtime.cache.LayeredKVCache`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from vlmkit.kernels.interface import SharedPrefix
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.graphs import capture_graph, round_up
from vlmkit.runtime.hooks import GenerationContext

if TYPE_CHECKING:
    from vlmkit.runtime.engine import Engine

CAPACITY_BUCKET = 256  # cache slots per layer are rounded up to a multiple of this
# "auto" decodes shorter answers dynamically when their layout is new (a graph capture costs more than a few steps
# save) and as a graph when the previous call had the same layout (an evaluation's batches of one-word answers)
MIN_NEW_TOKENS = 8


class StaticKVCache:
    """Per-layer key, value and validity buffers of fixed capacity, written in place (the cache protocol of
    :class:`~vlmkit.runtime.cache.LayeredKVCache`). A cache with shared prefixes gets fixed buffers for them too:
    ``prefix_capacity`` slots per prefix, the prefixes themselves copied once (not once per row)."""

    def __init__(self, like: LayeredKVCache, capacities: list[int], prefix_capacity: int = 0):
        batch = like.batch_size
        self.keys, self.values, self.valid = [], [], []
        for layer, capacity in enumerate(capacities):
            template = like.key_template(layer)
            for buffers in (self.keys, self.values):
                buffers.append(template.new_zeros(batch, template.shape[1], capacity, template.shape[-1]))
            self.valid.append(torch.zeros(batch, capacity, dtype=torch.bool, device=template.device))
        device = self.keys[0].device
        self.base = torch.zeros(len(capacities), dtype=torch.long, device=device)  # each layer's prefill length
        self.step = torch.zeros((), dtype=torch.long, device=device)  # the token being decoded
        self.prefixes: list[SharedPrefix] | None = None
        if like.prefixes is not None:
            first = like.prefixes[0]
            rows = torch.zeros_like(first.rows)
            valid = first.valid.new_zeros(batch, prefix_capacity)
            self.prefixes = [SharedPrefix(p.keys.new_zeros(*p.keys.shape[:-2], prefix_capacity, p.keys.shape[-1]),
                                          p.values.new_zeros(*p.values.shape[:-2], prefix_capacity,
                                                             p.values.shape[-1]), rows, valid)
                             for p in like.prefixes]

    def load(self, source: LayeredKVCache) -> None:
        """Copy the prefill's cache in; slots after it become invalid."""
        for layer, (key, value, valid) in enumerate(zip(source.keys, source.values, source.valid)):
            self.valid[layer].zero_()
            if key is None:
                continue
            length = key.shape[-2]
            self.keys[layer][..., :length, :].copy_(key)
            self.values[layer][..., :length, :].copy_(value)
            self.valid[layer][:, :length].copy_(valid)
        self.base.copy_(torch.tensor(source.lengths()), non_blocking=True)  # no wait for the prefill
        if self.prefixes is not None:
            for mine, theirs in zip(self.prefixes, source.prefixes):
                length = theirs.keys.shape[-2]
                mine.keys[..., :length, :].copy_(theirs.keys)
                mine.values[..., :length, :].copy_(theirs.values)
            first, theirs = self.prefixes[0], source.prefixes[0]
            first.rows.copy_(theirs.rows)
            first.valid.zero_()
            first.valid[:, :theirs.valid.shape[1]].copy_(theirs.valid)

    def shared_prefix(self, layer: int) -> SharedPrefix | None:
        return None if self.prefixes is None else self.prefixes[layer]

    def _slot(self, layer_idx: int) -> torch.Tensor:
        return (self.base[layer_idx] + self.step).view(1)

    @torch.compiler.disable  # a compiled layer (Engine(compile=True)) writes the cache outside its graphs
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        slot = self._slot(layer_idx)
        self.keys[layer_idx].index_copy_(2, slot, key)
        self.values[layer_idx].index_copy_(2, slot, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def extend_valid(self, layer_idx: int, valid: torch.Tensor) -> torch.Tensor:
        self.valid[layer_idx].index_copy_(1, self._slot(layer_idx), valid)
        return self.valid[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows in place (beam search), keeping the buffers' addresses."""
        per_row = [*self.keys, *self.values, *self.valid]
        if self.prefixes is not None:
            per_row += [self.prefixes[0].rows, self.prefixes[0].valid]  # shared by every layer's prefix
        for tensor in per_row:
            tensor.copy_(tensor.index_select(0, index))


class StaticDecoder:
    """One batch size and cache layout: the static cache, the step's input buffers and, on CUDA, the step's graph."""

    def __init__(self, engine: Engine, like: LayeredKVCache, capacities: list[int], prefix_capacity: int,
                 next_position: torch.Tensor):
        self.engine = weakref.proxy(engine)  # the engine owns this object: no reference cycle
        self.graphed = engine.graphs_allowed
        self.cache = StaticKVCache(like, capacities, prefix_capacity)
        self.next_position = torch.zeros_like(next_position)
        self.tokens = torch.zeros(next_position.shape[0], dtype=torch.long, device=next_position.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def start(self, cache: LayeredKVCache, next_position: torch.Tensor) -> None:
        self.cache.load(cache)
        self.next_position.copy_(next_position)

    def _run(self, ctx: GenerationContext) -> torch.Tensor:
        positions = self.engine.adapter.decode_positions(self.next_position, self.cache.step)
        return self.engine.decode_step(ctx, self.cache, self.tokens, positions, compiled=self.engine.compile)

    def step(self, ctx: GenerationContext, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """The next logits ``[B, V]`` after feeding ``tokens`` (``[B]``) as the ``step``-th generated token."""
        self.tokens.copy_(tokens)
        self.cache.step.fill_(step)
        if not self.graphed:
            return self._run(ctx)
        if self.graph is None:
            # A step only writes slot base + step and then reads it, so the warm-up run repeats this very step.
            self.graph, self.logits = capture_graph(lambda: self._run(ctx), pool=self.engine.graph_pool)
        self.graph.replay()
        return self.logits.clone()


def decoder_layout(cache: LayeredKVCache, next_position: torch.Tensor, max_new_tokens: int, num_beams: int) -> tuple:
    """What one static decoder serves: the batch size, the per-layer capacities (rounded up to
    :data:`CAPACITY_BUCKET`), the shared prefixes' count and capacity (0, 0 without), dtype, device and the beams per
    sample (hooks inside the graph may map rows to samples by it)."""
    capacities = tuple(round_up(length + max_new_tokens, CAPACITY_BUCKET) for length in cache.lengths())
    prefixes = (0, 0)
    if cache.prefixes is not None:
        shared = cache.prefixes[0].keys
        prefixes = (shared.shape[0], round_up(shared.shape[-2], CAPACITY_BUCKET))
    template = cache.key_template(0)
    return next_position.shape[0], capacities, prefixes, template.dtype, str(template.device), num_beams


def static_decoder(engine: Engine, cache: LayeredKVCache, next_position: torch.Tensor, layout: tuple) -> StaticDecoder:
    """The engine's static decoder for this ``decoder_layout``, loaded with ``cache``."""
    decoder = engine.static_decoders.get(
        layout, lambda: StaticDecoder(engine, cache, list(layout[1]), layout[2][1], next_position))
    decoder.start(cache, next_position)
    return decoder
