"""Fused attention forward with attention statistics, in Triton: ``attention(q, k, v, ...) -> (out, stats)``.

Same function as :func:`vlmkit.kernels.attention_reference` (same arguments, conventions and results, see
``reference.py``), computed FlashAttention-style so that the ``[Lq, Lk]`` attention matrix never exists in memory.
The kernels are in ``attention_kernels.py``; this module chooses their layout and launches them.

Algorithm
---------
1. **Forward** (``attention_fwd_kernel``). A program takes a block of query rows and streams K/V in blocks, keeping
   the running row maximum, the running softmax denominator and the unnormalised output in registers (online
   softmax). It writes the output and the row log-sum-exp (LSE). GQA/MQA: a query head reads KV head
   ``h // (Hq / Hkv)``; K/V are never expanded. Two row layouts:

   * *prefill* (``Lq > 16``): ``BLOCK_M`` consecutive queries of one head per program. Causal programs stop at their
     last row's diagonal, and only the blocks that cross the diagonal pay for element-wise causal masking.
   * *few queries* (decode, ``Lq <= 16``): the rows of all query heads of a GQA group are packed into one block, so
     each K/V tile is loaded once for the group, and the keys are split over several programs (split-KV, as in
     Flash-Decoding) so that a single decode step fills the GPU. Each split writes a partial output and LSE;
     ``combine_splits_kernel`` merges them. Splits are fixed chunks of ``DECODE_KEYS_PER_SPLIT`` keys, so masked
     slots after the real keys (a preallocated decode cache) add exact zeros and leave the result bit for bit
     unchanged: a graph-replayed static-cache step gives the tokens of the dynamic cache.

   *Shared prefixes* (:func:`shared_prefix_attention`, few queries): the same kernel reads K/V row ``kv_rows[b]``
   for batch row ``b``, so rows that share a prefix read one copy of it; the shared keys and the row's own keys are
   splits of one pass, merged by one combine. Key blocks after a row's last valid key are not read.

2. **Key mass** (``key_mass_kernel``, only when ``mass_queries`` is given). The transpose of pass 1: a program owns a
   block of keys and loops over the selected query rows, recomputing ``p = exp(q·k·scale + bias - lse)`` with pass
   1's LSE and summing it (times the row weight) over rows. Memory stays linear in the sequence length, each key's
   sum is owned by one program (no atomics, deterministic), and query blocks of zero weight are skipped, so a
   64-query span costs one extra pass over 64 rows.

Masks
-----
Logits are masked by causality (bottom-right aligned), ``key_valid`` (``[B, Lk]``, e.g. left padding; or
``key_lens``, the number of real keys at the end of each row) and ``mask_mod``. A Python callable cannot run in a
kernel, so ``mask_mod`` must be a :class:`~vlmkit.kernels.masks.TritonMask`: a torch implementation (what the
reference calls) and a ``triton.jit`` function of ``(b, h, q_idx, kv_idx, params)`` that is compiled into the kernel
as a ``tl.constexpr``, FlexAttention-style; :func:`~vlmkit.kernels.masks.concentric_causal_mask` (CCA) is built in.
``key_bias`` (``[B or 1, Hq or 1, Lk]``) is added to the logits, after ``key_abs_gain`` (same shape) turned each
logit ``s`` into ``s + g·|s|``. Rows with no allowed key give output 0 and LSE -inf.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vlmkit.kernels.masks import TritonMask
from vlmkit.kernels.reference import AttentionStats

FEW_QUERIES = 16  # up to this many query rows: packed GQA rows and split-KV (decode, short chunks)
DECODE_KEYS_PER_SPLIT = 256  # split-KV chunk: fixed, so results do not depend on trailing masked keys
MIN_SPLIT_BLOCK = 16  # the combine kernel reduces at least this many split slots (the same tree up to 16 splits)
MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Block shapes by (device kind, bytes per element). 16-bit: from `benchmarks/attention.py --sweep` on an H100 (causal,
# 4 x 4k tokens, d=128: 425/420 TFLOP/s for LLaVA/Qwen heads, within 1% of the best of 7 candidates). The interpreter
# (CPU) uses small blocks so that the tests cover several blocks, both loop stages and ragged ends.
PREFILL_CONFIGS = {
    ("cuda", 2): KernelConfig(128, 64, 8, 3),
    ("cuda", 4): KernelConfig(64, 32, 4, 2),
    ("cpu", 2): KernelConfig(16, 16, 1, 1),
    ("cpu", 4): KernelConfig(16, 16, 1, 1),
}
DECODE_BLOCK_N = {"cuda": 64, "cpu": 16}
KEY_MASS_CONFIGS = {"cuda": KernelConfig(64, 64, 4, 2), "cpu": KernelConfig(16, 16, 1, 1)}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    key_abs_gain: torch.Tensor | None = None,
    mask_mod: TritonMask | None = None,
    key_valid: torch.Tensor | None = None,
    key_lens: torch.Tensor | None = None,
    mass_queries: tuple[int, int] | torch.Tensor | None = None,
    mass_keys: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention with statistics; arguments and results as in :func:`~vlmkit.kernels.attention_reference`.

    ``q [B, Hq, Lq, D]``, ``k``/``v [B, Hkv, Lk, D]`` (bf16, fp16 or fp32; D up to 128, padded to a power of two)
    give ``out [B, Lq, Hq, D]`` (written into ``out`` when given) and ``AttentionStats(lse [B, Hq, Lq],
    key_mass [B, Hq, ke - ks] or None)``. Extra to the reference: ``key_lens [B]`` (real keys per row, left padded;
    combined with ``key_valid``) and ``num_splits`` (split-KV count for the few-queries path; default: chunks of
    ``DECODE_KEYS_PER_SPLIT`` keys).
    """
    from vlmkit.kernels import attention_kernels as kernels  # compiled on first use: `import vlmkit` needs no Triton

    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    _check_inputs(q, k, v, mask_mod)
    group = q_heads // kv_heads
    qk_scale = _qk_scale(head_dim, scale)
    kind = _kind(q)
    block_d = _block_d(head_dim)
    precision = _precision(q)

    if key_lens is not None:
        from_lens = torch.arange(k_len, device=q.device) >= (k_len - key_lens.to(q.device)).view(-1, 1)
        key_valid = from_lens if key_valid is None else key_valid.bool() & from_lens
    masks = _MaskArgs.build(q, key_valid, key_bias, key_abs_gain, mask_mod, batch, q_heads, k_len)
    if out is None:
        out = torch.empty(batch, q_len, q_heads, head_dim, device=q.device, dtype=q.dtype)
    elif out.shape != (batch, q_len, q_heads, head_dim) or out.dtype != q.dtype:
        raise ValueError(f"out must be {(batch, q_len, q_heads, head_dim)} {q.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    lse = torch.empty(batch, q_heads, q_len, device=q.device, dtype=torch.float32)

    layout = _Layout.choose(q, k, num_splits)
    if layout.num_splits == 1:  # the forward writes the final tensors
        _forward(kernels, q, k, v, _Destination.final(out, lse), masks, layout, causal, qk_scale, precision)
    else:
        partial = _Destination.partial(q, layout.num_splits)
        _forward(kernels, q, k, v, partial, masks, layout, causal, qk_scale, precision)
        partial.combine(kernels, out, lse)

    key_mass = None
    if mass_queries is not None:
        key_mass = _key_mass(kernels, q, k, lse, masks, mass_queries, mass_keys, causal, qk_scale, group,
                             block_d, precision, kind)
    return out, AttentionStats(lse=lse, key_mass=key_mass)


def _key_mass(kernels, q, k, lse, masks, mass_queries, mass_keys, causal, qk_scale, group, block_d, precision, kind):
    """Pass 2: per-key probability mass summed over the selected query rows (see the module docstring)."""
    batch, q_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    key_start, key_end, _ = slice(*(mass_keys or (0, k_len))).indices(k_len)
    key_end = max(key_start, key_end)
    if isinstance(mass_queries, torch.Tensor):
        weights = torch.broadcast_to(mass_queries.to(device=q.device, dtype=torch.float32), (batch, q_len))
        q_start, q_end, w_strides = 0, q_len, weights.stride()
    else:
        q_start, q_end, _ = slice(*mass_queries).indices(q_len)
        weights, w_strides = lse, (0, 0)  # unused: rows q_start..q_end weigh 1
    key_mass = torch.empty(batch, q_heads, key_end - key_start, device=q.device, dtype=torch.float32)
    if key_end == key_start:
        return key_mass
    config = KEY_MASS_CONFIGS[kind]
    kernels.key_mass_kernel[(_cdiv(key_end - key_start, config.block_n), batch * q_heads)](
        q, k, lse, weights, masks.valid, masks.bias, masks.gain, masks.params, key_mass,
        *q.stride(), *k.stride(), *w_strides,
        masks.valid_stride, masks.bias_stride_b, masks.bias_stride_h, masks.gain_stride_b, masks.gain_stride_h,
        masks.params_stride, q_heads, q_len, k_len, q_start, q_end, key_start, key_end, qk_scale,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, HAS_WEIGHTS=isinstance(mass_queries, torch.Tensor), HAS_VALID=masks.has_valid,
        HAS_BIAS=masks.has_bias, HAS_GAIN=masks.has_gain, HAS_MASK=masks.fn is not None, MASK_FN=masks.fn,
        PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return key_mass


def shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_rows: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    prefix_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Few-query attention (decode) over a prefix that several batch rows share, then each row's own keys.

    Row ``b`` attends to ``prefix_k[prefix_rows[b]]`` (``[G, Hkv, Lp, D]``; keys where ``prefix_valid[b]``) followed
    by its own ``k[b]`` (causal, keys where ``key_valid[b]``): the result of :func:`attention` on the concatenation
    ``cat(prefix_k[prefix_rows], k)`` with the validities concatenated, without building it (a batch of rows that
    ask about few images then reads each image's keys from one place). The prefix and the own keys are splits of one
    split-KV pass, merged in fp32 by one combine. ``Lq <= FEW_QUERIES``.
    """
    from vlmkit.kernels import attention_kernels as kernels

    batch, q_heads, q_len, head_dim = q.shape
    _check_inputs(q, k, v, None)
    if prefix_k.dim() != 4 or prefix_k.shape != prefix_v.shape or prefix_k.shape[1] != k.shape[1] \
            or prefix_k.shape[3] != k.shape[3] or prefix_k.dtype != k.dtype or prefix_v.dtype != k.dtype:
        raise ValueError(f"prefix_k, prefix_v must be [G, {k.shape[1]}, Lp, {k.shape[3]}] {k.dtype}; got "
                         f"{tuple(prefix_k.shape)} {prefix_k.dtype}, {tuple(prefix_v.shape)} {prefix_v.dtype}")
    if q_len > FEW_QUERIES:
        raise ValueError(f"shared-prefix attention takes at most {FEW_QUERIES} query rows, got {q_len}")
    if prefix_rows.shape != (batch,):
        raise ValueError(f"prefix_rows must be [{batch}], got {tuple(prefix_rows.shape)}")
    qk_scale = _qk_scale(head_dim, scale)
    precision = _precision(q)
    prefix_layout = _Layout.choose(q, prefix_k)
    own_layout = _Layout.choose(q, k)
    partial = _Destination.partial(q, prefix_layout.num_splits + own_layout.num_splits)
    rows = prefix_rows.to(device=q.device, dtype=torch.int64).contiguous()
    prefix_masks = _MaskArgs.build(q, prefix_valid, None, None, None, batch, q_heads, prefix_k.shape[2])
    _forward(kernels, q, prefix_k, prefix_v, partial.splits(0, prefix_layout.num_splits), prefix_masks,
             prefix_layout, False, qk_scale, precision, kv_rows=rows)
    own_masks = _MaskArgs.build(q, key_valid, None, None, None, batch, q_heads, k.shape[2])
    _forward(kernels, q, k, v, partial.splits(prefix_layout.num_splits, None), own_masks, own_layout, True,
             qk_scale, precision)
    out = torch.empty(batch, q_len, q_heads, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, q_heads, q_len, device=q.device, dtype=torch.float32)
    partial.combine(kernels, out, lse)
    return out, AttentionStats(lse=lse)


@dataclass(frozen=True)
class _Layout:
    """How the forward kernel covers one call: the row layout (packed GQA groups with split-KV for few queries, one
    head per program otherwise), its block shapes and the key splits."""

    packed: bool
    config: KernelConfig
    heads_axis: int
    row_blocks: int
    keys_per_split: int
    num_splits: int

    @classmethod
    def choose(cls, q: torch.Tensor, k: torch.Tensor, num_splits: int | None = None) -> _Layout:
        q_heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
        kind = _kind(q)
        packed = q_len <= FEW_QUERIES
        if packed:
            group = q_heads // k.shape[1]
            rows = group * q_len
            block_m = min(128, max(16, 1 << (rows - 1).bit_length()))
            block_n = DECODE_BLOCK_N[kind]
            config = KernelConfig(block_m, block_n, 4, 3) if kind == "cuda" else KernelConfig(block_m, block_n, 1, 1)
            heads_axis = q_heads // group
        else:
            rows = q_len
            config = PREFILL_CONFIGS[(kind, q.element_size())]
            heads_axis = q_heads
        if num_splits is None and packed:
            keys_per_split = DECODE_KEYS_PER_SPLIT
        else:
            keys_per_split = _cdiv(_cdiv(k_len, num_splits or 1), config.block_n) * config.block_n
        return cls(packed, config, heads_axis, _cdiv(rows, config.block_m), keys_per_split,
                   _cdiv(k_len, keys_per_split))


@dataclass(frozen=True)
class _Destination:
    """Where the forward kernel writes: the final ``out [B, Lq, Hq, D]`` and ``lse [B, Hq, Lq]`` (one split), or
    fp32 partial results ``[B, Hq, S, Lq, D]`` and ``[B, Hq, S, Lq]`` that :meth:`combine` merges. ``o_strides`` are
    (batch, head, query row, split, dim) and ``l_strides`` (batch, head, query row, split)."""

    out: torch.Tensor
    lse: torch.Tensor
    o_strides: tuple[int, ...]
    l_strides: tuple[int, ...]

    @classmethod
    def final(cls, out: torch.Tensor, lse: torch.Tensor) -> _Destination:
        return cls(out, lse, (out.stride(0), out.stride(2), out.stride(1), 0, out.stride(3)),
                   (lse.stride(0), lse.stride(1), lse.stride(2), 0))

    @classmethod
    def partial(cls, q: torch.Tensor, num_splits: int) -> _Destination:
        batch, q_heads, q_len, head_dim = q.shape
        out = torch.empty(batch, q_heads, num_splits, q_len, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, q_heads, num_splits, q_len, device=q.device, dtype=torch.float32)
        return cls(out, lse, (out.stride(0), out.stride(1), out.stride(3), out.stride(2), out.stride(4)),
                   (lse.stride(0), lse.stride(1), lse.stride(3), lse.stride(2)))

    def splits(self, start: int, stop: int | None) -> _Destination:
        """The partial results of splits ``start:stop`` (one call's share of a merged pass)."""
        return dataclasses.replace(self, out=self.out[:, :, start:stop], lse=self.lse[:, :, start:stop])

    def combine(self, kernels, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge the partial results into ``out`` and ``lse`` (``combine_splits_kernel``)."""
        part, part_lse = self.out, self.lse
        batch, q_heads, num_splits, q_len, head_dim = part.shape
        kernels.combine_splits_kernel[(batch * q_heads * q_len,)](
            part, part_lse, out, lse,
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            q_heads, q_len, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
            BLOCK_S=max(MIN_SPLIT_BLOCK, 1 << (num_splits - 1).bit_length()),
            num_warps=4 if part.is_cuda else 1,
        )


def _forward(kernels, q, k, v, dst: _Destination, masks: _MaskArgs, layout: _Layout, causal: bool, qk_scale: float,
             precision: str, kv_rows: torch.Tensor | None = None) -> None:
    """Launch ``attention_fwd_kernel`` over ``layout``'s grid; ``kv_rows [B]``: batch row ``b`` reads K/V row
    ``kv_rows[b]``. A few-query call with key validity skips the key blocks after each row's last valid key."""
    batch, q_heads, q_len, head_dim = q.shape
    config = layout.config
    key_end = None
    if layout.packed and masks.has_valid:  # decode over a preallocated cache: the unwritten slots are not read
        valid = masks.valid.view(-1, k.shape[2]).expand(batch, -1)
        key_end = (valid * torch.arange(1, k.shape[2] + 1, device=q.device, dtype=torch.int32)).amax(dim=1)
    kernels.attention_fwd_kernel[(layout.row_blocks, batch * layout.heads_axis, layout.num_splits)](
        q, k, v, dst.out, dst.lse, masks.valid, masks.bias, masks.gain, masks.params,
        q if kv_rows is None else kv_rows, q if key_end is None else key_end,
        *q.stride(), *k.stride(), *v.stride(), *dst.o_strides, *dst.l_strides,
        masks.valid_stride, masks.bias_stride_b, masks.bias_stride_h, masks.gain_stride_b, masks.gain_stride_h,
        masks.params_stride, q_heads, q_len, k.shape[2], layout.keys_per_split, qk_scale,
        GROUP=q_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, PACK_GROUP=layout.packed, CAUSAL=causal, HAS_VALID=masks.has_valid,
        HAS_BIAS=masks.has_bias, HAS_GAIN=masks.has_gain, HAS_MASK=masks.fn is not None, MASK_FN=masks.fn,
        PRECISION=precision, HAS_KV_ROWS=kv_rows is not None, HAS_KEY_END=key_end is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _qk_scale(head_dim: int, scale: float | None) -> float:
    """The logit scale times log2(e): the kernels use exp2."""
    return (1.0 / math.sqrt(head_dim) if scale is None else scale) * 1.4426950408889634


def _kind(q: torch.Tensor) -> str:
    return "cuda" if q.is_cuda else "cpu"


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _precision(q: torch.Tensor) -> str:
    """Products: full fp32 for fp32 inputs; bf16 in the CPU interpreter upcasts (see attention_kernels._dot)."""
    if q.dtype == torch.float32:
        return "ieee"
    return "upcast" if not q.is_cuda and q.dtype == torch.bfloat16 else "tf32"


@dataclass
class _MaskArgs:
    """The optional mask inputs as kernel arguments (a broadcast dimension gets stride 0; absent inputs pass a dummy
    pointer that the kernel never reads)."""

    valid: torch.Tensor
    valid_stride: int
    has_valid: bool
    bias: torch.Tensor
    bias_stride_b: int
    bias_stride_h: int
    has_bias: bool
    gain: torch.Tensor
    gain_stride_b: int
    gain_stride_h: int
    has_gain: bool
    params: torch.Tensor
    params_stride: int
    fn: object

    @classmethod
    def build(cls, q, key_valid, key_bias, key_abs_gain, mask_mod, batch, q_heads, k_len) -> _MaskArgs:
        valid, valid_stride = q, 0
        if key_valid is not None:
            if key_valid.shape[-1] != k_len or key_valid.shape[0] not in (1, batch):
                raise ValueError(f"key_valid must be [B or 1, {k_len}], got {tuple(key_valid.shape)}")
            valid = key_valid.to(device=q.device, dtype=torch.bool).reshape(-1, k_len).contiguous().view(torch.uint8)
            valid_stride = k_len if valid.shape[0] > 1 else 0
        bias, bias_b, bias_h = _per_key(q, key_bias, "key_bias", batch, q_heads, k_len)
        gain, gain_b, gain_h = _per_key(q, key_abs_gain, "key_abs_gain", batch, q_heads, k_len)
        params, params_stride, fn = q, 0, None
        if mask_mod is not None:
            params = mask_mod.params.to(device=q.device, dtype=torch.int32).contiguous()
            params_stride = params.shape[1] if params.shape[0] > 1 else 0
            fn = mask_mod.jit_function()
        return cls(valid, valid_stride, key_valid is not None, bias, bias_b, bias_h, key_bias is not None,
                   gain, gain_b, gain_h, key_abs_gain is not None, params, params_stride, fn)


def _per_key(q, tensor, name, batch, q_heads, k_len) -> tuple[torch.Tensor, int, int]:
    """A ``[B or 1, Hq or 1, Lk]`` per-key input (``key_bias``, ``key_abs_gain``) and its batch and head strides
    (0 where broadcast); absent: a dummy pointer the kernel never reads."""
    if tensor is None:
        return q, 0, 0
    if tensor.dim() != 3 or tensor.shape[0] not in (1, batch) or tensor.shape[1] not in (1, q_heads) \
            or tensor.shape[2] != k_len:
        raise ValueError(f"{name} must be [B or 1, Hq or 1, {k_len}], got {tuple(tensor.shape)}")
    tensor = tensor.to(q.device).contiguous()
    return tensor, tensor.stride(0) if tensor.shape[0] > 1 else 0, tensor.stride(1) if tensor.shape[1] > 1 else 0


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B, Hq, Lq, D] and k, v [B, Hkv, Lk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > MAX_HEAD_DIM or q.shape[3] % 8:
        raise ValueError(f"head dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {q.shape[3]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("empty query or key sequence")
    if mask_mod is not None and not isinstance(mask_mod, TritonMask):
        raise TypeError("the Triton kernel needs mask_mod as a vlmkit.kernels.masks.TritonMask (a plain callable "
                        "cannot run inside the kernel); use attention_reference for arbitrary callables")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
