"""``dart``: keep the visual tokens least duplicated by a few pivot tokens (DART).

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494 (ZichenWen1/DART; reference ModelTC/llmc:llmc/compression/token_reduction/dart.py). After LLM layer
``K - 1`` (default ``K = 2``): the pivots are the ``pivot_image`` visual tokens and the ``pivot_text`` question tokens
with the largest L1 norm of their layer-``K - 1`` keys; for each pivot in turn, the visual tokens with the lowest
cosine similarity of their hidden states (layer ``K - 1`` output) to it are kept and leave the candidate pool. The
image pivots are kept too; the text pivots are text and stay anyway. No attention maps are needed.

Deviations: llmc keeps ``floor(max_num / pivots)`` tokens per pivot, so the count misses the budget; here the
``keep - pivot_image`` slots are split over the pivots as evenly as possible (earlier pivots take the remainder), so
the budget is met exactly. Pivots are visited in sequence order (llmc iterates a Python set). Keys are taken before
RoPE (``k_proj`` of the normed layer input), concatenated over heads.
"""

from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.runtime.hooks import GenerationContext, LayerState


@register("dart")
class DART(Pruner):
    def __init__(self, keep: int | float = 64, layer: int = 2, pivot_image: int = 4, pivot_text: int = 4):
        super().__init__(keep)
        if layer < 1:
            raise ConfigError(f"dart: layer must be >= 1 (tokens leave after layer K-1), got {layer}")
        if pivot_image < 0 or pivot_text < 0 or pivot_image + pivot_text == 0:
            raise ConfigError(f"dart: needs at least one pivot, got pivot_image={pivot_image}, pivot_text={pivot_text}")
        self.layer, self.pivot_image, self.pivot_text = layer, pivot_image, pivot_text

    def prepare(self, ctx: GenerationContext, inputs) -> None:
        if self.layer >= len(ctx.adapter.layers):
            raise ConfigError(f"dart: layer={self.layer} but the model has only {len(ctx.adapter.layers)} layers")

    def prefill_layers(self, num_layers: int) -> set[int]:
        return {self.layer - 1}

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> None:
        if ctx.step < 0 and layer == self.layer - 1:
            ctx.scratch[self.name] = state.hidden  # the layer's input, for its keys

    def after_layer(self, ctx: GenerationContext, layer: int, state: LayerState, attention) -> torch.Tensor | None:
        if layer != self.layer - 1:
            return None
        block = ctx.adapter.layers[layer]
        keys = block.self_attn.k_proj(block.input_layernorm(ctx.scratch.pop(self.name)))
        key_norm = keys.float().abs().sum(dim=-1)
        keep = torch.zeros_like(state.is_visual)
        for row in range(state.hidden.shape[0]):
            keep[row, self.select_row(key_norm[row], state.hidden[row].float(), state.is_visual[row],
                                      state.text_after_visual[row])] = True
        return keep

    def select_row(self, key_norm: torch.Tensor, hidden: torch.Tensor, is_visual: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
        """Sequence indices of the visual tokens one row keeps."""
        visual, text = is_visual.nonzero().squeeze(-1), text.nonzero().squeeze(-1)
        budget = self.budget(visual.numel())
        image_pivots = visual[key_norm[visual].topk(min(self.pivot_image, budget)).indices]
        text_pivots = text[key_norm[text].topk(min(self.pivot_text, text.numel())).indices]
        pivots = torch.cat([image_pivots, text_pivots]).sort().values
        candidates = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        candidates[~is_visual] = False
        candidates[image_pivots] = False
        slots = budget - image_pivots.numel()
        unit = torch.nn.functional.normalize(hidden, dim=-1)
        kept = [image_pivots]
        for order, pivot in enumerate(pivots.tolist()):
            quota = slots // pivots.numel() + (1 if order < slots % pivots.numel() else 0)
            if quota == 0:
                continue
            similarity = (unit @ unit[pivot]).masked_fill(~candidates, float("inf"))
            chosen = similarity.topk(quota, largest=False).indices
            candidates[chosen] = False
            kept.append(chosen)
        return torch.cat(kept)
