"""Attention debiasing (``pruners/debias.py``): planted positional trends are removed; padding and sinks suppressed."""

from __future__ import annotations

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.pruners.debias import Debias, fit_weights, letterbox_padding

N = 64


def planted(trend: torch.Tensor, rows: int = 3, seed: int = 0):
    """Scores ``content * trend`` with a content signal independent of position; text columns around them."""
    generator = torch.Generator().manual_seed(seed)
    content = torch.rand(rows, N, generator=generator, dtype=torch.float64) + 0.5
    scores = torch.cat([torch.full((rows, 3), 7.0, dtype=torch.float64), content * trend, torch.ones(rows, 2)], 1)
    is_visual = torch.zeros_like(scores, dtype=torch.bool)
    is_visual[:, 3:3 + N] = True
    raster = (is_visual.long().cumsum(1) - 1).clamp(min=0)
    return content, scores, is_visual, raster, torch.full((rows,), N)


def position() -> torch.Tensor:
    return torch.arange(N, dtype=torch.float64) / (N - 1)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@pytest.mark.parametrize("form,trend,fidelity", [
    ("exp", torch.exp(3.0 * position()), 0.95),
    ("cubic", 1 + 4 * position() - 2 * position() ** 2 + 3 * position() ** 3, 0.8),  # additive fit: noisier
])
def test_online_fit_removes_a_planted_trend(form, trend, fidelity):
    content, scores, is_visual, raster, count = planted(trend)
    debiased = Debias(form, sink_ratio=0)(scores, is_visual, raster, count)[:, 3:3 + N]
    index = position()
    for row in range(3):
        assert correlation(scores[row, 3:3 + N], index) > 0.6  # the planted trend dominates the raw scores
        assert abs(correlation(debiased[row], index)) < 0.2  # and is gone afterwards
        assert correlation(debiased[row], content[row]) > fidelity


def test_exponential_rate_is_recovered():
    _, scores, is_visual, raster, count = planted(torch.exp(2.5 * position()), rows=40)
    weights = fit_weights(scores[:, 3:3 + N], "exp")
    torch.testing.assert_close(weights, torch.exp(-2.5 * position()).float(), atol=0.03, rtol=0.05)
    assert weights[0] == 1.0


def test_calibration_file_is_used_and_resampled(tmp_path):
    trend = torch.exp(2.0 * position())
    path = tmp_path / "weights.pt"
    torch.save(fit_weights((torch.rand(20, N, dtype=torch.float64) + 0.5) * trend, "exp"), path)
    content, scores, is_visual, raster, count = planted(trend)
    debiased = Debias(str(path), sink_ratio=0)(scores, is_visual, raster, count)[:, 3:3 + N]
    assert all(correlation(debiased[r], content[r]) > 0.95 for r in range(3))
    # a row with half as many tokens reads the vector at the same relative positions
    half = Debias(str(path), sink_ratio=0)(scores[:, 3:3 + N:2], torch.ones(3, N // 2, dtype=torch.bool),
                                           torch.arange(N // 2).expand(3, -1), torch.full((3,), N // 2))
    assert all(correlation(half[r], content[r, ::2]) > 0.95 for r in range(3))


def test_padding_and_sinks_get_zero():
    content, scores, is_visual, raster, count = planted(torch.ones(N))
    scores[0, 10] = 1000.0  # an attention sink
    pad = torch.zeros_like(is_visual)
    pad[:, 3:11] = True  # the first 8 visual tokens are letterbox padding
    debiased = Debias("exp")(scores, is_visual, raster, count, pad)
    assert torch.all(debiased[:, 3:11] == 0) and debiased[0, 10] == 0
    assert torch.all(debiased[:, 11:3 + N] > 0)


def test_letterbox_geometry():
    wide = letterbox_padding((64, 32), (4, 4), 0.5)  # image fills the middle half of the rows
    assert wide.view(4, 4).tolist() == [[True] * 4, [False] * 4, [False] * 4, [True] * 4]
    tall = letterbox_padding((48, 64), (4, 4), 0.5)  # 1/8 padding each side: half of columns 0 and 3
    assert not tall.any() and letterbox_padding((48, 64), (4, 4), 0.4).view(4, 4)[:, 0].all()
    assert not letterbox_padding((32, 32), (4, 4), 0.0).any()


def test_bad_sources():
    with pytest.raises(ConfigError, match="neither a trend form"):
        Debias("quadratic")
    with pytest.raises(ConfigError):
        Debias("exp", pad_threshold=2.0)
    assert Debias.parse(None) is None and Debias.parse("none") is None
