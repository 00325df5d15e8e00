"""Randomized testing: hypothesis draws shapes, strides, dtypes, masks, GQA
ratios and windows, and every draw is checked against the float64 reference.

CI runs it on the CPU, bounded (FLASH_EXT_FUZZ_EXAMPLES, default 80 per
test). The same generator drives a longer GPU run:
``FLASH_EXT_FUZZ_DEVICE=cuda FLASH_EXT_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flash_ext
from conftest import TORCH_SDPA, assert_matches_reference, reference_attention

DEVICE = os.environ.get("FLASH_EXT_FUZZ_DEVICE", "cpu")
EXAMPLES = int(os.environ.get("FLASH_EXT_FUZZ_EXAMPLES", "80"))
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("FLASH_EXT_FUZZ_DEVICE=cuda needs a GPU", allow_module_level=True)

# The CUDA kernels serve fp16/bf16 with equal head dims, multiples of 8.
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else \
    [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 16, 32, 40, 64, 72, 96, 128, 160, 256] if DEVICE == "cuda" else [1, 3, 8, 16, 33, 64, 80, 128]

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def attention_case(draw: st.DrawFn) -> dict:
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 4]))
    q_len = draw(st.integers(1, 160))
    kv_len = draw(st.integers(1, 160))
    dim = draw(st.sampled_from(HEAD_DIMS))
    v_dim = dim if DEVICE == "cuda" else draw(st.sampled_from([dim, 8, 24]))
    mask = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    # Broadcast pattern of the mask over (batch, heads, L, S): True keeps the size.
    mask_dims = draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.just(True)))
    return dict(
        batch=batch, kv_heads=kv_heads, heads=kv_heads * group, q_len=q_len, kv_len=kv_len, dim=dim,
        v_dim=v_dim, dtype=draw(st.sampled_from(DTYPES)), heads_inner=draw(st.booleans()), mask=mask,
        mask_dims=mask_dims, scale=draw(st.sampled_from([None, 0.05, 0.3, 1.0])), seed=draw(st.integers(0, 2**31)),
    )


def _make_inputs(case: dict, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(case["seed"])

    def tensor(heads: int, seq: int, dim: int) -> torch.Tensor:
        shape = (case["batch"], seq, heads, dim) if case["heads_inner"] else (case["batch"], heads, seq, dim)
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, case["dtype"])
        t = t.transpose(1, 2) if case["heads_inner"] else t  # (B, H, N, D) view, strided either way
        return t.requires_grad_(requires_grad)

    q = tensor(case["heads"], case["q_len"], case["dim"])
    k = tensor(case["kv_heads"], case["kv_len"], case["dim"])
    v = tensor(case["kv_heads"], case["kv_len"], case["v_dim"])
    mask = None
    if case["mask"] in ("bool", "float"):
        full = (case["batch"], case["heads"], case["q_len"], case["kv_len"])
        shape = tuple(n if keep else 1 for n, keep in zip(full, case["mask_dims"]))
        if case["mask"] == "bool":
            mask = (torch.rand(shape, generator=gen) < 0.8).to(DEVICE)
        else:
            mask = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, case["dtype"])
    return q, k, v, mask


def _call(fn, q, k, v, mask, case):
    return fn(q, k, v, attn_mask=mask, is_causal=case["mask"] == "causal", scale=case["scale"],
              enable_gqa=case["heads"] != case["kv_heads"])


@FUZZ
@given(case=attention_case())
def test_fuzz_forward(case: dict) -> None:
    q, k, v, mask = _make_inputs(case, requires_grad=False)
    out = _call(flash_ext.scaled_dot_product_attention, q, k, v, mask, case)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=case["mask"] == "causal", scale=case["scale"],
                              enable_gqa=case["heads"] != case["kv_heads"])
    theirs = None
    if case["dtype"] != torch.float64:
        # float32 too: with scale 1 and d=128 the logits reach ~50 and any
        # float32 softmax is off by ~1e-5, so the bar is PyTorch's own error.
        theirs = _call(TORCH_SDPA, q, k, v, mask, case)
        # PyTorch gives NaN on rows that see no key; ours (and the reference) 0.
        theirs = torch.nan_to_num(theirs, nan=0.0)
    assert_matches_reference(out, ref, torch_out=theirs, what=f"forward {case}",
                             fixed_tol={torch.float64: (1e-10, 1e-10)})


@FUZZ
@given(case=attention_case())
def test_fuzz_backward(case: dict) -> None:
    if case["dtype"] == torch.float32:
        # float32 gradients are checked against fixed tolerances elsewhere; here
        # exact float64, or fp16/bf16 against PyTorch's error (plus the part
        # that comes from the stored output, _stored_output_errors)
        case = {**case, "dtype": torch.float64}
    q, k, v, mask = _make_inputs(case, requires_grad=True)
    inputs = [q, k, v] + ([mask.requires_grad_()] if mask is not None and mask.is_floating_point() else [])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    out = _call(flash_ext.scaled_dot_product_attention, q, k, v, mask, case)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE, out.dtype)
    ours = torch.autograd.grad(out, inputs, grad_out)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=case["mask"] == "causal", scale=case["scale"],
                              enable_gqa=case["heads"] != case["kv_heads"])
    want = torch.autograd.grad(ref, inputs, grad_out.to(torch.float64))
    theirs = [None] * len(inputs)
    if case["dtype"] in (torch.float16, torch.bfloat16):
        ref_torch = _call(TORCH_SDPA, q, k, v, mask, case)
        theirs = [torch.nan_to_num(g, nan=0.0) for g in torch.autograd.grad(ref_torch, inputs, grad_out)]
    allowances = [0.0] * len(inputs)
    if case["dtype"] in (torch.float16, torch.bfloat16):
        allowances = _stored_output_errors(q, k, mask, out, ref, grad_out, case)
    for name, got, expected, t, allowance in zip(("dq", "dk", "dv", "dmask"), ours, want, theirs, allowances):
        assert_matches_reference(got, expected, torch_out=t, what=f"{name} {case}",
                                 fixed_tol={torch.float64: (1e-9, 1e-9)}, allowance=allowance)


def _stored_output_errors(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
                          ref: torch.Tensor, grad_out: torch.Tensor, case: dict) -> list[float]:
    """The gradient error that a recomputing backward cannot avoid, per input
    (max abs over elements; dv has none): it takes D = rowsum(dO * O) from
    the stored, rounded output (as FlashAttention's does), so each row's
    dS = P * (dP - D) is off by -P * dD with dD = rowsum(dO * (O_stored - O)).
    dS rows sum to zero exactly, so where dq, dk or a broadcast mask's
    gradient sum terms that cancel, this can exceed one unit of the small
    result. Computed in float64 from the reference probabilities."""
    q64, k64 = q.detach().double(), k.detach().double()
    group = case["heads"] // case["kv_heads"]
    k64 = k64.repeat_interleave(group, dim=1)
    scale = case["scale"] if case["scale"] is not None else q.shape[-1] ** -0.5
    scores = q64 @ k64.transpose(-1, -2) * scale
    if case["mask"] == "causal":
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(),
                                    float("-inf"))
    elif mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.detach().double()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: P = 0
    d_error = (grad_out.double() * (out.detach().double() - ref.detach())).sum(-1, keepdim=True)
    ds_error = -probs * d_error
    dq_error = scale * ds_error @ k64
    dk_error = scale * ds_error.transpose(-1, -2) @ q64
    dk_error = dk_error.unflatten(1, (case["kv_heads"], group)).sum(2)
    errors = [dq_error, dk_error, torch.zeros(0)]
    if mask is not None and mask.is_floating_point():
        errors.append(ds_error.sum_to_size(mask.shape))
    return [e.abs().max().item() if e.numel() else 0.0 for e in errors]
