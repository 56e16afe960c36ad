"""The layered KV cache: shared prefixes are handed to each layer's attention call and follow beam reordering
without copies."""

from __future__ import annotations

import torch

from vlmkit.runtime.cache import LayeredKVCache


def _shared(sequences: torch.Tensor) -> LayeredKVCache:
    """Two layers holding ``sequences`` (2 packed sequences of 5 tokens), shared by rows 1, 0, 1."""
    cache = LayeredKVCache(2)
    for layer in range(2):
        cache.extend_valid(layer, torch.ones(2, 5, dtype=torch.bool))
        cache.update(sequences, -sequences, layer)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    cache.share_prefix(torch.tensor([1, 0, 1]), valid)
    return cache


def test_shared_prefixes_are_not_copied_and_rows_store_only_their_own_tokens():
    sequences = torch.randn(2, 3, 5, 4)
    cache = _shared(sequences)
    assert cache.lengths() == [0, 0]
    for layer in range(2):
        prefix = cache.shared_prefix(layer)
        assert prefix.keys is sequences and torch.equal(prefix.values, -sequences)
        assert prefix.rows.tolist() == [1, 0, 1]
    new = torch.randn(3, 3, 1, 4)
    assert cache.extend_valid(0, torch.ones(3, 1, dtype=torch.bool)).shape == (3, 1)
    key, value = cache.update(new, -new, 0)
    assert key is new and cache.lengths() == [1, 0]


def test_reorder_moves_row_indices_and_own_tokens():
    cache = _shared(torch.randn(2, 3, 5, 4))
    new = torch.randn(3, 3, 1, 4)
    cache.extend_valid(0, torch.tensor([[True], [False], [True]]))
    cache.update(new, -new, 0)
    cache.reorder(torch.tensor([2, 2, 1]))
    assert torch.equal(cache.keys[0], new[[2, 2, 1]]) and cache.valid[0][:, 0].tolist() == [True, True, False]
    for layer in range(2):
        prefix = cache.shared_prefix(layer)
        assert prefix.rows.tolist() == [1, 1, 0]
        assert prefix.valid.tolist() == [[True, True, True, False, True]] * 2 + [[True, True, True, True, False]]


def test_an_unshared_cache_has_no_prefix():
    cache = LayeredKVCache(1)
    cache.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), 0)
    assert cache.shared_prefix(0) is None and cache.lengths() == [2]
