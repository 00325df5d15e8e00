"""Gradients: dq, dk, dv and the float mask's gradient against float64
autograd through the reference (and PyTorch's SDPA), gradcheck on small
shapes, and low-precision gradient error against PyTorch's own."""
from __future__ import annotations

import math

import pytest
import torch

import flash_ext
from conftest import (
    DEVICES, LOW_PRECISION, TORCH_SDPA, assert_matches_reference, grad_list, rand_bool, randn,
    reference_attention, shifted_by_one_element, skip_unless_served, to_bshd,
)

GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (5e-5, 5e-5)}

# (batch, heads, kv_heads, L, S, E, Ev, causal)
GRAD_GRID = [
    (1, 1, 1, 1, 1, 8, 8, False),
    (2, 2, 2, 7, 9, 16, 16, True),
    (1, 4, 2, 63, 65, 40, 40, False),
    (2, 4, 1, 65, 63, 64, 64, True),
    (1, 4, 4, 129, 130, 32, 24, True),
    (1, 2, 2, 257, 129, 16, 16, False),
    (1, 8, 2, 33, 257, 128, 128, True),
    (1, 1, 1, 40, 40, 256, 256, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", GRAD_GRID, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}-L{c[3]}S{c[4]}-E{c[5]}v{c[6]}-c{int(c[7])}")
def test_sdpa_gradients_grid(case, dtype, gen):
    b, h, hk, L, S, E, Ev, causal = case
    q = randn((b, h, L, E), dtype, gen=gen, requires_grad=True)
    k = randn((b, hk, S, E), dtype, gen=gen, requires_grad=True)
    v = randn((b, hk, S, Ev), dtype, gen=gen, requires_grad=True)
    dout = randn((b, h, L, Ev), dtype, gen=gen)
    gqa = h != hk
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    ours = grad_list(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    theirs = grad_list(ref, (q, k, v), dout.double())
    for name, g, r in zip("qkv", ours, theirs):
        assert g.dtype == dtype and g.shape == r.shape
        assert_matches_reference(g, r, dtype, what=f"d{name}", fixed_tol=GRAD_TOL)
    # PyTorch's own autograd in float64 agrees too (no empty rows here)
    if dtype == torch.float64:
        t = TORCH_SDPA(q, k, v, is_causal=causal, enable_gqa=gqa)
        for name, g, r in zip("qkv", ours, grad_list(t, (q, k, v), dout)):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name} vs torch: {m}")


B, H, L, S, E = 2, 3, 9, 13, 8
BIAS_SHAPES = [(L, S), (1, S), (L, 1), (B, 1, L, S), (1, H, L, S), (B, H, 1, S), (B, H, L, S), (H, L, S),
               (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_float_mask_gradient(shape, gen):
    q = randn((B, H, L, E), gen=gen, requires_grad=True)
    k = randn((B, H, S, E), gen=gen, requires_grad=True)
    v = randn((B, H, S, E), gen=gen, requires_grad=True)
    bias = randn(shape, gen=gen, requires_grad=True)
    dout = randn((B, H, L, E), gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ours = grad_list(out, (q, k, v, bias), dout)
    ref = reference_attention(q, k, v, attn_mask=bias)
    theirs = grad_list(ref, (q, k, v, bias), dout)
    assert ours[3].shape == bias.shape
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), ours, theirs):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    # PyTorch's SDPA autograd gives the same mask gradient
    t = TORCH_SDPA(q, k, v, attn_mask=bias)
    torch.testing.assert_close(ours[3], grad_list(t, (bias,), dout)[0], atol=1e-10, rtol=1e-10)


def test_sdpa_float_mask_gradient_float32_gqa_with_inf(gen):
    q = randn((2, 4, 30, 16), torch.float32, gen=gen, requires_grad=True)
    k = randn((2, 2, 41, 16), torch.float32, gen=gen, requires_grad=True)
    v = randn((2, 2, 41, 16), torch.float32, gen=gen, requires_grad=True)
    base = randn((1, 4, 30, 41), torch.float32, gen=gen)
    base = base.masked_fill(rand_bool(base.shape, gen, 0.3), -math.inf)
    bias = base.requires_grad_(True)
    dout = randn((2, 4, 30, 16), torch.float32, gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    ours = grad_list(out, (q, k, v, bias), dout)
    theirs = grad_list(reference_attention(q, k, v, attn_mask=bias, enable_gqa=True), (q, k, v, bias), dout.double())
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), ours, theirs):
        assert_matches_reference(g, r, torch.float32, what=name, fixed_tol=GRAD_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 8, 1, 64), (1, 1, 128, 64)], ids=lambda s: "x".join(map(str, s)))
def test_sdpa_broadcast_mask_gradient_low_precision(shape, dtype, device, gen):
    # The mask's gradient sums thousands of per-element gradients over the
    # broadcast dimensions: rounded once, not once per element.
    skip_unless_served(device, dtype, 64)
    q = randn((4, 8, 128, 64), dtype, device, gen=gen, requires_grad=True)
    k = randn((4, 8, 64, 64), dtype, device, gen=gen, requires_grad=True)
    v = randn((4, 8, 64, 64), dtype, device, gen=gen, requires_grad=True)
    bias = randn(shape, dtype, device, gen=gen, requires_grad=True)
    dout = randn((4, 8, 128, 64), dtype, device, gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    (ours,) = grad_list(out, (bias,), dout)
    (torch_grad,) = grad_list(TORCH_SDPA(q, k, v, attn_mask=bias), (bias,), dout)
    bias64 = bias.detach().double().requires_grad_(True)  # a float64 leaf keeps the reference unrounded
    (ref,) = grad_list(reference_attention(q, k, v, attn_mask=bias64), (bias64,), dout.double())
    assert ours.dtype == dtype and ours.shape == bias.shape
    assert_matches_reference(ours, ref, dtype, torch_out=torch_grad, what="dmask")
    # Rounded once: within one unit of the float64 sum of the same per-element
    # gradients dS = P * (dP - D), with D = rowsum(dO * O) from the stored
    # output as the backward takes it (plus float32's error over the sum).
    # Per-element rounding before the sum is off by up to sqrt(terms) units.
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    probs = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(64) + bias.detach().double(), dim=-1)
    row_dot = (dout.double() * out.detach().double()).sum(-1, keepdim=True)
    ds = probs * (dout.double() @ v64.transpose(-1, -2) - row_dot)
    expected = ds.sum_to_size(bias.shape)
    tol = torch.finfo(dtype).eps * expected.abs() + 1e-5 * ds.abs().sum_to_size(bias.shape)
    excess = ((ours.double() - expected).abs() - tol).max().item()
    assert excess <= 0, f"dmask {shape} {dtype}: off by more than one rounding (excess {excess:.3e})"


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_mask_gradients_without_mask_grad(kind, gen):
    q = randn((2, 2, 17, 8), gen=gen, requires_grad=True)
    k = randn((2, 2, 23, 8), gen=gen, requires_grad=True)
    v = randn((2, 2, 23, 12), gen=gen, requires_grad=True)
    mask = rand_bool((2, 1, 17, 23), gen) if kind == "bool" else randn((17, 23), gen=gen)
    dout = randn((2, 2, 17, 12), gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ours = grad_list(out, (q, k, v), dout)
    theirs = grad_list(reference_attention(q, k, v, attn_mask=mask), (q, k, v), dout)
    for name, g, r in zip("qkv", ours, theirs):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_sdpa_gradients_noncontiguous_gpt2(gen):
    b, t, nh, hs = 2, 37, 3, 16
    x = randn((b, t, 3 * nh * hs), gen=gen, requires_grad=True)
    q, k, v = (y.view(b, t, nh, hs).transpose(1, 2) for y in x.split(nh * hs, dim=2))
    dout = randn((b, nh, t, hs), gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    (ours,) = grad_list(out, (x,), dout)
    (theirs,) = grad_list(reference_attention(q, k, v, is_causal=True), (x,), dout)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


def test_sdpa_gradients_5d_and_3d(gen):
    q = randn((2, 2, 4, 11, 8), gen=gen, requires_grad=True)
    k = randn((2, 2, 2, 12, 8), gen=gen, requires_grad=True)
    v = randn((2, 2, 2, 12, 8), gen=gen, requires_grad=True)
    dout = randn((2, 2, 4, 11, 8), gen=gen)
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ours = grad_list(out, (q, k, v), dout)
    theirs = grad_list(reference_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), dout)
    for g, r in zip(ours, theirs):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    q3, k3, v3 = (randn((3, 10, 8), gen=gen, requires_grad=True) for _ in range(3))
    d3 = randn((3, 10, 8), gen=gen)
    ours = grad_list(flash_ext.scaled_dot_product_attention(q3, k3, v3), (q3, k3, v3), d3)
    theirs = grad_list(reference_attention(q3, k3, v3), (q3, k3, v3), d3)
    for g, r in zip(ours, theirs):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (5, 2)), (False, (-1, -1)), (False, (0, 0))])
@pytest.mark.parametrize("L,S", [(40, 40), (50, 30), (30, 50)])
def test_flash_attn_func_gradients(causal, window, L, S, gen):
    q = randn((2, L, 4, 16), gen=gen, requires_grad=True)
    k = randn((2, S, 2, 16), gen=gen, requires_grad=True)
    v = randn((2, S, 2, 16), gen=gen, requires_grad=True)
    dout = randn((2, L, 4, 16), gen=gen)
    out = flash_ext.flash_attn_func(q, k, v, causal=causal, window_size=window)
    ours = grad_list(out, (q, k, v), dout)
    w = (window[0], 0) if causal else window
    ref = to_bshd(reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=w, bottom_right=True))
    theirs = grad_list(ref, (q, k, v), dout)
    for name, g, r in zip("qkv", ours, theirs):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_flash_attn_func_deterministic_backward_is_bitwise_repeatable(gen):
    q = randn((2, 70, 4, 32), torch.float32, gen=gen, requires_grad=True)
    k = randn((2, 90, 2, 32), torch.float32, gen=gen, requires_grad=True)
    v = randn((2, 90, 2, 32), torch.float32, gen=gen, requires_grad=True)
    dout = randn((2, 70, 4, 32), torch.float32, gen=gen)
    runs = [grad_list(flash_ext.flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = to_bshd(reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=(-1, 0), bottom_right=True))
    for g, r in zip(runs[0], grad_list(ref, (q, k, v), dout.double())):
        assert_matches_reference(g, r, torch.float32, fixed_tol=GRAD_TOL)


# --------------------------------------------------------------------------- gradcheck


def _gradcheck_inputs(gen, shape_q, shape_kv, shape_v=None):
    q = randn(shape_q, gen=gen, requires_grad=True)
    k = randn(shape_kv, gen=gen, requires_grad=True)
    v = randn(shape_v or shape_kv, gen=gen, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.3}, {"enable_gqa": True},
                                    {"mask": "bool"}, {"mask": "float"}],
                         ids=["plain", "causal", "scale", "gqa", "bool_mask", "float_mask"])
def test_gradcheck_sdpa(kwargs, gen):
    kwargs = dict(kwargs)
    heads_kv = 1 if kwargs.get("enable_gqa") else 2
    q, k, v = _gradcheck_inputs(gen, (1, 2, 5, 4), (1, heads_kv, 6, 4), (1, heads_kv, 6, 3))
    inputs = [q, k, v]
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        m = rand_bool((5, 6), gen)
        m[:, 0] = True
        fn = lambda q, k, v: flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=m, **kwargs)  # noqa: E731
    elif mask == "float":
        inputs.append(randn((2, 1, 6), gen=gen, requires_grad=True))
        fn = lambda q, k, v, b: flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=b, **kwargs)  # noqa: E731
    else:
        fn = lambda q, k, v: flash_ext.scaled_dot_product_attention(q, k, v, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1))])
def test_gradcheck_flash_attn_func(causal, window, gen):
    q, k, v = _gradcheck_inputs(gen, (1, 6, 2, 4), (1, 5, 1, 4))
    fn = lambda q, k, v: flash_ext.flash_attn_func(q, k, v, causal=causal, window_size=window)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_is_refused_or_correct(gen):
    """Double backward (create_graph=True, e.g. gradient penalties): PyTorch's
    SDPA supports it. Ours must either raise or give the right second-order
    gradient -- never silently wrong ones."""
    q, k, v = _gradcheck_inputs(gen, (1, 1, 3, 4), (1, 1, 3, 4))
    w = randn((1, 1, 3, 4), gen=gen)

    def second_order(fn):
        out = fn(q, k, v)
        dq, = torch.autograd.grad((out * w).sum() + (out ** 2).sum(), (q,), create_graph=True)
        return grad_list(dq.pow(2).sum(), (q, k, v), None)

    expected = second_order(reference_attention)
    try:
        got = second_order(flash_ext.scaled_dot_product_attention)
    except RuntimeError:
        return  # refusing is fine
    for name, g, r in zip("qkv", got, expected):
        torch.testing.assert_close(g, r, atol=1e-8, rtol=1e-6, msg=lambda m: f"d(|dq|^2)/d{name}: {m}")


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
# Over 128 query rows at head dims of 64 and 128, the CPU's bf16/fp16 backward
# runs its products on the matrix units (odd rows and keys in the last tiles).
@pytest.mark.parametrize("case", [(2, 4, 4, 65, 65, 64, True), (1, 4, 2, 100, 129, 128, False),
                                  (2, 2, 1, 33, 17, 32, True), (1, 4, 2, 301, 257, 64, True),
                                  (1, 2, 2, 200, 333, 128, False)],
                         ids=lambda c: f"h{c[1]}kv{c[2]}-L{c[3]}S{c[4]}-E{c[5]}-c{int(c[6])}")
def test_sdpa_gradients_low_precision(case, dtype, device, gen):
    b, h, hk, L, S, E, causal = case
    skip_unless_served(device, dtype, E)
    q = randn((b, h, L, E), dtype, device, gen, requires_grad=True)
    k = randn((b, hk, S, E), dtype, device, gen, requires_grad=True)
    v = randn((b, hk, S, E), dtype, device, gen, requires_grad=True)
    dout = randn((b, h, L, E), dtype, device, gen)
    gqa = h != hk
    ours = grad_list(flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
                     (q, k, v), dout)
    theirs = grad_list(TORCH_SDPA(q, k, v, is_causal=causal, enable_gqa=gqa), (q, k, v), dout)
    ref = grad_list(reference_attention(q, k, v, is_causal=causal, enable_gqa=gqa), (q, k, v), dout.double())
    for name, g, t, r in zip("qkv", ours, theirs, ref):
        assert g.dtype == dtype
        assert_matches_reference(g, r, dtype, t, what=f"d{name}")


def odd_row_stride(t: torch.Tensor) -> torch.Tensor:
    """t's values with rows 65 elements apart (a differentiable view)."""
    return torch.nn.functional.pad(t, (0, 1))[..., :-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [odd_row_stride, shifted_by_one_element], ids=lambda f: f.__name__)
def test_low_precision_keys_off_word_boundaries(layout, device, gen):
    """K and V whose rows are not 4-byte aligned: the CPU's matrix-unit path
    packs them through oneDNN rather than as 32-bit words."""
    dtype = torch.bfloat16
    skip_unless_served(device, dtype, 64)
    q = randn((1, 4, 200, 64), dtype, device, gen, requires_grad=True)
    k = randn((1, 2, 150, 64), dtype, device, gen, requires_grad=True)
    v = randn((1, 2, 150, 64), dtype, device, gen, requires_grad=True)
    dout = randn((1, 4, 200, 64), dtype, device, gen)
    k_in, v_in = layout(k), layout(v)
    assert k_in.stride(-2) % 2 == 1 or k_in.data_ptr() % 4 != 0
    outs = [fn(q, kk, vv, is_causal=True, enable_gqa=True)
            for fn, kk, vv in ((flash_ext.scaled_dot_product_attention, k_in, v_in), (TORCH_SDPA, k, v),
                               (reference_attention, k, v))]
    assert_matches_reference(outs[0], outs[2], dtype, outs[1], what="out")
    ours, theirs = (grad_list(o, (q, k, v), dout) for o in outs[:2])
    ref = grad_list(outs[2], (q, k, v), dout.double())
    for name, g, t, r in zip("qkv", ours, theirs, ref):
        assert_matches_reference(g, r, dtype, t, what=f"d{name}")


@pytest.mark.parametrize("interface", ["flash_attn_func", "flash_attn_varlen_func"])
def test_backward_fills_no_zeros_for_the_lse(interface, gen):
    """The log-sum-exp output has no gradient: autograd must not materialize
    one (a float32 zeros tensor of the lse's size filled on every backward),
    and the gradients stay those of the reference."""
    q, k, v = (randn((2, 48, 4, 32), torch.float32, "cpu", gen).requires_grad_() for _ in range(3))
    grad = randn((2, 48, 4, 32), torch.float32, "cpu", gen)
    if interface == "flash_attn_func":
        out = flash_ext.flash_attn_func(q, k, v, causal=True)
    else:  # the same two sequences packed
        cu = torch.tensor([0, 48, 96], dtype=torch.int32)
        packed = (t.reshape(96, 4, 32) for t in (q, k, v))
        out = flash_ext.flash_attn_varlen_func(*packed, cu, cu, 48, 48, causal=True).reshape(2, 48, 4, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    zero_fills = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::fill_")]
    assert zero_fills == [], zero_fills
    ref_q, ref_k, ref_v = (to_bshd(t.detach().double()).requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(reference_attention(ref_q, ref_k, ref_v, is_causal=True),
                                   (ref_q, ref_k, ref_v), to_bshd(grad.double()))
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(got.double(), to_bshd(want), rtol=GRAD_TOL[torch.float32][0],
                                   atol=GRAD_TOL[torch.float32][1], msg=lambda m, name=name: f"d{name}: {m}")
