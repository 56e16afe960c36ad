"""``var``: Visual Attention Redistribution.

Paper: Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (ICLR 2025); code
``MICV-yonsei/VisAttnSink`` (``src/logic/logic.py``, ``src/model/llava.py``, ``A_exps/lv1.5_7b.yml``). Spec:
decoders.md §5.

In every forward (prefill and decode), in layers 2 .. L-2 (the last layer excluded):

1. **Sink tokens.** The hidden state entering the layer is RMS-normalised; a token whose ``|value|`` in one of the
   model's *sink dimensions* exceeds ``tau`` is a sink (visual or text). Sinks are found in the prefill; generated
   tokens are never sinks.
2. **Image-centric heads.** Per head and query row: the row's attention to the image is at least ``summ`` and at most
   ``rho`` of it falls on visual sinks.
3. **Redistribution** (post-softmax, in those heads and rows only): the attention on every sink token is multiplied
   by ``p``; the removed mass ``(1 - p) * (sink mass)`` goes to the non-sink visual tokens in proportion to their
   attention. Each row still sums to 1.

Defaults are the code's LLaVA-1.5-7B ones: ``tau`` 20, ``rho`` 0.5, ``p`` 0.6, ``summ`` 0.2, sink dimensions
1415 and 2533. ``p=1`` is greedy decoding exactly.

Choices and deviations:

* ``dims=auto`` (the default when the model is not 4096 wide) takes the two dimensions with the largest normalised
  magnitude over the batch at the first intervened layer (massive activations; the paper finds its dimensions
  this way offline). RMS normalisation bounds each value by ``sqrt(hidden size)``, so ``tau`` 20 can only fire on
  models wider than 400: lower it for small models (world-tiny: ``tau=8``).
* The normalisation has no learned weight (the code reads the layer's input before its norm's weight, too).
* Post-softmax editing runs on the torch reference attention (``AttentionRequest.probs_mod``), not in the fused
  kernel: VAR's intervened layers are not fused.
* Visual tokens dropped by a pruner are neither sinks nor redistribution targets; rows without any non-sink visual
  token are left alone.
"""

from __future__ import annotations

from functools import partial

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder, over_current_keys
from vlmkit.errors import ConfigError
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState

LLAVA_7B_SINK_DIMS = (1415, 2533)
FIRST_LAYER = 2


def redistribute(probs: torch.Tensor, sink: torch.Tensor, visual: torch.Tensor, p: float, rho: float,
                 summ: float) -> torch.Tensor:
    """VAR on probabilities ``[B, H, Lq, Lk]`` with per-key ``sink`` and ``visual`` masks ``[B, Lk]`` (steps 2-3)."""
    sink, visual = sink[:, None, None, :], visual[:, None, None, :]
    targets = visual & ~sink
    image = (probs * visual).sum(-1, keepdim=True)
    centric = (image >= summ) & ((probs * (visual & sink)).sum(-1, keepdim=True) <= rho * image)
    target_mass = (probs * targets).sum(-1, keepdim=True)
    centric &= target_mass > 0
    moved = (1 - p) * (probs * sink).sum(-1, keepdim=True)
    edited = probs * torch.where(sink, p, 1.0) + torch.where(targets, probs * moved / target_mass.clamp(min=1e-30), 0.0)
    return torch.where(centric, edited, probs)


def rms_normalised(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.float() * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + 1e-6)


def sink_tokens(hidden: torch.Tensor, valid: torch.Tensor, dims: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B, L]``: tokens whose RMS-normalised hidden state exceeds ``tau`` in magnitude in a sink dimension;
    ``dims`` ``[B or 1, k]`` per row."""
    normed = rms_normalised(hidden)
    index = dims.view(dims.shape[0], 1, -1).expand(normed.shape[0], normed.shape[1], -1)
    return (normed.gather(-1, index).abs() > tau).any(-1) & valid


@register("var")
class VisualAttentionRedistribution(Decoder):
    def __init__(self, p: float = 0.6, tau: float = 20.0, rho: float = 0.5, summ: float = 0.2,
                 dims: list[int] | int | str | None = None):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"var: p must be in [0, 1], got {p}")
        if tau <= 0 or not 0.0 <= rho <= 1.0 or not 0.0 <= summ <= 1.0:
            raise ConfigError(f"var: need tau > 0 and rho, summ in [0, 1]; got tau={tau}, rho={rho}, summ={summ}")
        self.p, self.tau, self.rho, self.summ = float(p), float(tau), float(rho), float(summ)
        self.dims = [dims] if isinstance(dims, int) else dims

    def prepare(self, ctx: GenerationContext, inputs) -> None:
        width = ctx.adapter.text_config.hidden_size
        dims = self.dims if self.dims is not None else list(LLAVA_7B_SINK_DIMS) if width == 4096 else "auto"
        if dims != "auto" and any(not 0 <= d < width for d in dims):
            raise ConfigError(f"var: sink dimensions {dims} do not fit the hidden size {width}")
        ctx.scratch[self.name] = {"dims": dims if dims == "auto" else torch.tensor([dims]), "layers": {}}

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        if self.p == 1.0 or not FIRST_LAYER <= layer < len(ctx.adapter.layers) - 1:
            return None
        scratch = ctx.scratch[self.name]
        if ctx.step < 0:  # prefill: find this layer's sinks among its keys (the tokens entering it)
            if isinstance(scratch["dims"], str):  # auto: each sample's two largest normalised dimensions
                normed = rms_normalised(state.hidden).abs().masked_fill(~state.valid.unsqueeze(-1), 0.0)
                scratch["dims"] = normed.amax(dim=1).topk(2).indices
            dims = scratch["dims"].to(state.hidden.device)
            scratch["layers"][layer] = (sink_tokens(state.hidden, state.valid, dims, self.tau),
                                        state.is_visual & state.valid)
        sink, visual = (over_current_keys(mask, state) for mask in scratch["layers"][layer])
        return AttentionRequest(probs_mod=partial(redistribute, sink=sink, visual=visual, p=self.p, rho=self.rho,
                                                  summ=self.summ))
