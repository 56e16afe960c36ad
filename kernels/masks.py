"""Structured attention masks that run both in torch (the reference) and inside the Triton kernel.

A Python ``mask_mod`` cannot run inside a Triton kernel, so a mask that the kernel should apply is a
:class:`TritonMask`: two implementations of the same tiny function of ``(b, h, q_idx, kv_idx)`` in the spirit of
FlexAttention's ``mask_mod``, plus integer parameters per batch row.

* ``torch_fn(b, h, q_idx, kv_idx, params)`` gets broadcastable index tensors (as :func:`allowed_mask` builds them)
  and ``params`` already gathered for each ``b`` (shape ``b.shape + (P,)``). Calling the mask object runs it, so a
  :class:`TritonMask` is an ordinary ``MaskMod`` for :func:`~vlmkit.kernels.attention_reference`.
* ``triton_fn(b, h, q_idx, kv_idx, params)`` is a ``triton.jit`` function compiled into the kernel as a
  ``tl.constexpr``: ``q_idx`` is a ``[BLOCK_M, 1]`` and ``kv_idx`` a ``[1, BLOCK_N]`` block of key indices, ``h`` the
  query head (a scalar, or a ``[BLOCK_M, 1]`` block when the kernel packs the heads of a GQA group), and ``params``
  a pointer to batch row ``b``'s ``P`` int32 parameters (read them with ``tl.load(params + j)``). It is named as
  ``"module:function"`` and imported when the kernel first needs it, so building a mask never imports Triton (the
  CPU path and platforms without Triton work); a ``triton.jit`` object is accepted too.

Indices follow the reference's convention: ``q_idx`` is the query's key index (bottom-right aligned).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TritonMask:
    """A ``mask_mod`` with a torch and a Triton implementation (see the module docstring)."""

    torch_fn: Callable[..., torch.Tensor]
    triton_fn: object  # "package.module:function" naming a triton.jit function, or the function itself
    params: torch.Tensor  # int32 [B or 1, P]: row b's parameters
    includes_causal: bool = False  # the mask already encodes the causal structure it wants: call with causal=False

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        rows = torch.clamp(b, max=self.params.shape[0] - 1)  # a single parameter row serves every batch row
        return self.torch_fn(b, h, q_idx, kv_idx, self.params.to(b.device)[rows])

    def jit_function(self):
        """The Triton implementation (imported on first use when given by name)."""
        if not isinstance(self.triton_fn, str):
            return self.triton_fn
        module, name = self.triton_fn.split(":")
        return getattr(importlib.import_module(module), name)


def concentric_causal_mask(visual_start: int | torch.Tensor, grid_side: int | torch.Tensor = 24) -> TritonMask:
    """CCA's concentric causal mask (decoders.md §3(a)4) over a ``grid_side × grid_side`` block of visual tokens.

    The visual block of batch row ``b`` occupies key indices ``visual_start[b] .. visual_start[b] + grid_side²``
    (raster order). A visual query attends to a visual key iff the key's ring ``ρ = min(r, c, S-1-r, S-1-c)`` is at
    most the query's (the outer border is ring 0): rings are bidirectional inside, inner rings see outer ones. Every
    other (query, key) pair is causal, so visual queries see the whole prefix and later text sees every visual token.
    The mask includes causality: call the attention with ``causal=False``. ``grid_side`` 0 marks a row without image.
    """
    start = torch.as_tensor(visual_start, dtype=torch.int32).reshape(-1, 1)
    side = torch.as_tensor(grid_side, dtype=torch.int32).reshape(-1, 1)
    start, side = torch.broadcast_tensors(start, side)
    params = torch.cat([start, side], dim=1).contiguous()
    return TritonMask(_concentric_torch, "vlmkit.kernels.attention_kernels:concentric_mask", params, True)


def _concentric_torch(b, h, q_idx, kv_idx, params):
    start, side = params[..., 0], params[..., 1]

    def ring(idx):  # (inside the visual block, ring index)
        local = idx - start
        inside = (local >= 0) & (local < side * side)
        width = side.clamp(min=1)
        r, c = local // width, local % width
        return inside, torch.minimum(torch.minimum(r, c), torch.minimum(side - 1 - r, side - 1 - c))

    q_in, q_ring = ring(q_idx)
    k_in, k_ring = ring(kv_idx)
    return torch.where(q_in & k_in, k_ring <= q_ring, kv_idx <= q_idx)


def ring_table_mask(rings: torch.Tensor) -> TritonMask:
    """The concentric causal mask from a per-key ring table ``[B, Lk]`` (-1 for keys that are not visual).

    The general form of :func:`concentric_causal_mask`: any grid shape, pruned images (each kept token keeps its
    ring), one table per batch row. Visual pairs follow the rings (``ρ(key) <= ρ(query)``), every other pair is
    causal; call the attention with ``causal=False``. The table must cover all ``Lk`` keys of the call.
    """
    rings = rings.to(torch.int32)
    length = torch.full((rings.shape[0], 1), rings.shape[1], dtype=torch.int32, device=rings.device)
    params = torch.cat([length, rings], dim=1).contiguous()  # (Lk, ring of key 0, ring of key 1, ...)
    return TritonMask(_ring_table_torch, "vlmkit.kernels.attention_kernels:ring_table_mask", params, True)


def _ring_table_torch(b, h, q_idx, kv_idx, params):
    q_ring, k_ring = _per_key_lookup(params, q_idx), _per_key_lookup(params, kv_idx)
    return torch.where((q_ring >= 0) & (k_ring >= 0), k_ring <= q_ring, kv_idx <= q_idx)


def segment_mask(segments: torch.Tensor) -> TritonMask:
    """Several prompts that share a prefix, packed as one sequence: ``[prefix, rest 1, rest 2, ...]``.

    ``segments [B, Lk]`` gives each key's segment: 0 for the shared prefix, a positive id for each rest. A query sees
    the prefix and its own segment (causality is the caller's: call the attention with ``causal=True``), so every
    rest's hidden states are those of ``prefix + rest`` as a prompt of its own. The table must cover all ``Lk`` keys
    of the call.
    """
    segments = segments.to(torch.int32)
    length = torch.full((segments.shape[0], 1), segments.shape[1], dtype=torch.int32, device=segments.device)
    params = torch.cat([length, segments], dim=1).contiguous()  # (Lk, segment of key 0, segment of key 1, ...)
    return TritonMask(_segment_torch, "vlmkit.kernels.attention_kernels:segment_mask", params)


def _segment_torch(b, h, q_idx, kv_idx, params):
    key_segment = _per_key_lookup(params, kv_idx)
    return (key_segment == 0) | (key_segment == _per_key_lookup(params, q_idx))


def _per_key_lookup(params: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The table entry (``params[..., 1:]``, one per key) of each key index in ``idx``."""
    return torch.take_along_dim(params[..., 1:], idx.unsqueeze(-1).long(), dim=-1).squeeze(-1)
