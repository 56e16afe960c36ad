"""Attention kernels: the fused Triton kernel (``attention``), the torch reference (``attention_reference``),
structured masks for both (``TritonMask``) and the transformers registration; plus ``selection``, the greedy
max-min token picks of DivPrune and ZOO-Prune in one Triton program."""

if __name__ != "vlmkit.kernels":
    # Imported as a top-level ``kernels`` because a source checkout is on sys.path (``python -m pytest`` in the repo
    # root). Stay inert and report an unusable version, so transformers' probe for the hub ``kernels`` package moves on.
    __version__ = "0"
else:
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
