"""``agile``: AgilePruner, attention ranking with near-duplicate suppression scaled by image complexity.

Baek et al., "AgilePruner" (earlier: "An Empirical Study of Attention and Diversity for Adaptive Visual Token
Pruning"), arXiv 2603.01236, ICLR 2026 (cvsp-lab/AgilePruner; no code released). Per image, before the LLM:

1. ``a``: the [CLS] -> patch attention (head mean) of the encoder layer that feeds the projector (INFERRED in the
   spec from the paper's FasterVLM comparison);
2. complexity ``c = erank(X) / erank_mean``, with ``erank`` the effective rank (Roy & Vetterli) of the projector's
   input features ``X``;
3. greedy NMS in attention order: take the best remaining candidate, then drop every remaining candidate whose
   cosine distance to it is below ``tau_i = min(i * c * scale, tau_max)`` (``i`` = 1, 2, ... the pick's order among
   the picked tokens); stop at the budget. If candidates run out, the suppressed tokens refill it in attention order.

Choices where the paper is ambiguous (all options): ``tau_max`` (default 0.5), ``scale`` (the paper's 0.01),
``order="selected"`` (``i`` counts picks; ``"rank"`` uses the token's attention rank instead), erank on the
uncentred encoder features. ``erank_mean`` is the calibration set's mean erank (compute it with :func:`erank`); left
unset, the current batch's mean stands in (a deviation: the paper uses a dataset mean). LLaVA only: the attention
source for encoders without [CLS] (Qwen) is unknown.
"""

from __future__ import annotations

import numpy as np
import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.pruners.fastervlm import cls_attention
from vlmkit.runtime.hooks import GenerationContext, Selection, VisualTokens


def erank(features: torch.Tensor) -> float:
    """Effective rank ``exp(H(sigma / sum sigma))`` of a ``[N, D]`` feature matrix, in float64. The singular values
    are the square roots of the eigenvalues of the smaller Gram matrix (min(N, D) square): a symmetric eigensolver on
    it is several times faster than an SVD of the features. Singular values under about 1e-7 of the largest (the
    float64 Gram matrix's rounding floor) are not resolved this way; the result agrees with the SVD's to about 1e-6
    relative, rank-deficient features included (the tests)."""
    x = features.double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    p = sigma / sigma.sum()
    return float(torch.exp(-(p * p.clamp(min=1e-300).log()).sum()))


def suppress_select(scores: torch.Tensor, features: torch.Tensor, count: int, complexity: float, scale: float,
                    tau_max: float, order: str = "selected") -> torch.Tensor:
    """Indices of ``count`` tokens picked by attention-ordered NMS on cosine distance (see the module docstring).

    The pairwise cosine distances are one matrix product on the features' device, read back once; the greedy walk
    runs on the host. It visits the tokens in attention order: the best remaining candidate is always the next one
    not yet suppressed, since suppression is never undone."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = (1.0 - unit @ unit.T).cpu().numpy()
    ranking = scores.argsort(descending=True, stable=True).tolist()
    alive = np.ones(len(ranking), dtype=bool)
    picked: list[int] = []
    for rank, token in enumerate(ranking):
        if len(picked) == count:
            break
        if not alive[token]:
            continue
        picked.append(token)
        alive[token] = False
        position = len(picked) if order == "selected" else rank + 1
        alive &= distance[token] >= min(position * complexity * scale, tau_max)
    if len(picked) < count:  # refill with the suppressed tokens, best attention first
        taken = set(picked)
        picked += [token for token in ranking if token not in taken][: count - len(picked)]
    return torch.tensor(picked, device=scores.device)


@register("agile")
class AgilePruner(Pruner):
    needs_vision_attention = True

    def __init__(self, keep: int | float = 64, erank_mean: float | None = None, scale: float = 0.01,
                 tau_max: float = 0.5, order: str = "selected"):
        super().__init__(keep)
        if erank_mean is not None and erank_mean <= 0:
            raise ConfigError(f"agile: erank_mean must be positive, got {erank_mean}")
        if order not in ("selected", "rank"):
            raise ConfigError(f"agile: order must be 'selected' or 'rank', got {order!r}")
        if scale < 0 or tau_max < 0:
            raise ConfigError("agile: scale and tau_max must be >= 0")
        self.erank_mean, self.scale, self.tau_max, self.order = erank_mean, scale, tau_max, order

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        scores = [cls_attention(self.name, image) for image in tokens]
        if any(image.features is None for image in tokens):
            raise ConfigError("agile needs the projector's input features; this adapter does not provide them")
        ranks = [erank(image.features) for image in tokens]
        mean = self.erank_mean or sum(ranks) / len(ranks)
        ctx.scratch[self.name] = {"erank": ranks, "complexity": [r / mean for r in ranks]}
        ctx.report("agile_erank", ranks)
        ctx.report("agile_complexity", ctx.scratch[self.name]["complexity"])
        selections = []
        for image, score, rank in zip(tokens, scores, ranks):
            picked = suppress_select(score, image.features, self.budget(score.numel()), rank / mean, self.scale,
                                     self.tau_max, self.order)
            selections.append(Selection(keep=picked.sort().values))
        return selections
