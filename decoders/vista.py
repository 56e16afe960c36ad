"""``vista``: Visual Steering Vector + Self-Logits Augmentation.

Paper: Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via Visual
Information Steering" (ICML 2025, arXiv 2502.03628); code ``LzVv123456/VISTA``. Spec: decoders.md §1.

* **VSV.** Two extra prefill passes per sample, with and without the image (``prepare``). At every decoder layer
  ``l`` the residual stream of the last prompt token gives ``v_l = h_pos_l - h_neg_l``. While generating, every
  layer's output ``h`` is steered to ``h + strength * v_l`` and rescaled to ``||h||``.
* **SLA.** The logits are mixed with the mean logits of the ``window`` layers just before the last one:
  ``(1 - gamma) * logits + gamma * mean_l lm_head(norm(h_l))``.

``strength=0`` switches the VSV off (no extra passes), ``gamma=0`` switches SLA off; both 0 is greedy decoding.
Works with greedy, sampling and beam search, batch > 1 (one VSV per sample; beams use their sample's vector). The
decode-time steering and SLA are tensor work at every step, so they run inside the decode step's CUDA graph: the
vectors are copied into a buffer this decoder keeps per shape, which the graph reads at a fixed address.

Paper vs code (paper is the default; the code's variant is an option):

* ``formula="paper"``: ``h + λv`` rescaled to ``||h||``. ``formula="code"``: the code's per-token rule
  ``normalize(normalize(h) + λ·(1 + max(0, cos(h, -v)))·v/||v||)·||h||``. The code applies it to each block's MLP
  output; the runtime exposes no MLP-output hook, so here both formulas act on the residual stream (after the
  layer). λ values of the two formulas are not comparable.
* ``steer_prompt=False`` (paper): steer only the positions that predict tokens (the last prompt token and every
  decoded token). ``True`` (code): every prompt position too.
* ``sla_norm=True`` (paper, "the same LM head"): the final norm is applied before ``lm_head``; ``False`` (code,
  transformers 4.37 hidden states) skips it. The code's window is 6 layers; the paper's (default here) is 5.
* The code's rank-1 PCA over one (pos, neg) pair is degenerate (decoders.md §1(a)3); the raw difference is used.
* The negative prompt is the chat prompt with the image placeholder tokens removed (and Qwen's
  ``<|vision_start|>``/``<|vision_end|>``); its positions are recomputed. Both passes run on the unmodified model
  (no pruner, no other decoder). The dtype of the model is kept (the code casts to fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder
from vlmkit.errors import ConfigError
from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import GenerationContext, LayerState

FORMULAS = ("paper", "code")


@register("vista")
class Vista(Decoder):
    decode_in_graph = True

    def __init__(self, strength: float = 0.17, gamma: float = 0.3, window: int = 5, formula: str = "paper",
                 steer_prompt: bool = False, sla_norm: bool = True):
        if formula not in FORMULAS:
            raise ConfigError(f"vista: formula must be one of {FORMULAS}, got {formula!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"vista: gamma must be in [0, 1], got {gamma}")
        if window < 1:
            raise ConfigError(f"vista: window must be at least 1, got {window}")
        self.strength, self.gamma, self.window = float(strength), float(gamma), int(window)
        self.formula, self.steer_prompt, self.sla_norm = formula, steer_prompt, sla_norm
        self.logit_hidden_layers = tuple(range(-1 - self.window, -1)) if self.gamma else ()
        self._vectors: dict[tuple, torch.Tensor] = {}  # the steering vectors' buffer per shape, dtype and device

    # -- VSV ------------------------------------------------------------------------------------------------------
    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        if len(self.logit_hidden_layers) >= len(ctx.adapter.layers):
            raise ConfigError(f"vista: window={self.window} needs more than {len(ctx.adapter.layers)} layers")
        ctx.scratch.pop(self.name, None)
        if self.strength == 0.0:
            return
        from vlmkit.runtime.engine import Engine  # the runtime imports the decoders: import it lazily

        bare = Engine(ctx.adapter, [], attention_backend=ctx.engine.attention_backend)
        pass_ctx = GenerationContext(adapter=ctx.adapter, prompts=ctx.prompts, images=ctx.images, engine=bare)
        positive, _, _ = bare.initial_state(pass_ctx, inputs)
        negative = self.text_only_state(ctx, inputs, mrope=positive.positions.dim() == 3)
        layers = set(range(len(ctx.adapter.layers)))
        last = [bare.run_layers(pass_ctx, state, LayeredKVCache(len(layers)), layers)[1] for state in (positive, negative)]
        vectors = torch.stack([last[0][l] - last[1][l] for l in sorted(layers)])  # [L, B, D]
        key = (vectors.shape, vectors.dtype, vectors.device)
        if key not in self._vectors:
            self._vectors[key] = torch.empty_like(vectors)
        ctx.scratch[self.name] = self._vectors[key].copy_(vectors)

    @staticmethod
    def text_only_state(ctx: GenerationContext, inputs: PreparedBatch, mrope: bool) -> LayerState:
        """The prompts without their image tokens (the negative context), left-padded, positions recomputed."""
        from vlmkit.runtime.engine import Engine

        config = ctx.adapter.config
        dropped = inputs.is_visual.clone()
        for key in ("vision_start_token_id", "vision_end_token_id"):
            if (token := getattr(config, key, None)) is not None:
                dropped |= inputs.input_ids == token
        valid = inputs.attention_mask.bool()
        state = LayerState(
            hidden=ctx.adapter.embed_tokens(inputs.input_ids),
            valid=valid,
            is_visual=torch.zeros_like(valid),
            positions=torch.zeros_like(inputs.input_ids),
            source_index=torch.arange(valid.shape[1], device=valid.device).expand_as(valid),
        )
        state = Engine.compact(state, valid & ~dropped)
        positions = (state.valid.long().cumsum(dim=1) - 1).clamp(min=0)
        state.positions = positions.expand(3, -1, -1) if mrope else positions
        return state

    def edit_residual(self, ctx: GenerationContext, layer: int, state: LayerState) -> torch.Tensor | None:
        vectors = ctx.scratch.get(self.name)
        if vectors is None:
            return None
        rows = torch.arange(state.hidden.shape[0], device=state.hidden.device) // ctx.num_beams
        vector = vectors[layer, rows].unsqueeze(1)  # [B, 1, D]
        if ctx.step >= 0 or self.steer_prompt:
            return self.steer(state.hidden, vector, self.strength, self.formula)
        hidden = state.hidden.clone()
        hidden[:, -1:] = self.steer(hidden[:, -1:], vector, self.strength, self.formula)
        return hidden

    @staticmethod
    def steer(hidden: torch.Tensor, vector: torch.Tensor, strength: float, formula: str = "paper") -> torch.Tensor:
        """Steer ``hidden [..., D]`` along ``vector`` (broadcastable), keeping each token's norm."""
        h, v = hidden.float(), vector.float()
        norm = h.norm(dim=-1, keepdim=True)
        if formula == "paper":
            steered = h + strength * v
        else:
            gain = 1.0 + F.cosine_similarity(h, -v.expand_as(h), dim=-1).clamp(min=0).unsqueeze(-1)
            steered = F.normalize(h, dim=-1) + strength * gain * F.normalize(v, dim=-1)
        return (F.normalize(steered, dim=-1) * norm).to(hidden.dtype)

    # -- SLA ------------------------------------------------------------------------------------------------------
    def edit_logits(self, ctx: GenerationContext, logits: torch.Tensor,
                    hidden_by_layer: dict[int, torch.Tensor]) -> torch.Tensor | None:
        if not self.gamma:
            return None
        adapter, count = ctx.adapter, len(ctx.adapter.layers)
        hidden = torch.stack([hidden_by_layer[l % count] for l in self.logit_hidden_layers])  # [w, B, D]
        if self.sla_norm:
            hidden = adapter.final_norm(hidden)
        early = adapter.lm_head(hidden).float().mean(dim=0)
        return (1.0 - self.gamma) * logits + self.gamma * early
