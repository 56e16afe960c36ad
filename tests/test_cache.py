"""The layered KV cache: rows selected with spare room are filled in place and hold what concatenation holds."""

from __future__ import annotations

import torch

from vlmkit.runtime.cache import LayeredKVCache


def _filled(prompt: torch.Tensor, room: int) -> LayeredKVCache:
    """Two layers holding ``prompt`` (2 rows of 5 tokens), then rows 1, 0, 1 selected with ``room`` spare slots."""
    cache = LayeredKVCache(2)
    for layer in range(2):
        cache.extend_valid(layer, torch.ones(2, 5, dtype=torch.bool))
        cache.update(prompt, -prompt, layer)
    cache.reorder(torch.tensor([1, 0, 1]), room=room)
    return cache


def test_room_is_filled_in_place_with_what_concatenation_gives():
    prompt = torch.randn(2, 3, 5, 4)
    roomy, plain = _filled(prompt, room=4), _filled(prompt, room=0)
    start = roomy.keys[0].data_ptr()
    for step in range(6):  # 4 slots of room, then 2 more: concatenation again
        new = torch.randn(3, 3, 1, 4)
        for cache in (roomy, plain):
            key, value = cache.update(new, -new, 0)
            assert key.shape[-2] == 5 + step + 1
        assert torch.equal(roomy.keys[0], plain.keys[0]) and torch.equal(roomy.values[0], plain.values[0])
        assert (roomy.keys[0].data_ptr() == start) == (step < 4)
    assert torch.equal(roomy.keys[0][:, :, :5], prompt[[1, 0, 1]])


def test_replaced_tensors_get_concatenation_and_reorder_keeps_room():
    prompt = torch.randn(2, 3, 5, 4)
    cache = _filled(prompt, room=3)
    cache.keys[1], cache.values[1] = cache.keys[1].clone(), cache.values[1].clone()  # a method swapped them
    key, _ = cache.update(torch.zeros(3, 3, 1, 4), torch.zeros(3, 3, 1, 4), 1)
    assert key.shape[-2] == 6 and torch.equal(key[:, :, :5], prompt[[1, 0, 1]])
    cache.reorder(torch.tensor([2, 1]))  # beam search: layer 0 keeps its spare slots
    start = cache.keys[0].data_ptr()
    cache.update(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), 0)
    assert cache.keys[0].data_ptr() == start and cache.lengths() == [6, 6]
