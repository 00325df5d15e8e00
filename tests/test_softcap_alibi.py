"""Logit soft-capping and ALiBi (flash_attn_func, the ops, and decode) against
an explicit float64 reference, forward and backward: float64 on the CPU with
fixed tolerances, float16/bfloat16 on every device within twice PyTorch's
error, combined with causal, windows, GQA, bool and float masks (with the
bias gradient), dropout, paged and contiguous caches, split-KV."""
from __future__ import annotations

import math

import pytest
import torch

import flash_ext
from conftest import (
    DEVICES, LOW_PRECISION, TORCH_SDPA, assert_matches_reference, randn, skip_unless_served, to_bshd,
    window_visible,
)

ops = torch.ops.flash_ext


def _visible(L: int, S: int, causal: bool, window, mask, device) -> torch.Tensor:
    """Bool, broadcastable to (B, H, L, S): FlashAttention's bottom-right
    alignment, causal = right window 0, and a bool mask."""
    left, right = window
    vis = window_visible(L, S, left, 0 if causal else right, True, device=device)
    return vis if mask is None or mask.dtype != torch.bool else vis & mask


def _alibi(slopes: torch.Tensor | None, L: int, S: int, device) -> torch.Tensor | float:
    """slope * |i + S - L - j| broadcastable to (B, H, L, S), float64."""
    if slopes is None:
        return 0.0
    i = torch.arange(L, device=device).view(L, 1) + (S - L)
    j = torch.arange(S, device=device).view(1, S)
    slope = slopes.to(torch.float64).view(*slopes.shape[:-1], -1, 1, 1)
    return slope * (i - j).abs().to(torch.float64)


def _repeat_kv(q, k, v):
    rep = q.shape[-3] // k.shape[-3]
    return k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)


def reference(q, k, v, causal: bool = False, softcap: float = 0.0, slopes: torch.Tensor | None = None, *,
              window=(-1, -1), mask=None, keep=None, dropout_p: float = 0.0, return_lse: bool = False):
    """(B, H, L, D) float64 in the library's order: scale * q.k, the cap,
    ALiBi, attn_mask, window, softmax, dropout. Rows that see no key give 0
    (and lse -inf)."""
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64, v64 = _repeat_kv(q64, k64, v64)
    L, S = q.shape[-2], k.shape[-2]
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s - _alibi(slopes, L, S, q.device)
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(torch.float64)
    s = s.masked_fill(~_visible(L, S, causal, window, mask, q.device), -math.inf)
    m = s.detach().amax(dim=-1, keepdim=True)  # a detached shift keeps exact gradients
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    if keep is not None:
        p = p * keep.to(torch.float64) / (1.0 - dropout_p)
    out = p @ v64
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse.masked_fill(denom.squeeze(-1) == 0, -math.inf)


def pytorch_way(q, k, v, causal: bool = False, softcap: float = 0.0, slopes: torch.Tensor | None = None, *,
                window=(-1, -1), mask=None, keep=None, dropout_p: float = 0.0):
    """The same attention computed the way PyTorch users do, at the inputs'
    precision: the yardstick for float16/bfloat16. Without softcap or dropout,
    PyTorch's SDPA with ALiBi and the mask as one additive bias (HF's sdpa
    route for ALiBi models; exact in the input dtype for the power-of-two
    slopes used here); otherwise eager ops as in Gemma-2's eager attention
    (scores and cap in the input dtype, softmax in float32). Rows that see no
    key give 0."""
    L, S = q.shape[-2], k.shape[-2]
    vis = _visible(L, S, causal, window, mask, q.device).expand(*q.shape[:-1], S)
    empty = ~vis.any(-1, keepdim=True)
    bias = torch.as_tensor(-_alibi(slopes, L, S, q.device), dtype=q.dtype, device=q.device)
    bias = torch.where(vis | empty, bias, -math.inf)  # empty rows: any finite output, zeroed below
    if mask is not None and mask.dtype != torch.bool:
        bias = bias + mask
    if not softcap and keep is None:
        out = TORCH_SDPA(q, k, v, attn_mask=bias, enable_gqa=q.shape[-3] != k.shape[-3])
    else:
        kk, vv = _repeat_kv(q, k, v)
        s = (q @ kk.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax((s + bias).float(), dim=-1).to(q.dtype)
        if keep is not None:
            p = p * keep.to(q.dtype) / (1.0 - dropout_p)
        out = p @ vv
    return out.masked_fill(empty, 0)


def _powers_of_two(shape, gen) -> torch.Tensor:
    """ALiBi slopes as the paper's: powers of two (here 1 down to 1/64)."""
    return 2.0 ** -torch.randint(0, 7, shape, generator=gen).to(torch.float32)


def _slopes(kind: str | None, batch: int, heads: int, gen, device) -> torch.Tensor | None:
    if kind == "head":
        return _powers_of_two((heads,), gen).to(device)
    if kind == "batch":  # (batch, heads) with a batch stride other than heads
        return _powers_of_two((batch, heads + 3), gen).to(device)[:, :heads]
    return None


def _poisoned(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    """(B, N, H, D) random, a view into a NaN-filled buffer padded in every
    dimension but the batch: a kernel reading past its rows, heads or dims
    sees NaN."""
    b, n, h, d = shape
    buf = torch.full((b, n + 3, h + 1, d + 8), math.nan, dtype=dtype, device=device)
    view = buf[:, 1:n + 1, :h, :d]
    view.copy_(randn(shape, dtype, device, gen, scale=scale))
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap,alibi", [(5.0, None), (0.0, "head"), (3.0, "batch")])
def test_flash_attn_func_softcap_alibi(device, causal, softcap, alibi, gen):
    skip_unless_served(device, torch.float64)
    B, H, L, S, D = 2, 3, 37, 50, 16
    q, k, v = (randn((B, H, n, D), gen=gen, device=device).requires_grad_() for n in (L, S, S))
    q_scaled = (q * 4).detach().requires_grad_()  # larger logits so the cap bites
    slopes = None
    if alibi == "head":
        slopes = torch.rand(H, generator=gen, dtype=torch.float32).to(device)
    elif alibi == "batch":
        slopes = torch.rand(B, H, generator=gen, dtype=torch.float32).to(device)
    out = flash_ext.flash_attn_func(to_bshd(q_scaled), to_bshd(k), to_bshd(v), causal=causal, softcap=softcap,
                                    alibi_slopes=slopes).transpose(1, 2)
    ref = reference(q_scaled, k, v, causal, softcap, slopes)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = randn(out.shape, gen=gen, device=device)
    got = torch.autograd.grad(out, (q_scaled, k, v), grad)
    want = torch.autograd.grad(ref, (q_scaled, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_gradcheck_softcap_alibi(gen):
    q, k, v = (randn((1, 2, n, 4), gen=gen).requires_grad_() for n in (5, 7, 7))
    slopes = torch.tensor([0.5, 0.25])
    torch.autograd.gradcheck(
        lambda q, k, v: flash_ext.flash_attn_func(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes),
        (to_bshd(q).detach().requires_grad_(), to_bshd(k).detach().requires_grad_(),
         to_bshd(v).detach().requires_grad_()))


def test_kvcache_softcap_alibi_matches_reference(gen):
    B, H, Hkv, D, max_len, q_len = 2, 4, 2, 16, 64, 3
    lens = torch.tensor([10, 40], dtype=torch.int32)
    k_cache, v_cache = (randn((B, max_len, Hkv, D), gen=gen) for _ in range(2))
    q = randn((B, q_len, H, D), gen=gen)
    slopes = torch.rand(H, generator=gen, dtype=torch.float32)
    out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, softcap=4.0,
                                            alibi_slopes=slopes, causal=True)
    for b in range(B):
        n = int(lens[b])
        kb = k_cache[b, :n].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        vb = v_cache[b, :n].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        ref = reference(q[b].transpose(0, 1), kb, vb, True, 4.0, slopes)
        torch.testing.assert_close(out[b].transpose(0, 1), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bad,match", [
    (dict(softcap=-1.0), "softcap"),
    (dict(softcap=math.inf), "softcap"),
    (dict(alibi_slopes=torch.ones(5)), "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(3, dtype=torch.float64)), "alibi_slopes"),
])
def test_bad_softcap_alibi_raise(bad, match, gen):
    q, k, v = (randn((1, 4, 3, 8), gen=gen) for _ in range(3))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        flash_ext.flash_attn_func(q, k, v, **bad)


# --------------------------------------------------------------------------- float16 / bfloat16, every device

PREFILL_CASES = [
    # (batch, heads, kv_heads, L, S, dim, softcap, alibi, causal, window, mask, dropout_p)
    (2, 4, 4, 70, 70, 64, 5.0, None, True, (-1, -1), None, 0.0),
    (2, 4, 2, 37, 130, 128, 0.0, "head", False, (-1, -1), None, 0.0),      # GQA, L < S
    (1, 6, 2, 129, 65, 32, 3.0, "batch", True, (-1, -1), None, 0.0),       # L > S: early rows see nothing
    (2, 2, 2, 100, 100, 64, 4.0, "head", False, (16, 8), "bool", 0.0),
    (1, 4, 4, 64, 96, 256, 30.0, "batch", False, (-1, -1), "float", 0.0),  # bias gradient through the cap
    (2, 4, 1, 90, 90, 96, 5.0, "batch", True, (-1, -1), None, 0.2),        # MQA, padded head dim
    (1, 2, 2, 200, 230, 64, 0.0, "head", False, (40, -1), "float", 0.3),   # several tiles each way
]


def _prefill_id(c):
    b, h, hk, L, S, d, cap, alibi, causal, window, mask, p = c
    return (f"h{h}kv{hk}-L{L}S{S}-d{d}-cap{cap:g}-{alibi or 'noalibi'}-c{int(causal)}"
            f"-w{window[0]}_{window[1]}-{mask or 'nomask'}-p{p:g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=_prefill_id)
def test_softcap_alibi_low_precision_forward_backward(case, dtype, device, gen):
    b, h, hk, L, S, d, softcap, alibi, causal, window, mask_kind, p = case
    skip_unless_served(device, dtype, d)
    q = to_bshd(_poisoned((b, L, h, d), dtype, device, gen, scale=3.0 if softcap else 1.0))  # the cap bites
    k = to_bshd(_poisoned((b, S, hk, d), dtype, device, gen))
    v = to_bshd(_poisoned((b, S, hk, d), dtype, device, gen))
    slopes = _slopes(alibi, b, h, gen, device)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand((b, 1, L, S), generator=gen) < 0.8).to(device)
    elif mask_kind == "float":
        mask = randn((1, h, L, S), dtype, device, gen)
    left, right = window[0], 0 if causal else window[1]
    scale = 1 / math.sqrt(d)

    out, lse, rng_state = ops.attention_fwd(q, k, v, mask, p, scale, left, right, True, softcap, slopes)
    keep = ops.dropout_keep_mask(rng_state, b, h, L, S, p) if p > 0 else None
    dout = randn((b, h, L, d), dtype, device, gen)
    bias_grad = mask_kind == "float"
    grads = ops.attention_bwd(dout, q, k, v, out, lse, rng_state, mask, p, scale, left, right, True, bias_grad,
                              False, softcap, slopes)

    inputs = (q, k, v) + ((mask,) if bias_grad else ())
    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    leaves = [t.detach().requires_grad_() for t in inputs]
    kw = dict(window=window, keep=keep, dropout_p=p)
    ref, ref_lse = reference(*ref_leaves[:3], causal, softcap, slopes, return_lse=True,
                             mask=ref_leaves[3] if bias_grad else mask, **kw)
    want = torch.autograd.grad(ref, ref_leaves, dout.to(torch.float64))
    theirs = pytorch_way(*leaves[:3], causal, softcap, slopes, mask=leaves[3] if bias_grad else mask, **kw)
    their_grads = torch.autograd.grad(theirs, leaves, dout)

    assert_matches_reference(out, ref, dtype, theirs, what="out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows that see no key have lse -inf, and only they"
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-2, rtol=2e-2)
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), grads, want, their_grads):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert_matches_reference(g, w, dtype, t, what=name)


# Varlen (packed) batches: empty and one-token sequences, L != S, sequences
# longer than a query tile; the cap, ALiBi's distance and the causal mask
# per sequence, aligned bottom-right in each, slopes per head or per sequence.
VARLEN_LENS = ([5, 0, 1, 37, 130, 3], [9, 4, 0, 37, 150, 1])


def _per_sequence(fn, tensors, lens_q, lens_k, slopes, dtype, heads, dim):
    """fn(q, k, v, slopes) on each sequence of packed (total, heads, dim)
    tensors, as (1, heads, len, dim); zeros for sequences without queries or
    keys; concatenated back to (total_q, heads, dim)."""
    outs, q0, k0 = [], 0, 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq == 0 or lk == 0:
            outs.append(torch.zeros((lq, heads, dim), dtype=dtype, device=tensors[0].device))
        else:
            seq = [t[r0:r0 + n].transpose(0, 1).unsqueeze(0) for t, r0, n in zip(tensors, (q0, k0, k0), (lq, lk, lk))]
            sl = None if slopes is None else slopes if slopes.dim() == 1 else slopes[b]
            outs.append(fn(*seq, sl)[0].transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float64, *LOW_PRECISION), ids=str)
@pytest.mark.parametrize("causal,softcap,alibi", [(True, 4.0, "batch"), (False, 0.0, "head"), (True, 3.0, None),
                                                  (False, 5.0, "batch")])
def test_varlen_softcap_alibi_forward_backward(device, dtype, causal, softcap, alibi, gen):
    skip_unless_served(device, dtype, 64)
    lens_q, lens_k = VARLEN_LENS
    heads, kv_heads, dim = 4, 2, 64
    q = randn((sum(lens_q), heads, dim), dtype, device, gen, scale=3.0 if softcap else 1.0)  # the cap bites
    k, v = (randn((sum(lens_k), kv_heads, dim), dtype, device, gen) for _ in range(2))
    slopes = _slopes(alibi, len(lens_q), heads, gen, device)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for lens in (lens_q, lens_k))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flash_ext.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                           softcap=softcap, alibi_slopes=slopes)
    dout = randn(out.shape, dtype, device, gen)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    ref = _per_sequence(lambda q, k, v, sl: reference(q, k, v, causal, softcap, sl), ref_leaves, lens_q, lens_k,
                        slopes, torch.float64, heads, dim)
    want = torch.autograd.grad(ref, ref_leaves, dout.to(torch.float64))
    low_leaves = [t.detach().requires_grad_() for t in leaves]
    theirs = _per_sequence(lambda q, k, v, sl: pytorch_way(q, k, v, causal, softcap, sl), low_leaves, lens_q,
                           lens_k, slopes, dtype, heads, dim)
    their_grads = torch.autograd.grad(theirs, low_leaves, dout)
    assert_matches_reference(out, ref, dtype, theirs, what="out")
    for name, g, w, t in zip(("dq", "dk", "dv"), grads, want, their_grads):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert_matches_reference(g, w, dtype, t, what=name)


# Split-KV decoding: the packed rows (group * q_len) pick the warp layout:
# up to 16 rows 1x4, up to 32 2x2, more 4x1.
DECODE_CASES = [
    # (batch, heads, kv_heads, q_len, new_len, max_len, dim, lens, causal, softcap, alibi, num_splits, page)
    (3, 4, 4, 1, 1, 64, 64, [0, 17, 63], True, 5.0, "head", 0, None),
    (2, 8, 2, 3, 3, 192, 128, [0, 150], True, 0.0, "batch", 3, None),
    (2, 6, 2, 4, 0, 128, 64, [7, 128], False, 3.0, "batch", 1, None),
    (2, 16, 2, 4, 2, 128, 128, [30, 126], True, 4.0, "head", 2, 16),     # 32 rows: 2x2
    (2, 8, 1, 5, 5, 128, 256, [5, 64], True, 30.0, "batch", 0, 32),      # 40 rows: 4x1, MQA
    (3, 4, 2, 2, 1, 96, 32, [95, 1, 40], False, 2.0, None, 4, 32),
]


def _decode_id(c):
    b, h, hk, ql, new, max_len, d, lens, causal, cap, alibi, splits, page = c
    return (f"h{h}kv{hk}-q{ql}new{new}-d{d}-c{int(causal)}-cap{cap:g}-{alibi or 'noalibi'}-s{splits}"
            f"-{'paged' + str(page) if page else 'contig'}")


def _paged(cache: torch.Tensor, page: int, table: torch.Tensor, num_pages: int) -> torch.Tensor:
    """(num_pages, page, heads, dim): cache rows at the pages `table` names;
    unreferenced pages NaN."""
    batch, max_len = cache.shape[:2]
    out = torch.full((num_pages, page, *cache.shape[2:]), math.nan, dtype=cache.dtype, device=cache.device)
    for bi in range(batch):
        for i in range(max_len // page):
            out[int(table[bi, i])] = cache[bi, i * page:(i + 1) * page]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_kvcache_softcap_alibi_low_precision(case, dtype, device, gen):
    b, h, hk, q_len, new_len, max_len, d, lens, causal, softcap, alibi, splits, page = case
    skip_unless_served(device, dtype, d)
    k_cache = randn((b, max_len, hk, d), dtype, device, gen)
    v_cache = randn((b, max_len, hk, d), dtype, device, gen)
    for bi, n in enumerate(lens):  # rows past each length: never read
        k_cache[bi, n:] = math.nan
        v_cache[bi, n:] = math.nan
    q = randn((b, q_len, h, d), dtype, device, gen, scale=3.0 if softcap else 1.0)
    k_new = v_new = None
    if new_len:
        k_new = randn((b, new_len, hk, d), dtype, device, gen)
        v_new = randn((b, new_len, hk, d), dtype, device, gen)
    slopes = _slopes(alibi, b, h, gen, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    kw = dict(cache_seqlens=seqlens, causal=causal, num_splits=splits, softcap=softcap, alibi_slopes=slopes,
              return_lse=True)
    k_full, v_full = k_cache.clone(), v_cache.clone()
    if page:
        pages = max_len // page
        num_pages = b * pages + 2
        table = torch.randperm(num_pages, generator=gen)[:b * pages].view(b, pages).to(torch.int32)
        k_paged, v_paged = _paged(k_cache, page, table, num_pages), _paged(v_cache, page, table, num_pages)
        out_p, lse_p = flash_ext.flash_attn_with_kvcache(q, k_paged, v_paged, k_new, v_new,
                                                         block_table=table.to(device), **kw)
    out, lse = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    if page:
        torch.testing.assert_close(out_p, out, atol=0, rtol=0)
        torch.testing.assert_close(lse_p, lse, atol=0, rtol=0)

    outs, lses, theirs = [], [], []
    for bi, n in enumerate(lens):
        if new_len:
            k_full[bi, n:n + new_len] = k_new[bi]
            v_full[bi, n:n + new_len] = v_new[bi]
        total = n + new_len
        qb = q[bi:bi + 1].transpose(1, 2)
        kb, vb = (t[bi:bi + 1, :total].transpose(1, 2) for t in (k_full, v_full))
        sb = None if slopes is None else slopes[bi] if slopes.dim() == 2 else slopes
        o, l = reference(qb, kb, vb, causal, softcap, sb, return_lse=True)
        outs.append(o.transpose(1, 2))
        lses.append(l)
        theirs.append(pytorch_way(qb, kb, vb, causal, softcap, sb).transpose(1, 2))
    torch.testing.assert_close(k_cache, k_full, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_full, atol=0, rtol=0, equal_nan=True)
    ref, ref_lse = torch.cat(outs), torch.cat(lses)
    assert_matches_reference(out, ref, dtype, torch.cat(theirs))
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-2, rtol=2e-2)
