"""Greedy max-min diversity selection (DivPrune; ZOO-Prune's weighted variant) in one Triton program.

Each greedy pick depends on the one before, so as torch ops on a GPU every pick is a few tiny kernels plus a host
synchronisation to read it: tens of picks cost milliseconds of launches and waits before the prefill can start. This
kernel keeps one image's scores, running minimum distances and picked set in registers and makes all picks in one
program, reading one row of the distance matrix per pick. Ties go to the lowest index, as ``torch.argmax`` does, so
it picks what the torch loop in ``vlmkit.pruners.select.greedy_max_min`` picks (the CPU path, and the tests'
reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 8192  # one program holds a row of this many scores in registers; longer rows use the torch loop


@triton.jit
def greedy_max_min_kernel(Distance, Score, Weights, Picked, n, count, stride_row,
                          BLOCK: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """Pick ``count`` of ``n`` tokens: each pick maximises ``score`` over the unpicked tokens, then ``score`` becomes
    the minimum distance to the picked set (times ``Weights`` with ``HAS_WEIGHTS``)."""
    offs = tl.arange(0, BLOCK)
    in_range = offs < n
    score = tl.load(Score + offs, mask=in_range, other=0.0)
    if HAS_WEIGHTS:
        weights = tl.load(Weights + offs, mask=in_range, other=0.0)
    min_distance = tl.full([BLOCK], float("inf"), tl.float32)
    taken = offs >= n
    for step in range(count):
        choice = tl.argmax(tl.where(taken, float("-inf"), score), axis=0, tie_break_left=True)
        tl.store(Picked + step, choice)
        taken = taken | (offs == choice)
        row = tl.load(Distance + choice * stride_row + offs, mask=in_range, other=float("inf"))
        min_distance = tl.minimum(min_distance, row)
        if HAS_WEIGHTS:
            score = min_distance * weights
        else:
            score = min_distance


def greedy_max_min_picks(distance: torch.Tensor, first_score: torch.Tensor, count: int,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ``count`` picks (int64, in pick order) over the float32 ``distance [N, N]``, starting from
    ``first_score [N]``; ``N`` at most :data:`MAX_TOKENS`."""
    n = distance.shape[0]
    if n > MAX_TOKENS:
        raise ValueError(f"{n} tokens: the kernel holds at most {MAX_TOKENS}")
    distance = distance.float().contiguous()
    picked = torch.empty(count, dtype=torch.long, device=distance.device)
    block = triton.next_power_of_2(n)
    greedy_max_min_kernel[(1,)](
        distance, first_score.float().contiguous(), picked if weights is None else weights.float().contiguous(),
        picked, n, count, distance.stride(0),
        BLOCK=block, HAS_WEIGHTS=weights is not None, num_warps=4 if block <= 2048 else 8,
    )
    return picked
