"""``locore``: Local Coherence Reinforcement.

Paper: "Hallucination Begins Where Saliency Drops" (ICLR 2026, arXiv 2601.20279), Eq. 8-10 / Alg. 2; the official
repository ``zhangbaijin/LVLMs-Saliency`` does not release LocoRE (``zhangbaijin/LVLMs-Saliency#2``). Spec:
decoders.md §4(a)10, §4(f).

At every decode step, the attention weight from the current token to each of the ``window`` most recent earlier
output tokens is multiplied by ``1 + strength`` and the row is renormalised. Multiplying post-softmax weights and
renormalising is exactly adding ``log(1 + strength)`` to those keys' logits, which is how it is applied here (a key
bias, so it runs in the fused kernel). Forward-only, no extra pass; batch, sampling and beam search are supported
(the cache keeps the generated keys last, beams included). Combine with ``sgrs`` by listing both decoders.

Choices where the paper is silent (decoders.md §4(f)): post-softmax with renormalisation; ``window`` = 8 output
tokens; every layer unless ``layers`` is given; the current token's own key is not boosted. ``strength`` (β)
defaults to the paper's LLaVA-1.5 value 0.15 (0.20 for Qwen2-VL). The unreleased experiments may have used a
VAF-style visual-attention boost instead (§4(d)); that is not what this implements.
"""

from __future__ import annotations

import math

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder
from vlmkit.errors import ConfigError
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState


@register("locore")
class LocalCoherence(Decoder):
    def __init__(self, strength: float = 0.15, window: int = 8, layers: list[int] | int | None = None):
        if strength < 0:
            raise ConfigError(f"locore: strength must be >= 0, got {strength}")
        if window < 1:
            raise ConfigError(f"locore: window must be at least 1, got {window}")
        self.strength, self.window = float(strength), int(window)
        self.layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        earlier = min(self.window, ctx.step)  # output tokens before the current one (at step s, token s is fed)
        if ctx.step < 1 or not self.strength or earlier < 1 or (self.layers is not None and layer not in self.layers):
            return None
        keys = state.key_valid.shape[1]
        bias = torch.zeros(1, 1, keys, device=state.hidden.device)
        bias[..., keys - 1 - earlier: keys - 1] = math.log1p(self.strength)
        return AttentionRequest(key_bias=bias)
