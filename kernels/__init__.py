"""Attention kernels: the torch reference (``attention_reference``) and the transformers registration."""

from vlmkit.kernels.interface import IMPLEMENTATION, LayerAttention, register
from vlmkit.kernels.reference import AttentionStats, attention_reference

__all__ = ["IMPLEMENTATION", "AttentionStats", "LayerAttention", "attention_reference", "register"]
