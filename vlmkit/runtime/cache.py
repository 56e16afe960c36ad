"""A KV cache whose layers may hold different numbers of tokens (tokens dropped after layer k)."""

from __future__ import annotations

import torch


class LayeredKVCache:
    """Keys, values and key validity per layer.

    It implements the one method transformers' attention layers call, ``update(key, value, layer_idx)``. Layer ``l``
    keeps every token it has seen; after a pruner drops tokens at layer ``k``, only layers ``> k`` see (and store)
    the shorter sequence. ``valid[l]`` marks each layer's real keys (False for left padding).
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers

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

    def reorder(self, index: torch.Tensor) -> None:
        """Select (and repeat) batch rows, for beam search."""
        for store in (self.keys, self.values, self.valid):
            for layer, tensor in enumerate(store):
                if tensor is not None:
                    store[layer] = tensor.index_select(0, index)

    def lengths(self) -> list[int]:
        return [0 if k is None else k.shape[-2] for k in self.keys]
