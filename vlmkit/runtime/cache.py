"""A KV cache whose layers may hold different numbers of tokens (tokens dropped after layer k), optionally after a
prompt prefix that groups of rows share."""

from __future__ import annotations

import torch

from vlmkit.kernels.interface import PrefixGroups, SharedKeys


class LayeredKVCache:
    """Keys, values and key validity per layer.

    It implements the one method transformers' attention layers call, ``update(key, value, layer_idx)``. Layer ``l``
    keeps every token it has seen; after a pruner drops tokens at layer ``k``, only layers ``> k`` see (and store)
    the shorter sequence. ``valid[l]`` marks each layer's real keys (False for left padding).

    After :meth:`share_as_prefix`, the tokens cached so far become a prefix that groups of rows share (one copy per
    group); each row's own keys follow in ``keys``, and attention reads both (``prefix_at``).
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers
        self.prefix: list[SharedKeys] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def extend_valid(self, layer_idx: int, valid: torch.Tensor) -> torch.Tensor:
        """Append the validity of the tokens this layer is about to store; return the layer's full key validity."""
        previous = self.valid[layer_idx]
        self.valid[layer_idx] = valid if previous is None else torch.cat([previous, valid], dim=1)
        return self.valid[layer_idx]

    def share_as_prefix(self, rows: torch.Tensor) -> None:
        """Turn the cached rows into shared prefixes: row ``i`` of the batch continues cached row ``rows[i]``."""
        groups = PrefixGroups.of(rows)
        self.prefix = [SharedKeys(k, v, m, groups) for k, v, m in zip(self.keys, self.values, self.valid)]
        self.keys, self.values, self.valid = ([None] * len(self.prefix) for _ in range(3))

    def prefix_at(self, layer_idx: int) -> SharedKeys | None:
        return None if self.prefix is None else self.prefix[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        """Select (and repeat) batch rows, for beam search."""
        for store in (self.keys, self.values, self.valid):
            for layer, tensor in enumerate(store):
                if tensor is not None:
                    store[layer] = tensor.index_select(0, index)
        if self.prefix is not None:
            groups = PrefixGroups.of(self.prefix[0].groups.rows.index_select(0, index))
            for shared in self.prefix:
                shared.groups = groups

    def without_prefix(self) -> LayeredKVCache:
        """The same cache with each row's copy of its prefix in front of its own keys (for the static decoder)."""
        if self.prefix is None:
            return self
        flat = LayeredKVCache(len(self.keys))
        for layer, shared in enumerate(self.prefix):
            rows = shared.groups.rows
            flat.keys[layer] = torch.cat([shared.keys.index_select(0, rows), self.keys[layer]], dim=-2)
            flat.values[layer] = torch.cat([shared.values.index_select(0, rows), self.values[layer]], dim=-2)
            flat.valid[layer] = torch.cat([shared.valid.index_select(0, rows), self.valid[layer]], dim=1)
        return flat

    def lengths(self) -> list[int]:
        return [0 if k is None else k.shape[-2] for k in self.keys]
