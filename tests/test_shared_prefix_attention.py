"""Cascade attention over a shared prefix (one cached copy per group of rows) equals attention over each row's own
copy of the prefix followed by its keys; the float64 torch reference over the concatenated keys is the oracle. On a
GPU the Triton kernel runs it too."""

from __future__ import annotations

import pytest
import torch

from vlmkit.kernels import LayerAttention, attention_reference
from vlmkit.kernels.interface import PrefixGroups, SharedKeys, vlmkit_attention
from vlmkit.runtime.cache import LayeredKVCache

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_prefix_groups_list_each_groups_rows():
    groups = PrefixGroups.of(torch.tensor([0, 0, 1, 0, 1, 2]))
    assert groups.members.tolist() == [[0, 1, 3], [2, 4, 4], [5, 5, 5]]  # padded with the group's last row
    assert groups.slots.tolist() == [0, 1, 0, 2, 1, 0]
    assert all(groups.members[g, s] == row for row, (g, s) in enumerate(zip(groups.rows, groups.slots)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len", [1, 5])  # a decode step; a prefill of the rows' own tokens
def test_attention_after_a_shared_prefix_equals_attention_over_each_rows_copy(device, q_len):
    generator = torch.Generator().manual_seed(q_len)
    rows = torch.tensor([0, 1, 0, 0, 1])  # two prefixes, continued by 3 and 2 rows
    batch, q_heads, kv_heads, head_dim, prefix_len, own_len = 5, 4, 2, 32, 9, q_len + 3
    dtype = torch.float64 if device == "cpu" else torch.float32  # the kernel takes up to fp32

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query, key, value = randn(batch, q_heads, q_len, head_dim), randn(batch, kv_heads, own_len, head_dim), \
        randn(batch, kv_heads, own_len, head_dim)
    prefix_keys, prefix_values = randn(2, kv_heads, prefix_len, head_dim), randn(2, kv_heads, prefix_len, head_dim)
    prefix_valid = torch.ones(2, prefix_len, dtype=torch.bool)
    prefix_valid[1, :3] = False  # the second prefix is shorter (left padding)
    own_valid = torch.ones(batch, own_len, dtype=torch.bool)
    own_valid[[1, 3], 0] = False  # rows with a shorter continuation; their first query row sees only the prefix

    def on(x):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    call = LayerAttention(key_valid=on(own_valid), prefix=SharedKeys(
        on(prefix_keys), on(prefix_values), on(prefix_valid), PrefixGroups.of(on(rows))))
    out, _ = vlmkit_attention(None, on(query), on(key), on(value), None, scaling=0.3, vlmkit_attention=call)

    expected, _ = attention_reference(
        query, torch.cat([prefix_keys[rows], key], dim=2), torch.cat([prefix_values[rows], value], dim=2),
        causal=True, scale=0.3, key_valid=torch.cat([prefix_valid[rows], own_valid], dim=1))
    tolerance = 1e-6 if dtype == torch.float64 else 2e-5  # the merge weights come from float32 log-sum-exps
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tolerance, atol=tolerance)


def test_cache_follows_beams_and_expands_its_prefix():
    cache = LayeredKVCache(1)
    cache.update(torch.arange(2.0).view(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), 0)
    cache.extend_valid(0, torch.ones(2, 1, dtype=torch.bool))
    cache.share_as_prefix(torch.tensor([0, 0, 1]))
    cache.update(torch.full((3, 1, 1, 1), 5.0), torch.zeros(3, 1, 1, 1), 0)
    cache.extend_valid(0, torch.ones(3, 1, dtype=torch.bool))
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.prefix_at(0).groups.rows.tolist() == [1, 1, 0]
    flat = cache.without_prefix()
    assert flat.keys[0].flatten().tolist() == [1.0, 5.0, 1.0, 5.0, 0.0, 5.0]
    assert flat.prefix is None and flat.lengths() == [2]
