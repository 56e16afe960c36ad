"""Attention debiasing for attention-scored pruners (the ``debias=...`` option of ``fastv`` and ``pdrop``).

Zhao et al., "Attention Debiasing for Token Pruning in Vision-Language Models", arXiv 2508.17807; code
intcomp/attention-bias (spec: shared/specs/pruners.md section 1). Text-to-vision attention grows with the visual
token's raster index (recency). The host's score ``s_i`` is divided by a fitted positional trend ``t(i)``
(``s'_i = s_i * t(0) / t(i)``), padding tokens of letterboxed images get score 0, then the host ranks as usual.

Trend sources (``debias=``):

* ``"exp"``: ``t(i) = a * exp(b * i)``, least squares on ``log s`` (the form of the shipped PDrop/SparseVLM/HiMAP
  vectors), fitted **online on each sample's own scores**.
* ``"cubic"``: ``t(i)`` a cubic polynomial in ``i`` (the form of the shipped FastV vector), fitted online per sample.
* a path to a ``.npy``, ``.pt`` or ``.json`` file with a weight vector ``w(i) = t(0)/t(i)`` over the raster index,
  e.g. one of attention-bias' shipped vectors or one made by :func:`fit_weights` on a calibration set; a vector of
  another length is resampled linearly over the relative position (Qwen's variable token counts).

Deviations from the code: the paper's code only ships offline vectors (no fitting script); the online per-sample fit
is this toolkit's default, as the spec recommends. Sink suppression is an addition (not in attention-bias): a visual
token whose score exceeds ``sink_ratio`` times its row's median visual score is treated as an attention sink, left
out of the fit and given score 0, like padding. Padding and sink tokens are excluded from every fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners.select import raster_index
from vlmkit.runtime.hooks import LayerState

FORMS = ("exp", "cubic")


class Debias:
    """A positional-trend remover; ``Debias.parse(None)`` is None (debiasing off)."""

    def __init__(self, source: str, pad_threshold: float = 0.5, sink_ratio: float = 10.0):
        if not 0.0 <= pad_threshold <= 1.0:
            raise ConfigError(f"pad_threshold must be in [0, 1], got {pad_threshold}")
        if sink_ratio < 0:
            raise ConfigError(f"sink_ratio must be >= 0 (0 turns sink suppression off), got {sink_ratio}")
        self.form = source if source in FORMS else "file"
        self.weights = None if self.form != "file" else load_weights(source)
        self.pad_threshold, self.sink_ratio = pad_threshold, sink_ratio

    @classmethod
    def parse(cls, source: str | None, pad_threshold: float = 0.5, sink_ratio: float = 10.0) -> Debias | None:
        return None if source in (None, "", "none") else cls(str(source), pad_threshold, sink_ratio)

    def for_prompt(self, ctx, is_visual_prompt: torch.Tensor) -> dict:
        """What ``apply`` needs about the unpruned prompt (call from the host's ``prepare``)."""
        return {"is_visual": is_visual_prompt, "pad": prompt_padding(ctx, is_visual_prompt, self.pad_threshold)}

    def apply(self, scores: torch.Tensor, state: LayerState, prompt: dict) -> torch.Tensor:
        """Debiased ``scores [B, L]`` of the visual tokens of ``state`` (``prompt`` from ``for_prompt``)."""
        raster = raster_index(prompt["is_visual"], state.source_index)
        count = prompt["is_visual"].sum(dim=1)
        pad = prompt["pad"]
        if pad is not None:
            pad = pad.gather(1, raster.clamp(0, pad.shape[1] - 1))
        return self(scores, state.is_visual, raster, count, pad)

    def __call__(self, scores: torch.Tensor, is_visual: torch.Tensor, raster: torch.Tensor, count: torch.Tensor,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """Debias ``scores [B, L]`` of the visual tokens. ``raster [B, L]``: each token's index among its row's
        ``count[b]`` unpruned visual tokens; ``pad [B, L]`` (optional): True for letterbox-padding tokens."""
        scores = scores.double()
        dropped = pad & is_visual if pad is not None else torch.zeros_like(is_visual)
        if self.sink_ratio > 0:
            median = scores.masked_fill(~is_visual, float("nan")).nanmedian(dim=1, keepdim=True).values
            dropped = dropped | (is_visual & (scores > self.sink_ratio * median.clamp(min=0)))
        fit = is_visual & ~dropped
        position = raster.double()
        if self.form == "file":
            trend = 1.0 / self._file_weights(position, count)
        else:
            trend = fit_trend(scores, position, fit, count, self.form)
        debiased = scores / trend
        return torch.where(dropped, torch.zeros_like(debiased), debiased).float()

    def _file_weights(self, position: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        weights = self.weights.to(position.device, torch.float64)
        relative = position / (count.to(position.device).double().view(-1, 1) - 1).clamp(min=1)
        grid = relative.clamp(0, 1) * (weights.numel() - 1)
        low = grid.floor().long().clamp(max=weights.numel() - 1)
        high = (low + 1).clamp(max=weights.numel() - 1)
        frac = grid - low
        return weights[low] * (1 - frac) + weights[high] * frac


def fit_trend(scores: torch.Tensor, position: torch.Tensor, fit: torch.Tensor, count: torch.Tensor,
              form: str) -> torch.Tensor:
    """Per-row least-squares trend ``t [B, L]`` (positive, ``t(0)``-normalised) of ``scores`` over ``position``,
    fitted on the tokens where ``fit`` is True."""
    x = position / (count.to(position.device).double().view(-1, 1) - 1).clamp(min=1)  # relative index in [0, 1]
    powers = 2 if form == "exp" else 4
    design = torch.stack([x**p for p in range(powers)], dim=-1)  # [B, L, P]
    if form == "exp":
        target = scores.clamp(min=torch.finfo(torch.float64).tiny).log()
    else:
        target = scores
    weighted = design * fit.double().unsqueeze(-1)
    gram = weighted.transpose(1, 2) @ design  # normal equations, with a tiny ridge for rows with few fit points
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-12)
    gram = gram + ridge.view(-1, 1, 1) * torch.eye(powers, dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram, weighted.transpose(1, 2) @ (target * fit).unsqueeze(-1))  # [B, P, 1]
    if form == "exp":
        return torch.exp((x * coef[:, 1]))  # t(i)/t(0) = exp(b * x)
    trend = (design @ coef).squeeze(-1)
    floor = 1e-3 * (scores * fit).sum(dim=1, keepdim=True) / fit.sum(dim=1, keepdim=True).clamp(min=1)
    return trend.clamp(min=floor.clamp(min=1e-12))


def fit_weights(scores: torch.Tensor, form: str = "exp") -> torch.Tensor:
    """Calibration: ``scores [S, N]`` raw host scores of ``S`` images with ``N`` visual tokens each -> the weight
    vector ``w(i) = t(0)/t(i)`` of the trend fitted to their mean (save it with ``torch.save`` or ``numpy.save``)."""
    if form not in FORMS:
        raise ConfigError(f"unknown trend form {form!r}; choose one of {FORMS}")
    mean = scores.double().mean(dim=0, keepdim=True)
    n = mean.shape[1]
    position = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    trend = fit_trend(mean, position, torch.ones_like(mean, dtype=torch.bool), torch.tensor([n]), form)[0]
    return (trend[0] / trend).float()


def load_weights(path: str) -> torch.Tensor:
    """A 1-D weight vector from ``.npy``, ``.pt`` or ``.json``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"debias={path!r} is neither a trend form ({', '.join(FORMS)}) nor an existing weight file")
    if file.suffix == ".npy":
        import numpy

        weights = torch.from_numpy(numpy.load(file))
    elif file.suffix == ".json":
        weights = torch.tensor(json.loads(file.read_text()))
    else:
        weights = torch.load(file, map_location="cpu")
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if weights.numel() < 2 or not bool((weights > 0).all()):
        raise ConfigError(f"debias weight file {path} must hold a positive vector of at least 2 values")
    return weights


def letterbox_padding(size: tuple[int, int], grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """``[rows * cols]`` bool: patches of a ``(width, height)`` image letterboxed to a square whose padded area
    fraction exceeds ``threshold`` (LLaVA-1.5 'pad' aspect mode)."""
    width, height = size
    side = max(width, height)
    rows, cols = grid

    def covered(extent: int, cells: int) -> torch.Tensor:
        start, end = (side - extent) / (2 * side), (side + extent) / (2 * side)
        edges = torch.arange(cells + 1, dtype=torch.float64) / cells
        return ((torch.minimum(edges[1:], torch.tensor(end)) - torch.maximum(edges[:-1], torch.tensor(start)))
                .clamp(min=0) * cells)

    image_fraction = covered(height, rows)[:, None] * covered(width, cols)[None, :]
    return (1.0 - image_fraction).flatten() > threshold


def prompt_padding(ctx, is_visual_prompt: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """``[B, N_max]`` letterbox-padding flags per row's visual raster index, or None when the processor does not
    letterbox (only LLaVA's image processor with ``do_pad``)."""
    image_processor = getattr(ctx.adapter.processor, "image_processor", None)
    if ctx.adapter.family != "llava" or not getattr(image_processor, "do_pad", False):
        return None
    counts = is_visual_prompt.sum(dim=1).tolist()
    pad = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for row, (image, count) in enumerate(zip(ctx.images, counts)):
        side = int(round(count**0.5))
        if side * side == count:
            pad[row, :count] = letterbox_padding(image.size, (side, side), threshold)
    return pad.to(is_visual_prompt.device)
