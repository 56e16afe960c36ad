"""``divprune``: keep a max-min diverse subset of the projected visual tokens (DivPrune).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(reference: ModelTC/llmc:llmc/compression/token_reduction/divprune.py). Greedy solution of the Max-Min Diversity
Problem on the cosine distance of the projector's output embeddings: the first pick has the largest distance to its
nearest neighbour, each next pick the largest minimum distance to the picked set. Runs before the LLM, per image
(Qwen's merged tokens included); kept tokens keep their original positions. No deviations.
"""

from __future__ import annotations

from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.pruners.select import greedy_max_min
from vlmkit.runtime.hooks import GenerationContext, Selection, VisualTokens


@register("divprune")
class DivPrune(Pruner):
    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        return [
            Selection(keep=greedy_max_min(image.embeds, self.budget(image.embeds.shape[0])).sort().values)
            for image in tokens
        ]
