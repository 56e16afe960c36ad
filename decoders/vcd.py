"""``vcd``: Visual Contrastive Decoding.

Paper: Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive
Decoding" (CVPR 2024, arXiv 2311.16922); code ``DAMO-NLP-SG/VCD`` (``vcd_utils/vcd_sample.py``,
``vcd_utils/vcd_add_noise.py``). Spec: decoders.md §6.

A second branch decodes the same answer from a distorted image ``v'``: the diffusion forward process
``q(v_t | v_0) = N(sqrt(ᾱ_t) v_0, (1 - ᾱ_t) I)`` at ``noise_step`` t of a 1000-step schedule, applied to the model's
pixel inputs (the normalised pixels, as the code does). Each step's logits become

    (1 + alpha) * l(v) - alpha * l(v')   where l(v) >= log(beta) + max l(v),   -inf elsewhere

(the adaptive plausibility constraint ``p(y|v) >= beta * max_w p(w|v)``, written on logits as in the code).
``l(v)`` are the logits as they reach this decoder (after any decoder listed before it); ``l(v')`` come from the
branch (``decoders/branch.py``: own prefill and KV cache, one decode step per token, unmodified model). The call's
sampler then applies temperature / top-k / top-p to the result, as the code's ``logits_warper`` does.

Options: ``alpha`` (1.0), ``beta`` (0.1; the code's POPE script uses 0.2), ``noise_step`` (500), ``seed`` (0),
``schedule``. ``alpha=0`` is greedy decoding exactly (no branch runs). Works with greedy, sampling and beam search
(the branch's cache follows the beams) and batch > 1.

Paper vs code, and deviations:

* ``schedule="vcd"`` (default, the code's ``add_diffusion_noise``): ``β_t = sigmoid(linspace(-6, 6, 1000)) ·
  (5e-3 - 1e-5) + 1e-5``, a sigmoid-shaped schedule (at t = 500: ``sqrt(ᾱ) ≈ 0.86``). ``schedule="linear"``: the DDPM
  linear schedule ``β_t = linspace(1e-4, 0.02, 1000)`` (``sqrt(ᾱ_500) ≈ 0.28``), a much stronger distortion. The paper
  describes the forward process without fixing the schedule, so the code's is the default.
* Noise is seeded: each image's noise comes from a generator seeded with ``seed`` (the same for every image), so an
  image's noise does not depend on its batch; the code draws unseeded ``randn_like`` noise.
* Qwen's pixel inputs are flattened patches in which each frame is repeated ``temporal_patch_size`` times; the noise
  is drawn per patch element, so the copies get independent noise (noising the image before patching would not).
* The branch sees no pruner: with a pruner, only the main branch is pruned and the noised branch keeps every visual
  token (it costs a full prefill). The code's headline numbers use sampling (``DAMO-NLP-SG/VCD#9``); here the
  call's decoding mode is used as given.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder
from vlmkit.decoders.branch import Branch
from vlmkit.errors import ConfigError
from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.hooks import GenerationContext

SCHEDULES = ("vcd", "linear")
DIFFUSION_STEPS = 1000


def alpha_bar(step: int, schedule: str = "vcd") -> float:
    """``ᾱ_t = prod_{s <= t} (1 - β_s)`` of the 1000-step schedule (0-based ``step``, as the code indexes it)."""
    if schedule == "vcd":
        betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    else:
        betas = torch.linspace(1e-4, 0.02, DIFFUSION_STEPS, dtype=torch.float64)
    return float(torch.cumprod(1 - betas, dim=0)[step])


def noised_pixels(inputs: PreparedBatch, step: int, seed: int, schedule: str = "vcd") -> torch.Tensor:
    """``sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε`` on each image's pixel inputs, ``ε`` from a generator seeded with ``seed``."""
    pixels = inputs.vision_inputs["pixel_values"]
    if "image_grid_thw" in inputs.vision_inputs:  # Qwen: one row per patch, images concatenated
        sizes = inputs.vision_inputs["image_grid_thw"].prod(dim=-1).tolist()
    else:
        sizes = [1] * pixels.shape[0]
    keep = alpha_bar(step, schedule)
    parts = []
    for image in pixels.split(sizes):
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        parts.append(math.sqrt(keep) * image.float() + math.sqrt(1 - keep) * noise.to(image.device))
    return torch.cat(parts).to(pixels.dtype)


def contrast(logits: torch.Tensor, negative: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``(1 + alpha) l - alpha l'`` on the plausible set ``l >= log(beta) + max l`` (-inf elsewhere)."""
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return ((1 + alpha) * logits - alpha * negative).masked_fill(logits < cutoff, float("-inf"))


@register("vcd")
class VisualContrastiveDecoding(Decoder):
    def __init__(self, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0,
                 schedule: str = "vcd"):
        if alpha < 0:
            raise ConfigError(f"vcd: alpha must be >= 0, got {alpha}")
        if not 0 < beta <= 1:
            raise ConfigError(f"vcd: beta must be in (0, 1], got {beta}")
        if not 0 <= noise_step < DIFFUSION_STEPS:
            raise ConfigError(f"vcd: noise_step must be in [0, {DIFFUSION_STEPS - 1}], got {noise_step}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"vcd: schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.alpha, self.beta, self.noise_step = float(alpha), float(beta), int(noise_step)
        self.seed, self.schedule = int(seed), schedule

    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        ctx.scratch.pop(self.name, None)
        if self.alpha == 0.0:
            return
        pixels = noised_pixels(inputs, self.noise_step, self.seed, self.schedule)
        noised = dataclasses.replace(inputs, vision_inputs={**inputs.vision_inputs, "pixel_values": pixels})
        ctx.scratch[self.name] = Branch(ctx, *Branch.image_state(ctx, noised))

    def edit_logits(self, ctx: GenerationContext, logits: torch.Tensor,
                    hidden_by_layer: dict[int, torch.Tensor]) -> torch.Tensor | None:
        branch = ctx.scratch.get(self.name)
        if branch is None:
            return None
        return contrast(logits, branch.logits(ctx), self.alpha, self.beta)

    def after_step(self, ctx: GenerationContext, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        if (branch := ctx.scratch.get(self.name)) is not None:
            branch.follow(ctx, tokens, parents)
