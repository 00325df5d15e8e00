"""Dropout: the kept fraction, seeding, and forward/backward equal to the
reference built from the replayed keep-mask (torch.ops.flash_ext.dropout_keep_mask)."""
from __future__ import annotations

import math

import pytest
import torch

import flash_ext
from conftest import assert_matches_reference, grad_list, rand_bool, randn, reference_attention, to_bshd

ops = torch.ops.flash_ext


def _fwd_with_state(q, k, v, mask, p, scale, wl=-1, wr=-1, bottom_right=False):
    with torch.no_grad():
        return ops.attention_fwd(q, k, v, mask, p, scale, wl, wr, bottom_right)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_matches_one_minus_p(p, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    q, k, v = (randn((2, 3, 1, 8), gen=gen) for _ in range(3))
    _, _, rng_state = _fwd_with_state(q, k, v, None, p, 1.0)
    assert rng_state.dtype == torch.int64 and rng_state.numel() == 2
    keep = ops.dropout_keep_mask(rng_state, 2, 3, 128, 256, p)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 128, 256)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 6 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {6 * sigma:.4f}"
    # no structure: every (batch, head), every column lane mod 4 and row parity keeps ~1-p
    per_slice = [keep[b, h] for b in range(2) for h in range(3)]
    per_slice += [keep[..., lane::4] for lane in range(4)] + [keep[:, :, 0::2], keep[:, :, 1::2]]
    for part in per_slice:
        s = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.double().mean().item() - (1 - p)) < 6 * s
    # distinct heads get distinct masks
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    # the replay is a pure function of the state
    assert torch.equal(keep, ops.dropout_keep_mask(rng_state, 2, 3, 128, 256, p))


def test_dropout_output_seeding(gen):
    q, k, v = (randn((2, 2, 40, 16), torch.float32, gen=gen) for _ in range(3))
    torch.manual_seed(1234)
    a = flash_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(1234)
    b = flash_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(4321)
    c = flash_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    d = flash_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3)  # generator advanced
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(c, d)
    no_drop = flash_ext.scaled_dot_product_attention(q, k, v)
    assert not torch.equal(a, no_drop)
    # zero dropout is deterministic and equals the plain call
    assert torch.equal(flash_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.0), no_drop)


def test_dropout_flash_attn_func_seeding(gen):
    q, k, v = (randn((1, 33, 2, 16), gen=gen) for _ in range(3))
    torch.manual_seed(7)
    a = flash_ext.flash_attn_func(q, k, v, dropout_p=0.2, causal=True)
    torch.manual_seed(7)
    b = flash_ext.flash_attn_func(q, k, v, dropout_p=0.2, causal=True)
    torch.manual_seed(8)
    c = flash_ext.flash_attn_func(q, k, v, dropout_p=0.2, causal=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


DROPOUT_CASES = [
    # (batch, heads, kv_heads, L, S, E, causal, mask kind, p)
    (2, 2, 2, 37, 37, 16, False, None, 0.2),
    (1, 4, 2, 65, 130, 32, True, None, 0.5),
    (2, 2, 1, 129, 70, 8, False, "bool", 0.1),
    (1, 2, 2, 50, 61, 16, False, "float", 0.7),
    (1, 1, 1, 300, 260, 16, True, None, 0.3),   # several key/query blocks
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"h{c[1]}kv{c[2]}-L{c[3]}S{c[4]}-c{int(c[6])}-{c[7]}-p{c[8]}")
def test_dropout_forward_backward_match_replayed_mask(case, dtype, gen):
    b, h, hk, L, S, E, causal, mask_kind, p = case
    q = randn((b, h, L, E), dtype, gen=gen, requires_grad=True)
    k = randn((b, hk, S, E), dtype, gen=gen, requires_grad=True)
    v = randn((b, hk, S, E), dtype, gen=gen, requires_grad=True)
    mask = None
    if mask_kind == "bool":
        mask = rand_bool((b, 1, L, S), gen)
    elif mask_kind == "float":
        mask = randn((L, S), dtype, gen=gen)
    dout = randn((b, h, L, E), dtype, gen=gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    gqa = h != hk

    torch.manual_seed(seed)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 enable_gqa=gqa)
    # the same seed through the op gives the same output and exposes the rng state
    torch.manual_seed(seed)
    mask4 = None if mask is None else mask.expand(b, h, L, S)
    out2, _, rng_state = _fwd_with_state(q, k, v, mask4, p, 1 / math.sqrt(E), -1, 0 if causal else -1)
    assert torch.equal(out.detach(), out2)
    keep = ops.dropout_keep_mask(rng_state, b, h, L, S, p)
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 6 * math.sqrt(p * (1 - p) / keep.numel()) + 1e-12

    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                              dropout_keep=keep, dropout_p=p)
    assert_matches_reference(out, ref, dtype, what="dropout forward")
    ours = grad_list(out, (q, k, v), dout)
    theirs = grad_list(ref, (q, k, v), dout.to(torch.float64))
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (5e-5, 5e-5)}
    for name, g, r in zip("qkv", ours, theirs):
        assert_matches_reference(g, r, dtype, what=f"dropout d{name}", fixed_tol=tol)


def test_dropout_float_mask_gradient_with_replayed_mask(gen):
    q, k, v = (randn((2, 2, 20, 8), gen=gen, requires_grad=True) for _ in range(3))
    bias = randn((1, 2, 20, 20), gen=gen, requires_grad=True)
    dout = randn((2, 2, 20, 8), gen=gen)
    torch.manual_seed(99)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.4)
    torch.manual_seed(99)
    _, _, rng_state = _fwd_with_state(q, k, v, bias.expand(2, 2, 20, 20), 0.4, 1 / math.sqrt(8))
    keep = ops.dropout_keep_mask(rng_state, 2, 2, 20, 20, 0.4)
    ref = reference_attention(q, k, v, attn_mask=bias, dropout_keep=keep, dropout_p=0.4)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), grad_list(out, (q, k, v, bias), dout),
                          grad_list(ref, (q, k, v, bias), dout)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_dropout_flash_attn_func_window_replay(gen):
    b, L, S, h, E, p = 1, 45, 60, 2, 16, 0.25
    q = randn((b, L, h, E), gen=gen, requires_grad=True)
    k = randn((b, S, h, E), gen=gen, requires_grad=True)
    v = randn((b, S, h, E), gen=gen, requires_grad=True)
    dout = randn((b, L, h, E), gen=gen)
    torch.manual_seed(5)
    out = flash_ext.flash_attn_func(q, k, v, dropout_p=p, window_size=(6, 3))
    torch.manual_seed(5)
    _, _, rng_state = _fwd_with_state(to_bshd(q), to_bshd(k), to_bshd(v), None, p, 1 / math.sqrt(E), 6, 3, True)
    keep = ops.dropout_keep_mask(rng_state, b, h, L, S, p)
    ref = to_bshd(reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=(6, 3), bottom_right=True,
                                      dropout_keep=keep, dropout_p=p))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for g, r in zip(grad_list(out, (q, k, v), dout), grad_list(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_dropout_expected_output_is_undropped(gen):
    """Averaged over many seeds, dropout's output approaches the undropped one
    (the 1/(1-p) rescaling is right)."""
    q, k, v = (randn((1, 1, 4, 8), gen=gen) for _ in range(3))
    v = v + 3.0  # a non-zero mean makes a wrong rescaling visible
    plain = flash_ext.scaled_dot_product_attention(q, k, v)
    torch.manual_seed(0)
    n = 2000
    mean = sum(flash_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(n)) / n
    # per-element std of one sample is at most ~|v|max; 6 sigma of the mean
    bound = 6 * v.abs().max().item() / math.sqrt(n)
    assert (mean - plain).abs().max().item() < bound
