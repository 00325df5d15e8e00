"""Forward pass against the float64 reference: shapes, GQA, masks with every
broadcast shape, scale, value dim, strides, 3-D/5-D inputs, dtypes; and
flash_attn_func (bottom-right causal, windows, lse)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from conftest import (
    ALL_DTYPES, DEVICES, LOW_PRECISION, TORCH_SDPA, assert_matches_reference, rand_bool, randn,
    decode_reference, reference_attention, skip_unless_served, to_bshd,
)

# (batch, heads, kv_heads, L, S, E, Ev, causal)
GRID = [
    (1, 1, 1, 1, 1, 8, 8, False),
    (2, 2, 2, 7, 7, 16, 16, True),
    (3, 4, 2, 63, 65, 40, 40, False),
    (1, 4, 1, 65, 63, 64, 64, True),        # MQA, L > S, top-left causal
    (2, 8, 2, 129, 33, 96, 96, False),      # GQA 4
    (1, 2, 2, 1, 257, 128, 128, False),     # a single query row
    (1, 2, 1, 257, 129, 256, 256, True),
    (2, 3, 3, 33, 129, 40, 24, True),       # value dim != query dim
    (1, 2, 2, 200, 257, 64, 128, False),
    (2, 4, 4, 129, 129, 8, 8, True),
    (1, 6, 3, 17, 300, 16, 16, True),       # L < S, top-left causal
]


def _ids(case):
    b, h, hk, L, S, E, Ev, c = case
    return f"b{b}h{h}kv{hk}-L{L}S{S}-E{E}v{Ev}-{'causal' if c else 'full'}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_sdpa_forward_grid(case, dtype, device, gen):
    b, h, hk, L, S, E, Ev, causal = case
    skip_unless_served(device, dtype, E, Ev)
    q = randn((b, h, L, E), dtype, device, gen)
    k = randn((b, hk, S, E), dtype, device, gen)
    v = randn((b, hk, S, Ev), dtype, device, gen)
    gqa = h != hk
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert out.dtype == dtype and out.device == q.device
    ref = reference_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    torch_out = None
    if dtype in LOW_PRECISION:
        torch_out = TORCH_SDPA(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert_matches_reference(out, ref, dtype, torch_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0, 0.0])
def test_sdpa_custom_scale(scale, dtype, device, gen):
    skip_unless_served(device, dtype, 32)
    q, k, v = (randn((2, 3, 37, 32), dtype, device, gen) for _ in range(3))
    if device == "cuda" and scale <= 0:
        # The CUDA kernels fold the scale into exp2 after the row maximum
        # (positive scales only): strict mode refuses, default mode falls back.
        with pytest.raises(RuntimeError, match="scale <= 0"):
            flash_ext.scaled_dot_product_attention(q, k, v, scale=scale)
        flash_ext.set_strict(False)
        with pytest.warns(UserWarning, match="scale <= 0"):
            out = flash_ext.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out = flash_ext.scaled_dot_product_attention(q, k, v, scale=scale)
    ref = reference_attention(q, k, v, scale=scale)
    torch_out = None
    if dtype in LOW_PRECISION:
        # PyTorch's fused CUDA kernels give NaN at scale 0: compare with its math backend there.
        if scale <= 0:
            with sdpa_kernel([SDPBackend.MATH]):
                torch_out = TORCH_SDPA(q, k, v, scale=scale)
        else:
            torch_out = TORCH_SDPA(q, k, v, scale=scale)
    assert_matches_reference(out, ref, dtype, torch_out)


def test_sdpa_default_scale_is_inverse_sqrt_dim(gen):
    q, k, v = (randn((1, 2, 19, 24), gen=gen, scale=3.0) for _ in range(3))
    out = flash_ext.scaled_dot_product_attention(q, k, v)
    explicit = flash_ext.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(24))
    torch.testing.assert_close(out, explicit, atol=1e-12, rtol=1e-12)
    assert_matches_reference(out, reference_attention(q, k, v, scale=1 / math.sqrt(24)))
    # and a different scale really changes the result
    assert (flash_ext.scaled_dot_product_attention(q, k, v, scale=1.0) - out).abs().max() > 1e-3


# --------------------------------------------------------------------------- masks

B, H, L, S, E = 2, 3, 9, 13, 16
MASK_SHAPES = [
    (L, S), (1, S), (L, 1), (S,), (1, 1), (1,),
    (B, 1, L, S), (1, H, L, S), (B, H, 1, S), (B, H, L, S), (1, 1, 1, S), (H, L, S), (1, L, S),
    (B, 1, 1, 1), (1, H, 1, 1), (B, H, L, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float", "float_with_inf"])
def test_sdpa_mask_broadcast(kind, shape, dtype, device, gen):
    skip_unless_served(device, dtype, E)
    q = randn((B, H, L, E), dtype, device, gen)
    k = randn((B, H, S, E), dtype, device, gen)
    v = randn((B, H, S, E), dtype, device, gen)
    if kind == "bool":
        mask = rand_bool(shape, gen, 0.6, device)
    else:
        mask = randn(shape, dtype, device, gen)
        if kind == "float_with_inf":
            mask = mask.masked_fill(rand_bool(shape, gen, 0.3, device), -math.inf)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = reference_attention(q, k, v, attn_mask=mask)
    assert_matches_reference(out, ref, dtype)
    # PyTorch agrees wherever its math has no empty (NaN) rows (some shapes,
    # e.g. a 1-D mask, PyTorch's CPU SDPA does not take; the reference decides)
    try:
        theirs = TORCH_SDPA(q, k, v, attn_mask=mask)
    except (RuntimeError, IndexError):
        return
    finite = ~torch.isnan(theirs)
    torch.testing.assert_close(out[finite], theirs[finite], atol=1e-5 if dtype == torch.float32 else 1e-10,
                               rtol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_mask_low_precision(kind, dtype, device, gen):
    q = randn((2, 4, 70, 64), dtype, device, gen)
    k = randn((2, 4, 90, 64), dtype, device, gen)
    v = randn((2, 4, 90, 64), dtype, device, gen)
    if kind == "bool":
        mask = rand_bool((2, 1, 70, 90), gen, 0.5, device)
        mask[..., 0] = True  # no empty rows, so PyTorch's output is finite
    else:
        mask = randn((1, 4, 70, 90), dtype, device, gen, scale=2.0)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = reference_attention(q, k, v, attn_mask=mask)
    assert_matches_reference(out, ref, dtype, TORCH_SDPA(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sdpa_mask_noncontiguous_and_gqa(dtype, gen):
    """A transposed (column-major) bool mask and a float mask in a wider buffer,
    with GQA heads."""
    q = randn((2, 4, 21, 16), dtype, gen=gen)
    k = randn((2, 2, 34, 16), dtype, gen=gen)
    v = randn((2, 2, 34, 8), dtype, gen=gen)
    bool_mask = rand_bool((34, 21), gen).t()
    assert not bool_mask.is_contiguous()
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, enable_gqa=True)
    assert_matches_reference(out, reference_attention(q, k, v, attn_mask=bool_mask, enable_gqa=True), dtype)
    bias = randn((2, 4, 21, 70), dtype, gen=gen)[..., 3:71:2]
    assert bias.shape[-1] == 34 and bias.stride(-1) == 2
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    assert_matches_reference(out, reference_attention(q, k, v, attn_mask=bias, enable_gqa=True), dtype)


def test_sdpa_float_mask_of_other_float_dtype(gen):
    """A float32 mask on float64 inputs is added to the scores as its values.
    (PyTorch's CPU SDPA accepts this too, but on torch 2.14 returns wrong
    values for it, so the float64 reference decides.)"""
    q, k, v = (randn((1, 2, 11, 8), gen=gen) for _ in range(3))
    mask = randn((11, 11), torch.float32, gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_matches_reference(out, reference_attention(q, k, v, attn_mask=mask.double()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_sdpa_under_autocast(dtype, device, gen):
    """Inside torch.autocast the float inputs (mask included) are cast to the
    autocast dtype, as PyTorch's SDPA does: same output dtype, values within
    low-precision error of the float64 reference, float32 gradients."""
    skip_unless_served(device, dtype, 32)
    q = randn((2, 4, 33, 32), torch.float32, device, gen=gen, requires_grad=True)
    k = randn((2, 4, 40, 32), torch.float32, device, gen=gen, requires_grad=True)
    v = randn((2, 4, 40, 32), torch.float32, device, gen=gen, requires_grad=True)
    bias = randn((33, 40), torch.float32, device, gen=gen)
    with torch.autocast(device, dtype=dtype):
        out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        theirs = TORCH_SDPA(q, k, v, attn_mask=bias)
    assert out.dtype == theirs.dtype == dtype
    low = [t.detach().to(dtype) for t in (q, k, v, bias)]
    assert_matches_reference(out, reference_attention(*low[:3], attn_mask=low[3]), dtype, theirs)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # outside the region nothing is cast (float32 runs on the CPU kernels)
    if device == "cpu":
        assert flash_ext.scaled_dot_product_attention(q, k, v).dtype == torch.float32


# --------------------------------------------------------------------------- strides and ranks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sdpa_gpt2_view_transpose(dtype, device, gen):
    """nanoGPT: qkv = x @ W -> split -> view(B,T,nh,hs).transpose(1,2)."""
    skip_unless_served(device, dtype, 32)
    b, t, nh, hs = 2, 67, 4, 32
    qkv = randn((b, t, 3 * nh * hs), dtype, device, gen)
    q, k, v = qkv.split(nh * hs, dim=2)
    q, k, v = (x.view(b, t, nh, hs).transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference_attention(q, k, v, is_causal=True)
    torch_out = TORCH_SDPA(q, k, v, is_causal=True) if dtype in LOW_PRECISION else None
    assert_matches_reference(out, ref, dtype, torch_out)


STRIDE_CASES = ["seq_slice", "last_dim_slice", "expanded_batch", "heads_permuted", "offset_view"]


@pytest.mark.parametrize("layout", STRIDE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sdpa_noncontiguous_inputs(layout, dtype, gen):
    if layout == "seq_slice":
        q = randn((2, 3, 40, 16), dtype, gen=gen)[:, :, ::2]
        k = randn((2, 3, 62, 16), dtype, gen=gen)[:, :, 1::3]
        v = randn((2, 3, 62, 24), dtype, gen=gen)[:, :, 1::3]
    elif layout == "last_dim_slice":
        q = randn((2, 3, 20, 32), dtype, gen=gen)[..., ::2]
        k = randn((2, 3, 21, 32), dtype, gen=gen)[..., 1::2]
        v = randn((2, 3, 21, 16), dtype, gen=gen)
    elif layout == "expanded_batch":
        q = randn((3, 2, 20, 16), dtype, gen=gen)
        k = randn((1, 2, 21, 16), dtype, gen=gen).expand(3, -1, -1, -1)
        v = randn((1, 2, 21, 16), dtype, gen=gen).expand(3, -1, -1, -1)
    elif layout == "heads_permuted":
        q = randn((20, 2, 3, 16), dtype, gen=gen).permute(1, 2, 0, 3)
        k = randn((3, 21, 2, 16), dtype, gen=gen).permute(2, 0, 1, 3)
        v = randn((21, 3, 16, 2), dtype, gen=gen).permute(3, 1, 0, 2)
    else:
        base = randn((2 * 3 * 21 * 16 + 5,), dtype, gen=gen)
        q = randn((2, 3, 20, 16), dtype, gen=gen)
        k = base[5:].view(2, 3, 21, 16)
        v = base[:-5].view(2, 3, 21, 16)
    for causal in (False, True):
        out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert_matches_reference(out, reference_attention(q, k, v, is_causal=causal), dtype,
                                 what=f"{layout} causal={causal}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sdpa_3d_2d_5d_inputs(dtype, gen):
    # 3-D (N, L, E)
    q, k, v = randn((4, 13, 16), dtype, gen=gen), randn((4, 9, 16), dtype, gen=gen), randn((4, 9, 8), dtype, gen=gen)
    mask = rand_bool((4, 13, 9), gen)
    mask[..., 0] = True
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask[0]}):
        out = flash_ext.scaled_dot_product_attention(q, k, v, **kw)
        assert out.shape == (4, 13, 8)
        assert_matches_reference(out, reference_attention(q, k, v, **kw), dtype, what=f"3-D {list(kw)}")
        torch.testing.assert_close(out, TORCH_SDPA(q, k, v, **kw), atol=1e-5, rtol=1e-5)
    # 3-D with GQA: the leading dim is the heads dim that enable_gqa groups
    # (served by our kernels: strict mode would raise on a fallback)
    kg, vg = k[:2], v[:2]
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask[:, :, :]}):
        out = flash_ext.scaled_dot_product_attention(q, kg, vg, enable_gqa=True, **kw)
        assert_matches_reference(out, reference_attention(q, kg, vg, enable_gqa=True, **kw), dtype,
                                 what=f"3-D GQA {list(kw)}")
    # 2-D (L, E)
    q2, k2, v2 = q[0], k[0], v[0]
    out = flash_ext.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    assert out.shape == (13, 8)
    assert_matches_reference(out, reference_attention(q2, k2, v2, is_causal=True), dtype, what="2-D")
    # 5-D (B, X, H, L, E), with GQA and a broadcast mask, and a transposed view
    q5 = randn((2, 3, 4, 11, 16), dtype, gen=gen)
    k5 = randn((2, 3, 2, 14, 16), dtype, gen=gen)
    v5 = randn((2, 3, 14, 2, 8), dtype, gen=gen).transpose(2, 3)
    m5 = randn((3, 1, 11, 14), dtype, gen=gen)
    out = flash_ext.scaled_dot_product_attention(q5, k5, v5, attn_mask=m5, enable_gqa=True)
    assert out.shape == (2, 3, 4, 11, 8)
    assert_matches_reference(out, reference_attention(q5, k5, v5, attn_mask=m5, enable_gqa=True), dtype,
                             what="5-D")
    out = flash_ext.scaled_dot_product_attention(q5, k5, v5, is_causal=True, enable_gqa=True)
    assert_matches_reference(out, reference_attention(q5, k5, v5, is_causal=True, enable_gqa=True), dtype,
                             what="5-D causal")


# --------------------------------------------------------------------------- flash_attn_func

FA_CASES = [
    # (batch, heads, kv_heads, L, S, E, causal, window)
    (2, 2, 2, 7, 7, 16, True, (-1, -1)),
    (1, 4, 2, 65, 63, 40, True, (-1, -1)),     # L > S bottom-right: first rows empty
    (2, 4, 1, 33, 129, 64, True, (-1, -1)),    # L < S
    (1, 2, 2, 129, 129, 32, False, (16, 0)),   # sliding window, causal-like
    (1, 2, 2, 65, 100, 32, False, (8, 5)),     # two-sided window, L != S
    (2, 2, 2, 100, 65, 16, False, (0, 0)),     # diagonal only, L > S
    (1, 3, 3, 63, 63, 96, False, (-1, 3)),     # right-bounded only
    (1, 2, 1, 1, 257, 128, True, (-1, -1)),    # decode-like
    (1, 2, 2, 70, 70, 8, True, (10, 7)),       # causal overrides the right window
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", FA_CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}-L{c[3]}S{c[4]}-E{c[5]}-c{int(c[6])}-w{c[7][0]}_{c[7][1]}")
def test_flash_attn_func_forward(case, dtype, device, gen):
    b, h, hk, L, S, E, causal, window = case
    skip_unless_served(device, dtype, E)
    q = randn((b, L, h, E), dtype, device, gen)
    k = randn((b, S, hk, E), dtype, device, gen)
    v = randn((b, S, hk, E), dtype, device, gen)
    out, lse = flash_ext.flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True)
    assert out.shape == (b, L, h, E) and out.dtype == dtype
    assert lse.shape == (b, h, L)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    w = (window[0], 0) if causal else window
    ref, ref_lse = reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=w, bottom_right=True,
                                       return_lse=True)
    ref = to_bshd(ref)
    torch_out = None
    if dtype in LOW_PRECISION:
        # PyTorch's SDPA on the same inputs with the same visibility as a bool mask
        from conftest import window_visible
        vis = window_visible(L, S, w[0], w[1], True, device=device)
        safe = vis.clone()
        safe[~vis.any(-1)] = True  # keep PyTorch finite; those rows are compared to 0 below anyway
        torch_out = to_bshd(TORCH_SDPA(to_bshd(q), to_bshd(k), to_bshd(v), attn_mask=safe,
                                       enable_gqa=h != hk))
        torch_out[:, ~vis.any(-1)] = 0
    assert_matches_reference(out, ref, dtype, torch_out)
    # lse: natural log, -inf for rows with no key, float32 precision suffices
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty.cpu())
    lse_tol = 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[~empty].double().cpu(), ref_lse[~empty].cpu(), atol=lse_tol, rtol=lse_tol)


def test_flash_attn_func_default_scale_and_custom_scale(gen):
    q, k, v = (randn((2, 17, 2, 24), gen=gen) for _ in range(3))
    out = flash_ext.flash_attn_func(q, k, v)
    ref = to_bshd(reference_attention(to_bshd(q), to_bshd(k), to_bshd(v)))
    assert_matches_reference(out, ref)
    out = flash_ext.flash_attn_func(q, k, v, softmax_scale=0.7, causal=True)
    ref = to_bshd(reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), scale=0.7, window=(-1, 0),
                                      bottom_right=True))
    assert_matches_reference(out, ref)


def test_flash_attn_func_value_dim_and_strides(gen):
    """(B, S, H, D) views of packed qkv and a value dim != query dim."""
    b, n, h = 2, 45, 3
    qkv = randn((b, n, 3, h, 32), gen=gen)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    v = randn((b, n, h, 48), gen=gen)[..., :20]
    assert not q.is_contiguous() and not v.is_contiguous()
    out = flash_ext.flash_attn_func(q, k, v, causal=True)
    ref = to_bshd(reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=(-1, 0), bottom_right=True))
    assert out.shape == (b, n, h, 20)
    assert_matches_reference(out, ref)


# bf16 forwards with more than one 128-row query block take the CPU's
# matrix-unit path where the CPU has one (packed K/V; P rounded to bf16 in
# one pass when nothing needs the scaled scores first), else the staged one.
# The cases' call arguments: the one-pass softmax serves all but the float
# mask and the negative scale.
PACKED_CASES = {
    "full": dict(),
    "causal": dict(is_causal=True),
    "bool-mask": dict(mask="bool"),
    "float-mask": dict(mask="float"),
    "scale-negative": dict(scale=-0.3),
    "scale-large": dict(scale=4.0),
    # The first keys, in the tile the softmax reaches last, score so far
    # above the running maximum that exponentials shifted by it would
    # overflow: that tile must be redone with its own maximum.
    "early-keys-dominate": dict(is_causal=True, early_keys_scale=50.0),
}


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
def test_cpu_bf16_long_queries(case, dim, gen):
    kwargs = dict(PACKED_CASES[case])
    b, h, hk, L, S = 2, 4, 2, 300, 333
    q = randn((b, h, L, dim), torch.bfloat16, "cpu", gen)
    k = randn((b, hk, S, dim), torch.bfloat16, "cpu", gen)
    v = randn((b, hk, S, dim), torch.bfloat16, "cpu", gen)
    k[:, :, :64] *= kwargs.pop("early_keys_scale", 1.0)
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        mask = rand_bool((b, 1, L, S), gen)
        mask[0, :, 5] = False  # a row that sees no key: 0, not NaN
    elif mask == "float":
        mask = randn((1, h, 1, S), torch.bfloat16, "cpu", gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, **kwargs)
    ref = reference_attention(q, k, v, attn_mask=mask, enable_gqa=True, **kwargs)
    torch_out = torch.nan_to_num(TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True, **kwargs), nan=0.0)
    assert_matches_reference(out, ref, torch.bfloat16, torch_out)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        assert (out[0, :, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cpu_later_tiles_far_above_the_running_maximum(dtype, dropout_p, gen):
    # Key tiles run last to first; the first 64 keys, in the last tile, score
    # ~150 above the maximum of the ones before, so any shortcut that kept the
    # earlier maximum as the exponentials' shift would overflow there.
    q = randn((1, 3, 600, 32), dtype, "cpu", gen)
    k = randn((1, 3, 600, 32), dtype, "cpu", gen)
    v = randn((1, 3, 600, 32), dtype, "cpu", gen)
    k[:, :, :64] *= 60.0
    out, lse = flash_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, causal=True, return_lse=True)
    assert torch.isfinite(out).all()
    ref, ref_lse = reference_attention(q, k, v, is_causal=True, return_lse=True)
    # Scores near 300 carry float32 rounding of ~1e-5 (so the output is
    # checked loosely there); the statistics must hold with or without dropout.
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=0)
    if dropout_p == 0.0:
        torch.testing.assert_close(out.transpose(1, 2).double(), ref.double(), atol=tol, rtol=tol)


def test_cpu_bf16_long_queries_propagate_nan(gen):
    # A NaN in one key reaches every row that sees it, as in the reference.
    q = randn((1, 2, 300, 64), torch.bfloat16, "cpu", gen)
    k = randn((1, 2, 300, 64), torch.bfloat16, "cpu", gen)
    v = randn((1, 2, 300, 64), torch.bfloat16, "cpu", gen)
    k[0, 1, 200, 3] = float("nan")
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference_attention(q, k, v, is_causal=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 1, 200:].isnan().all() and not out[0, 1, :200].isnan().any() and not out[0, 0].isnan().any()


def test_cpu_avx2_loops(tmp_path, gen):
    # The softmax loops of CPUs without AVX-512, reached on any x86 CPU by
    # running under ATEN_CPU_CAPABILITY=avx2 (which our loops follow, as
    # ATen's kernels do): a float32 forward with gradients and a bf16 forward
    # long enough for the one-pass bf16 softmax.
    import os
    import subprocess
    import sys
    q32, k32, v32 = (randn((2, 4, 150, 48), torch.float32, "cpu", gen) for _ in range(3))
    dout = randn((2, 4, 150, 48), torch.float32, "cpu", gen)
    q16, k16, v16 = (randn((1, 4, 300, 64), torch.bfloat16, "cpu", gen) for _ in range(3))
    torch.save([q32, k32, v32, dout, q16, k16, v16], tmp_path / "inputs.pt")
    script = f"""
import torch, flash_ext
assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT"), torch.backends.cpu.get_cpu_capability()
q32, k32, v32, dout, q16, k16, v16 = torch.load(r"{tmp_path / 'inputs.pt'}")
for t in (q32, k32, v32):
    t.requires_grad_()
out32 = flash_ext.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
grads = torch.autograd.grad(out32, (q32, k32, v32), dout)
out16 = flash_ext.scaled_dot_product_attention(q16, k16, v16, is_causal=True)
torch.save([out32.detach(), *grads, out16], r"{tmp_path / 'outputs.pt'}")
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    out32, dq, dk, dv, out16 = torch.load(tmp_path / "outputs.pt")
    leaves = [t.requires_grad_() for t in (q32, k32, v32)]
    ref = reference_attention(*leaves, is_causal=True)
    assert_matches_reference(out32, ref, torch.float32)
    for got, want in zip((dq, dk, dv), torch.autograd.grad(ref, leaves, dout.double())):
        assert_matches_reference(got, want, torch.float32)
    torch_out = TORCH_SDPA(q16, k16, v16, is_causal=True)  # this process: PyTorch's own kernels
    assert_matches_reference(out16, reference_attention(q16, k16, v16, is_causal=True), torch.bfloat16, torch_out)


def test_cpu_16bit_conversions_without_vector_isa(tmp_path, gen):
    # bfloat16/float16 -> float32 staging (vec_math's conversions) on the
    # element loop that CPUs without AVX2/F16C take, reached by running under
    # ATEN_CPU_CAPABILITY=default: a forward on the staged path and a decode
    # step, at dims off the 8-lane vectors, against the float64 reference.
    import os
    import subprocess
    import sys
    cases = {dtype: [randn((1, 3, 100, 20), dtype, "cpu", gen) for _ in range(3)] +
             [randn((2, 1, 4, 20), dtype, "cpu", gen), randn((2, 50, 2, 20), dtype, "cpu", gen),
              randn((2, 50, 2, 12), dtype, "cpu", gen)]
             for dtype in (torch.bfloat16, torch.float16)}
    torch.save(cases, tmp_path / "inputs.pt")
    script = f"""
import torch, flash_ext
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
cases = torch.load(r"{tmp_path / 'inputs.pt'}")
lens = torch.tensor([50, 31], dtype=torch.int32)
outs = {{dtype: (flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True),
                 flash_ext.flash_attn_with_kvcache(qd, kc.clone(), vc.clone(), cache_seqlens=lens))
         for dtype, (q, k, v, qd, kc, vc) in cases.items()}}
torch.save(outs, r"{tmp_path / 'outputs.pt'}")
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    outs = torch.load(tmp_path / "outputs.pt")
    lens = [50, 31]
    for dtype, (q, k, v, qd, kc, vc) in cases.items():
        out, out_decode = outs[dtype]
        assert_matches_reference(out, reference_attention(q, k, v, is_causal=True), dtype,
                                 TORCH_SDPA(q, k, v, is_causal=True))
        ref, _ = decode_reference(qd, kc, vc, lens, 0, causal=True)
        # One new token sees the whole cache: PyTorch's SDPA per sequence, GQA.
        torch_out = torch.cat([TORCH_SDPA(qd[b:b + 1].transpose(1, 2), kc[b:b + 1, :n].transpose(1, 2),
                                          vc[b:b + 1, :n].transpose(1, 2), enable_gqa=True).transpose(1, 2)
                               for b, n in enumerate(lens)])
        assert_matches_reference(out_decode, ref, dtype, torch_out)



@pytest.mark.parametrize("n", [64, 256], ids=["staged", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_16bit_outputs_round_to_nearest_even(dtype, n):
    # q = 0: every key weighs the same, so each output is the exact float32
    # mean of the value rows, (v1 + v2) / 2, halfway between two 16-bit
    # numbers; rounding it to nearest even gives v2, truncation v1. Catches a
    # store or P-rounding path that rounds otherwise, which the tolerance of
    # the reference comparisons cannot.
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    v1, v2 = 1 + ulp, 1 + 2 * ulp  # v1's last mantissa bit odd, v2's even
    q = torch.zeros(1, 2, n, 64, dtype=dtype)
    k = torch.randn(1, 2, n, 64).to(dtype)
    v = torch.tensor([v1, v2], dtype=dtype).repeat(n // 2)[None, None, :, None].expand(1, 2, n, 64).contiguous()
    out = flash_ext.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, torch.full_like(out, v2))
