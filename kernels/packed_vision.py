"""``"vlmkit_flash_packed"``: one attention call per layer for vision towers that attend within images or windows.

transformers' Qwen2-VL and Qwen2.5-VL vision attention passes the packed patches of all images with their cumulative
sequence lengths (``cu_seq_lens_q``) only to an implementation whose name contains "flash"; every other one gets a
separate call per image, and in Qwen2.5-VL's window layers per window: thousands of small calls per image, which leave
the ViT host-bound (about 65 ms per 672 x 672 image on an H200). This implementation is registered under a name with
"flash" in it (``interface.register``) and takes the packed call:

* on CUDA in fp16/bf16, torch's variable-length attention (``torch.nn.attention.varlen.varlen_attn``, FlashAttention)
  runs every sequence in one call;
* elsewhere (the CPU, fp32, dropout, a torch without ``varlen_attn``) it makes transformers' own sdpa call per
  sequence, exactly what the sdpa implementation does.

A call without sequence lengths is a plain sdpa call.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None

PACKED_VISION_IMPLEMENTATION = "vlmkit_flash_packed"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, L, D]: every sequence's tokens, one after another
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed sequence (non-causal); returns ``[1, L, H, D]`` like transformers' functions."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout:
        starts = cu_seq_lens_q.to(torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((starts[1:] - starts[:-1]).max())
        packed = [t[0].transpose(0, 1) for t in (query, key, value)]  # [L, H, D]
        return varlen_attn(*packed, starts, starts, longest, longest, scale=scaling).unsqueeze(0), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    splits = [torch.split(t, lengths, dim=2) for t in (query, key, value)]
    outputs = [sdpa_attention_forward(module, q, k, v, None, scaling=scaling, dropout=dropout, is_causal=False)[0]
               for q, k, v in zip(*splits)]
    return torch.cat(outputs, dim=1), None

