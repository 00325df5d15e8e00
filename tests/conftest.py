"""Shared helpers for the flash_ext test suite.

* ``reference_attention``: an explicit float64 softmax(Q Kᵀ · scale + bias) V
  with every masking rule the library implements (bool / float masks with
  PyTorch broadcasting, top-left or bottom-right causal, sliding windows, GQA,
  a replayed dropout keep-mask). Rows that see no key give 0 (and, through
  autograd, zero gradients) -- the library's documented semantics, where
  PyTorch's math backend gives NaN.
* ``assert_matches_reference``: the tolerance rule per dtype. float64 and
  float32 use fixed tolerances; float16 / bfloat16 must be no worse than twice
  PyTorch's own SDPA error against the same float64 reference (plus a rounding
  floor).
* ``DEVICES``: 'cpu' always, 'cuda' (marked ``cuda``) when a GPU is present.
* an autouse fixture that runs every test in strict mode (a silent fallback to
  PyTorch's SDPA would make a comparison against PyTorch vacuous) and restores
  strict mode and ``F.scaled_dot_product_attention`` afterwards.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import flash_ext
from flash_ext import attention as _fa_attention

TORCH_SDPA = _fa_attention.torch_sdpa  # PyTorch's own, captured before any patch()

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Fixed tolerances (atol, rtol) for the dtypes we compare with fixed bounds.
FIXED_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _strict_and_unpatched():
    """Every test runs in strict mode (no silent fallback) and unpatched."""
    was_strict = flash_ext.is_strict()
    flash_ext.set_strict(True)
    _fa_attention._warned.clear()  # each test sees the one-time fallback warnings afresh
    saved_sdpa = F.scaled_dot_product_attention
    try:
        yield
    finally:
        flash_ext.set_strict(was_strict)
        flash_ext.unpatch()
        F.scaled_dot_product_attention = saved_sdpa
        assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: fresh inputs per test, but
    reproducible runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


# --------------------------------------------------------------------------- inputs


def randn(shape, dtype=torch.float64, device="cpu", gen: torch.Generator | None = None,
          scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Normal random tensor drawn in float64 on the CPU (so the same values can
    be drawn for every dtype/device), then cast."""
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale
    t = t.to(device=device, dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def rand_bool(shape, gen: torch.Generator, p_true: float = 0.7, device="cpu") -> torch.Tensor:
    return (torch.rand(tuple(shape), generator=gen) < p_true).to(device)


def skip_unless_served(device: str, dtype: torch.dtype, head_dim: int = 64, v_head_dim: int | None = None):
    """Skip combinations our kernels do not serve on `device` (they would fall
    back to PyTorch, which is not what is under test)."""
    if device == "cuda":
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        if dtype not in LOW_PRECISION:
            pytest.skip("the CUDA kernels serve float16/bfloat16 only (float32/64 fall back)")
        if head_dim % 8 or head_dim > 256 or v_head_dim != head_dim:
            pytest.skip("the CUDA kernels need equal head dims, multiples of 8 up to 256")


def shifted_by_one_element(t: torch.Tensor) -> torch.Tensor:
    """t's values, contiguous strides, starting one element past an aligned
    address (off every 4- and 16-byte boundary for 16-bit types)."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


# --------------------------------------------------------------------------- reference


def window_visible(L: int, S: int, window_left: int = -1, window_right: int = -1,
                   bottom_right: bool = False, device="cpu") -> torch.Tensor:
    """(L, S) bool: query i sees key j iff diag - left <= j <= diag + right,
    diag = i (+ S - L when bottom_right); -1 = unbounded."""
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    diag = i + (S - L if bottom_right else 0)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= diag - window_left
    if window_right >= 0:
        ok &= j <= diag + window_right
    return ok


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False,
                        window: tuple[int, int] = (-1, -1), bottom_right: bool = False,
                        dropout_keep: torch.Tensor | None = None, dropout_p: float = 0.0,
                        return_lse: bool = False):
    """Explicit float64 attention in SDPA layout (..., H, L, E).

    Inputs are upcast to float64 (and stay differentiable: gradients flow back
    to the original tensors through the cast). `is_causal` = window (-1, 0)
    top-left; FlashAttention's causal is `window=(-1, 0), bottom_right=True`.
    `dropout_keep` (broadcastable to (..., H, L, S), bool) and `dropout_p`
    apply dropout to the normalised probabilities: P ∘ keep / (1 - p).
    A row with no visible key gives 0 output and lse -inf.
    """
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    if q64.dim() >= 3 and k64.dim() >= 3 and q64.shape[-3] != k64.shape[-3]:
        rep = q64.shape[-3] // k64.shape[-3]
        k64 = k64.repeat_interleave(rep, dim=-3)
        v64 = v64.repeat_interleave(rep, dim=-3)
    L, S, E = q64.shape[-2], k64.shape[-2], q64.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        visible &= window_visible(L, S, -1, 0, False, device=q.device)
    if window != (-1, -1):
        visible &= window_visible(L, S, window[0], window[1], bottom_right, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.to(torch.float64)
    s = s.masked_fill(~visible, -math.inf)
    if S == 0:  # no keys at all: every row is empty
        out = torch.zeros((*s.shape[:-1], v64.shape[-1]), dtype=torch.float64, device=q.device)
        out = out + 0 * (q64.sum() + k64.sum() + v64.sum())  # keep the graph (zero gradients)
        lse = torch.full(s.shape[:-1], -math.inf, dtype=torch.float64, device=q.device)
        return (out, lse) if return_lse else out
    # Softmax is shift invariant, so a detached shift keeps exact gradients.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    empty = denom == 0
    p = p / torch.where(empty, torch.ones_like(denom), denom)
    if dropout_keep is not None:
        p = p * dropout_keep.to(torch.float64) / (1.0 - dropout_p)
    out = torch.matmul(p, v64)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, -math.inf), lse)
    return out, lse


def decode_reference(q, k_full, v_full, lens, new_len, causal, scale=None, window=(-1, -1)):
    """float64 decoding of q (batch, q_len, heads, dim) against a cache
    (batch, max_len, kv_heads, dim), per sequence its first lens[b] + new_len
    rows (appended included), GQA; returns the output and the lse;
    new query t sees keys j in [pos - left, pos + right], pos = total - q_len + t
    (bottom right); causal makes right 0."""
    window = (window[0], 0) if causal else window
    outs, lses = [], []
    for b, n in enumerate(lens):
        total = n + new_len
        qb = q[b:b + 1].transpose(1, 2)
        kb = k_full[b:b + 1, :total].transpose(1, 2)
        vb = v_full[b:b + 1, :total].transpose(1, 2)
        o, lse = reference_attention(qb, kb, vb, scale=scale, window=window,
                                     bottom_right=True, enable_gqa=True, return_lse=True)
        outs.append(o.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def to_bshd(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) <-> (B, N, H, D)."""
    return t.transpose(1, 2)


# --------------------------------------------------------------------------- tolerances


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().to(torch.float64).cpu() - ref.detach().to(torch.float64).cpu()).abs().max().item()


def rounding_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """A small absolute floor: one unit of `dtype` at the reference's magnitude
    (float32: 16 units, a few roundings of a sum of products, still 5x under
    the fixed float32 tolerance; PyTorch's own error there can be a lucky 1e-8)."""
    mag = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    return torch.finfo(dtype).eps * mag * (16 if dtype == torch.float32 else 1)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                             torch_out: torch.Tensor | None = None, what: str = "output",
                             factor: float = 2.0, fixed_tol: dict | None = None,
                             allowance: float = 0.0) -> None:
    """float64/float32: torch.testing.assert_close with fixed tolerances, every
    element. float16/bfloat16: our max error against the float64 reference must
    be at most `factor` x PyTorch's own error (`torch_out`, computed by
    PyTorch's SDPA on the same low-precision inputs) plus a rounding floor,
    plus `allowance`: an error the caller has computed the source of."""
    dtype = out.dtype if dtype is None else dtype
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    tol = (fixed_tol or FIXED_TOL).get(dtype)
    if tol is not None:
        torch.testing.assert_close(out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu(),
                                   atol=tol[0], rtol=tol[1], msg=lambda m: f"{what}: {m}")
        return
    assert torch_out is not None, "low-precision comparisons need PyTorch's output on the same inputs"
    ours, theirs = max_abs_err(out, ref), max_abs_err(torch_out, ref)
    bound = factor * theirs + rounding_floor(dtype, ref) + allowance
    assert ours <= bound, (f"{what} ({dtype}): max error {ours:.3e} vs PyTorch's {theirs:.3e} "
                           f"(bound {bound:.3e}, of which {allowance:.3e} allowed for a known cause)")


def grad_list(outputs, inputs, grad_out):
    """Gradients of `outputs` w.r.t. `inputs` given `grad_out` (None -> zeros)."""
    grads = torch.autograd.grad(outputs, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
