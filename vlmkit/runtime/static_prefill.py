"""The language-model prefill in fixed-shape buffers, replayed as a CUDA graph.

When no intervention acts inside the language model during the prefill (none overrides :data:`LLM_PREFILL_HOOKS`:
vision-side pruners, position edits and decode-time checks are fine), the prefill is the same fixed sequence of
kernels for every prompt of the same packed shape. Its eager walk is launch-bound: the issue's anchor is that HF
prefills 140 and 652 tokens in about the same time. So the engine copies the packed sequence into buffers of
``LENGTH_BUCKET``-rounded length, right-padded with invalid tokens, and on CUDA replays one captured graph per
(batch, bucket).

Right padding leaves every real token's computation as it was: causal attention never lets a real query see the
padded keys after it, and the real keys keep their offsets (the Triton kernel's key blocks are the same). The logits
are read at the last real position, and the cache handed to decoding is cut back to the real length, so decoding
sees the dynamic prefill's layout. The matrix products see a longer sequence, so cuBLAS could round a row
differently; ``benchmarks/e2e.py`` checks the greedy tokens against the eager walk (``tokens_match_dynamic``), and
they matched for every graph configuration on both 7B shapes (docs/performance.md).

On the CPU (``prefill="static"``), and for a model spread over several GPUs, the same padded prefill runs eagerly;
the tests compare it with the dynamic one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.graphs import capture_graph
from vlmkit.runtime.hooks import GenerationContext, LayerState

if TYPE_CHECKING:
    from vlmkit.runtime.engine import Engine

#: hooks that act inside the language model's prefill; an intervention overriding any of them keeps it eager
LLM_PREFILL_HOOKS = ("attention", "after_layer", "edit_residual", "edit_logits")
LENGTH_BUCKET = 64  # the packed length is rounded up to a multiple of this (the Triton kernel's key block divides it)
MAX_GRAPH_TOKENS = 2048  # "auto": batch x bucketed length up to this; longer prefills are compute-bound
MAX_GRAPH_IMAGES = 4  # the vision forward replays as a graph (adapters that allow it) for batches up to this


def bucketed(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class StaticPrefill:
    """One (batch, bucketed length) prefill: input buffers and, on CUDA, the graph and the outputs it writes."""

    def __init__(self, engine: Engine, like: LayerState, length: int):
        batch, _, width = like.hidden.shape
        self.engine = engine
        self.hidden = like.hidden.new_zeros(batch, length, width)
        self.valid = like.valid.new_zeros(batch, length)
        self.positions = like.positions.new_zeros(*like.positions.shape[:-1], length)
        self.last = torch.zeros(1, dtype=torch.long, device=like.hidden.device)  # the last real position
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[LayeredKVCache, torch.Tensor] | None = None

    def _run(self, ctx: GenerationContext) -> tuple[LayeredKVCache, torch.Tensor]:
        engine = self.engine
        state = LayerState(hidden=self.hidden, valid=self.valid, is_visual=torch.zeros_like(self.valid),
                           positions=self.positions, source_index=torch.zeros_like(self.valid, dtype=torch.long))
        cache = LayeredKVCache(len(engine.adapter.layers))
        state, _, _ = engine.run_layers(ctx, state, cache, set())
        last = engine.adapter.final_norm(state.hidden.index_select(1, self.last))
        return cache, engine.adapter.lm_head(last)[:, -1].float()

    def run(self, ctx: GenerationContext, state: LayerState) -> tuple[LayeredKVCache, torch.Tensor]:
        """Prefill the packed ``state``: its cache (cut to the real length) and the next logits ``[B, V]``."""
        length = state.valid.shape[1]
        self.hidden[:, :length].copy_(state.hidden)
        self.hidden[:, length:].zero_()
        self.valid[:, :length].copy_(state.valid)
        self.valid[:, length:] = False
        self.positions[..., :length].copy_(state.positions)
        self.positions[..., length:] = 0
        self.last.fill_(length - 1)
        if not self.engine.graphs_allowed:
            cache, logits = self._run(ctx)
        else:
            if self.graph is None:
                self.graph, self.outputs = capture_graph(lambda: self._run(ctx))
            self.graph.replay()
            cache, logits = self.outputs
        real = LayeredKVCache(len(cache.keys))
        real.keys = [key[..., :length, :] for key in cache.keys]
        real.values = [value[..., :length, :] for value in cache.values]
        real.valid = [valid[:, :length] for valid in cache.valid]
        return real, logits.clone()


def static_prefill(engine: Engine, state: LayerState) -> StaticPrefill:
    """The engine's static prefill for this batch size and bucketed length."""
    length = bucketed(state.valid.shape[1])
    key = (state.valid.shape[0], length, state.positions.dim(), state.hidden.dtype, str(state.hidden.device))
    return engine.static_prefills.get(key, lambda: StaticPrefill(engine, state, length))
