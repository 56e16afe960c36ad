"""A KV cache whose layers may hold different numbers of tokens (tokens dropped after layer k)."""

from __future__ import annotations

import dataclasses

import torch

from vlmkit.kernels.interface import SharedPrefix


class LayeredKVCache:
    """Keys, values and key validity per layer.

    It implements the one method transformers' attention layers call, ``update(key, value, layer_idx)``. Layer ``l``
    keeps every token it has seen; after a pruner drops tokens at layer ``k``, only layers ``> k`` see (and store)
    the shorter sequence. ``valid[l]`` marks each layer's real keys (False for left padding).

    After :meth:`share_prefix`, what the cache held becomes prefixes that several rows share: each layer's attention
    call then gets the layer's :class:`~vlmkit.kernels.interface.SharedPrefix` (:meth:`shared_prefix`), and
    ``keys``/``values``/``valid`` hold only each row's own tokens after it.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers
        self.prefixes: list[SharedPrefix] | None = None

    @torch.compiler.disable  # a compiled layer (Engine(compile=True)) writes the cache outside its graphs
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        stored = self.keys[layer_idx]
        if stored is not None:
            key = torch.cat([stored, key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def extend_valid(self, layer_idx: int, valid: torch.Tensor) -> torch.Tensor:
        """Append the validity of the tokens this layer is about to store; return the layer's full key validity."""
        previous = self.valid[layer_idx]
        self.valid[layer_idx] = valid if previous is None else torch.cat([previous, valid], dim=1)
        return self.valid[layer_idx]

    def share_prefix(self, rows: torch.Tensor, valid: torch.Tensor) -> None:
        """Turn what the cache holds (``G`` packed sequences) into prefixes shared by ``B`` rows: row ``b`` reads
        sequence ``rows[b]`` where ``valid [B, L]``; every layer must hold the same ``L`` tokens. The rows' own
        tokens start empty."""
        self.prefixes = [SharedPrefix(key, value, rows, valid) for key, value in zip(self.keys, self.values)]
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.valid = [None] * len(self.valid)

    def shared_prefix(self, layer: int) -> SharedPrefix | None:
        return None if self.prefixes is None else self.prefixes[layer]

    @property
    def batch_size(self) -> int:
        return self.prefixes[0].rows.shape[0] if self.prefixes is not None else self.keys[0].shape[0]

    def key_template(self, layer: int) -> torch.Tensor:
        """A tensor with the layer's key heads, head size, dtype and device: its own keys or, before it stores any,
        its shared prefix's."""
        return self.keys[layer] if self.keys[layer] is not None else self.prefixes[layer].keys

    def reorder(self, index: torch.Tensor) -> None:
        """Select (and repeat) batch rows, for beam search; shared prefixes are not copied (only their row index)."""
        for layer, (key, value) in enumerate(zip(self.keys, self.values)):
            if key is not None:
                self.keys[layer], self.values[layer] = key.index_select(0, index), value.index_select(0, index)
                self.valid[layer] = self.valid[layer].index_select(0, index)
        if self.prefixes is not None:
            first = self.prefixes[0]
            rows, valid = first.rows.index_select(0, index), first.valid.index_select(0, index)
            self.prefixes = [dataclasses.replace(prefix, rows=rows, valid=valid) for prefix in self.prefixes]

    def lengths(self) -> list[int]:
        """Each layer's own tokens per row (after the shared prefix, if any)."""
        return [0 if k is None else k.shape[-2] for k in self.keys]
