"""Triton kernels behind :func:`vlmkit.kernels.attention` (the algorithm is described in ``attention.py``).

Imported on the first call of ``attention``, so that ``import vlmkit`` needs no Triton and tests can switch on
``TRITON_INTERPRET`` before the kernels are decorated. Softmax arithmetic is in base 2: logits are multiplied by
``scale * log2(e)`` so that ``exp2`` replaces ``exp``; the LSE is converted back to natural log when stored.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """Load a tile; out-of-range elements (ragged keys, D padded to a power of two) read as zero."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. ``"upcast"`` multiplies in fp32 instead: Triton's CPU interpreter multiplies
    the raw bits of bf16 operands, so the interpreter runs bf16 products this way (exact products, fp32 sums: what
    the tensor cores compute)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _allowed(b, head, q_idx, kv_idx, kv_end, key_valid, mask_params,
             CAUSAL: tl.constexpr, CHECK_END: tl.constexpr, HAS_VALID: tl.constexpr,
             HAS_MASK: tl.constexpr, MASK_FN: tl.constexpr):
    """Which logits of a tile take part in the softmax. ``q_idx [BM, 1]`` and ``kv_idx [1, BN]`` are key indices;
    ``key_valid`` and ``mask_params`` already point at batch row ``b``."""
    allowed = kv_idx >= 0
    if CHECK_END:
        allowed = allowed & (kv_idx < kv_end)
    if CAUSAL:
        allowed = allowed & (kv_idx <= q_idx)
    if HAS_VALID:
        allowed = allowed & (tl.load(key_valid + kv_idx, mask=kv_idx < kv_end, other=0) != 0)
    if HAS_MASK:
        allowed = allowed & MASK_FN(b, head, q_idx, kv_idx, mask_params)
    return allowed


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, b, head, q_idx, k_ptrs, v_ptrs, bias_ptrs, gain_ptrs, key_valid, mask_params,
                  start, end, d_ok, qk_scale, stride_kn, stride_vn,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, CHECK_END: tl.constexpr, EVEN_D: tl.constexpr,
                  HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MASK: tl.constexpr,
                  MASK_FN: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks ``start, start + BLOCK_N, ... < end``.

    Keeps, per query row, the running maximum ``m_i`` of the (base-2) logits, the running sum ``l_i`` of
    ``exp2(logit - m_i)`` and the unnormalised output ``acc``; each new block rescales both by ``exp2(m_old - m_new)``.
    ``CHECK_END`` masks keys at or past ``end`` (the ragged last block) and ``CAUSAL`` masks keys after the query;
    the caller runs the blocks that need neither without them.
    """
    offs_n = tl.arange(0, BLOCK_N)
    APPLY_MASK: tl.constexpr = CAUSAL or CHECK_END or HAS_VALID or HAS_MASK
    for n0 in range(start, end, BLOCK_N):
        kv = n0 + offs_n
        kv_ok = kv < end
        k = _load(k_ptrs + n0 * stride_kn, d_ok[:, None] & kv_ok[None, :], CHECK_END or not EVEN_D)  # [BD, BN]
        s = _dot(q, k, PRECISION) * qk_scale
        if HAS_GAIN:  # s + g|s| commutes with the positive scale, so it applies to base-2 logits as well
            s += tl.load(gain_ptrs + kv[None, :], mask=kv_ok[None, :], other=0.0).to(tl.float32) * tl.abs(s)
        if HAS_BIAS:
            s += tl.load(bias_ptrs + kv[None, :], mask=kv_ok[None, :], other=0.0).to(tl.float32) * LOG2E
        if APPLY_MASK:
            allowed = _allowed(b, head, q_idx, kv[None, :], end, key_valid, mask_params,
                               CAUSAL, CHECK_END, HAS_VALID, HAS_MASK, MASK_FN)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptrs + n0 * stride_vn, kv_ok[:, None] & d_ok[None, :], CHECK_END or not EVEN_D)  # [BN, BD]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Lse, KeyValid, KeyBias, KeyGain, MaskParams, KvRows, KeyEnd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_os, stride_od,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_valid_b, stride_bias_b, stride_bias_h, stride_gain_b, stride_gain_h, stride_params_b,
    q_heads, q_len, k_len, keys_per_split, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK_GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_FN: tl.constexpr, PRECISION: tl.constexpr, HAS_KV_ROWS: tl.constexpr, HAS_KEY_END: tl.constexpr,
):
    """One program: ``BLOCK_M`` query rows of one batch row against the keys of one split.

    Grid ``(row blocks, B * heads, splits)``. Without ``PACK_GROUP`` the rows are consecutive queries of one query
    head; with it, row ``r`` is query ``r % q_len`` of head ``r // q_len`` of the GQA group that shares one KV head,
    so K/V are read once per group (decode). ``Out``/``Lse`` strides include a split stride: with one split they are
    the final tensors, with several they are partial results merged by ``combine_splits_kernel``. With
    ``HAS_KV_ROWS``, batch row ``b`` reads the K/V of batch row ``KvRows[b]`` (a prefix that several rows share).
    With ``HAS_KEY_END``, keys from ``KeyEnd[b]`` on are all invalid and not read (a preallocated decode cache's
    unwritten slots): their blocks would add exact zeros, so the result is the same bit for bit.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GROUP:
        kv_heads = q_heads // GROUP
        b = pid_bh // kv_heads
        kv_head = pid_bh % kv_heads
        q_row = rows % q_len
        row_ok = rows < GROUP * q_len
        # [BM]: each row's query head; spare rows past the group (GROUP * q_len < BLOCK_M) reuse its last head, so
        # that their (masked-off) loads stay inside the group's bias and Q rows
        head_m = kv_head * GROUP + tl.minimum(rows // q_len, GROUP - 1)
        head = head_m[:, None]
    else:
        b = pid_bh // q_heads
        head_m = pid_bh % q_heads
        kv_head = head_m // GROUP
        q_row = rows
        row_ok = rows < q_len
        head = head_m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_idx = (q_row + k_len - q_len)[:, None]  # bottom-right alignment: each row's position among the keys

    # This program's keys: its split, cut at the causal limit of its last row. Blocks before `mid` are fully visible
    # to every row (no causal or ragged-end test); blocks from `mid` to `hi` cross the diagonal or the end.
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, k_len)
    if HAS_KEY_END:
        hi = tl.minimum(hi, tl.load(KeyEnd + b))
    first_q = tl.min(tl.where(row_ok, q_row, q_len), 0) + k_len - q_len
    last_q = tl.max(tl.where(row_ok, q_row, 0), 0) + k_len - q_len
    if CAUSAL:
        hi = tl.minimum(hi, last_q + 1)
        full_end = tl.minimum(hi, first_q + 1)
    else:
        full_end = hi
    mid = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N

    q = _load(Q + b * stride_qb + head * stride_qh + q_row[:, None] * stride_qm + offs_d[None, :] * stride_qd,
              row_ok[:, None] & d_ok[None, :], True)
    if HAS_KV_ROWS:
        kv_b = tl.load(KvRows + b)
    else:
        kv_b = b
    k_ptrs = K + kv_b * stride_kb + kv_head * stride_kh + tl.arange(0, BLOCK_N)[None, :] * stride_kn \
        + offs_d[:, None] * stride_kd
    v_ptrs = V + kv_b * stride_vb + kv_head * stride_vh + tl.arange(0, BLOCK_N)[:, None] * stride_vn \
        + offs_d[None, :] * stride_vd
    bias_ptrs = KeyBias + b * stride_bias_b + head * stride_bias_h
    gain_ptrs = KeyGain + b * stride_gain_b + head * stride_gain_h
    key_valid = KeyValid + b * stride_valid_b
    mask_params = MaskParams + b * stride_params_b

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, b, head, q_idx, k_ptrs, v_ptrs, bias_ptrs, gain_ptrs,
                                  key_valid, mask_params, lo, mid, d_ok, qk_scale, stride_kn, stride_vn, BLOCK_N,
                                  False, False, EVEN_D, HAS_VALID, HAS_BIAS, HAS_GAIN, HAS_MASK, MASK_FN, PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, b, head, q_idx, k_ptrs, v_ptrs, bias_ptrs, gain_ptrs,
                                  key_valid, mask_params, mid, hi, d_ok, qk_scale, stride_kn, stride_vn, BLOCK_N,
                                  CAUSAL, True, EVEN_D, HAS_VALID, HAS_BIAS, HAS_GAIN, HAS_MASK, MASK_FN, PRECISION)

    # Rows with no allowed key (l = 0) give output 0 and LSE -inf.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.maximum(l_i, 1.0))) * LN2)  # l >= 1 when allowed
    out_ptrs = Out + b * stride_ob + head * stride_oh + q_row[:, None] * stride_om + split * stride_os \
        + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + head_m * stride_lh + q_row * stride_lm + split * stride_ls, lse, mask=row_ok)


@triton.jit
def combine_splits_kernel(
    PartOut, PartLse, Out, Lse,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_om, stride_oh, stride_od,
    q_heads, q_len, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge split-KV partial results of one (batch, head, query row): ``lse = logsumexp_s lse_s`` and
    ``out = Σ_s exp(lse_s - lse) out_s``. Splits without an allowed key have ``lse_s = -inf`` and weigh nothing."""
    pid = tl.program_id(0)
    q_row = pid % q_len
    head = (pid // q_len) % q_heads
    b = pid // (q_len * q_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse_s = tl.load(PartLse + b * stride_plb + head * stride_plh + offs_s * stride_pls + q_row, mask=s_ok,
                    other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    part = tl.load(PartOut + b * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + q_row * stride_pm
                   + offs_d[None, :], mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + q_row * stride_om + head * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + (b * q_heads + head) * q_len + q_row, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total)))


@triton.jit
def key_mass_kernel(
    Q, K, Lse, Weights, KeyValid, KeyBias, KeyGain, MaskParams, KeyMass,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_wb, stride_wm,
    stride_valid_b, stride_bias_b, stride_bias_h, stride_gain_b, stride_gain_h, stride_params_b,
    q_heads, q_len, k_len, q_start, q_end, key_start, key_end, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_FN: tl.constexpr, PRECISION: tl.constexpr,
):
    """Second pass: ``KeyMass[b, h, n - key_start] = Σ_rows w_row · exp(s[row, n] - lse[row])`` for one block of keys.

    Grid ``(key blocks, B * q_heads)``. The program keeps its K tile in registers and loops over the selected query
    rows ``q_start .. q_end`` (under causality, only those that can see the block), recomputing the logits and turning
    them into probabilities with pass 1's LSE. Each key belongs to one program: no atomics, deterministic sums.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    head = pid_bh % q_heads
    kv_head = head // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n0 = key_start + pid_n * BLOCK_N
    kv = n0 + tl.arange(0, BLOCK_N)
    kv_ok = kv < key_end
    k = tl.load(K + b * stride_kb + kv_head * stride_kh + kv[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=d_ok[:, None] & kv_ok[None, :], other=0.0)  # [BD, BN]
    if HAS_BIAS:
        bias = tl.load(KeyBias + b * stride_bias_b + head * stride_bias_h + kv, mask=kv_ok, other=0.0)
        bias = bias.to(tl.float32)[None, :] * LOG2E
    if HAS_GAIN:
        gain = tl.load(KeyGain + b * stride_gain_b + head * stride_gain_h + kv, mask=kv_ok, other=0.0)
        gain = gain.to(tl.float32)[None, :]
    key_valid = KeyValid + b * stride_valid_b
    mask_params = MaskParams + b * stride_params_b

    m_lo = q_start
    if CAUSAL:  # query row i sits at key index k_len - q_len + i and sees keys up to it
        m_lo = tl.maximum(q_start, n0 - (k_len - q_len))
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(m_lo, q_end, BLOCK_M):
        q_row = m0 + tl.arange(0, BLOCK_M)
        row_ok = q_row < q_end
        if HAS_WEIGHTS:
            w = tl.load(Weights + b * stride_wb + q_row * stride_wm, mask=row_ok, other=0.0)
        else:
            w = row_ok.to(tl.float32)
        if tl.max(tl.abs(w), 0) != 0.0:  # skip query blocks that carry no weight
            lse = tl.load(Lse + (b * q_heads + head) * q_len + q_row, mask=row_ok, other=0.0) * LOG2E
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # a fully masked row: every logit below is -inf
            q = tl.load(Q + b * stride_qb + head * stride_qh + q_row[:, None] * stride_qm
                        + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, k, PRECISION) * qk_scale
            if HAS_GAIN:
                s += gain * tl.abs(s)
            if HAS_BIAS:
                s += bias
            allowed = _allowed(b, head, (q_row + k_len - q_len)[:, None], kv[None, :], key_end, key_valid,
                               mask_params, CAUSAL, True, HAS_VALID, HAS_MASK, MASK_FN)
            p = tl.exp2(tl.where(allowed, s, float("-inf")) - lse[:, None])
            col_sum += tl.sum(p * w[:, None], 0)
    tl.store(KeyMass + (b * q_heads + head) * (key_end - key_start) + kv - key_start, col_sum, mask=kv_ok)


@triton.jit
def concentric_mask(b, h, q_idx, kv_idx, params):
    """CCA's concentric causal mask (see ``masks.concentric_causal_mask``); ``params`` = (visual start, grid side)."""
    start = tl.load(params)
    side = tl.load(params + 1)
    width = tl.maximum(side, 1)
    q_local = q_idx - start
    k_local = kv_idx - start
    q_in = (q_local >= 0) & (q_local < side * side)
    k_in = (k_local >= 0) & (k_local < side * side)
    q_r = q_local // width
    q_c = q_local % width
    k_r = k_local // width
    k_c = k_local % width
    q_ring = tl.minimum(tl.minimum(q_r, q_c), tl.minimum(side - 1 - q_r, side - 1 - q_c))
    k_ring = tl.minimum(tl.minimum(k_r, k_c), tl.minimum(side - 1 - k_r, side - 1 - k_c))
    return tl.where(q_in & k_in, k_ring <= q_ring, kv_idx <= q_idx)


@triton.jit
def ring_table_mask(b, h, q_idx, kv_idx, params):
    """Concentric mask from a ring table (see ``masks.ring_table_mask``): ``params`` = (Lk, ring of each key)."""
    length = tl.load(params)
    q_ring = tl.load(params + 1 + q_idx, mask=(q_idx >= 0) & (q_idx < length), other=-1)
    k_ring = tl.load(params + 1 + kv_idx, mask=(kv_idx >= 0) & (kv_idx < length), other=-1)
    return tl.where((q_ring >= 0) & (k_ring >= 0), k_ring <= q_ring, kv_idx <= q_idx)


@triton.jit
def segment_mask(b, h, q_idx, kv_idx, params):
    """Shared-prefix segments (see ``masks.segment_mask``): ``params`` = (Lk, segment of each key)."""
    length = tl.load(params)
    q_segment = tl.load(params + 1 + q_idx, mask=(q_idx >= 0) & (q_idx < length), other=-1)
    k_segment = tl.load(params + 1 + kv_idx, mask=(kv_idx >= 0) & (kv_idx < length), other=-1)
    return (k_segment == 0) | (k_segment == q_segment)
