"""The ``"vlmkit"`` attention implementation, registered with transformers' AttentionInterface.

The runtime sets it on the language model only (``model.set_attn_implementation({"text_config": "vlmkit"})``); the
vision tower keeps its own implementation. For each layer call, the runtime passes a :class:`LayerAttention` through
the decoder layer's ``**kwargs`` (keyword ``vlmkit_attention``): key padding, logit biases and gains, a ``mask_mod``
and the statistics it wants. The function writes the statistics back into that object. Without one (a plain HF
forward or ``generate``), it behaves like sdpa with the mask transformers built.

Backends for a call with a :class:`LayerAttention` (``backend="auto"``): CUDA tensors go to the fused Triton kernel
(:func:`vlmkit.kernels.attention`), prefill and decode alike. Its split-KV decode gives the same bits whether or not
masked slots follow the real keys, so the static decode cache (``vlmkit.runtime.static_decode``) decodes the tokens
of the dynamic one. On the CPU, or for a ``mask_mod`` that is a plain callable rather than a
:class:`~vlmkit.kernels.masks.TritonMask`, statistics, masks and gains use the torch reference and plain calls use
sdpa. A call with a ``probs_mod`` (an edit of the probabilities) always runs on the torch reference. A mask that
``includes_causal`` (CCA's) replaces the causal mask instead of narrowing it.

A call may carry a :class:`SharedPrefix`: keys that several rows share and read before their own (rows that ask
about the same image, ``vlmkit.runtime.cache``). Decode steps on CUDA read them in place
(:func:`~vlmkit.kernels.attention.shared_prefix_attention`); other calls join them to the row's own keys first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vlmkit.kernels.attention import FEW_QUERIES, shared_prefix_attention
from vlmkit.kernels.attention import attention as fused_attention
from vlmkit.kernels.masks import TritonMask
from vlmkit.kernels.packed_vision import PACKED_VISION_IMPLEMENTATION, packed_attention
from vlmkit.kernels.reference import AttentionStats, MaskMod, ProbsMod, allowed_mask, attention_reference

IMPLEMENTATION = "vlmkit"


@dataclass
class SharedPrefix:
    """One layer's keys of prefixes that several batch rows share (image-prefix reuse): row ``b`` attends to
    ``keys[rows[b]]`` where ``valid[b]``, then to its own keys (the layer call's ``key``/``value``)."""

    keys: torch.Tensor  # [G, Hkv, Lp, D]
    values: torch.Tensor  # [G, Hkv, Lp, D]
    rows: torch.Tensor  # [B] long: each batch row's prefix
    valid: torch.Tensor  # [B, Lp] bool: the prefix keys each row sees

    def joined(self, key: torch.Tensor, value: torch.Tensor,
               key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's prefix and own keys, values and validity as one sequence (the reference path)."""
        return (torch.cat([self.keys[self.rows], key], dim=2), torch.cat([self.values[self.rows], value], dim=2),
                torch.cat([self.valid, key_valid.to(self.valid.device)], dim=1))


@dataclass
class LayerAttention:
    """What the runtime asks of one layer's attention call, and what comes back (``stats``)."""

    key_valid: torch.Tensor  # [B, Lk] bool, False for padding or dropped slots
    key_bias: torch.Tensor | None = None  # [B or 1, Hq or 1, Lk] added to every query row's logits
    key_abs_gain: torch.Tensor | None = None  # [B or 1, Hq or 1, Lk]: every row's logit s -> s + g|s| (before bias)
    mask_mod: MaskMod | None = None  # (b, h, q_idx, kv_idx) -> bool, q_idx in key-index space
    probs_mod: ProbsMod | None = None  # edits the probabilities [B, Hq, Lq, Lk]: torch reference path only
    mass_queries: torch.Tensor | tuple[int, int] | None = None  # rows whose softmax mass is summed per key
    backend: str = "auto"  # "auto": fastest available path; "reference": always the torch reference
    prefix: SharedPrefix | None = None  # keys before the call's own, shared with other rows (plain attention only)
    stats: AttentionStats | None = field(default=None, repr=False)

    @property
    def needs_statistics(self) -> bool:
        return self.mass_queries is not None

    @property
    def only_statistics(self) -> bool:
        """Key validity and at most statistics: no bias, gain, mask or probability edit."""
        return self.key_bias is None and self.key_abs_gain is None and self.mask_mod is None \
            and self.probs_mod is None

    @property
    def is_plain(self) -> bool:
        """Only key validity: no bias, gain, mask, probability edit or statistics."""
        return self.only_statistics and self.mass_queries is None

    def to(self, device: torch.device) -> None:
        self.key_valid = self.key_valid.to(device)
        if self.key_bias is not None:
            self.key_bias = self.key_bias.to(device)
        if self.key_abs_gain is not None:
            self.key_abs_gain = self.key_abs_gain.to(device)
        if isinstance(self.mass_queries, torch.Tensor):
            self.mass_queries = self.mass_queries.to(device)
        if self.prefix is not None:
            self.prefix = dataclasses.replace(self.prefix, rows=self.prefix.rows.to(device),
                                              valid=self.prefix.valid.to(device))


@torch.compiler.disable  # host-side dispatch and Triton launches: a compiled layer calls it outside its graphs
def vlmkit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    vlmkit_attention: LayerAttention | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q ``[B,Hq,Lq,D]``, k/v ``[B,Hkv,Lk,D]`` -> ``[B,Lq,Hq,D]``."""
    call = vlmkit_attention
    if call is None:
        return _sdpa(query, key, value, _hf_mask(attention_mask, query, key), scaling), None
    call.to(query.device)  # layers spread over GPUs (device_map="auto") each get their own copy of the request
    if call.prefix is not None:
        return _with_prefix(call, query, key, value, scaling), None
    causal = not getattr(call.mask_mod, "includes_causal", False)
    if call.backend == "auto" and call.probs_mod is None and _triton_can_run(query, call.mask_mod):
        out, call.stats = fused_attention(
            query, key, value, causal=causal, scale=scaling, key_bias=call.key_bias, key_abs_gain=call.key_abs_gain,
            mask_mod=call.mask_mod, key_valid=call.key_valid, mass_queries=call.mass_queries,
        )
        return out, None
    if call.backend == "reference" or call.needs_statistics or call.mask_mod is not None \
            or call.key_abs_gain is not None or call.probs_mod is not None:  # sdpa cannot scale logits
        out, call.stats = attention_reference(
            query, key, value, causal=causal, scale=scaling, key_bias=call.key_bias, key_abs_gain=call.key_abs_gain,
            mask_mod=call.mask_mod, key_valid=call.key_valid, mass_queries=call.mass_queries,
            probs_mod=call.probs_mod,
        )
        return out, None
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    allowed = allowed_mask(
        batch, 1, q_len, k_len, causal=True, key_valid=call.key_valid, mask_mod=None, device=query.device
    )
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding query rows: any finite output will do
    mask = allowed
    if call.key_bias is not None:
        bias = call.key_bias.to(query.dtype).unsqueeze(-2)
        mask = torch.where(allowed, bias, torch.finfo(query.dtype).min)
    return _sdpa(query, key, value, mask, scaling), None


def _with_prefix(call: LayerAttention, query, key, value, scaling) -> torch.Tensor:
    """Attention over a shared prefix and the call's own keys: the shared-prefix kernel for a few queries on CUDA,
    else the joined sequence through this function's other paths."""
    prefix = call.prefix
    if not call.is_plain:
        raise ValueError("attention over a shared prefix takes key validity only (no bias, gain, mask or statistics)")
    if call.backend == "auto" and query.shape[2] <= FEW_QUERIES and _triton_can_run(query, None):
        out, call.stats = shared_prefix_attention(query, key, value, prefix.keys, prefix.values, prefix.rows,
                                                  key_valid=call.key_valid, prefix_valid=prefix.valid, scale=scaling)
        return out
    key, value, key_valid = prefix.joined(key, value, call.key_valid)
    joined = dataclasses.replace(call, key_valid=key_valid, prefix=None)
    out, _ = vlmkit_attention(None, query, key, value, None, scaling, vlmkit_attention=joined)
    call.stats = joined.stats
    return out


def _triton_can_run(query: torch.Tensor, mask_mod: MaskMod | None) -> bool:
    """The Triton kernel handles this call: CUDA, a supported head dim and dtype, and a mask it can compile."""
    return (
        query.is_cuda
        and query.shape[-1] <= 128 and query.shape[-1] % 8 == 0
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (mask_mod is None or isinstance(mask_mod, TritonMask))
    )


def _sdpa(query, key, value, mask, scaling) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=False, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def _hf_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return allowed_mask(1, 1, query.shape[2], key.shape[2], causal=True, key_valid=None, mask_mod=None,
                            device=query.device)
    return attention_mask[:, :, :, : key.shape[2]]


def register() -> None:
    """Register vlmkit's attention implementations with transformers (idempotent): ``"vlmkit"`` for language models
    and ``"vlmkit_flash_packed"`` for vision towers (``packed_vision.py``)."""
    AttentionInterface.register(IMPLEMENTATION, vlmkit_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(PACKED_VISION_IMPLEMENTATION, packed_attention)
