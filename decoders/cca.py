"""``cca``: Concentric Causal Attention (position ids and attention mask of CCA-trained checkpoints).

Paper: Xing et al., "Mitigating Object Hallucination via Concentric Causal Attention" (NeurIPS 2024,
arXiv 2410.15926); code ``xing0047/cca-llava`` (``llava/cca_utils/cca.py``). Spec: decoders.md §3.

For an image whose visual tokens form an ``R × C`` grid (raster order), the ring of token ``(r, c)`` is
``ρ = min(r, c, R-1-r, C-1-c)`` (outer border 0) and the image has ``n = ceil(min(R, C) / 2)`` rings.

* **Positions** (``positions`` hook): with ``p`` the position of the first visual token, visual token ``(r, c)`` gets
  ``p + ρ`` and the text after the image continues at ``p + n`` (the paper's ``i - N + n``). The whole row is then
  shifted by the constant ``N - n`` (per row and M-RoPE component) so that decoding continues at the runtime's
  next position; RoPE depends only on position differences, so attention is the paper's exactly.
* **Mask** (``attention`` hook, prefill): a visual query sees a visual key iff ``ρ(key) <= ρ(query)`` (same ring
  bidirectional, inner rings see outer ones); all other pairs are causal. Decoded tokens see everything.

CCA is a training-time change: use it on CCA-trained checkpoints (their config has
``concentric_causal_attention = true``). On a stock model it is out of distribution and only runs with the explicit
opt-in ``training_free=True``. It has no strength; there is nothing to tune at decode time (no overhead): it acts in
the prefill only, so its decode steps replay as a CUDA graph like plain greedy decoding's.

Beyond the paper (which only defines the 24 × 24 LLaVA grid): general ``R × C`` grids (Qwen's native resolution),
batches with different image offsets (the code keeps only the last sample's positions), visual tokens dropped by a
pruner (each kept token keeps its ring, looked up by its source index), and M-RoPE (each of the three components
gets the 1-D scheme above, so the image's 2-D M-RoPE layout is replaced by rings). The mask is the kernels' per-key
ring table (``ring_table_mask``), which runs in the Triton kernel and on the torch path.
"""

from __future__ import annotations

import math

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder
from vlmkit.errors import ConfigError
from vlmkit.kernels.masks import ring_table_mask
from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState

CONFIG_FLAG = "concentric_causal_attention"


def ring_ids(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Ring index of each cell of a ``rows × cols`` grid in raster order, ``[rows * cols]``."""
    r = torch.arange(rows, device=device).view(-1, 1)
    c = torch.arange(cols, device=device).view(1, -1)
    return torch.minimum(torch.minimum(r, c), torch.minimum(rows - 1 - r, cols - 1 - c)).reshape(-1)


def concentric_positions(positions: torch.Tensor, rings: torch.Tensor) -> torch.Tensor:
    """CCA position ids. ``positions`` ``[B, L]`` or ``[3, B, L]``; ``rings`` ``[B, L]`` (-1 for non-visual tokens,
    one contiguous image per row). Returns the paper's ids shifted per row by ``N - n`` (see the module docstring)."""
    out = positions.clone()
    flat = out if out.dim() == 3 else out.unsqueeze(0)
    for b in range(rings.shape[0]):
        visual = (rings[b] >= 0).nonzero().squeeze(-1)
        if visual.numel() == 0:
            continue
        first, last = int(visual[0]), int(visual[-1])
        if last + 1 >= rings.shape[1]:
            raise ConfigError("cca: the prompt ends with the image; CCA needs text after the visual tokens")
        start = flat[:, b, first]  # [C] position of the first visual token
        after = flat[:, b, last + 1]  # [C] position of the first text token after the image
        count = int(rings[b, visual].max()) + 1
        shift = (after - (start + count)).unsqueeze(-1)  # == N - n for 1-D positions
        flat[:, b, : first] += shift
        flat[:, b, visual] = start.unsqueeze(-1) + rings[b, visual] + shift
    return out


@register("cca")
class ConcentricCausalAttention(Decoder):
    acts_in_decode = False  # decoded tokens see every key: the mask and the positions are the prefill's business

    def __init__(self, training_free: bool = False):
        self.training_free = training_free

    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        config = ctx.adapter.config
        trained = getattr(config, CONFIG_FLAG, False) or getattr(ctx.adapter.text_config, CONFIG_FLAG, False)
        if not (trained or self.training_free):
            raise ConfigError(
                "cca: this checkpoint was not trained with concentric causal attention (its config has no "
                f"{CONFIG_FLAG}=true); applying CCA to a stock model is out of distribution. "
                "Pass training_free=True to do it anyway."
            )
        ctx.scratch[self.name] = {"grids": self.grids(ctx, inputs)}

    @staticmethod
    def grids(ctx: GenerationContext, inputs: PreparedBatch) -> list[tuple[int, int]]:
        """The visual token grid ``(rows, cols)`` of each sample."""
        if "image_grid_thw" in inputs.vision_inputs:  # Qwen: patches merged merge × merge
            merge = ctx.adapter.config.vision_config.spatial_merge_size
            return [(h // merge, w // merge) for _, h, w in inputs.vision_inputs["image_grid_thw"].tolist()]
        grids = []
        for count in inputs.is_visual.sum(dim=1).tolist():
            side = math.isqrt(count)
            if side * side != count:
                raise ConfigError(f"cca: {count} visual tokens do not form a square grid")
            grids.append((side, side))
        return grids

    def positions(self, ctx: GenerationContext, positions: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
        scratch = ctx.scratch[self.name]
        rings = torch.full(is_visual.shape, -1, dtype=torch.long, device=is_visual.device)
        for b, (rows, cols) in enumerate(scratch["grids"]):
            slots = is_visual[b].nonzero().squeeze(-1)
            if slots.numel() != rows * cols or (slots.numel() and int(slots[-1] - slots[0]) + 1 != slots.numel()):
                raise ConfigError(f"cca: sample {b} needs one contiguous {rows}x{cols} block of visual tokens")
            rings[b, slots] = ring_ids(rows, cols, device=is_visual.device)
        scratch["rings"] = rings  # indexed by position in the unpruned prompt
        return concentric_positions(positions, rings)

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        if ctx.step >= 0:
            return None
        table = ctx.scratch[self.name]["rings"]
        source = state.source_index
        rings = table.gather(1, source.clamp(min=0)).masked_fill(source < 0, -1)
        return AttentionRequest(mask_mod=ring_table_mask(rings))
