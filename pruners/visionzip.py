"""``visionzip``: dominant tokens by [CLS] attention plus contextual tokens merged from the rest (VisionZip).

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025
(dvlab-research/VisionZip). Of the ``keep`` tokens, ``keep - contextual`` are the *dominant* tokens with the most
[CLS] attention (summed over heads) in the encoder layer that feeds the projector. The other tokens are merged into
``contextual`` tokens: evenly spaced anchors among them, every other token joins its most similar anchor (cosine of
the encoder features), and each group's mean feature goes through the projector. ``contextual`` defaults to
``round(keep * 10 / 64)`` (the official 54 + 10 split of 64; 108 + 20 and 162 + 30 for 128 and 192).

Deviations: similarity uses the encoder layer's output features, not its attention keys (the adapter exposes
features, not keys); a contextual token sits at its anchor's position instead of after the dominant tokens, so every
kept token keeps an original position. LLaVA only: Qwen has no [CLS] token and the spec gives no Qwen rule
(VisionZip-Qwen2VL#3).
"""

from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.pruners.fastervlm import cls_attention
from vlmkit.runtime.hooks import GenerationContext, Selection, VisualTokens


@register("visionzip")
class VisionZip(Pruner):
    needs_vision_attention = True

    def __init__(self, keep: int | float = 64, contextual: int | None = None):
        super().__init__(keep)
        if contextual is not None and contextual < 0:
            raise ConfigError(f"visionzip: contextual must be >= 0, got {contextual}")
        self.contextual = contextual

    def split(self, budget: int, available: int) -> int:
        """Number of contextual tokens among ``budget`` (0 when every token is kept)."""
        if budget == available:
            return 0
        contextual = round(budget * 10 / 64) if self.contextual is None else self.contextual
        if contextual >= budget:
            raise ConfigError(f"visionzip: contextual={contextual} leaves no dominant token of the budget {budget}")
        return contextual

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        return [self.select_one(ctx, image) for image in tokens]

    def select_one(self, ctx: GenerationContext, image: VisualTokens) -> Selection:
        scores = cls_attention(self.name, image) * image.attention.shape[0]  # summed over heads
        if image.features is None:
            raise ConfigError("visionzip needs the projector's input features; this adapter does not provide them")
        available = scores.numel()
        budget = self.budget(available)
        contextual = self.split(budget, available)
        dominant = scores.topk(budget - contextual).indices
        if contextual == 0:
            return Selection(keep=dominant.sort().values)
        rest = torch.ones(available, dtype=torch.bool, device=scores.device)
        rest[dominant] = False
        rest = rest.nonzero().squeeze(-1)
        anchors = rest[torch.arange(0, rest.numel(), max(1, rest.numel() // contextual))[:contextual]]
        unit = torch.nn.functional.normalize(image.features[rest].float(), dim=-1)
        group = (unit @ torch.nn.functional.normalize(image.features[anchors].float(), dim=-1).T).argmax(dim=1)
        group[torch.isin(rest, anchors)] = torch.arange(contextual, device=scores.device)  # anchors join themselves
        merged = torch.zeros(contextual, image.features.shape[1], device=scores.device)
        merged.index_add_(0, group, image.features[rest].float())
        sizes = torch.bincount(group, minlength=contextual)
        merged_embeds = ctx.adapter.projector((merged / sizes[:, None]).to(image.features.dtype))
        keep = torch.cat([dominant, anchors]).sort()
        embeds = torch.cat([image.embeds[dominant], merged_embeds.to(image.embeds.dtype)])[keep.indices]
        return Selection(keep=keep.values, embeds=embeds)
