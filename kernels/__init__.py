"""Attention kernels: the fused Triton kernel (``attention``), the torch reference (``attention_reference``),
structured masks for both (``TritonMask``) and the transformers registration."""

from vlmkit.kernels.attention import attention
from vlmkit.kernels.interface import IMPLEMENTATION, LayerAttention, register
from vlmkit.kernels.masks import TritonMask, concentric_causal_mask, ring_table_mask
from vlmkit.kernels.reference import AttentionStats, attention_reference

__all__ = [
    "IMPLEMENTATION",
    "AttentionStats",
    "LayerAttention",
    "TritonMask",
    "attention",
    "attention_reference",
    "concentric_causal_mask",
    "register",
    "ring_table_mask",
]
