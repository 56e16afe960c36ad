"""``uniform``: keep visual tokens on an evenly spaced lattice over the token grid (a content-blind baseline).

No paper; the standard spatial-sampling baseline of pruning studies (e.g. the "spatially uniform samples" of
PruMerge+). Tokens are chosen at evenly spaced flat indices of the row-major grid, which covers the image uniformly.
"""

from __future__ import annotations

import torch

from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.runtime.hooks import GenerationContext, Selection, VisualTokens


@register("uniform")
class UniformPruner(Pruner):
    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        selections = []
        for image in tokens:
            available = image.embeds.shape[0]
            count = self.budget(available)
            keep = torch.linspace(0, available - 1, count, device=image.embeds.device).round().long().unique()
            selections.append(Selection(keep=keep))
        return selections
