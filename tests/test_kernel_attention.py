"""The Triton attention kernel against the float64 reference, feature by feature.

With a GPU these tests run the compiled kernels. Without one they run in Triton's CPU interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before ``triton.language`` is first imported, and the test session imports it
long before this module (torch and transformers do). So, unless the variable is already set, the module runs itself
in a child pytest process that has it from the start (``test_in_the_interpreter``), and its cases are skipped here:
the variable never leaks into other tests. Every call writes into a NaN-poisoned output buffer, and every case draws
fresh random inputs from its own seed.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
IN_CHILD = not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1"
kernel_case = pytest.mark.skipif(IN_CHILD, reason="runs in the interpreter's child process (test_in_the_interpreter)")


@pytest.mark.skipif(not IN_CHILD, reason="the kernels run in this process")
def test_in_the_interpreter(run_in_interpreter):
    run_in_interpreter(__file__)


from vlmkit.kernels import attention, attention_reference  # noqa: E402
from vlmkit.kernels.attention import shared_prefix_attention  # noqa: E402
from vlmkit.kernels.masks import concentric_causal_mask, ring_table_mask, segment_mask  # noqa: E402
from vlmkit.kernels.reference import allowed_mask  # noqa: E402

# (elementwise atol/rtol on the output, bound on ‖out - ref‖ / ‖ref‖)
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (3e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _inputs(seed, batch, q_heads, kv_heads, q_len, k_len, dim, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v)], gen


def _check(q, k, v, num_splits=None, **kwargs):
    """Run the kernel into a poisoned buffer and compare out, LSE and key mass with the float64 reference."""
    batch, q_heads, q_len, dim = q.shape
    out = torch.full((batch, q_len, q_heads, dim), float("nan"), device=q.device, dtype=q.dtype)
    got, stats = attention(q, k, v, out=out, num_splits=num_splits, **kwargs)
    ref, ref_stats = attention_reference(q, k, v, compute_dtype=torch.float64, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "output elements left unwritten (still NaN)"
    atol, rel_bound = TOLERANCE[q.dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=atol)
    rel = (got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-12)
    assert rel < rel_bound, f"relative error {rel:.2e} over {rel_bound:.0e}"
    assert not stats.lse.isnan().any()
    torch.testing.assert_close(stats.lse, ref_stats.lse, atol=2e-4, rtol=1e-5)
    if ref_stats.key_mass is None:
        assert stats.key_mass is None
    else:
        torch.testing.assert_close(stats.key_mass, ref_stats.key_mass, atol=2e-5, rtol=1e-4)
    return got, stats


@kernel_case
@pytest.mark.parametrize(
    "seed, dtype, dim, q_heads, kv_heads, causal",
    [
        (1, torch.bfloat16, 64, 4, 2, True),
        (2, torch.float16, 80, 4, 1, True),  # MQA, D padded to 128
        (3, torch.float32, 96, 2, 2, False),  # D padded to 128
        (4, torch.bfloat16, 128, 4, 4, True),
    ],
)
def test_prefill(seed, dtype, dim, q_heads, kv_heads, causal):
    (q, k, v), _ = _inputs(seed, 2, q_heads, kv_heads, 40, 40, dim, dtype)
    _check(q, k, v, causal=causal)


@kernel_case
def test_prefill_queries_are_the_last_keys():
    """Lq < Lk (a prefill chunk after cached keys): bottom-right causal alignment, ragged last blocks."""
    (q, k, v), _ = _inputs(5, 1, 2, 2, 27, 61, 64, torch.float16)
    _check(q, k, v, causal=True)


@kernel_case
@pytest.mark.parametrize(
    "seed, dtype, q_len, q_heads, kv_heads, num_splits",
    [
        (11, torch.bfloat16, 1, 4, 1, 1),
        (12, torch.float16, 1, 4, 2, 3),  # split-KV: 3 splits merged by the combine kernel
        (13, torch.bfloat16, 3, 4, 2, 4),  # a few queries of two packed heads, each split ragged
        (14, torch.float32, 2, 2, 2, 2),
    ],
)
def test_decode_split_kv(seed, dtype, q_len, q_heads, kv_heads, num_splits):
    (q, k, v), _ = _inputs(seed, 2, q_heads, kv_heads, q_len, 64, 128 if dtype != torch.float32 else 64, dtype)
    key_valid = torch.ones(2, 64, dtype=torch.bool, device=DEVICE)
    key_valid[1, :19] = False  # left padding in row 1
    _check(q, k, v, key_valid=key_valid, num_splits=num_splits)


@kernel_case
def test_decode_rows_ending_early():
    """Rows whose valid keys end early (a decode cache's unwritten slots): splits past a row's last valid key are
    skipped, one split is cut inside, and a row with no valid key gives zeros."""
    (q, k, v), _ = _inputs(16, 3, 4, 2, 1, 300, 64, torch.bfloat16)
    key_valid = torch.zeros(3, 300, dtype=torch.bool, device=DEVICE)
    key_valid[0, :37] = True
    key_valid[1, 5:270] = True
    _check(q[:2], k[:2], v[:2], key_valid=key_valid[:2])
    out, stats = attention(q, k, v, key_valid=key_valid)
    assert not out[2].any() and stats.lse[2].isinf().all()


@kernel_case
def test_split_kv_changes_nothing_but_rounding():
    (q, k, v), _ = _inputs(15, 1, 4, 2, 1, 64, 64, torch.float32)
    one, stats_one = attention(q, k, v, num_splits=1)
    four, stats_four = attention(q, k, v, num_splits=4)
    torch.testing.assert_close(one, four, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats_one.lse, stats_four.lse, atol=1e-6, rtol=1e-6)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trailing_masked_slots_change_no_bit(dtype):
    """A decode step over a preallocated cache (real keys, then masked slots holding stale values) gives bit for bit
    the result over the real keys alone: what makes static-cache decoding give the dynamic cache's tokens."""
    (q, k, v), gen = _inputs(17, 2, 4, 2, 1, 300, 64, dtype)
    valid = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    valid[1, :37] = False  # left padding
    slots = 768
    stale = [torch.randn(2, 2, slots - 300, 64, generator=gen).to(k) for _ in range(2)]
    k_static, v_static = torch.cat([k, stale[0]], dim=2), torch.cat([v, stale[1]], dim=2)
    valid_static = torch.cat([valid, torch.zeros(2, slots - 300, dtype=torch.bool, device=DEVICE)], dim=1)
    out, stats = attention(q, k, v, key_valid=valid)
    out_static, stats_static = attention(q, k_static, v_static, key_valid=valid_static)
    assert torch.equal(out, out_static) and torch.equal(stats.lse, stats_static.lse)


@kernel_case
def test_left_padding_rows_and_key_lens():
    """Left-padded rows: padding queries see no key (output 0, LSE -inf); key_lens is the same as key_valid."""
    (q, k, v), _ = _inputs(21, 2, 2, 1, 48, 48, 64, torch.bfloat16)
    lens = torch.tensor([48, 29], device=DEVICE)
    key_valid = torch.arange(48, device=DEVICE) >= (48 - lens).view(2, 1)
    out, stats = _check(q, k, v, key_valid=key_valid)
    assert (out[1, :19] == 0).all() and torch.isneginf(stats.lse[1, :, :19]).all()
    assert torch.isfinite(stats.lse[1, :, 19:]).all()
    out_lens, stats_lens = attention(q, k, v, key_lens=lens)
    torch.testing.assert_close(out_lens, out, atol=0, rtol=0)
    torch.testing.assert_close(stats_lens.lse, stats.lse, atol=0, rtol=0)


@kernel_case
@pytest.mark.parametrize("bias_shape", [(2, 4, 40), (1, 1, 40), (2, 1, 40)])
def test_key_bias(bias_shape):
    (q, k, v), gen = _inputs(31 + bias_shape[0] + bias_shape[1], 2, 4, 2, 40, 40, 64, torch.float16)
    bias = (3 * torch.randn(bias_shape, generator=gen)).to(DEVICE)
    bias[..., 5] = float("-inf")  # a key removed by its bias
    _check(q, k, v, key_bias=bias)


def _gain(gen, shape, k_len):
    """A per-key gain on about half the keys (PAI: alpha on the image keys), some negative."""
    gain = torch.rand(shape, generator=gen) * (torch.rand(shape[0], 1, k_len, generator=gen) < 0.5)
    gain[..., :3] = -0.5
    return gain.to(DEVICE)


def test_key_abs_gain_reference_by_hand():
    """The reference's gain is s + g|s| on the scaled logits, before the bias: softmax written out by hand."""
    (q, k, v), gen = _inputs(71, 2, 4, 2, 6, 9, 16, torch.float32)
    gain, bias = _gain(gen, (2, 4, 9), 9).cpu(), torch.randn(2, 1, 9, generator=gen)
    out, stats = attention_reference(q.cpu(), k.cpu(), v.cpu(), key_abs_gain=gain, key_bias=bias,
                                     mass_queries=(0, 6), compute_dtype=torch.float64)
    kk, vv = (t.cpu().double().repeat_interleave(2, dim=1) for t in (k, v))
    s = q.cpu().double() @ kk.transpose(-1, -2) / 4.0
    s = s + gain.double()[:, :, None] * s.abs() + bias.double()[:, :, None]
    s = s.masked_fill(torch.ones(6, 9, dtype=torch.bool).triu(4), float("-inf"))
    probs = s.softmax(-1)
    torch.testing.assert_close(out.double(), (probs @ vv).transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.key_mass.double(), probs.sum(2), atol=1e-6, rtol=1e-6)
    plain, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), key_abs_gain=torch.zeros(1, 1, 9))
    torch.testing.assert_close(plain, attention_reference(q.cpu(), k.cpu(), v.cpu())[0], atol=0, rtol=0)


@kernel_case
@pytest.mark.parametrize(
    "seed, dtype, gain_shape, q_len, num_splits",
    [
        (72, torch.float16, (2, 4, 40), 40, None),  # prefill, per-head gain, with bias and key mass
        (73, torch.float32, (1, 1, 40), 40, None),  # broadcast gain
        (74, torch.bfloat16, (2, 1, 40), 1, 2),  # decode: packed GQA rows, split-KV, left padding
    ],
)
def test_key_abs_gain(seed, dtype, gain_shape, q_len, num_splits):
    (q, k, v), gen = _inputs(seed, 2, 4, 2, q_len, 40, 64, dtype)
    key_valid = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    key_valid[1, :7] = False
    bias = torch.randn(2, 1, 40, generator=gen).to(DEVICE)
    _check(q, k, v, key_abs_gain=_gain(gen, gain_shape, 40), key_bias=bias, key_valid=key_valid,
           mass_queries=(0, q_len), num_splits=num_splits)


@kernel_case
@pytest.mark.parametrize("q_len", [1, 2])
def test_packed_group_of_seven_with_head_bias(q_len):
    """Decode packs a GQA group's heads into one block of rows; with 7 heads a group (Qwen2.5-VL-7B: 28 over 4) the
    block has spare rows, which must not read another group's (or a missing head's) bias. The interpreter does not
    trap such reads; on a GPU the last group's spare row read past the bias (an illegal address) before the fix."""
    (q, k, v), gen = _inputs(41 + q_len, 2, 14, 2, q_len, 50, 64, torch.float16)
    bias = (2 * torch.randn(2, 14, 50, generator=gen)).to(DEVICE)
    _check(q, k, v, key_bias=bias, mass_queries=(0, q_len))


@kernel_case
def test_key_mass_query_span_and_key_span():
    """Mass of queries 9..33 on keys 4..29 (an image block), with GQA, padding and a bias."""
    (q, k, v), gen = _inputs(41, 2, 4, 2, 40, 40, 64, torch.bfloat16)
    key_valid = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    key_valid[0, :3] = False
    bias = torch.randn(2, 1, 40, generator=gen).to(DEVICE)
    _, stats = _check(q, k, v, key_valid=key_valid, key_bias=bias, mass_queries=(9, 33), mass_keys=(4, 29))
    assert stats.key_mass.shape == (2, 4, 25)


@kernel_case
def test_key_mass_all_rows_sums_to_row_count():
    (q, k, v), _ = _inputs(42, 1, 2, 2, 36, 36, 80, torch.float32)
    _, stats = _check(q, k, v, mass_queries=(0, 36))
    torch.testing.assert_close(stats.key_mass.sum(-1), torch.full((1, 2), 36.0, device=DEVICE), atol=1e-4, rtol=0)


@kernel_case
def test_key_mass_weight_tensor():
    """The runtime's form: a [B, Lq] weight per query row (zero rows are skipped by the kernel)."""
    (q, k, v), gen = _inputs(43, 2, 4, 1, 40, 40, 96, torch.float16)
    weights = torch.rand(2, 40, generator=gen)
    weights[:, :20] = 0
    weights[1, 30:] = 0
    _check(q, k, v, mass_queries=weights.to(DEVICE))


@kernel_case
def test_key_mass_during_decode():
    (q, k, v), _ = _inputs(44, 2, 4, 2, 2, 64, 64, torch.bfloat16)
    key_valid = torch.ones(2, 64, dtype=torch.bool, device=DEVICE)
    key_valid[1, :10] = False
    _check(q, k, v, key_valid=key_valid, mass_queries=(1, 2), mass_keys=(8, 40), num_splits=2)


def _cca_by_definition(start: int, side: int, length: int) -> torch.Tensor:
    """decoders.md §3(a)4 literally: causal, except inside the visual block where ring(k) <= ring(q)."""

    def ring(i):
        r, c = divmod(i - start, side)
        return min(r, c, side - 1 - r, side - 1 - c)

    def visual(i):
        return start <= i < start + side * side

    return torch.tensor([[ring(kk) <= ring(qq) if visual(qq) and visual(kk) else kk <= qq for kk in range(length)]
                         for qq in range(length)])


def test_concentric_mask_matches_its_definition():
    mask = concentric_causal_mask(torch.tensor([3, 7]), 4)
    allowed = allowed_mask(2, 1, 30, 30, causal=False, key_valid=None, mask_mod=mask, device=torch.device("cpu"))
    assert torch.equal(allowed[0, 0], _cca_by_definition(3, 4, 30))
    assert torch.equal(allowed[1, 0], _cca_by_definition(7, 4, 30))
    assert not _cca_by_definition(3, 4, 30).tril().equal(_cca_by_definition(3, 4, 30))  # it does look ahead


@kernel_case
def test_concentric_mask_in_the_kernel():
    """CCA prefill: a 5x5 visual block at a different offset per row, plus left padding, and the image's mass."""
    (q, k, v), _ = _inputs(51, 2, 4, 2, 48, 48, 64, torch.bfloat16)
    mask = concentric_causal_mask(torch.tensor([6, 11]), torch.tensor([5, 5]))
    key_valid = torch.ones(2, 48, dtype=torch.bool, device=DEVICE)
    key_valid[1, :4] = False
    _check(q, k, v, causal=False, mask_mod=mask, key_valid=key_valid, mass_queries=(31, 48), mass_keys=(6, 36))


def _rings(start: int, rows: int, cols: int, length: int) -> torch.Tensor:
    r, c = torch.arange(rows).view(-1, 1), torch.arange(cols).view(1, -1)
    table = torch.full((length,), -1, dtype=torch.long)
    rings = torch.minimum(torch.minimum(r, c), torch.minimum(rows - 1 - r, cols - 1 - c))
    table[start: start + rows * cols] = rings.flatten()
    return table


def test_ring_table_mask_is_the_concentric_mask():
    square = allowed_mask(1, 1, 30, 30, causal=False, key_valid=None, mask_mod=concentric_causal_mask(3, 4),
                          device=torch.device("cpu"))
    table = allowed_mask(1, 1, 30, 30, causal=False, key_valid=None,
                         mask_mod=ring_table_mask(_rings(3, 4, 4, 30)[None]), device=torch.device("cpu"))
    assert torch.equal(square, table)


@kernel_case
def test_ring_table_mask_in_the_kernel():
    """A 3x6 grid in row 0, a pruned 4x4 grid (two tokens dropped: their keys are not visual) in row 1."""
    (q, k, v), _ = _inputs(53, 2, 4, 2, 44, 44, 64, torch.float16)
    pruned = _rings(9, 4, 4, 44)
    pruned[[12, 17]] = -1
    rings = torch.stack([_rings(5, 3, 6, 44), pruned]).to(DEVICE)
    _check(q, k, v, causal=False, mask_mod=ring_table_mask(rings), mass_queries=(30, 44))


@kernel_case
def test_concentric_mask_row_without_image():
    (q, k, v), _ = _inputs(52, 2, 2, 2, 40, 40, 64, torch.float16)
    _check(q, k, v, causal=False, mask_mod=concentric_causal_mask(torch.tensor([2, 0]), torch.tensor([4, 0])))


def test_segment_mask_matches_its_definition():
    segments = torch.tensor([[0, 0, 0, 3, 3, 5, 5, 5]])
    allowed = allowed_mask(1, 1, 8, 8, causal=True, key_valid=None, mask_mod=segment_mask(segments),
                           device=torch.device("cpu"))[0, 0]
    for q_idx in range(8):
        for kv_idx in range(8):
            visible = kv_idx <= q_idx and (segments[0, kv_idx] == 0 or segments[0, kv_idx] == segments[0, q_idx])
            assert bool(allowed[q_idx, kv_idx]) == bool(visible)


@kernel_case
def test_segment_mask_in_the_kernel():
    """Two packed groups: a prefix then three rests (row 0), a shorter prefix then two rests, left-padded (row 1)."""
    (q, k, v), _ = _inputs(54, 2, 4, 2, 50, 50, 64, torch.bfloat16)
    segments = torch.tensor([[0] * 20 + [1] * 10 + [2] * 12 + [3] * 8, [0] * 9 + [0] * 21 + [4] * 9 + [7] * 11])
    key_valid = torch.ones(2, 50, dtype=torch.bool)
    key_valid[1, :9] = False
    _check(q, k, v, causal=True, mask_mod=segment_mask(segments.to(DEVICE)), key_valid=key_valid.to(DEVICE))


@kernel_case
@pytest.mark.parametrize("dtype,q_len,own_len", [(torch.bfloat16, 1, 3), (torch.float32, 2, 5),
                                                 (torch.float16, 1, 300)])
def test_shared_prefix_attention_is_attention_over_the_concatenation(dtype, q_len, own_len):
    """Five rows over three prefixes (row 4 reads prefix 0 again), each prefix masked per row, against the float64
    reference on the materialised ``cat(prefix[rows], own)``; a long own part takes several splits."""
    gen = torch.Generator().manual_seed(55)
    q = torch.randn(5, 4, q_len, 64, generator=gen)
    k, v = (torch.randn(5, 2, own_len, 64, generator=gen) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(3, 2, 290, 64, generator=gen) for _ in range(2))
    q, k, v, prefix_k, prefix_v = (t.to(DEVICE, dtype) for t in (q, k, v, prefix_k, prefix_v))
    rows = torch.tensor([0, 2, 1, 2, 0], device=DEVICE)
    prefix_valid = torch.rand(5, 290, generator=gen).to(DEVICE) > 0.3
    key_valid = torch.ones(5, own_len, dtype=torch.bool, device=DEVICE)
    key_valid[3, :1] = False
    got, stats = shared_prefix_attention(q, k, v, prefix_k, prefix_v, rows, key_valid=key_valid,
                                         prefix_valid=prefix_valid)
    ref, ref_stats = attention_reference(
        q, torch.cat([prefix_k[rows], k], dim=2), torch.cat([prefix_v[rows], v], dim=2), causal=True,
        key_valid=torch.cat([prefix_valid, key_valid], dim=1), compute_dtype=torch.float64,
    )
    atol, rel_bound = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=atol)
    assert (got.double() - ref.double()).norm() / ref.double().norm() < rel_bound
    torch.testing.assert_close(stats.lse, ref_stats.lse, atol=2e-4, rtol=1e-5)


def test_rejects_a_plain_callable_mask():
    (q, k, v), _ = _inputs(61, 1, 2, 2, 20, 20, 64, torch.float16)
    with pytest.raises(TypeError, match="TritonMask"):
        attention(q, k, v, mask_mod=lambda b, h, qi, ki: ki <= qi)
