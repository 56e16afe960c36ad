"""``random``: keep a seeded uniformly random subset of each image's visual tokens (a content-blind baseline).

The seed makes runs repeatable; each image of a batch gets its own draw (seed + image index).
"""

from __future__ import annotations

import torch

from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.runtime.hooks import GenerationContext, Selection, VisualTokens


@register("random")
class RandomPruner(Pruner):
    def __init__(self, keep: int | float = 64, seed: int = 0):
        super().__init__(keep)
        self.seed = seed

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        selections = []
        for image in tokens:
            available = image.embeds.shape[0]
            generator = torch.Generator().manual_seed(self.seed + image.image_index)
            keep = torch.randperm(available, generator=generator)[: self.budget(available)].sort().values
            selections.append(Selection(keep=keep.to(image.embeds.device)))
        return selections
