"""Selection helpers shared by the pruners: per-row top-k inside the LLM, greedy max-min diversity, raster indices.

Not a method; imported by the method files.
"""

from __future__ import annotations

import torch

from vlmkit.runtime.hooks import LayerState


def visual_counts(state: LayerState) -> list[int]:
    """Visual tokens of each row at this layer."""
    return state.is_visual.sum(dim=1).tolist()


def top_visual(scores: torch.Tensor, is_visual: torch.Tensor, budgets: list[int] | torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: each row's ``budgets[b]`` visual tokens with the highest ``scores`` (ties: earlier first)."""
    scores = scores.float().masked_fill(~is_visual, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    budgets = torch.as_tensor(budgets, device=scores.device).view(-1, 1)
    return is_visual & (rank < budgets)


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the ``count`` highest of one image's ``scores`` ``[N]`` (ties: earlier first, as
    ``top_visual``)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices[:count].sort().values


def greedy_max_min(embeds: torch.Tensor, count: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity on cosine distance (DivPrune); optional per-token ``weights`` multiply the
    min-distance (ZOO-Prune's SADS). Returns the picked indices in pick order.

    Without weights the first pick maximises the distance to its nearest neighbour; with weights it is
    ``argmax(weights)``. Each later pick maximises ``min distance to the picked set (x weight)`` over the unpicked.
    """
    unit = torch.nn.functional.normalize(embeds.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = distance.shape[0]
    if weights is None:
        nearest = distance + torch.diag(torch.full((n,), float("inf"), device=embeds.device))
        score = nearest.min(dim=0).values if n > 1 else torch.zeros(1, device=embeds.device)
    else:
        score = weights.float().clone()
    if embeds.is_cuda:
        from vlmkit.kernels.selection import MAX_TOKENS, greedy_max_min_picks  # Triton, imported on first use

        if n <= MAX_TOKENS:  # every pick in one program, no host synchronisation
            return greedy_max_min_picks(distance, score, count, weights)
    picked = torch.empty(count, dtype=torch.long, device=embeds.device)
    taken = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    min_distance = torch.full((n,), float("inf"), device=embeds.device)
    for step in range(count):
        choice = int(score.masked_fill(taken, float("-inf")).argmax())
        picked[step] = choice
        taken[choice] = True
        min_distance = torch.minimum(min_distance, distance[choice])
        score = min_distance if weights is None else min_distance * weights
    return picked


def raster_index(is_visual_prompt: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` index of each token among its row's visual tokens in the unpruned prompt (row-major raster order
    for one image per prompt); meaningless for text tokens. ``is_visual_prompt`` is the unpruned ``[B, L0]`` mask."""
    ordinal = is_visual_prompt.long().cumsum(dim=1) - 1
    return ordinal.gather(1, source_index.clamp(min=0))
