"""``pdrop``: PyramidDrop, stage-wise visual-token dropping inside the LLM.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction", CVPR 2025 (Cooperx521/PyramidDrop). At each stage boundary ``b`` (default ``[L/4, L/2, 3L/4]``, the
paper's [8, 16, 24] of 32 layers) the visual tokens still in the sequence are ranked by the head-averaged attention
of the last instruction token at layer ``b - 1`` and the top ones stay. Stage ``s`` (0-based) keeps
``floor(budget(N) * lam**s)`` tokens of the image's ``N``: ``keep`` is the first stage's budget and ``lam`` the
ratio between stages (the paper's lambda = 0.5; ``keep=0.5`` gives the paper's 50/25/12.5%).

``query="text"`` scores with all question tokens instead. ``debias`` (see ``pruners/debias.py``) applies at the first
stage only, as in attention-bias' PDrop patch; its padding threshold defaults to that patch's 0.01.
Deviation: ``keep`` defaults to 0.5 (the paper's first stage) rather than the toolkit's usual 64.
"""

from __future__ import annotations

import math

import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.pruners.debias import Debias
from vlmkit.pruners.select import top_visual
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState


@register("pdrop")
class PyramidDrop(Pruner):
    def __init__(self, keep: int | float = 0.5, layers: list[int] | int | None = None, lam: float = 0.5,
                 query: str = "last", debias: str | None = None, pad_threshold: float = 0.01,
                 sink_ratio: float = 10.0):
        super().__init__(keep)
        if not 0 < lam <= 1:
            raise ConfigError(f"pdrop: lam must be in (0, 1], got {lam}")
        if query not in ("last", "text"):
            raise ConfigError(f"pdrop: query must be 'last' or 'text', got {query!r}")
        self.layers = [layers] if isinstance(layers, int) else layers
        if self.layers is not None and (sorted(set(self.layers)) != self.layers or self.layers[0] < 1):
            raise ConfigError(f"pdrop: layers must be increasing stage boundaries >= 1, got {layers}")
        self.lam, self.query = lam, query
        self.debias = Debias.parse(debias, pad_threshold, sink_ratio)

    def boundaries(self, num_layers: int) -> list[int]:
        layers = self.layers or sorted({max(1, num_layers * s // 4) for s in (1, 2, 3)})
        if layers[-1] >= num_layers:
            raise ConfigError(f"pdrop: stage boundary {layers[-1]} is not inside the model's {num_layers} layers")
        return layers

    def prepare(self, ctx: GenerationContext, inputs) -> None:
        scratch = {"stages": self.boundaries(len(ctx.adapter.layers)), "count": inputs.is_visual.sum(dim=1).tolist()}
        if self.debias is not None:
            scratch["debias"] = self.debias.for_prompt(ctx, inputs.is_visual)
        ctx.scratch[self.name] = scratch

    def prefill_layers(self, num_layers: int) -> set[int]:
        return {boundary - 1 for boundary in self.boundaries(num_layers)}

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        if ctx.step < 0 and layer + 1 in ctx.scratch[self.name]["stages"]:
            rows = state.last_token if self.query == "last" else state.text_after_visual
            return AttentionRequest(mass_queries=rows)
        return None

    def after_layer(self, ctx: GenerationContext, layer: int, state: LayerState, attention) -> torch.Tensor | None:
        scratch = ctx.scratch[self.name]
        if layer + 1 not in scratch["stages"]:
            return None
        stage = scratch["stages"].index(layer + 1)
        scores = attention.key_mass.mean(dim=1)
        if stage == 0 and self.debias is not None:
            scores = self.debias.apply(scores, state, scratch["debias"])
        budgets = [max(1, math.floor(self.budget(n) * self.lam**stage)) for n in scratch["count"]]
        return top_visual(scores, state.is_visual, budgets)
