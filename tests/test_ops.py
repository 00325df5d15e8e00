"""The registered operators: torch.library.opcheck on each (schema, fake
kernels, autograd registration, AOT dispatch), and torch.compile(fullgraph=True)
of code using them, forward and backward, compared to eager and the reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_ext
from conftest import grad_list, rand_bool, randn, reference_attention, to_bshd

ops = torch.ops.flash_ext


def _qkv(gen, b=2, h=4, hk=2, L=9, S=11, E=16, Ev=16, dtype=torch.float32, requires_grad=False):
    q = randn((b, h, L, E), dtype, gen=gen, requires_grad=requires_grad)
    k = randn((b, hk, S, E), dtype, gen=gen, requires_grad=requires_grad)
    v = randn((b, hk, S, Ev), dtype, gen=gen, requires_grad=requires_grad)
    return q, k, v


# --------------------------------------------------------------------------- opcheck


def _attention_samples(gen):
    q, k, v = _qkv(gen, requires_grad=True)
    bool_mask = rand_bool((2, 1, 9, 11), gen).expand(2, 4, 9, 11)
    float_mask = randn((1, 4, 9, 11), torch.float32, gen=gen)
    return [
        (q, k, v, None, 0.0, 0.25, -1, -1, False, False),
        (q, k, v, None, 0.0, 0.25, -1, 0, True, True),           # causal bottom-right, deterministic
        (q, k, v, bool_mask, 0.0, 0.25, -1, -1, False, False),
        (q, k, v, float_mask, 0.0, 0.5, 3, 2, False, False),     # bias + window
        (q.detach(), k.detach(), v.detach(), None, 0.0, 1.0, -1, 0, False, False),  # no grad
        (q.transpose(2, 3).contiguous().transpose(2, 3).detach().contiguous(), k, v, None, 0.0, 0.25, -1, -1,
         False, False),
    ]


@pytest.mark.parametrize("i", range(6))
def test_opcheck_attention(i, gen):
    args = _attention_samples(gen)[i]
    torch.library.opcheck(ops.attention.default, args)


def test_opcheck_attention_float_mask_requiring_grad(gen):
    q, k, v = _qkv(gen, requires_grad=True, dtype=torch.float64)
    bias = randn((2, 4, 9, 11), gen=gen, requires_grad=True)
    torch.library.opcheck(ops.attention.default, (q, k, v, bias, 0.0, 0.25, -1, -1, False, False))


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_attention_fwd(with_mask, gen):
    q, k, v = _qkv(gen)
    mask = randn((2, 4, 9, 11), torch.float32, gen=gen) if with_mask else None
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, mask, 0.0, 0.25, -1, 0, False))


def test_opcheck_attention_bwd(gen):
    q, k, v = _qkv(gen, Ev=8)
    bias = randn((2, 4, 9, 11), torch.float32, gen=gen)
    out, lse, rng = ops.attention_fwd(q, k, v, bias, 0.0, 0.25, -1, -1, False)
    grad_out = randn(out.shape, torch.float32, gen=gen)
    torch.library.opcheck(ops.attention_bwd.default,
                          (grad_out, q, k, v, out, lse, rng, bias, 0.0, 0.25, -1, -1, False, True, False))
    out, lse, rng = ops.attention_fwd(q, k, v, None, 0.0, 0.25, 4, 0, True)
    torch.library.opcheck(ops.attention_bwd.default,
                          (grad_out, q, k, v, out, lse, rng, None, 0.0, 0.25, 4, 0, True, False, True))


def test_opcheck_attention_bwd_with_dropout_state(gen):
    q, k, v = _qkv(gen)
    torch.manual_seed(3)
    out, lse, rng = ops.attention_fwd(q, k, v, None, 0.3, 0.25, -1, -1, False)
    grad_out = randn(out.shape, torch.float32, gen=gen)
    torch.library.opcheck(ops.attention_bwd.default,
                          (grad_out, q, k, v, out, lse, rng, None, 0.3, 0.25, -1, -1, False, False, False))


@pytest.mark.parametrize("paged,append", [(False, False), (False, True), (True, True)])
def test_opcheck_kvcache_attention(paged, append, gen):
    b, h, hk, d = 2, 4, 2, 16
    lens = torch.tensor([3, 20], dtype=torch.int32)
    q = randn((b, 1, h, d), torch.float32, gen=gen)
    k_new = randn((b, 1, hk, d), torch.float32, gen=gen) if append else None
    v_new = randn((b, 1, hk, d), torch.float32, gen=gen) if append else None
    if paged:
        k_cache = randn((6, 16, hk, d), torch.float32, gen=gen)
        v_cache = randn((6, 16, hk, d), torch.float32, gen=gen)
        table = torch.tensor([[5, 1, 3], [0, 4, 2]], dtype=torch.int32)
    else:
        k_cache = randn((b, 32, hk, d), torch.float32, gen=gen)
        v_cache = randn((b, 32, hk, d), torch.float32, gen=gen)
        table = None
    torch.library.opcheck(ops.kvcache_attention.default,
                          (q, k_cache, v_cache, k_new, v_new, lens, table, 0.25, True, 2))
    # with softcap, ALiBi and a sliding window
    slopes = torch.rand(b, h, generator=gen)
    torch.library.opcheck(ops.kvcache_attention.default,
                          (q, k_cache, v_cache, k_new, v_new, lens, table, 0.25, False, 2, 5.0, slopes, 7, 2))


def test_opcheck_dropout_keep_mask():
    state = torch.tensor([123456789, 0], dtype=torch.int64)
    torch.library.opcheck(ops.dropout_keep_mask.default, (state, 2, 3, 5, 7, 0.3))
    torch.library.opcheck(ops.dropout_keep_mask.default, (state, 1, 1, 0, 4, 0.5))


# --------------------------------------------------------------------------- torch.compile


def test_compile_sdpa_forward_and_backward(gen):
    torch._dynamo.reset()

    def fn(q, k, v, bias):
        out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        return (out * 2).sum(dim=-1)

    compiled = torch.compile(fn, fullgraph=True)
    q, k, v = _qkv(gen, requires_grad=True)
    bias = randn((9, 11), torch.float32, gen=gen, requires_grad=True)
    dout = randn((2, 4, 9), torch.float32, gen=gen)
    eager = fn(q, k, v, bias)
    eager_grads = grad_list(eager, (q, k, v, bias), dout)
    out = compiled(q, k, v, bias)
    grads = grad_list(out, (q, k, v, bias), dout)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    ref = (reference_attention(q, k, v, attn_mask=bias, enable_gqa=True) * 2).sum(-1)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_compile_sdpa_causal_gpt2_layout_backward(gen):
    torch._dynamo.reset()

    def fn(x):
        b, t, c = x.shape
        q, k, v = x.split(c // 3, dim=2)
        q, k, v = (y.view(b, t, 2, c // 6).transpose(1, 2) for y in (q, k, v))
        return flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)

    compiled = torch.compile(fn, fullgraph=True)
    x = randn((2, 13, 48), torch.float32, gen=gen, requires_grad=True)
    dout = randn((2, 13, 16), torch.float32, gen=gen)
    (ge,) = grad_list(fn(x), (x,), dout)
    out = compiled(x)
    (gc,) = grad_list(out, (x,), dout)
    torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)


def test_compile_flash_attn_func(gen):
    torch._dynamo.reset()

    def fn(q, k, v):
        out, lse = flash_ext.flash_attn_func(q, k, v, causal=True, window_size=(5, 0), return_lse=True)
        return out, lse

    compiled = torch.compile(fn, fullgraph=True)
    q, k, v = (randn((1, 20, 2, 16), torch.float32, gen=gen, requires_grad=True) for _ in range(3))
    dout = randn((1, 20, 2, 16), torch.float32, gen=gen)
    out_e, lse_e = fn(q, k, v)
    out_c, lse_c = compiled(q, k, v)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_e, atol=1e-5, rtol=1e-5)
    for g, e in zip(grad_list(out_c, (q, k, v), dout), grad_list(out_e, (q, k, v), dout)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_compile_kvcache(gen):
    torch._dynamo.reset()

    def step(q, k_cache, v_cache, k, v, lens):
        return flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, return_lse=True)

    compiled = torch.compile(step, fullgraph=True)
    b, h, d, n = 2, 4, 16, 24
    kc0 = randn((b, n, 2, d), torch.float32, gen=gen)
    vc0 = randn((b, n, 2, d), torch.float32, gen=gen)
    q = randn((b, 1, h, d), torch.float32, gen=gen)
    k, v = randn((b, 1, 2, d), torch.float32, gen=gen), randn((b, 1, 2, d), torch.float32, gen=gen)
    lens = torch.tensor([4, 17], dtype=torch.int32)
    kc_e, vc_e = kc0.clone(), vc0.clone()
    kc_c, vc_c = kc0.clone(), vc0.clone()
    out_e, lse_e = step(q, kc_e, vc_e, k, v, lens)
    out_c, lse_c = compiled(q, kc_c, vc_c, k, v, lens)
    torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_c, lse_e, atol=1e-6, rtol=1e-6)
    # the in-place append happened under compile too
    torch.testing.assert_close(kc_c, kc_e, atol=0, rtol=0)
    torch.testing.assert_close(vc_c, vc_e, atol=0, rtol=0)
    assert not torch.equal(kc_c, kc0)


class _TinyAttention(nn.Module):
    def __init__(self, c=32, nh=4):
        super().__init__()
        self.nh = nh
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (y.view(b, t, self.nh, c // self.nh).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


def test_compile_module_under_patch(gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyAttention()
    x = randn((2, 15, 32), torch.float32, gen=gen, requires_grad=True)
    eager = model(x)
    (g_eager,) = grad_list(eager.sum(), (x,), None)
    with flash_ext.patch():
        assert F.scaled_dot_product_attention is flash_ext.scaled_dot_product_attention
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        (g,) = grad_list(out.sum(), (x,), None)
        # the graph really calls our operator
        torch._dynamo.reset()
        seen = []

        def backend(gm, example_inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        torch.compile(model, backend=backend, fullgraph=True)(x)
    assert any("flash_ext" in s for s in seen), seen
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_eager, atol=1e-5, rtol=1e-5)
    assert not flash_ext.is_patched()
