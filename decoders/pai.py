"""``pai``: Pay Attention to Image.

Paper: Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in LVLMs"
(ECCV 2024, arXiv 2407.21771); code ``LALBJ/PAI`` (``attention.py``, ``CFG.py``, ``README.md``). Spec:
decoders.md §6.

1. **Attention intervention.** In the LLM layers ``layers`` (default 2 .. L-1, the README's ``--start-layer 2
   --end-layer 32`` on 32 layers), the scaled, pre-softmax attention logit ``a`` of the predicting query row on every
   image key becomes ``a + alpha * |a|``. It is the kernels' per-key gain ``key_abs_gain`` (exact in the Triton
   kernel and the torch reference: the map is 1-homogeneous, so it commutes with the logit scale). Rows edited, as
   in the code (which edits the last query row of every forward): each decode step's single row uses the gain
   directly; in the prefill the gain would move every prompt row, so the prefill runs unedited and, after each
   intervened layer, its last row (the one that predicts the first token) is recomputed with the gain over the
   layer's cached keys and replaces the unedited row. The recomputed row then feeds the next layer, and its keys
   and values there, exactly as in the code. Cost: one one-row layer pass per intervened layer, once per batch.
2. **Logit refinement.** A branch decodes the same answer from the prompt without the image (``decoders/branch.py``;
   the image placeholder tokens removed, as in ``vista``) on the unmodified model. The code's no-image forward also
   runs without the attention intervention (``use_cfg``). Each step's logits become

       gamma * (log p_img - log p_noimg) + log p_noimg   where log p_img >= log(beta) + max log p_img,   -inf elsewhere

   ``p_img`` is the softmax of the logits as they reach this decoder (after any decoder listed before it).

Options: ``alpha`` (0.2, the README's value), ``gamma`` (1.1), ``beta`` (the plausibility cutoff, 0.1), ``layers``.
``alpha=0`` switches (1) off and ``gamma=1`` switches (2) off (no branch runs); both is greedy decoding exactly.
Works with greedy, sampling (the README recommends nucleus sampling) and beam search, and batch > 1.

Paper vs code, and deviations:

* The paper writes the refinement as ``gamma p(y|X_V, X_I, X_H) - (gamma - 1) p(y|X_I, X_H)``. Read literally on
  probabilities it can go negative; it is applied to log-probabilities, as in classifier-free guidance and in the
  code (``CFG.py``, on ``log_softmax`` scores). The 0.1 cutoff is the code's. Beyond the spec's summary the paper's
  text was not checked here; the defaults are the code's and the README's.
* The code hard-codes the image token span of one sample (``img_start_idx:img_end_idx``); here every row's visual
  tokens are the keys that get the gain, per layer after any pruning.
* The prefill's last-row recompute replays only this gain: other interventions' biases and masks in that layer, and
  the attention statistics a pruner reads there (FastV-style), see the unedited row. List ``pai`` before decoders
  that edit the residual stream (``vista``): its recomputed row replaces the last row of the layer's output.
* The no-image branch sees no pruner (it has no visual tokens) and no other decoder.
"""

from __future__ import annotations

import math

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder, over_current_keys
from vlmkit.decoders.branch import Branch
from vlmkit.errors import ConfigError
from vlmkit.kernels.interface import LayerAttention
from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState

CODE_START_LAYER = 2


def guidance(logits: torch.Tensor, negative: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """``gamma (log p - log q) + log q`` on the plausible set ``log p >= log(beta) + max log p`` (-inf elsewhere)."""
    conditional, unconditional = logits.float().log_softmax(dim=-1), negative.float().log_softmax(dim=-1)
    cutoff = math.log(beta) + conditional.max(dim=-1, keepdim=True).values
    mixed = gamma * (conditional - unconditional) + unconditional
    return mixed.masked_fill(conditional < cutoff, float("-inf"))


@register("pai")
class PayAttentionToImage(Decoder):
    def __init__(self, alpha: float = 0.2, gamma: float = 1.1, beta: float = 0.1,
                 layers: list[int] | int | None = None):
        if alpha < 0:
            raise ConfigError(f"pai: alpha must be >= 0, got {alpha}")
        if gamma < 0:
            raise ConfigError(f"pai: gamma must be >= 0, got {gamma}")
        if not 0 < beta <= 1:
            raise ConfigError(f"pai: beta must be in (0, 1], got {beta}")
        self.alpha, self.gamma, self.beta = float(alpha), float(gamma), float(beta)
        self.layers = None if layers is None else [layers] if isinstance(layers, int) else list(layers)

    def intervened_layers(self, count: int) -> set[int]:
        layers = self.layers if self.layers is not None else range(CODE_START_LAYER, count)
        if any(not -count <= l < count for l in layers):
            raise ConfigError(f"pai: layers {list(layers)} out of range for a model with {count} layers")
        return {l % count for l in layers}

    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        ctx.scratch.pop(self.name, None)
        layers = self.intervened_layers(len(ctx.adapter.layers)) if self.alpha else set()
        if not layers and self.gamma == 1.0:
            return
        branch = Branch(ctx, *Branch.text_state(ctx, inputs)) if self.gamma != 1.0 else None
        ctx.scratch[self.name] = {"layers": layers, "visual": {}, "row": None, "branch": branch}

    # -- (1) attention intervention -------------------------------------------------------------------------------
    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        scratch = ctx.scratch.get(self.name)
        if scratch is None or layer not in scratch["layers"]:
            return None
        if ctx.step < 0:  # prefill: remember the layer's visual keys and the last row's input (see edit_residual)
            scratch["visual"][layer] = state.is_visual
            scratch["row"] = (state.hidden[:, -1:], state.positions[..., -1:])
            return None
        visual = over_current_keys(scratch["visual"][layer], state)  # decoded keys are text
        return AttentionRequest(key_abs_gain=visual[:, None].float() * self.alpha)

    def edit_residual(self, ctx: GenerationContext, layer: int, state: LayerState) -> torch.Tensor | None:
        scratch = ctx.scratch.get(self.name)
        if ctx.step >= 0 or scratch is None or scratch["row"] is None:
            return None
        (row, positions), scratch["row"] = scratch["row"], None
        adapter = ctx.adapter
        cache = LayeredKVCache(len(adapter.layers))  # the layer's prompt keys and values but the last row's
        cache.keys[layer] = ctx.cache.keys[layer][:, :, :-1]
        cache.values[layer] = ctx.cache.values[layer][:, :, :-1]
        gain = scratch["visual"][layer].float()[:, None] * self.alpha
        call = LayerAttention(state.key_valid, key_abs_gain=gain, backend=ctx.engine.attention_backend)
        edited = adapter.layers[layer](
            row, attention_mask=None, position_ids=None, **adapter.cache_argument(cache), use_cache=True,
            position_embeddings=adapter.rotary(row, positions), vlmkit_attention=call,
        )
        hidden = state.hidden.clone()
        hidden[:, -1:] = edited
        return hidden

    # -- (2) logit refinement -------------------------------------------------------------------------------------
    def edit_logits(self, ctx: GenerationContext, logits: torch.Tensor,
                    hidden_by_layer: dict[int, torch.Tensor]) -> torch.Tensor | None:
        scratch = ctx.scratch.get(self.name)
        if scratch is None or scratch["branch"] is None:
            return None
        return guidance(logits, scratch["branch"].logits(ctx), self.gamma, self.beta)

    def after_step(self, ctx: GenerationContext, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        scratch = ctx.scratch.get(self.name)
        if scratch is not None and scratch["branch"] is not None:
            scratch["branch"].follow(ctx, tokens, parents)
