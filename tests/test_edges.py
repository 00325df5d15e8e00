"""Numerical and shape edges: fully-masked rows, huge logits, NaN/inf
propagation, empty and length-1 sequences, batch 0, one head, q_len > kv_len."""
from __future__ import annotations

import math

import pytest
import torch

import flash_ext
from conftest import (
    DEVICES, LOW_PRECISION, TORCH_SDPA, assert_matches_reference, grad_list, rand_bool, randn,
    reference_attention, skip_unless_served, to_bshd,
)


# --------------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("kind", ["bool", "float_inf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fully_masked_rows_give_zero_output_and_gradients(kind, dtype, gen):
    b, h, hk, L, S, E = 2, 4, 2, 20, 300, 16   # S spans two key blocks
    q = randn((b, h, L, E), dtype, gen=gen, requires_grad=True)
    k = randn((b, hk, S, E), dtype, gen=gen, requires_grad=True)
    v = randn((b, hk, S, E), dtype, gen=gen, requires_grad=True)
    keep = rand_bool((b, 1, L, S), gen, 0.5)
    empty_rows = [(0, 0), (0, 7), (1, 19)]
    for bi, i in empty_rows:
        keep[bi, :, i] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -math.inf)
    dout = randn((b, h, L, E), dtype, gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    dq, dk, dv = grad_list(out, (q, k, v), dout)
    for bi, i in empty_rows:
        assert torch.equal(out[bi, :, i], torch.zeros_like(out[bi, :, i])), "empty row must give exactly 0"
        assert torch.equal(dq[bi, :, i], torch.zeros_like(dq[bi, :, i])), "empty row must give dq = 0"
    ref = reference_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_matches_reference(out, ref, dtype)
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (5e-5, 5e-5)}
    for name, g, r in zip("qkv", (dq, dk, dv), grad_list(ref, (q, k, v), dout.double())):
        assert_matches_reference(g, r, dtype, what=f"d{name}", fixed_tol=tol)
    # a key no query sees gets zero dk, dv
    unseen = torch.ones(b, 1, L, S, dtype=torch.bool)
    unseen[:, :, :, 5] = False
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=unseen, enable_gqa=True)
    dq, dk, dv = grad_list(out, (q, k, v), dout)
    assert torch.equal(dk[:, :, 5], torch.zeros_like(dk[:, :, 5]))
    assert torch.equal(dv[:, :, 5], torch.zeros_like(dv[:, :, 5]))


def test_fully_masked_float_mask_gradient_is_zero(gen):
    q, k, v = (randn((1, 2, 6, 8), gen=gen, requires_grad=True) for _ in range(3))
    base = randn((1, 2, 6, 6), gen=gen)
    base[0, 1, 2] = -math.inf
    bias = base.requires_grad_(True)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    dout = randn((1, 2, 6, 8), gen=gen)
    g = grad_list(out, (q, k, v, bias), dout)
    assert torch.isfinite(g[3]).all()
    assert torch.equal(g[3][0, 1, 2], torch.zeros(6, dtype=torch.float64))
    r = grad_list(reference_attention(q, k, v, attn_mask=bias), (q, k, v, bias), dout)
    for a, e in zip(g, r):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- huge logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("which", ["q", "qk", "scale"])
def test_huge_logits_no_overflow(which, dtype, device, gen):
    skip_unless_served(device, dtype, 64)
    big = 1e4
    q = randn((2, 2, 65, 64), dtype, device, gen, scale=big if which in ("q", "qk") else 1.0)
    k = randn((2, 2, 70, 64), dtype, device, gen, scale=big if which == "qk" else 1.0)
    v = randn((2, 2, 70, 64), dtype, device, gen)
    scale = 1e3 if which == "scale" else 1.0 if which == "q" else 1e-2
    for causal in (False, True):
        out = flash_ext.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)
        assert torch.isfinite(out).all(), "huge logits overflowed"
        ref = reference_attention(q, k, v, scale=scale, is_causal=causal)
        assert_matches_reference(out, ref, dtype, TORCH_SDPA(q, k, v, scale=scale, is_causal=causal))
    # and through backward
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out = flash_ext.scaled_dot_product_attention(q, k, v, scale=scale)
    for g in grad_list(out, (q, k, v), torch.ones_like(out)):
        assert torch.isfinite(g).all()


def test_huge_values_float32(gen):
    q = randn((1, 2, 40, 32), torch.float32, gen=gen, scale=1e4)
    k = randn((1, 2, 41, 32), torch.float32, gen=gen, scale=1e2)
    v = randn((1, 2, 41, 32), torch.float32, gen=gen, scale=1e4)
    out = flash_ext.scaled_dot_product_attention(q, k, v)
    ref = reference_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * 1e4, rtol=1e-4)


# --------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("j", [0, 11])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_key_propagates_like_reference(bad, causal, j, gen):
    """With causal and j = 0, query row 0 sees only the bad key: its output
    must still be NaN (for a NaN key), not hidden as an 'empty' row."""
    q = randn((1, 2, 30, 8), gen=gen)
    k = randn((1, 2, 30, 8), gen=gen)
    v = randn((1, 2, 30, 8), gen=gen)
    k[0, 1, j, 3] = bad
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref = reference_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10, equal_nan=True)
    if math.isnan(bad):
        sees = torch.arange(30) >= j if causal else torch.ones(30, dtype=torch.bool)
        assert torch.isnan(out[0, 1][sees]).all(), "a NaN key must make every output that sees it NaN"
        assert not torch.isnan(out[0, 1][~sees]).any()
        assert not torch.isnan(out[0, 0]).any(), "another head must stay finite"


def test_nan_in_value_and_query_propagate(gen):
    q = randn((1, 1, 25, 8), gen=gen)
    k = randn((1, 1, 25, 8), gen=gen)
    v = randn((1, 1, 25, 8), gen=gen)
    v[0, 0, 9, 0] = math.nan
    q[0, 0, 3, 5] = math.nan
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isnan(out[0, 0, 3]).all(), "a NaN query row gives a NaN output row"
    assert torch.isnan(out[0, 0, 9:, 0]).all(), "rows that see a NaN value get NaN in that column"
    ref = reference_attention(q, k, v, is_causal=True)
    ok = torch.ones(25, dtype=torch.bool)
    ok[3] = False
    ok[9:] = False
    # Rows that do not see key 9 weight it by exactly 0, and 0 · NaN is NaN in
    # any blocked product (PyTorch's math and flash backends give NaN there
    # too): each such element is either NaN or the reference, never another
    # finite value.
    rest, want = out[0, 0, ok], ref[0, 0, ok]
    finite = ~torch.isnan(rest)
    torch.testing.assert_close(rest[finite], want[finite], atol=1e-10, rtol=1e-10)
    assert not torch.isnan(out[0, 0, ok][:, 1:]).any(), "NaN reached columns whose values hold no NaN"
    # NaN in the value is never hidden in columns of the rows that see it
    out_fa = flash_ext.flash_attn_func(to_bshd(q), to_bshd(k), to_bshd(v), causal=True)
    assert torch.isnan(out_fa[0, 9:, 0, 0]).all()


def test_nan_in_kvcache_propagates(gen):
    k_cache = randn((2, 20, 1, 8), gen=gen)
    v_cache = randn((2, 20, 1, 8), gen=gen)
    k_cache[1, 4, 0, 2] = math.nan  # inside sequence 1's length
    q = randn((2, 1, 2, 8), gen=gen)
    out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([10, 10], dtype=torch.int32),
                                            num_splits=3)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[0]).any()


def test_nan_float_mask_propagates(gen):
    q, k, v = (randn((1, 1, 9, 8), gen=gen) for _ in range(3))
    mask = randn((9, 9), gen=gen)
    mask[4, 6] = math.nan
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = reference_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10, equal_nan=True)
    assert torch.isnan(out[0, 0, 4]).all()


# --------------------------------------------------------------------------- degenerate shapes


@pytest.mark.parametrize("shape", [
    # (batch, heads, L, S)
    (2, 3, 0, 5), (2, 3, 5, 0), (0, 3, 5, 5), (2, 3, 0, 0), (1, 1, 1, 1), (3, 1, 1, 7), (1, 1, 7, 1),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_empty_and_length_one(shape, dtype, gen):
    b, h, L, S = shape
    q = randn((b, h, L, 16), dtype, gen=gen, requires_grad=True)
    k = randn((b, h, S, 16), dtype, gen=gen, requires_grad=True)
    v = randn((b, h, S, 12), dtype, gen=gen, requires_grad=True)
    for causal in (False, True):
        out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert out.shape == (b, h, L, 12)
        ref = reference_attention(q, k, v, is_causal=causal)
        assert_matches_reference(out, ref, dtype)
        dout = randn(out.shape, dtype, gen=gen)
        got = grad_list(out, (q, k, v), dout)
        want = grad_list(ref, (q, k, v), dout.double())
        for g, r, t in zip(got, want, (q, k, v)):
            assert g.shape == t.shape
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), r.double(), atol=1e-5, rtol=1e-5)
    # flash_attn_func and its lse
    out, lse = flash_ext.flash_attn_func(to_bshd(q), to_bshd(k), to_bshd(v), causal=True, return_lse=True)
    assert out.shape == (b, L, h, 12) and lse.shape == (b, h, L)
    ref, ref_lse = reference_attention(q, k, v, window=(-1, 0), bottom_right=True, return_lse=True)
    assert_matches_reference(out, to_bshd(ref), dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.mark.parametrize("batch", [(0, 3), (2, 0), (0,)], ids=str)
def test_zero_size_leading_dimensions(batch, gen):
    # 5-D (and 4-D) inputs with an empty leading dimension: an empty output of
    # the right shape, and empty gradients.
    q = randn((*batch, 2, 5, 8), gen=gen, requires_grad=True)
    k = randn((*batch, 2, 7, 8), gen=gen, requires_grad=True)
    v = randn((*batch, 2, 7, 4), gen=gen, requires_grad=True)
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (*batch, 2, 5, 4)
    grads = grad_list(out, (q, k, v), torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


def test_kvcache_batch_zero_and_empty_cache(gen):
    q = randn((0, 1, 2, 8), gen=gen)
    out = flash_ext.flash_attn_with_kvcache(q, randn((0, 5, 2, 8), gen=gen), randn((0, 5, 2, 8), gen=gen),
                                            cache_seqlens=torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 1, 2, 8)
    q = randn((2, 3, 2, 8), gen=gen)
    out, lse = flash_ext.flash_attn_with_kvcache(q, randn((2, 5, 2, 8), gen=gen), randn((2, 5, 2, 8), gen=gen),
                                                 cache_seqlens=torch.zeros(2, dtype=torch.int32), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("L,S", [(10, 4), (33, 1), (300, 130)])
def test_q_longer_than_kv_causal(L, S, gen):
    """Top-left (SDPA): every row sees key 0. Bottom-right (flash_attn_func):
    rows i < L - S see nothing -> 0 output, -inf lse, zero gradients."""
    q = randn((1, 2, L, 16), gen=gen, requires_grad=True)
    k = randn((1, 2, S, 16), gen=gen, requires_grad=True)
    v = randn((1, 2, S, 16), gen=gen, requires_grad=True)
    dout = randn((1, 2, L, 16), gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True), atol=1e-10, rtol=1e-10)
    for g, r in zip(grad_list(out, (q, k, v), dout), grad_list(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)

    out, lse = flash_ext.flash_attn_func(to_bshd(q), to_bshd(k), to_bshd(v), causal=True, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, window=(-1, 0), bottom_right=True, return_lse=True)
    torch.testing.assert_close(out, to_bshd(ref), atol=1e-10, rtol=1e-10)
    assert torch.equal(out[:, : L - S], torch.zeros_like(out[:, : L - S]))
    assert torch.isneginf(lse[..., : L - S]).all()
    torch.testing.assert_close(lse[..., L - S:], ref_lse[..., L - S:], atol=1e-10, rtol=1e-10)
    dq, dk, dv = grad_list(out, (q, k, v), to_bshd(dout))
    assert torch.equal(dq[:, :, : L - S], torch.zeros_like(dq[:, :, : L - S]))
    for g, r in zip((dq, dk, dv), grad_list(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_one_head_and_head_dim_one(gen):
    q, k, v = (randn((3, 1, 9, 1), gen=gen) for _ in range(3))
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_matches_reference(out, reference_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=["3d", "4d", "5d"])
@pytest.mark.parametrize("causal", [False, True])
def test_single_kv_head_broadcasts_without_enable_gqa(lead, causal, gen):
    """PyTorch broadcasts a size-1 head dim like any batch dim: one key/value
    head under several query heads is multi-query attention, which our
    kernels serve (strict mode: no fallback) with or without enable_gqa."""
    q = randn((*lead, 4, 9, 16), gen=gen, requires_grad=True)
    k = randn((*lead, 1, 11, 16), gen=gen, requires_grad=True)
    v = randn((*lead, 1, 11, 8), gen=gen, requires_grad=True)
    dout = randn((*lead, 4, 9, 8), gen=gen)
    ref = reference_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ref, TORCH_SDPA(q, k, v, is_causal=causal), atol=1e-12, rtol=1e-12)
    want = grad_list(ref, (q, k, v), dout)
    for enable_gqa in (False, True):
        out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        for g, r in zip(grad_list(out, (q, k, v), dout), want):
            torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", ["one_query_head", "head_dim_0", "value_dim_0", "dropout_1"])
def test_degenerate_calls_give_pytorchs_result(case, gen):
    """Calls PyTorch's SDPA defines that no kernel of ours carries: one query
    head over several key/value heads (broadcast), empty head dims (uniform
    weights, or an empty output), dropout_p = 1 (every weight dropped: 0).
    They go to PyTorch's SDPA (a warning; an error in strict mode) and give
    its output and gradients."""
    q_shape, kv_shape, v_dim, kwargs = {
        "one_query_head": ((2, 1, 5, 8), (2, 3, 7, 8), 8, {}),
        "head_dim_0": ((2, 3, 5, 0), (2, 3, 7, 0), 8, {"scale": 1.0}),
        "value_dim_0": ((2, 3, 5, 8), (2, 3, 7, 8), 0, {}),
        "dropout_1": ((2, 3, 5, 8), (2, 3, 7, 8), 8, {"dropout_p": 1.0}),
    }[case]
    q = randn(q_shape, gen=gen, requires_grad=True)
    k = randn(kv_shape, gen=gen, requires_grad=True)
    v = randn((*kv_shape[:-1], v_dim), gen=gen, requires_grad=True)
    with pytest.raises(RuntimeError, match="strict mode"):
        flash_ext.scaled_dot_product_attention(q, k, v, **kwargs)
    flash_ext.set_strict(False)
    with pytest.warns(UserWarning, match="falls back"):
        out = flash_ext.scaled_dot_product_attention(q, k, v, **kwargs)
    want = TORCH_SDPA(q, k, v, **kwargs)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    if case == "dropout_1":
        assert torch.equal(out, torch.zeros_like(out))
    dout = randn(out.shape, gen=gen)
    for g, r in zip(grad_list(out, (q, k, v), dout), grad_list(want, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=0, rtol=0)
