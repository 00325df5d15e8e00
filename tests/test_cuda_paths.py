"""The CUDA kernel families side by side: each family this GPU runs (on an
H100, the Hopper kernels and the portable sm80 ones) against the float64
reference on the same inputs, forward and backward, and the routing of the
calls the Hopper kernels do not cover to the sm80 kernels."""
from __future__ import annotations

import pytest
import torch

import flash_ext
from conftest import (
    HAS_CUDA, TORCH_SDPA, assert_matches_reference, grad_list, rand_bool, randn, reference_attention, to_bshd,
    window_visible,
)


def _families_here() -> list[str]:
    if not HAS_CUDA or not flash_ext.cuda_built():
        return []
    return flash_ext._support.cuda_families(torch.cuda.get_device_capability()[0])


FAMILIES = _families_here()
HAS_SM90 = "sm90" in FAMILIES


@pytest.fixture(autouse=True)
def _automatic_path():
    yield
    flash_ext.set_cuda_path(None)


def test_family_rule(monkeypatch):
    """The Python mirror of the dispatch's family rule (runs without a GPU)."""
    support = flash_ext._support
    monkeypatch.setattr(support._C, "CUDA_FAMILIES", "sm90,sm80")
    monkeypatch.setattr(support, "_forced_cuda_path", "")
    assert support.cuda_families(9) == ["sm90", "sm80"]
    assert support.cuda_families(8) == support.cuda_families(10) == ["sm80"]
    assert support.cuda_families(7) == []
    assert (support.cuda_family_name(9), support.cuda_family_name(8), support.cuda_family_name(7)) == ("sm90", "sm80", None)
    monkeypatch.setattr(support, "_forced_cuda_path", "sm80")
    assert support.cuda_family_name(9) == "sm80" and support.cuda_families(9) == ["sm90", "sm80"]
    monkeypatch.setattr(support._C, "CUDA_FAMILIES", "sm80")
    monkeypatch.setattr(support, "_forced_cuda_path", "")
    assert support.cuda_families(9) == ["sm80"] and support.cuda_family_name(9) == "sm80"


# (batch, heads, kv_heads, L, S, head dim, causal, window): flash_attn_func
# semantics (bottom-right causal); several key tiles so the pipelines wrap.
CASES = [
    (2, 4, 4, 1000, 1000, 128, True, (-1, -1)),
    (1, 8, 2, 333, 777, 64, False, (-1, -1)),     # GQA 4, L != S
    (2, 2, 1, 129, 2000, 256, True, (-1, -1)),    # MQA
    (1, 4, 4, 1536, 1536, 128, False, (-1, -1)),
    (1, 3, 3, 200, 200, 96, False, (-1, -1)),     # head dim through the next size up
    (2, 2, 2, 77, 300, 40, True, (-1, -1)),
    (1, 2, 2, 300, 100, 128, True, (-1, -1)),     # L > S: the first 200 rows see no key
    (1, 2, 2, 1, 1, 64, False, (-1, -1)),
    (1, 2, 2, 1, 4097, 128, True, (-1, -1)),      # one query row, long cache
    (1, 4, 2, 1024, 1024, 64, False, (128, 0)),   # sliding window
    (1, 2, 2, 700, 900, 128, False, (64, 32)),    # two-sided window
    (1, 4, 2, 300, 517, 256, False, (-1, -1)),    # GQA 2 at d = 256
    (2, 2, 2, 400, 400, 192, True, (100, 0)),     # d = 192 on the d = 256 tiles, window
    (3, 16, 8, 1100, 1100, 128, True, (-1, -1)),  # 432 query tiles: several per block of the persistent forward
    (2, 6, 2, 2100, 2250, 128, False, (-1, -1)),  # d = 128's 192-row tiles of 80 keys, both partial; GQA 3
]


def _torch_visible(q, k, v, vis, gqa):
    """PyTorch's SDPA ((batch, heads, seq, dim) inputs) restricted to the
    visible (query, key) pairs, with rows that see no key set to 0 as ours
    (PyTorch would give NaN there); differentiable."""
    seen = vis.any(-1)
    safe = vis.clone()
    safe[~seen] = True  # keeps PyTorch finite on rows that see no key
    out = TORCH_SDPA(q, k, v, attn_mask=safe, enable_gqa=gqa)
    return out * seen.to(out.dtype)[:, None]


def _case_id(c):
    b, h, hk, L, S, d, causal, w = c
    return f"b{b}h{h}kv{hk}-L{L}S{S}-d{d}-c{int(causal)}-w{w[0]}_{w[1]}"


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES or ["none"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_family_matches_reference(case, dtype, family, gen):
    if family == "none":
        pytest.skip("no CUDA kernel family here")
    b, h, hk, L, S, d, causal, window = case
    q = randn((b, L, h, d), dtype, "cuda", gen)
    k = randn((b, S, hk, d), dtype, "cuda", gen)
    v = randn((b, S, hk, d), dtype, "cuda", gen)
    flash_ext.set_cuda_path(family)
    out, lse = flash_ext.flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True)
    assert flash_ext.last_cuda_kernel_family() == family
    w = (window[0], 0) if causal else window
    ref, ref_lse = reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=w, bottom_right=True,
                                       return_lse=True)
    vis = window_visible(L, S, w[0], w[1], True, device="cuda")
    torch_out = to_bshd(_torch_visible(to_bshd(q), to_bshd(k), to_bshd(v), vis, h != hk))
    assert_matches_reference(out, to_bshd(ref), dtype, torch_out)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu())
    torch.testing.assert_close(lse[~empty].double().cpu(), ref_lse[~empty].cpu(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES or ["none"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_family_nan_key_reaches_every_row(d, family, gen):
    """Head h has a NaN at key h (h < 32): every query row sees it, so every
    output row of those heads is NaN, whichever column of the score tile the
    key falls in (the Hopper softmax takes some columns' exponentials on the
    FMA pipes, which must not swallow a NaN); heads 32+ match the reference."""
    if family == "none":
        pytest.skip("no CUDA kernel family here")
    q, k, v = (randn((1, 36, 300, d), torch.bfloat16, "cuda", gen) for _ in range(3))
    for h in range(32):
        k[0, h, h, 0] = float("nan")
    flash_ext.set_cuda_path(family)
    out = flash_ext.scaled_dot_product_attention(q, k, v)
    assert flash_ext.last_cuda_kernel_family() == family
    assert torch.isnan(out[0, :32]).all(), "a NaN key must make every output row that sees it NaN"
    assert not torch.isnan(out[0, 32:]).any()
    ref = reference_attention(q[:, 32:], k[:, 32:], v[:, 32:])
    assert_matches_reference(out[:, 32:], ref, torch.bfloat16, TORCH_SDPA(q[:, 32:], k[:, 32:], v[:, 32:]))


# Packed batches (query lengths, key lengths, heads, kv heads, head dim,
# causal, window): sequences of several tiles, one-token and empty ones, so
# tiles reach into the next sequence's rows (masked keys, unstored queries).
VARLEN_CASES = [
    ([300, 0, 1, 129, 77], [300, 5, 0, 200, 500], 4, 2, 128, True, (-1, -1)),
    ([500, 130, 1, 257], [500, 130, 1, 257], 4, 1, 64, False, (-1, -1)),
    ([129, 64, 3, 200], [70, 300, 3, 0], 2, 2, 256, True, (-1, -1)),   # L > S: rows that see no key
    ([700, 33, 250], [900, 40, 250], 2, 2, 96, False, (64, 32)),     # head dim through the next size up
    ([1000, 333], [1000, 333], 3, 3, 128, True, (128, -1)),          # sliding window
]


def _varlen_id(c):
    lq, lk, h, hk, d, causal, w = c
    return f"n{len(lq)}-max{max(lq)}_{max(lk)}-h{h}kv{hk}-d{d}-c{int(causal)}-w{w[0]}_{w[1]}"


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES or ["none"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_families_varlen_match_reference(case, dtype, family, gen):
    if family == "none":
        pytest.skip("no CUDA kernel family here")
    lens_q, lens_k, h, hk, d, causal, window = case
    q = randn((sum(lens_q), h, d), dtype, "cuda", gen)
    k = randn((sum(lens_k), hk, d), dtype, "cuda", gen)
    v = randn((sum(lens_k), hk, d), dtype, "cuda", gen)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
                  for n in (lens_q, lens_k))
    flash_ext.set_cuda_path(family)
    torch.full((4 * q.numel(),), float("nan"), device="cuda")  # freed: unwritten outputs would read NaN
    out, lse = flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                window_size=window, return_lse=True)
    assert flash_ext.last_cuda_kernel_family() == family
    w = (window[0], 0) if causal else window
    refs, ref_lses, torch_outs = [], [], []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        qb, kb, vb = (t[r0:r0 + n].transpose(0, 1).unsqueeze(0) for t, r0, n in ((q, q0, lq), (k, k0, lk), (v, k0, lk)))
        ref, ref_lse = reference_attention(qb, kb, vb, window=w, bottom_right=True, enable_gqa=True, return_lse=True)
        refs.append(ref[0].transpose(0, 1))
        ref_lses.append(ref_lse[0])
        vis = window_visible(lq, lk, w[0], w[1], True, device="cuda")
        torch_out = _torch_visible(qb, kb, vb, vis, h != hk) if lq and lk else torch.zeros_like(qb)
        torch_outs.append(torch_out[0].transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    assert_matches_reference(out, torch.cat(refs), dtype, torch.cat(torch_outs))
    ref_lse = torch.cat(ref_lses, dim=-1)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu())
    torch.testing.assert_close(lse[~empty].double().cpu(), ref_lse[~empty].cpu(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES or ["none"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_families_varlen_backward_match_reference(case, dtype, family, gen):
    """dq, dk, dv of packed batches: each sequence against its own float64
    reference, including empty and one-token sequences (zero gradients where
    nothing is visible) and tiles that reach into the next sequence."""
    if family == "none":
        pytest.skip("no CUDA kernel family here")
    lens_q, lens_k, h, hk, d, causal, window = case
    q = randn((sum(lens_q), h, d), dtype, "cuda", gen, requires_grad=True)
    k = randn((sum(lens_k), hk, d), dtype, "cuda", gen, requires_grad=True)
    v = randn((sum(lens_k), hk, d), dtype, "cuda", gen, requires_grad=True)
    dout = randn((sum(lens_q), h, d), dtype, "cuda", gen)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
                  for n in (lens_q, lens_k))
    flash_ext.set_cuda_path(family)
    out = flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                           window_size=window)
    torch.full((16 * q.numel(),), float("nan"), device="cuda")  # freed: unwritten gradients would read NaN
    ours = grad_list(out, (q, k, v), dout)
    assert flash_ext.last_cuda_kernel_family() == family
    w = (window[0], 0) if causal else window
    refs, torch_refs = ([[], [], []] for _ in range(2))
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        qb, kb, vb = (t[r0:r0 + n].detach().transpose(0, 1).unsqueeze(0).requires_grad_()
                      for t, r0, n in ((q, q0, lq), (k, k0, lk), (v, k0, lk)))
        dob = dout[q0:q0 + lq].transpose(0, 1).unsqueeze(0)
        ref = reference_attention(qb, kb, vb, window=w, bottom_right=True, enable_gqa=True)
        vis = window_visible(lq, lk, w[0], w[1], True, device="cuda")
        if lq and lk:
            theirs = grad_list(ref, (qb, kb, vb), dob.double())
            torch_grads = grad_list(_torch_visible(qb, kb, vb, vis, h != hk), (qb, kb, vb), dob)
        else:  # nothing visible: zero gradients
            theirs = [torch.zeros_like(t, dtype=torch.float64) for t in (qb, kb, vb)]
            torch_grads = [torch.zeros_like(t) for t in (qb, kb, vb)]
        for i in range(3):
            refs[i].append(theirs[i][0].transpose(0, 1))
            torch_refs[i].append(torch_grads[i][0].transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    for name, g, r, t in zip("qkv", ours, refs, torch_refs):
        assert_matches_reference(g, torch.cat(r), dtype, torch.cat(t), what=f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES or ["none"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_families_backward_match_reference(family, dtype, case, gen):
    if family == "none":
        pytest.skip("no CUDA kernel family here")
    b, h, hk, L, S, d, causal, window = case
    q = randn((b, L, h, d), dtype, "cuda", gen, requires_grad=True)
    k = randn((b, S, hk, d), dtype, "cuda", gen, requires_grad=True)
    v = randn((b, S, hk, d), dtype, "cuda", gen, requires_grad=True)
    dout = randn((b, L, h, d), dtype, "cuda", gen)
    flash_ext.set_cuda_path(family)
    out = flash_ext.flash_attn_func(q, k, v, causal=causal, window_size=window)
    ours = grad_list(out, (q, k, v), dout)
    assert flash_ext.last_cuda_kernel_family() == family
    w = (window[0], 0) if causal else window
    ref = reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=w, bottom_right=True)
    theirs = grad_list(to_bshd(ref), (q, k, v), dout.double())
    vis = window_visible(L, S, w[0], w[1], True, device="cuda")
    torch_out = to_bshd(_torch_visible(to_bshd(q), to_bshd(k), to_bshd(v), vis, h != hk))
    torch_grads = grad_list(torch_out, (q, k, v), dout)
    for name, g, r, t in zip("qkv", ours, theirs, torch_grads):
        assert_matches_reference(g, r, dtype, t, what=f"d{name}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_hopper_routes_uncovered_calls_to_sm80(gen):
    q, k, v = (randn((2, 4, 300, 128), torch.bfloat16, "cuda", gen) for _ in range(3))
    mask = rand_bool((300, 300), gen, device="cuda")
    flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    for kwargs in ({"attn_mask": mask}, {"dropout_p": 0.1}):
        out = flash_ext.scaled_dot_product_attention(q, k, v, **kwargs)
        assert flash_ext.last_cuda_kernel_family() == "sm80", kwargs
        assert torch.isfinite(out).all()
    # A stride-0 (expanded) batch is beyond TMA: the sm80 kernels take it.
    k1, v1 = (randn((1, 4, 300, 128), torch.bfloat16, "cuda", gen).expand(2, -1, -1, -1) for _ in range(2))
    out = flash_ext.scaled_dot_product_attention(q, k1, v1)
    assert flash_ext.last_cuda_kernel_family() == "sm80"
    ref = reference_attention(q, k1, v1)
    assert_matches_reference(out, ref, torch.bfloat16, TORCH_SDPA(q, k1, v1))
    # Packed variable-length batches: the Hopper forward and backward, the
    # sm80 backward when deterministic; with dropout or softcap, the sm80
    # forward.
    qv, kv, vv = (randn((300, 4, 128), torch.bfloat16, "cuda", gen, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    out = flash_ext.flash_attn_varlen_func(qv, kv, vv, cu, cu, 200, 200)
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    out.sum().backward()
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    flash_ext.flash_attn_varlen_func(qv, kv, vv, cu, cu, 200, 200, deterministic=True).sum().backward()
    assert flash_ext.last_cuda_kernel_family() == "sm80"
    flash_ext.flash_attn_varlen_func(qv.detach(), kv.detach(), vv.detach(), cu, cu, 200, 200, dropout_p=0.1)
    assert flash_ext.last_cuda_kernel_family() == "sm80"
    # Softcap and ALiBi: the sm80 kernels, varlen batches too.
    flash_ext.flash_attn_varlen_func(qv, kv, vv, cu, cu, 200, 200, softcap=5.0).sum().backward()
    assert flash_ext.last_cuda_kernel_family() == "sm80"
    # The backward runs on the Hopper kernels, unless deterministic (unordered dq sums there).
    qg = q.detach().requires_grad_()
    flash_ext.scaled_dot_product_attention(qg, k, v, is_causal=True).sum().backward()
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    qb = to_bshd(q).detach().requires_grad_()
    flash_ext.flash_attn_func(qb, to_bshd(k), to_bshd(v), causal=True, deterministic=True).sum().backward()
    assert flash_ext.last_cuda_kernel_family() == "sm80"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_forced_sm80_path_on_hopper(gen):
    q, k, v = (randn((1, 2, 257, 64), torch.float16, "cuda", gen) for _ in range(3))
    flash_ext.set_cuda_path("sm80")
    a = flash_ext.scaled_dot_product_attention(q, k, v)
    assert flash_ext.last_cuda_kernel_family() == "sm80"
    flash_ext.set_cuda_path(None)
    b = flash_ext.scaled_dot_product_attention(q, k, v)
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    assert (a.float() - b.float()).abs().max().item() < 2e-3


def test_set_cuda_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="name must be one of"):
        flash_ext.set_cuda_path("sm70")
    with pytest.raises(ValueError, match="name must be one of"):
        flash_ext.set_cuda_path("cpu")


_TUNING_CHILD = """
import sys, torch, flash_ext
torch.manual_seed(0)
outs = []
for d, causal, n in ((128, False, 1000), (128, True, 700), (64, False, 1300), (256, True, 600)):
    q, k, v = (torch.randn(2, 3, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    outs.append(flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal).cpu())
    assert flash_ext.last_cuda_kernel_family() == "sm90"
# More tiles than SMs, so each block runs several one after another (the next
# tile's loads beside this one's epilogue), with tiles that see no key
# (bottom-right causal, q_len > kv_len) among them.
for d, causal, n_q, n_k in ((128, False, 1536, 1536), (128, True, 1536, 1536), (64, True, 1000, 1000),
                            (128, True, 1000, 300), (64, True, 1000, 300), (256, False, 1300, 1300)):
    q = torch.randn(4, n_q, 16, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, n_k, 16, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    outs += [t.cpu() for t in flash_ext.flash_attn_func(q, k, v, causal=causal, return_lse=True)]
    assert flash_ext.last_cuda_kernel_family() == "sm90"
# Varlen at d = 128 without a mask (the three-stage tiles, O staged in a K
# stage): a sequence without keys (its tiles store zeros between others) and
# short ones, more tiles than SMs.
lens_q, lens_k = [700, 300, 1300, 130, 1536] * 8, [700, 0, 1300, 130, 1536] * 8
cu_q, cu_k = (torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
q = torch.randn(int(cu_q[-1]), 8, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(int(cu_k[-1]), 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
outs.append(flash_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)).cpu())
assert flash_ext.last_cuda_kernel_family() == "sm90"
# Cluster pairs (d = 128's 176-key tiles, by default from 4096 keys): even
# numbers of query tiles, partial last query and key tiles, a head dim padded
# to 128, several pairs per cluster; an odd number keeps single blocks.
for d, n_q, n_k in ((128, 512, 9000), (96, 250, 8300), (128, 1536, 8192), (128, 1100, 9000)):
    q = torch.randn(4, 16, n_q, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, 16, n_k, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    outs += [t.cpu() for t in flash_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                        return_lse=True)]
    assert flash_ext.last_cuda_kernel_family() == "sm90"
# A packed batch whose tiles include ones past a short sequence's end and a
# sequence without queries or keys (the tiles the consumers skip).
cu = torch.tensor([0, 700, 700, 1030, 2600], dtype=torch.int32, device="cuda")
for d, causal in ((128, False), (64, True)):
    q, k, v = (torch.randn(2600, 16, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    outs += [t.cpu() for t in flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, 1570, 1570, causal=causal,
                                                               return_lse=True)]
    assert flash_ext.last_cuda_kernel_family() == "sm90"
torch.save(outs, sys.argv[1])
"""


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_hopper_forward_tuning_variants_agree(tmp_path):
    """FLASH_EXT_FWD_TUNING (scripts/fwd_tuning.py) changes the pipeline depth,
    the grid, the tile sizes, the order of the tiles, whether blocks share
    K/V loads in cluster pairs, when O's staging stage is released (a
    stage released before the TMA store has read it would let the next
    loads overwrite O) and whether a key tile's exponentials start before
    its row maxima (a warp whose maxima moved must fold the tile again),
    never the arithmetic:
    every variant's output equals the default's bit for bit; an unknown key or
    a bad value is refused by name."""
    import os
    import subprocess
    import sys
    outputs = {}
    for name, spec in (("default", ""), ("two_stage", "two_stage_max_kv=100000"),
                       ("per_tile", "per_tile_max_q=100000"), ("both", "two_stage_max_kv=1,per_tile_max_q=4096"),
                       ("pair_major", "pair_major_max_q=100000,pair_major_max_q_causal=100000"),
                       ("no_pair_major", "pair_major_max_q=0,pair_major_max_q_causal=0"),
                       ("no_cluster_pairs", "cluster_pairs_min_kv=0"),
                       ("d64_narrow", "d64_narrow_max_q=100000,d64_narrow_max_q_causal=100000"),
                       ("d64_wide", "d64_narrow_max_q=0,d64_narrow_max_q_causal=0"),
                       ("o_release_at_once", "o_release_late=0"), ("fold_after_max", "fold_ahead=0")):
        path = tmp_path / f"{name}.pt"
        env = dict(os.environ, FLASH_EXT_FWD_TUNING=spec)
        subprocess.run([sys.executable, "-c", _TUNING_CHILD, str(path)], env=env, check=True, timeout=120)
        outputs[name] = torch.load(path)
    for name, outs in outputs.items():
        assert len(outs) == len(outputs["default"]), name
        for a, b in zip(outs, outputs["default"]):
            assert torch.equal(a, b), name
    bad = subprocess.run([sys.executable, "-c", _TUNING_CHILD, str(tmp_path / "bad.pt")],
                         env=dict(os.environ, FLASH_EXT_FWD_TUNING="stages=2"), capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown key 'stages'" in bad.stderr
    bad = subprocess.run([sys.executable, "-c", _TUNING_CHILD, str(tmp_path / "bad.pt")],
                         env=dict(os.environ, FLASH_EXT_FWD_TUNING="per_tile_max_q=lots"), capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "wants key=N with N >= 0, got 'per_tile_max_q=lots'" in bad.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_hopper_forward_tuning_set_in_process():
    """flash_ext._C._set_fwd_tuning (scripts/fwd_tuning.py alternates variants
    with it) replaces the knobs for the next calls: single blocks instead of
    cluster pairs give the same bits; a bad spec raises ValueError naming the
    key and changes nothing; "" restores the defaults."""
    torch.manual_seed(0)
    q = torch.randn(2, 16, 512, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 16, 9000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    set_tuning = flash_ext._C._set_fwd_tuning
    try:
        set_tuning("")
        pairs = flash_ext.scaled_dot_product_attention(q, k, v)
        set_tuning("cluster_pairs_min_kv=0")
        single = flash_ext.scaled_dot_product_attention(q, k, v)
        assert torch.equal(pairs, single)
        with pytest.raises(ValueError, match="unknown key 'stages'"):
            set_tuning("stages=2")
        with pytest.raises(ValueError, match="wants key=N with N >= 0"):
            set_tuning("cluster_pairs_min_kv=-1")
        with pytest.raises(TypeError):
            set_tuning(3)
        assert torch.equal(flash_ext.scaled_dot_product_attention(q, k, v), single)  # still the last good spec
    finally:
        set_tuning("")
    assert torch.equal(flash_ext.scaled_dot_product_attention(q, k, v), pairs)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_hopper_varlen_cluster_pairs_match_single_blocks():
    """Varlen batches of long sequences of equal lengths run on cluster pairs
    and compute what single blocks do, bit for bit, including each
    sequence's last pair, which ends past it (its second tile walks the keys
    beside its partner and must store nothing into the next sequence's
    rows). Unequal lengths deal their tiles to whichever block asks first,
    which pairs cannot share: they stay on single blocks, under any knob."""
    torch.manual_seed(0)
    set_tuning = flash_ext._C._set_fwd_tuning
    # 65 query tiles a sequence (odd), 3 * 66 * 4 tiles: more than the grid.
    # Then unequal lengths: 65, 0, 2, 71 and 18 tiles.
    for lens in ([8200, 8200, 8200], [8200, 0, 130, 9000, 2200]):
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(int(cu[-1]), 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        outputs = {}
        try:
            for name, spec in (("default", ""), ("any_length", "cluster_pairs_varlen_min_q=0"),
                               ("single", "cluster_pairs_min_kv=0")):
                set_tuning(spec)
                outputs[name] = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens))
                assert flash_ext.last_cuda_kernel_family() == "sm90"
        finally:
            set_tuning("")
        assert torch.isfinite(outputs["single"]).all()
        assert torch.equal(outputs["default"], outputs["single"]), lens
        assert torch.equal(outputs["any_length"], outputs["single"]), lens
        # The last sequence against float64, so agreeing with single blocks means right.
        a = int(cu[-2])
        seq_q, seq_k, seq_v = (t[a:].transpose(0, 1).double() for t in (q, k, v))
        expected = torch.softmax(seq_q @ seq_k.transpose(-1, -2) / 128 ** 0.5, dim=-1) @ seq_v
        torch.testing.assert_close(outputs["default"][a:].transpose(0, 1).double(), expected, rtol=2e-2, atol=1e-2)


_TILE_VARIANTS_CHILD = """
import sys, torch, flash_ext
saved = []
for d, n_q, n_k, causal in ((128, 1000, 1000, False), (128, 77, 3000, False), (128, 64, 8200, False),
                            (96, 200, 700, False), (128, 700, 700, True), (64, 500, 500, False),
                            (64, 600, 900, True),
                            (256, 900, 900, False), (256, 300, 1111, False), (256, 700, 700, True),
                            (256, 130, 500, True)):
    q = torch.randn(2, 3, n_q, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 3, n_k, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    saved.append([causal] + [t.cpu() for t in (q, k, v, out)])
# A packed batch (varlen kernels) with an empty sequence, saved per sequence
# in the layout above.
cu = torch.tensor([0, 300, 1300, 1300, 1377], dtype=torch.int32, device="cuda")
q, k, v = (torch.randn(1377, 3, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, 1000, 1000)
for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
    saved.append([False] + [t[a:b].transpose(0, 1).unsqueeze(0).cpu() for t in (q, k, v, out)])
torch.save(saved, sys.argv[1])
"""


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
@pytest.mark.parametrize("spec", ["", "wide_keys_min_kv=1", "wide_keys_min_kv=0",
                                  "cluster_pairs_min_kv=1,wide_keys_min_kv=1",
                                  "d128_tall_min=1,d128_tall_max_kv=100000,d128_tall_min_windowed=1",
                                  "d128_tall_min=1,d128_tall_max_kv=100000,d128_tall_pairs_min_kv=1"])
def test_hopper_forward_tile_variants(tmp_path, spec):
    """The d = 128 176-key tiles (by default from 4096 keys; all calls under
    wide_keys_min_kv=1, none under 0), d = 128's 192-row tiles of 80 keys
    (by default at 2k-8k without a window; every dense call, causal ones
    too, under d128_tall_min=1 and d128_tall_min_windowed=1), d = 64's
    128-row tiles (Q K^T with Q in registers) and d = 256's 80-key tiles
    sum in other tiles than the rest, so each setting is held to the
    float64 reference, with lengths that leave partial tiles, a head dim
    padded to 128 and a packed (varlen) batch; so are cluster pairs on
    176-key tiles (cluster_pairs_min_kv=1: even numbers of query tiles at
    d = 96 and 128, K/V tiles multicast) and on the 192-row tiles
    (d128_tall_pairs_min_kv=1: 1000 and 200 query rows make 6 and 2 tiles)."""
    import os
    import subprocess
    import sys
    path = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", _TILE_VARIANTS_CHILD, str(path)], check=True, timeout=120,
                   env=dict(os.environ, FLASH_EXT_FWD_TUNING=spec))
    for causal, q, k, v, out in torch.load(path):
        scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
        if causal:  # top-left aligned, as torch's is_causal
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        expected = torch.softmax(scores, dim=-1) @ v.double()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_hopper_forward_sections_short_first(gen):
    """The persistent forward's tiles in L2 sections whose first is short:
    d = 256 causal at 4k, 10 heads, whose K and V (4 MB a head) make
    sections of 8 pairs, so a first section of 2 then one of 8; against
    float64."""
    q, k, v = (randn((1, 10, 4096, 256), torch.bfloat16, "cuda", gen) for _ in range(3))
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    ref = reference_attention(q, k, v, is_causal=True)
    assert_matches_reference(out, ref, torch.bfloat16, TORCH_SDPA(q, k, v, is_causal=True))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("align", ["none", "top", "bottom"])
def test_hopper_forward_epilogue_across_tiles(d, align, gen):
    """A persistent block's tiles one after another, each epilogue's TMA
    store waited for at the next tile's first turn where O has a buffer of
    its own (d = 64), at once where it is staged in a K/V stage, against
    float64 over ~7 tiles a block, with partial tiles. "bottom" (more
    queries than keys, FlashAttention's causal) puts tiles without any
    visible key (stored as zeros, no staging) between the others."""
    n_q, n_k = (384, 200) if align == "bottom" else (333, 333)
    q = randn((6, 40, n_q, d), torch.bfloat16, "cuda", gen)
    k, v = (randn((6, 40, n_k, d), torch.bfloat16, "cuda", gen) for _ in range(2))
    if align == "bottom":
        out = flash_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal=True).transpose(1, 2)
        ref = reference_attention(q, k, v, window=(-1, 0), bottom_right=True)
        theirs = torch.cat([torch.zeros_like(q[:, :, :n_q - n_k]),
                            TORCH_SDPA(q[:, :, n_q - n_k:], k, v, is_causal=True)], dim=2)
        assert (out[:, :, :n_q - n_k] == 0).all(), "rows without keys"
    else:
        out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=align == "top")
        ref = reference_attention(q, k, v, is_causal=align == "top")
        theirs = TORCH_SDPA(q, k, v, is_causal=align == "top")
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    assert_matches_reference(out, ref, torch.bfloat16, theirs)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("slack", [0, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_forward_rescale_skip(d, slack, dtype, gen):
    """The forward skips O's rescale in a warp none of whose rows raised its
    maximum: rows whose maximum jumps at a late key tile (a key aligned with
    their query), alone among the rows of their warp, and rows whose maximum
    moves by a little (under FwdTuning::rescale_slack, kept), against
    float64 at every row, with and without a causal mask (probabilities up
    to 2^slack, in fp16 too)."""
    n = 2500
    q = randn((2, 4, n, d), dtype, "cuda", gen)
    k, v = (randn((2, 4, n, d), dtype, "cuda", gen) for _ in range(2))
    # Query rows 2100, 2170 and 2240 (each in another 64-row group, visible
    # to the keys under the causal mask too) see their largest score at keys
    # 2000-2002, far past the first tiles: row 2100's past any slack
    # (2 |q|^2 / sqrt(d): 16-32 against a largest other score of ~4), the
    # others' within 8 (log2 units); row 2300 a little above its others at 1500.
    for row, key, gain in ((2100, 2000, 2.0), (2170, 2001, 0.5), (2240, 2002, 0.5), (2300, 1500, 0.1)):
        k[:, :, key] = q[:, :, row] * gain
    set_tuning = flash_ext._C._set_fwd_tuning
    try:
        set_tuning(f"rescale_slack={slack}")
        for causal in (False, True):
            out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert flash_ext.last_cuda_kernel_family() == "sm90"
            assert_matches_reference(out, reference_attention(q, k, v, is_causal=causal), dtype,
                                     TORCH_SDPA(q, k, v, is_causal=causal))
    finally:
        set_tuning("")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
def test_hopper_backward_block_order_in_process(gen):
    """flash_ext._C._set_bwd_tuning's masked_section_rounds reorders the
    backward's blocks under a mask (sections of pairs, heaviest key tiles
    first; 0: pair by pair) and never their arithmetic: dK and dV, which one
    block computes whole, equal the default's bit for bit, dQ (float32 adds
    in another order) within rounding. Causal with GQA at 4k (14 pairs of
    32 key tiles: sections of 3 pairs by L2 after a first of 2), then two
    small shapes against float64: causal with GQA, and a left-only window,
    whose heaviest key tiles are the last."""
    set_tuning = flash_ext._C._set_bwd_tuning
    cases = [(7, 4, 2, 4096, 4096, (-1, 0), False), (5, 6, 3, 1000, 1000, (-1, 0), True),
             (3, 4, 4, 1300, 1100, (300, -1), True)]
    for batch, heads, kv_heads, n_q, n_k, window, against_float64 in cases:
        q = randn((batch, n_q, heads, 128), torch.bfloat16, "cuda", gen, requires_grad=True)
        k = randn((batch, n_k, kv_heads, 128), torch.bfloat16, "cuda", gen, requires_grad=True)
        v = randn((batch, n_k, kv_heads, 128), torch.bfloat16, "cuda", gen, requires_grad=True)
        dout = randn((batch, n_q, heads, 128), torch.bfloat16, "cuda", gen)
        grads = {}
        try:
            for spec in ("", "masked_section_rounds=0", "masked_section_rounds=1", "masked_section_rounds=7"):
                set_tuning(spec)
                out = flash_ext.flash_attn_func(q, k, v, window_size=window)
                grads[spec] = torch.autograd.grad(out, (q, k, v), dout)
                assert flash_ext.last_cuda_kernel_family() == "sm90"
            with pytest.raises(ValueError, match="unknown key 'rounds'"):
                set_tuning("rounds=2")
        finally:
            set_tuning("")
        for spec, (dq, dk, dv) in grads.items():
            assert torch.equal(dk, grads[""][1]) and torch.equal(dv, grads[""][2]), spec
            torch.testing.assert_close(dq, grads[""][0], rtol=1e-2, atol=1e-3)
        if not against_float64:
            continue
        ref = reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=window, bottom_right=True,
                                  enable_gqa=True)
        refs = grad_list(to_bshd(ref), (q, k, v), dout.double())
        vis = window_visible(n_q, n_k, window[0], window[1], True, device="cuda")
        torch_grads = grad_list(to_bshd(_torch_visible(to_bshd(q), to_bshd(k), to_bshd(v), vis, True)), (q, k, v),
                                dout)
        for name, g, r, t in zip("qkv", grads[""], refs, torch_grads):
            assert_matches_reference(g, r, torch.bfloat16, t, what=f"d{name} window {window}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["none", "causal", "bottom", "window"])
@pytest.mark.parametrize("d,n_q,n_k,heads,kv_heads", [
    (128, 1000, 1000, 4, 4), (128, 2048, 2048, 2, 2), (128, 333, 777, 6, 2), (96, 161, 300, 2, 1),
    (128, 80, 130, 3, 3)])
def test_hopper_backward_tall_tiles_against_float64(d, n_q, n_k, heads, kv_heads, mask, dtype, gen):
    """The d = 128 backward's 80-row query tiles (BwdTuning d128_tall_min_q,
    d128_tall_masked) against float64: query lengths off both tile sizes
    (the last tile reaching into the padding), GQA, a head dim padded to 128;
    no mask, causal (top-left, and bottom-right through flash_attn_func) and
    a sliding window."""
    set_tuning = flash_ext._C._set_bwd_tuning
    q = randn((2, heads, n_q, d), dtype, "cuda", gen, requires_grad=True)
    k = randn((2, kv_heads, n_k, d), dtype, "cuda", gen, requires_grad=True)
    v = randn((2, kv_heads, n_k, d), dtype, "cuda", gen, requires_grad=True)
    dout = randn((2, heads, n_q, d), dtype, "cuda", gen)
    gqa = heads != kv_heads
    window = {"bottom": (-1, 0), "window": (300, 0)}.get(mask)
    try:
        set_tuning("d128_tall_min_q=1,d128_tall_masked=1")
        if window is None:
            out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", enable_gqa=gqa)
        else:
            out = flash_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            window_size=window).transpose(1, 2)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        assert flash_ext.last_cuda_kernel_family() == "sm90"
    finally:
        set_tuning("")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if window is None:
        theirs = torch.autograd.grad(TORCH_SDPA(q, k, v, is_causal=mask == "causal", enable_gqa=gqa), (q, k, v),
                                     dout)
        ref = reference_attention(q64, k64, v64, is_causal=mask == "causal", enable_gqa=True)
    else:
        vis = window_visible(n_q, n_k, window[0], window[1], True, device="cuda")
        theirs = torch.autograd.grad(_torch_visible(q, k, v, vis, gqa), (q, k, v), dout)
        ref = reference_attention(q64, k64, v64, window=window, bottom_right=True, enable_gqa=True)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, r, t in zip("qkv", grads, refs, theirs):
        assert_matches_reference(g, r, dtype, t, what=f"d{name} (80-row tiles, {mask})")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SM90, reason="needs a GPU served by the Hopper kernels")
@pytest.mark.parametrize("d,align,n_q,n_k,heads,kv_heads", [
    (128, None, 1000, 1000, 4, 4), (128, "top", 700, 700, 4, 4), (128, None, 500, 500, 8, 2),
    (96, None, 300, 1111, 2, 2), (64, "top", 600, 900, 4, 4), (128, "bottom", 400, 200, 2, 2),
    (64, "bottom", 500, 300, 2, 1)])
def test_hopper_backward_against_float64(d, align, n_q, n_k, heads, kv_heads, gen):
    """The Hopper backward's gradients against float64: partial tiles, both
    causal alignments, GQA, a head dim padded to 128. "bottom" is
    FlashAttention's causal with more queries than keys: the first n_q - n_k
    rows see no key, so whole dQ tiles get no addition and must be exactly 0."""
    q = randn((2, heads, n_q, d), torch.bfloat16, "cuda", gen, requires_grad=True)
    k = randn((2, kv_heads, n_k, d), torch.bfloat16, "cuda", gen, requires_grad=True)
    v = randn((2, kv_heads, n_k, d), torch.bfloat16, "cuda", gen, requires_grad=True)
    dout = randn((2, heads, n_q, d), torch.bfloat16, "cuda", gen)
    if align == "bottom":
        out = flash_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal=True).transpose(1, 2)
    else:
        out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=align == "top", enable_gqa=heads != kv_heads)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert flash_ext.last_cuda_kernel_family() == "sm90"
    # PyTorch's gradients on the same inputs (for the error allowance), and float64's.
    gqa, off = heads != kv_heads, n_q - n_k
    if align == "bottom":  # rows from n_q - n_k on see keys as a top-left causal mask of n_k rows
        theirs = torch.autograd.grad(TORCH_SDPA(q[:, :, off:], k, v, is_causal=True, enable_gqa=gqa), (q, k, v),
                                     dout[:, :, off:])
    else:
        theirs = torch.autograd.grad(TORCH_SDPA(q, k, v, is_causal=align == "top", enable_gqa=gqa), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if align == "bottom":
        ref = reference_attention(q64, k64, v64, window=(-1, 0), bottom_right=True, enable_gqa=True)
        assert (grads[0][:, :, :off] == 0).all(), "dq of rows without keys"
    else:
        ref = reference_attention(q64, k64, v64, is_causal=align == "top", enable_gqa=True)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, r, t in zip("qkv", grads, refs, theirs):
        assert_matches_reference(g, r, torch.bfloat16, t, what=f"d{name} ({align})")
