"""The greedy max-min Triton kernel (kernels/selection.py) picks what the torch loop picks.

Like test_kernel_attention.py, the cases run on the GPU when there is one, else in Triton's CPU interpreter in a
child process (``test_in_the_interpreter``). Both paths get the same float32 distance matrix, so any difference is
the kernel's. Coarse integer embeddings make many exact ties, which must go to the lowest index (only the GPU run
checks the kernel's tie-breaking: the interpreter's argmax always takes the lowest index).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
IN_CHILD = not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1"
kernel_case = pytest.mark.skipif(IN_CHILD, reason="runs in the interpreter's child process (test_in_the_interpreter)")


@pytest.mark.skipif(not IN_CHILD, reason="the kernels run in this process")
def test_in_the_interpreter(run_in_interpreter):
    run_in_interpreter(__file__)


from vlmkit.kernels.selection import MAX_TOKENS, greedy_max_min_picks  # noqa: E402
from vlmkit.pruners.select import greedy_max_min  # noqa: E402


def _distance_and_first_score(embeds: torch.Tensor, weights: torch.Tensor | None):
    """What ``greedy_max_min`` hands the kernel, computed on the CPU."""
    unit = torch.nn.functional.normalize(embeds.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = len(embeds)
    if weights is not None:
        return distance, weights.float()
    nearest = distance + torch.diag(torch.full((n,), float("inf")))
    return distance, nearest.min(dim=0).values if n > 1 else torch.zeros(1)


@kernel_case
@pytest.mark.parametrize("n, count", [(1, 1), (7, 7), (50, 9), (577, 64)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_picks_what_the_torch_loop_picks(n, count, weighted, ties):
    gen = torch.Generator().manual_seed(n * 10 + count)
    if ties:  # few distinct directions: duplicate tokens and equal scores everywhere
        embeds = torch.randint(0, 2, (n, 3), generator=gen).float() + torch.tensor([0.0, 0.0, 1.0])
    else:
        embeds = torch.randn(n, 16, generator=gen)
    weights = torch.randint(1, 4, (n,), generator=gen).float() if weighted else None
    expected = greedy_max_min(embeds, count, weights)
    distance, first = _distance_and_first_score(embeds, weights)
    picked = greedy_max_min_picks(distance.to(DEVICE), first.to(DEVICE), count,
                                  None if weights is None else weights.to(DEVICE))
    assert picked.dtype == torch.long and picked.tolist() == expected.tolist()
    assert len(set(picked.tolist())) == count  # never a token twice


@kernel_case
def test_kernel_refuses_rows_longer_than_a_program_holds():
    with pytest.raises(ValueError, match="at most"):
        greedy_max_min_picks(torch.zeros(MAX_TOKENS + 1, MAX_TOKENS + 1, device=DEVICE),
                             torch.zeros(MAX_TOKENS + 1, device=DEVICE), 1)
