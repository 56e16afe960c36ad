"""``fastervlm``: keep the visual tokens with the most [CLS] attention in the vision encoder (FasterVLM).

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster",
arXiv 2412.01818 (Theia-4869/FasterVLM). Score: the [CLS] -> patch attention of the encoder layer that feeds the
projector (LLaVA's penultimate layer), averaged over heads; the top ``keep`` tokens enter the LLM with their original
positions. LLaVA only: Qwen's ViT has no [CLS] token. No deviations.
"""

from __future__ import annotations

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.runtime.hooks import GenerationContext, Selection, VisualTokens


def cls_attention(name: str, image: VisualTokens):
    """Head-averaged [CLS] attention ``[N]`` of one image, or a ConfigError for encoders without [CLS]."""
    if image.attention is None:
        raise ConfigError(f"{name} needs the vision encoder's [CLS] attention; this model's encoder has no [CLS] "
                          "token (supported: LLaVA)")
    return image.attention.float().mean(dim=0)


@register("fastervlm")
class FasterVLM(Pruner):
    needs_vision_attention = True

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        selections = []
        for image in tokens:
            scores = cls_attention(self.name, image)
            keep = scores.topk(self.budget(scores.numel())).indices.sort().values
            selections.append(Selection(keep=keep))
        return selections
