"""Plain-torch attention with statistics: the oracle for the Triton kernel and the CPU path of the runtime.

Conventions shared with :func:`vlmkit.kernels.attention`:

* ``q`` is ``[B, Hq, Lq, D]``; ``k`` and ``v`` are ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
* Queries are the *last* ``Lq`` positions of the ``Lk`` keys (bottom-right causal alignment, as in FlashAttention),
  so query row ``i`` sits at key index ``Lk - Lq + i``. ``mask_mod`` receives that absolute index as ``q_idx``.
* ``key_valid [B, Lk]`` marks real keys (False for padding). Rows whose query is padding are computed but meaningless.
* ``key_abs_gain [B or 1, Hq or 1, Lk]`` scales each key's scaled logit ``s`` to ``s + g * |s|`` (PAI's image
  attention excitation), before ``key_bias`` is added. The map is 1-homogeneous, so it commutes with the positive
  logit scale (the kernel applies it to base-2 logits).
* ``mass_queries`` selects which query rows contribute to ``key_mass``: a ``(start, end)`` pair of query-row indices,
  or a ``[B, Lq]`` 0/1 (or weight) tensor. ``mass_keys`` is a ``(start, end)`` pair of key indices (default: all).
* The output is ``[B, Lq, Hq, D]``, the layout transformers' attention functions return.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ProbsMod = Callable[[torch.Tensor], torch.Tensor]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttentionStats:
    """Side outputs of one attention call."""

    lse: torch.Tensor  # [B, Hq, Lq] row log-sum-exp of the (scaled, biased, masked) logits, float32
    key_mass: torch.Tensor | None = None  # [B, Hq, ke - ks] summed softmax probability per key, float32


def allowed_mask(
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_valid: torch.Tensor | None,
    mask_mod: MaskMod | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean ``[B or 1, H or 1, Lq, Lk]`` mask of the logits that take part in the softmax."""
    q_idx = torch.arange(k_len - q_len, k_len, device=device).view(1, 1, q_len, 1)
    kv_idx = torch.arange(k_len, device=device).view(1, 1, 1, k_len)
    allowed = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (kv_idx <= q_idx)
    if key_valid is not None:
        allowed = allowed & key_valid.view(batch, 1, 1, k_len).bool()
    if mask_mod is not None:
        b_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        h_idx = torch.arange(heads, device=device).view(1, heads, 1, 1)
        allowed = allowed & mask_mod(b_idx, h_idx, q_idx, kv_idx)
    return allowed


def query_weights(mass_queries, batch: int, q_len: int, device: torch.device) -> torch.Tensor:
    """``mass_queries`` as a float ``[B, Lq]`` weight matrix."""
    if isinstance(mass_queries, torch.Tensor):
        return mass_queries.to(device=device, dtype=torch.float32).expand(batch, q_len)
    start, end = mass_queries
    weights = torch.zeros(batch, q_len, device=device)
    weights[:, start:end] = 1.0
    return weights


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    mask_mod: MaskMod | None = None,
    key_valid: torch.Tensor | None = None,
    mass_queries=None,
    mass_keys: tuple[int, int] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    key_abs_gain: torch.Tensor | None = None,
    probs_mod: ProbsMod | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention by the definition: materialise the logits in ``compute_dtype`` (float64 for the test oracle).
    ``probs_mod`` edits the softmax probabilities ``[B, Hq, Lq, Lk]`` before they weigh the values (and the key
    mass); it exists only here, as the torch path's escape hatch for post-softmax methods."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = q_heads // kv_heads
    qf = q.to(compute_dtype).view(batch, kv_heads, group, q_len, head_dim)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", qf, k.to(compute_dtype)).reshape(batch, q_heads, q_len, k_len) * scale
    if key_abs_gain is not None:
        gain = key_abs_gain.to(compute_dtype).view(key_abs_gain.shape[0], key_abs_gain.shape[1], 1, k_len)
        logits = logits + gain * logits.abs()
    if key_bias is not None:
        logits = logits + key_bias.to(compute_dtype).view(key_bias.shape[0], key_bias.shape[1], 1, k_len)
    allowed = allowed_mask(
        batch, q_heads, q_len, k_len, causal=causal, key_valid=key_valid, mask_mod=mask_mod, device=q.device
    )
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)  # fully masked rows give zeros, not NaN
    if probs_mod is not None:
        probs = probs_mod(probs)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs.view(batch, kv_heads, group, q_len, k_len), v.to(compute_dtype))
    out = out.reshape(batch, q_heads, q_len, head_dim).transpose(1, 2).to(q.dtype)
    key_mass = None
    if mass_queries is not None:
        weights = query_weights(mass_queries, batch, q_len, q.device).to(compute_dtype)
        ks, ke = mass_keys if mass_keys is not None else (0, k_len)
        key_mass = torch.einsum("bq,bhqk->bhk", weights, probs[..., ks:ke]).float()
    return out, AttentionStats(lse=lse.float(), key_mass=key_mass)
