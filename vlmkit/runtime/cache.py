"""A KV cache whose layers may hold different numbers of tokens (tokens dropped after layer k)."""

from __future__ import annotations

import torch


class LayeredKVCache:
    """Keys, values and key validity per layer.

    It implements the one method transformers' attention layers call, ``update(key, value, layer_idx)``. Layer ``l``
    keeps every token it has seen; after a pruner drops tokens at layer ``k``, only layers ``> k`` see (and store)
    the shorter sequence. ``valid[l]`` marks each layer's real keys (False for left padding).

    ``keys[l]`` and ``values[l]`` always hold exactly the stored tokens. By default each update concatenates, which
    copies the layer's cache; after ``reorder(..., room=n)`` they are the front of buffers with ``n`` spare slots
    that later updates fill in place (a large batch's shared prefixes then are not copied again on every step).
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        stored = self.keys[layer_idx]
        if stored is not None:
            length, end = stored.shape[-2], stored.shape[-2] + key.shape[-2]
            if self._spare(layer_idx) >= key.shape[-2]:
                key_buffer, value_buffer = self._buffers[layer_idx]
                key_buffer[..., length:end, :].copy_(key)
                value_buffer[..., length:end, :].copy_(value)
                key, value = key_buffer[..., :end, :], value_buffer[..., :end, :]
            else:
                key = torch.cat([stored, key], dim=-2)
                value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def _spare(self, layer: int) -> int:
        """Free slots behind the layer's stored tokens: 0 unless ``keys[l]`` and ``values[l]`` are still the front of
        the layer's buffers (a method that replaced them with other tensors gets concatenation)."""
        buffers = self._buffers[layer]
        if buffers is None:
            return 0
        for stored, buffer in zip((self.keys[layer], self.values[layer]), buffers):
            if stored.data_ptr() != buffer.data_ptr() or stored.stride() != buffer.stride() \
                    or stored.shape[:-2] != buffer.shape[:-2]:
                return 0
        return buffers[0].shape[-2] - self.keys[layer].shape[-2]

    def extend_valid(self, layer_idx: int, valid: torch.Tensor) -> torch.Tensor:
        """Append the validity of the tokens this layer is about to store; return the layer's full key validity."""
        previous = self.valid[layer_idx]
        self.valid[layer_idx] = valid if previous is None else torch.cat([previous, valid], dim=1)
        return self.valid[layer_idx]

    def reorder(self, index: torch.Tensor, room: int = 0) -> None:
        """Select (and repeat) batch rows, for beam search and shared prefixes; with ``room``, allocate that many
        spare token slots per layer behind the selected rows (spare slots a layer already had are kept)."""
        runs = _runs(index.tolist()) if room or any(self._buffers) else []  # rows copied into spare room
        for layer, (key, value) in enumerate(zip(self.keys, self.values)):
            if key is None:
                continue
            self.valid[layer] = self.valid[layer].index_select(0, index)
            spare = max(room, self._spare(layer))
            if not spare:
                self.keys[layer], self.values[layer] = key.index_select(0, index), value.index_select(0, index)
                continue
            length = key.shape[-2]
            buffers = tuple(t.new_empty(len(index), *t.shape[1:-2], length + spare, t.shape[-1]) for t in (key, value))
            for tensor, buffer in zip((key, value), buffers):
                for start, stop, source in runs:  # one broadcast copy per run of a source row: bandwidth-bound
                    rows = tensor[source:source + 1].expand(stop - start, *tensor.shape[1:])
                    buffer[start:stop, ..., :length, :].copy_(rows)
            self._buffers[layer] = buffers
            self.keys[layer], self.values[layer] = (buffer[..., :length, :] for buffer in buffers)

    def lengths(self) -> list[int]:
        return [0 if k is None else k.shape[-2] for k in self.keys]


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """``(start, stop, source)`` for each run of equal consecutive entries of ``index``."""
    runs: list[tuple[int, int, int]] = []
    for row, source in enumerate(index):
        if runs and runs[-1][2] == source:
            runs[-1] = (runs[-1][0], row + 1, source)
        else:
            runs.append((row, row + 1, source))
    return runs
