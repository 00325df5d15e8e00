"""Variable-length (packed) batches: flash_attn_varlen_func and the packed
interfaces against a float64 reference computed sequence by sequence, on
ragged lengths with empty and one-token sequences, L != S, GQA, causal
(bottom-right per sequence), windows, dropout replay and gradients; nested
(jagged) tensors through scaled_dot_product_attention; bad inputs; opcheck
and torch.compile."""
from __future__ import annotations

import pytest
import torch

import flash_ext
from conftest import (DEVICES, HAS_CUDA, TORCH_SDPA, assert_matches_reference, randn, reference_attention,
                      skip_unless_served, window_visible)

ops = torch.ops.flash_ext

# (query lengths, key lengths): empty and one-token sequences, L != S, one
# longer than a CPU (128) and a CUDA (64/128) query tile.
RAGGED = ([5, 0, 1, 37, 130, 3], [9, 4, 0, 37, 150, 1])
SELF = ([7, 1, 0, 70, 129], [7, 1, 0, 70, 129])


def cu_seqlens(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def poison_allocator(nbytes: int, device) -> None:
    """Leaves a freed NaN block in the CUDA caching allocator, so outputs the
    kernels fail to write read NaN instead of lucky zeros."""
    if torch.device(device).type == "cuda":
        torch.full((nbytes // 4 + 1,), float("nan"), device=device)


def varlen_reference(q, k, v, lens_q, lens_k, window=(-1, -1), scale=None, dropout_keep=None, dropout_p=0.0):
    """float64 reference per sequence on packed (total, heads, dim) tensors:
    bottom-right windows, GQA; out (total_q, H, Dv) and lse (H, total_q)."""
    outs, lses = [], []
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qb, kb, vb = (t[r0:r0 + n].transpose(0, 1).unsqueeze(0)
                      for t, r0, n in ((q, q0, lq), (k, k0, lk), (v, k0, lk)))
        keep = None if dropout_keep is None else dropout_keep[b:b + 1, :, :lq, :lk]
        out, lse = reference_attention(qb, kb, vb, scale=scale, window=window, bottom_right=True,
                                       enable_gqa=True, dropout_keep=keep, dropout_p=dropout_p,
                                       return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, dim=-1)


def torch_varlen(q, k, v, lens_q, lens_k, window=(-1, -1)):
    """PyTorch's SDPA per sequence on the same low-precision inputs (rows
    that see no key give 0, the library's semantics): the error yardstick."""
    outs = []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        qb, kb, vb = (t[r0:r0 + n].transpose(0, 1)
                      for t, r0, n in ((q, q0, lq), (k, k0, lk), (v, k0, lk)))
        if lq and lk:
            mask = window_visible(lq, lk, *window, bottom_right=True, device=q.device)
            out = TORCH_SDPA(qb, kb, vb, attn_mask=mask, enable_gqa=True).nan_to_num(0.0)
        else:
            out = q.new_zeros((q.shape[1], lq, v.shape[-1]))
        outs.append(out.transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


def packed_inputs(lens_q, lens_k, h, hk, d, dtype, device, gen, requires_grad=True):
    q = randn((sum(lens_q), h, d), dtype, device, gen, requires_grad=requires_grad)
    k = randn((sum(lens_k), hk, d), dtype, device, gen, requires_grad=requires_grad)
    v = randn((sum(lens_k), hk, d), dtype, device, gen, requires_grad=requires_grad)
    return q, k, v


CASES = [  # (lengths, heads, kv heads, window, causal)
    (RAGGED, 4, 4, (-1, -1), False),
    (RAGGED, 4, 2, (-1, -1), True),
    (SELF, 4, 1, (-1, -1), True),
    (RAGGED, 2, 2, (16, 3), False),
    (SELF, 4, 2, (8, -1), True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_matches_reference(device, dtype, case, gen):
    skip_unless_served(device, dtype, 32)
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("bfloat16 covers the CPU's low-precision path")
    (lens_q, lens_k), h, hk, window, causal = CASES[case]
    d = 32
    q, k, v = packed_inputs(lens_q, lens_k, h, hk, d, dtype, device, gen)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    poison_allocator(q.numel() * 8, device)
    out, lse = flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                window_size=window, return_lse=True)
    assert out.shape == (sum(lens_q), h, d) and lse.shape == (h, sum(lens_q)) and lse.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32)
    ref_window = (window[0], 0) if causal else window
    ref, ref_lse = varlen_reference(q, k, v, lens_q, lens_k, ref_window)
    torch_out = None if dtype in (torch.float64, torch.float32) else torch_varlen(q.detach(), k.detach(), v.detach(),
                                                                                lens_q, lens_k, ref_window)
    assert_matches_reference(out, ref, dtype, torch_out, what="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite.cpu()), "lse: -inf exactly where a row sees no key"
    lse_tol = 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.detach().double().cpu()[finite.cpu()], ref_lse.detach().cpu()[finite.cpu()],
                               atol=lse_tol, rtol=lse_tol)

    grad_out = randn(out.shape, dtype, device, gen)
    poison_allocator(q.numel() * 8, device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    torch_grads = None
    if dtype not in (torch.float64, torch.float32):
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        torch_grads = torch.autograd.grad(torch_varlen(qt, kt, vt, lens_q, lens_k, ref_window), (qt, kt, vt),
                                          grad_out)
    for i, name in enumerate("qkv"):
        assert_matches_reference(grads[i], ref_grads[i], dtype, None if torch_grads is None else torch_grads[i],
                                 what=f"d{name}", factor=3.0,
                                 fixed_tol={torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4)})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equal_lengths_equals_batched(device, causal, gen):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, s, h, d = 3, 45, 4, 64
    q, k, v = (randn((b, s, h, d), dtype, device, gen, requires_grad=True) for _ in range(3))
    # deterministic: CUDA's dq then sums key tiles in the same order in both
    batched = flash_ext.flash_attn_func(q, k, v, causal=causal, deterministic=True, return_lse=True)
    cu = cu_seqlens([s] * b, device)
    packed = flash_ext.flash_attn_varlen_func(*(t.reshape(b * s, h, d) for t in (q, k, v)), cu, cu, s, s,
                                              causal=causal, deterministic=True, return_lse=True)
    torch.testing.assert_close(packed[0], batched[0].reshape(b * s, h, d), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed[1], batched[1].transpose(0, 1).reshape(h, b * s), atol=1e-6, rtol=1e-6)
    grad_out = randn((b, s, h, d), dtype, device, gen)
    g_batched = torch.autograd.grad(batched[0], (q, k, v), grad_out)
    g_packed = torch.autograd.grad(packed[0], (q, k, v), grad_out.reshape(b * s, h, d))
    for a, e in zip(g_packed, g_batched):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_seqlen_extra", [0, 1])
def test_varlen_equal_lengths_many_tiles_cuda(max_seqlen_extra, gen):
    # More query tiles than SMs: equal lengths (packed totals = batch x the
    # longest) take the Hopper forward's static round robin, a max_seqlen
    # above the lengths the dynamic deal; both equal the batched call.
    b, s, h, d = 8, 1000, 16, 128
    q, k, v = (randn((b, s, h, d), torch.bfloat16, "cuda", gen) for _ in range(3))
    batched, lse_b = flash_ext.flash_attn_func(q, k, v, return_lse=True)
    cu = cu_seqlens([s] * b, "cuda")
    packed, lse_p = flash_ext.flash_attn_varlen_func(*(t.reshape(b * s, h, d) for t in (q, k, v)), cu, cu,
                                                     s + max_seqlen_extra, s + max_seqlen_extra, return_lse=True)
    torch.testing.assert_close(packed, batched.reshape(b * s, h, d), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_p, lse_b.transpose(0, 1).reshape(h, b * s), atol=1e-6, rtol=1e-6)
    # and the first sequence against float64
    q1, k1, v1 = (t[:1].transpose(1, 2) for t in (q, k, v))
    assert_matches_reference(packed[:s], reference_attention(q1, k1, v1)[0].transpose(0, 1), torch.bfloat16,
                             TORCH_SDPA(q1, k1, v1)[0].transpose(0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_dropout_replays(device, gen):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = RAGGED
    q, k, v = packed_inputs(lens_q, lens_k, 2, 2, 32, dtype, device, gen)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    p, scale = 0.3, 0.2
    torch.manual_seed(7)
    out, lse, rng_state = ops.attention_varlen_fwd(q.detach(), k.detach(), v.detach(), cu_q, cu_k, max(lens_q),
                                                   max(lens_k), p, scale, -1, 0, True)
    keep = ops.dropout_keep_mask(rng_state, len(lens_q), 2, max(lens_q), max(lens_k), p).cpu()
    ref, _ = varlen_reference(q, k, v, lens_q, lens_k, (-1, 0), scale, keep.to(device), p)
    tol = {torch.float64: (1e-10, 1e-10), torch.bfloat16: (3e-2, 3e-2)}[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol[0], rtol=tol[1])
    grad_out = randn(out.shape, dtype, device, gen)
    dq, dk, dv = ops.attention_varlen_bwd(grad_out, q.detach(), k.detach(), v.detach(), out, lse, rng_state, cu_q,
                                          cu_k, max(lens_q), max(lens_k), p, scale, -1, 0, True, False)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for got, want in zip((dq, dk, dv), ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=tol[0] * 10, rtol=tol[1] * 10)
    # the same seed through the autograd op drops the same elements
    torch.manual_seed(7)
    again = flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p,
                                             softmax_scale=scale, causal=True)
    assert torch.equal(again, out)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_deterministic_backward(device, gen):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens = [300, 17, 0, 129]
    q, k, v = packed_inputs(lens, lens, 4, 2, 64, dtype, device, gen)
    cu = cu_seqlens(lens, device)
    grad_out = randn((sum(lens), 4, 64), dtype, device, gen)
    runs = []
    for _ in range(3):
        out = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                               deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), grad_out))
    for run in runs[1:]:
        for a, e in zip(run, runs[0]):
            assert torch.equal(a, e)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_return_conventions(device, gen):
    dtype = torch.float32 if device == "cpu" else torch.float16
    lens = [3, 5]
    q, k, v = packed_inputs(lens, lens, 2, 2, 16, dtype, device, gen, requires_grad=False)
    cu = cu_seqlens(lens, device)
    out = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
    out2, lse = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, return_lse=True)
    out3, lse3, probs = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, return_attn_probs=True)
    assert torch.equal(out, out2) and torch.equal(out, out3) and torch.equal(lse, lse3) and probs is None
    assert lse.shape == (2, 8)


# --------------------------------------------------------------------------- packed inputs


@pytest.mark.parametrize("device", DEVICES)
def test_qkvpacked_and_kvpacked(device, gen):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    b, s, h, d = 2, 33, 4, 32
    qkv = randn((b, s, 3, h, d), dtype, device, gen, requires_grad=True)
    out, lse = flash_ext.flash_attn_qkvpacked_func(qkv, causal=True, return_lse=True)
    q, k, v = (to_sdpa(t) for t in qkv.unbind(2))
    ref, ref_lse = reference_attention(q, k, v, window=(-1, 0), bottom_right=True, return_lse=True)
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(out.double(), ref.transpose(1, 2).detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    grad_out = randn(out.shape, dtype, device, gen)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    (ref_dqkv,) = torch.autograd.grad(ref.transpose(1, 2), qkv, grad_out.double())
    assert dqkv.shape == qkv.shape
    torch.testing.assert_close(dqkv.double(), ref_dqkv.double(), atol=tol * 5, rtol=tol * 5)

    hk = 2
    q = randn((b, 20, h, d), dtype, device, gen, requires_grad=True)
    kv = randn((b, s, 2, hk, d), dtype, device, gen, requires_grad=True)
    out = flash_ext.flash_attn_kvpacked_func(q, kv, causal=True)
    ref = reference_attention(to_sdpa(q), to_sdpa(kv[:, :, 0]), to_sdpa(kv[:, :, 1]), window=(-1, 0),
                              bottom_right=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    grad_out = randn(out.shape, dtype, device, gen)
    for got, want in zip(torch.autograd.grad(out, (q, kv), grad_out),
                         torch.autograd.grad(ref, (q, kv), grad_out.double())):
        torch.testing.assert_close(got.double(), want.double(), atol=tol * 5, rtol=tol * 5)


def to_sdpa(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_packed(device, gen):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = RAGGED
    h, hk, d = 4, 2, 32
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    qkv = randn((sum(lens_k), 3, h, d), dtype, device, gen, requires_grad=True)
    cu = cu_seqlens(lens_k, device)
    out = flash_ext.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens_k), causal=True)
    ref, _ = varlen_reference(*qkv.unbind(1), lens_k, lens_k, (-1, 0))
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    grad_out = randn(out.shape, dtype, device, gen)
    (got,) = torch.autograd.grad(out, qkv, grad_out)
    (want,) = torch.autograd.grad(ref, qkv, grad_out.double())
    torch.testing.assert_close(got.double(), want.double(), atol=tol * 5, rtol=tol * 5)

    q = randn((sum(lens_q), h, d), dtype, device, gen, requires_grad=True)
    kv = randn((sum(lens_k), 2, hk, d), dtype, device, gen, requires_grad=True)
    out, lse, _ = flash_ext.flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens(lens_q, device), cu, max(lens_q),
                                                            max(lens_k), return_attn_probs=True)
    ref, ref_lse = varlen_reference(q, *kv.unbind(1), lens_q, lens_k)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    grad_out = randn(out.shape, dtype, device, gen)
    for got, want in zip(torch.autograd.grad(out, (q, kv), grad_out),
                         torch.autograd.grad(ref, (q, kv), grad_out.double())):
        torch.testing.assert_close(got.double(), want.double(), atol=tol * 5, rtol=tol * 5)


# --------------------------------------------------------------------------- nested tensors


def jagged(lens, h, d, dtype, device, gen) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A (B, H, j, D) jagged nested tensor requiring grad, and its leaves."""
    leaves = [randn((n, h, d), dtype, device, gen, requires_grad=True) for n in lens]
    nt = torch.nested.as_nested_tensor(leaves, layout=torch.jagged)
    return nt.transpose(1, 2), leaves


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_nested_sdpa(device, causal, gen):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = [5, 1, 40, 17], [5, 3, 40, 20]
    if causal:
        lens_k = lens_q  # PyTorch's causal nested SDPA is self-attention
    q, q_leaves = jagged(lens_q, 4, 32, dtype, device, gen)
    k, k_leaves = jagged(lens_k, 2, 32, dtype, device, gen)
    v, v_leaves = jagged(lens_k, 2, 32, dtype, device, gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert out.is_nested and out.shape[0] == 4 and out.shape[1] == 4
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    pieces = out.transpose(1, 2).unbind()
    total = 0
    for qi, ki, vi, got in zip(q_leaves, k_leaves, v_leaves, pieces):
        ref = reference_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), is_causal=causal,
                                  enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got.double(), ref.detach(), atol=tol, rtol=tol)
        total = total + (ref * torch.arange(ref.numel(), dtype=ref.dtype, device=device).view_as(ref).sin()).sum()
    # gradients reach the leaves through the nested tensors
    ours = sum((p * torch.arange(p.numel(), dtype=torch.float64, device=device).view_as(p).sin().to(p.dtype)).sum()
               for p in pieces)
    leaves = q_leaves + k_leaves + v_leaves
    for got, want in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(total, leaves)):
        torch.testing.assert_close(got.double(), want.double(), atol=tol * 5, rtol=tol * 5)


def test_nested_with_mask_falls_back(gen):
    q, _ = jagged([3, 4], 2, 8, torch.float32, "cpu", gen)
    flash_ext.set_strict(False)
    with pytest.warns(UserWarning, match="attn_mask"):
        try:
            flash_ext.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))
        except Exception:  # PyTorch's own SDPA may refuse the mask: the warning is what is tested
            pass
    flash_ext.set_strict(True)
    with pytest.raises(RuntimeError, match="strict"):
        flash_ext.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))


# --------------------------------------------------------------------------- bad inputs


def _call(q, k, v, cu_q, cu_k, max_q=4, max_k=4, **kw):
    return flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_bad_inputs(device, gen):
    q, k, v = packed_inputs([3, 4], [3, 4], 2, 2, 16, torch.float16 if device == "cuda" else torch.float32,
                            device, gen, requires_grad=False)
    cu = cu_seqlens([3, 4], device)
    cases = [
        (dict(cu_q=cu.long()), TypeError, "cu_seqlens_q must be int32"),
        (dict(cu_k=cu.view(1, 3)), ValueError, "cu_seqlens_k must be 1-D"),
        (dict(cu_k=cu[:2]), ValueError, "cu_seqlens_k must have batch \\+ 1 = 3"),
        (dict(q=q.unsqueeze(0)), ValueError, "q must be 3-D"),
        (dict(v=v[..., :8].contiguous()), None, None),  # value dim != query dim: CPU only
        (dict(max_q=-1), ValueError, "max_seqlen_q and max_seqlen_k must be >= 0"),
        (dict(k=k[:, :1].expand(7, 3, 16), v=v[:, :1].expand(7, 3, 16)), ValueError, "multiple of key/value heads"),
    ]
    if device == "cpu":
        cases += [
            (dict(cu_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
            (dict(cu_k=torch.tensor([0, 5, 4], dtype=torch.int32), max_k=9), ValueError,
             "cu_seqlens_k must be nondecreasing"),
            (dict(cu_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
             "cu_seqlens_q must end at the number of packed rows \\(7\\)"),
            (dict(max_k=3), ValueError, "sequence 1 has length 4 \\(from cu_seqlens_k\\) above its max_seqlen 3"),
            (dict(cu_q=torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")), ValueError,
             "cu_seqlens_q must be on the"),
        ]
    for kw, err, match in cases:
        args = dict(q=q, k=k, v=v, cu_q=cu, cu_k=cu)
        args.update(kw)
        if err is None:
            if device == "cuda":
                with pytest.raises(RuntimeError, match="value dim"):
                    _call(**args)
            else:
                _call(**args)
            continue
        with pytest.raises(err, match=match):
            _call(**args)
    with pytest.raises(ValueError, match="qkv must be 4-D"):
        flash_ext.flash_attn_varlen_qkvpacked_func(q, cu, 4)
    with pytest.raises(ValueError, match="kv must be 5-D"):
        flash_ext.flash_attn_kvpacked_func(q.unsqueeze(0), k)
    with pytest.raises(ValueError, match="window_size"):
        _call(q, k, v, cu, cu, window_size=(1, 2, 3))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_varlen_cuda_bad_values_do_not_crash(gen):
    """On CUDA cu_seqlens values are not checked (a sync): kernels clamp them
    and stay inside the tensors; the results are documented as undefined."""
    q, k, v = packed_inputs([3, 4], [3, 4], 2, 2, 64, torch.float16, "cuda", gen)
    for bad in ([0, 9, 100], [5, 2, 7], [-3, 3, 2**30]):
        cu = torch.tensor(bad, dtype=torch.int32, device="cuda")
        out = _call(q, k, v, cu, cu, 4, 4)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        torch.cuda.synchronize()
    out = _call(q, k, v, cu_seqlens([3, 4], "cuda"), cu_seqlens([3, 4], "cuda"))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- operator machinery


def _varlen_args(gen, dtype=torch.float64):
    lens_q, lens_k = [3, 0, 5], [4, 2, 5]
    q, k, v = packed_inputs(lens_q, lens_k, 4, 2, 8, dtype, "cpu", gen)
    return (q, k, v, cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu"), 5, 5)


@pytest.mark.parametrize("window", [(-1, -1, False), (-1, 0, True), (2, 1, True)])
def test_opcheck_varlen(window, gen):
    args = _varlen_args(gen)
    torch.library.opcheck(ops.attention_varlen.default, (*args, 0.0, 0.3, *window, False))
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(ops.attention_varlen_fwd.default, (*plain, 0.0, 0.3, *window))
    out, lse, rng = ops.attention_varlen_fwd(*plain, 0.0, 0.3, *window)
    torch.library.opcheck(ops.attention_varlen_bwd.default,
                          (torch.randn_like(out), *plain[:3], out, lse, rng, *plain[3:], 0.0, 0.3, *window, True))


def test_compile_varlen_max_seqlen_from_the_data(gen, monkeypatch):
    """max_seqlen read from cu_seqlens with .item() inside the compiled
    function (as models that pack batches do): a SymInt the op takes."""
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", True)
    q, k, v, cu_q, cu_k, _, _ = _varlen_args(gen, torch.float32)

    def f(q, k, v, cu_q, cu_k):
        max_q, max_k = ((cu[1:] - cu[:-1]).max().item() for cu in (cu_q, cu_k))
        out = flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        return (out * out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss = f(q, k, v, cu_q, cu_k)
    loss = compiled(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(loss, eager_loss)
    for a, e in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(eager_loss, (q, k, v))):
        torch.testing.assert_close(a, e)


def test_compile_nested_sdpa_fullgraph(gen):
    """Jagged query, key and value sharing their offsets (as a model's
    projections of one jagged input do) through torch.compile without a
    graph break: the longest length is a SymInt there."""
    lens = [5, 17, 1, 30]
    x = torch.nested.nested_tensor([randn((n, 4, 16), torch.float32, "cpu", gen) for n in lens],
                                   layout=torch.jagged)
    k, v = (torch.nested.nested_tensor_from_jagged(randn(x.values().shape, torch.float32, "cpu", gen),
                                                   x.offsets()).requires_grad_() for _ in range(2))
    q = torch.nested.nested_tensor_from_jagged(x.values().clone(), x.offsets()).requires_grad_()

    def f(q, k, v):
        out = flash_ext.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True)
        return out.transpose(1, 2).values()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager, out = f(q, k, v), compiled(q, k, v)
    torch.testing.assert_close(out, eager)
    weights = randn(eager.shape, torch.float32, "cpu", gen)
    want = torch.autograd.grad((eager * weights).sum(), (q, k, v))
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.values(), e.values())


def test_compile_varlen_fullgraph(gen):
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_args(gen, torch.float32)

    def f(q, k, v, cu_q, cu_k):
        out = flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss = f(q, k, v, cu_q, cu_k)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    loss = compiled(q, k, v, cu_q, cu_k)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)
