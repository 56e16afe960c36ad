"""``fastv``: drop the least-attended visual tokens after LLM layer ``K - 1`` (FastV).

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024 (pkunlp-icler/FastV). The attention of layer
``K - 1`` (the runtime's attention statistics, head-averaged) ranks the visual tokens; the top ``keep`` stay for
layers ``K..L-1`` with their original positions (the code's "inplace" mode, which really shortens the sequence).

``query`` picks the attention rows that score a token:

* ``"all"`` (default, the paper): attention received from every token of the prompt;
* ``"last"``: from the last prompt token only (the official code, FastV issue #44);
* ``"text"``: from the question tokens after the image.

``debias`` (``"exp"``, ``"cubic"`` or a weight file) removes the positional trend first, see ``pruners/debias.py``;
the attention-bias FastV host uses ``query="last"``. Deviations: the budget is met exactly even when padding tokens
would have to fill it (attention-bias' FastV patch shrinks the budget instead); ``keep`` defaults to this toolkit's
64 tokens rather than the paper's 50%.
"""

from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.pruners.debias import Debias
from vlmkit.pruners.select import top_visual, visual_counts
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState

QUERIES = ("all", "last", "text")


def query_rows(state: LayerState, query: str) -> torch.Tensor:
    """``[B, L]`` bool query rows for ``query`` in ("all", "last", "text")."""
    return {"all": state.valid, "last": state.last_token, "text": state.text_after_visual}[query]


@register("fastv")
class FastV(Pruner):
    def __init__(self, keep: int | float = 64, layer: int = 2, query: str = "all", debias: str | None = None,
                 pad_threshold: float = 0.5, sink_ratio: float = 10.0):
        super().__init__(keep)
        if layer < 1:
            raise ConfigError(f"fastv: layer must be >= 1 (the attention of layer K-1 ranks the tokens), got {layer}")
        if query not in QUERIES:
            raise ConfigError(f"fastv: query must be one of {QUERIES}, got {query!r}")
        self.layer, self.query = layer, query
        self.debias = Debias.parse(debias, pad_threshold, sink_ratio)

    def prepare(self, ctx: GenerationContext, inputs) -> None:
        if self.layer >= len(ctx.adapter.layers):
            raise ConfigError(f"fastv: layer={self.layer} but the model has only {len(ctx.adapter.layers)} layers")
        if self.debias is not None:
            ctx.scratch[self.name] = self.debias.for_prompt(ctx, inputs.is_visual)

    def prefill_layers(self, num_layers: int) -> set[int]:
        return {self.layer - 1}

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        if ctx.step < 0 and layer == self.layer - 1:
            return AttentionRequest(mass_queries=query_rows(state, self.query))
        return None

    def after_layer(self, ctx: GenerationContext, layer: int, state: LayerState, attention) -> torch.Tensor | None:
        if layer != self.layer - 1:
            return None
        scores = attention.key_mass.mean(dim=1)
        if self.debias is not None:
            scores = self.debias.apply(scores, state, ctx.scratch[self.name])
        return top_visual(scores, state.is_visual, [self.budget(n) for n in visual_counts(state)])
