"""Logit soft-capping and ALiBi (flash_attn_func, the op, and decode) against
an explicit float64 reference, forward and backward."""
from __future__ import annotations

import math

import pytest
import torch

import flash_ext
from conftest import DEVICES, randn, skip_unless_served, to_bshd


def reference(q, k, v, causal: bool, softcap: float, slopes: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, D) float64: bottom-right aligned like FlashAttention."""
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    L, S = q.shape[-2], k.shape[-2]
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L).view(L, 1) + (S - L)
    j = torch.arange(S).view(1, S)
    if slopes is not None:
        slope = slopes.to(torch.float64).view(*slopes.shape[:-1], -1, 1, 1)
        s = s - slope * (i - j).abs().to(q.device, torch.float64)
    if causal:
        s = s.masked_fill((j > i).to(q.device), -math.inf)
    return torch.softmax(s, dim=-1) @ v64


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
