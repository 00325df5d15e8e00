"""flash_ext.patch(): routing F.scaled_dot_product_attention to flash_ext for
unchanged model code, restoring it afterwards, and the strict / fallback rules."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_ext
from conftest import TORCH_SDPA, grad_list, randn, reference_attention


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, unchanged: it calls F.scaled_dot_product_attention."""

    def __init__(self, n_embd=48, n_head=4):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.seen = []

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        self.seen.append(F.scaled_dot_product_attention)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_patch_nanogpt_module_same_output_and_grads(dtype, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = CausalSelfAttention().to(dtype)
    x = randn((2, 37, 48), dtype, gen=gen, requires_grad=True)
    plain = model(x)
    plain_grads = grad_list(plain.sum(), (x, *model.parameters()), None)
    assert model.seen[-1] is TORCH_SDPA
    with flash_ext.patch() as ctx:
        assert ctx is not None
        assert flash_ext.is_patched()
        assert F.scaled_dot_product_attention is flash_ext.scaled_dot_product_attention
        patched = model(x)
        patched_grads = grad_list(patched.sum(), (x, *model.parameters()), None)
    assert model.seen[-1] is flash_ext.scaled_dot_product_attention
    assert not flash_ext.is_patched()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(patched, plain, atol=tol, rtol=tol)
    for a, b in zip(patched_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_patch_really_calls_our_operator(gen, monkeypatch):
    calls = []
    real = torch.ops.flash_ext.attention

    class Spy:
        def __call__(self, *a, **kw):
            calls.append(a[0].shape)
            return real(*a, **kw)

        def __getattr__(self, name):
            return getattr(real, name)

    import flash_ext.attention as fa
    monkeypatch.setattr(fa.ops, "attention", Spy())
    q, k, v = (randn((1, 2, 5, 8), gen=gen) for _ in range(3))
    with flash_ext.patch():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls, "F.scaled_dot_product_attention under patch() did not reach torch.ops.flash_ext.attention"
    torch.testing.assert_close(out, reference_attention(q, k, v, is_causal=True), atol=1e-12, rtol=1e-12)


def test_patch_plain_call_unpatch_and_nesting():
    assert not flash_ext.is_patched()
    flash_ext.patch()
    assert flash_ext.is_patched()
    flash_ext.unpatch()
    assert not flash_ext.is_patched() and F.scaled_dot_product_attention is TORCH_SDPA
    with flash_ext.patch():
        with flash_ext.patch():
            assert flash_ext.is_patched()
        assert flash_ext.is_patched(), "leaving an inner patch() must keep the outer one"
    assert not flash_ext.is_patched()
    # restored even when the body raises
    with pytest.raises(KeyError):
        with flash_ext.patch():
            raise KeyError("boom")
    assert not flash_ext.is_patched()
    # unpatch() when not patched is harmless
    flash_ext.unpatch()
    assert F.scaled_dot_product_attention is TORCH_SDPA


# --------------------------------------------------------------------------- strict / fallback


def _broadcast_batch_inputs(gen):
    """A real unsupported case on the CPU: key/value batch broadcast against
    the query's (PyTorch's SDPA accepts it)."""
    q = randn((3, 2, 7, 8), gen=gen)
    k = randn((1, 2, 9, 8), gen=gen)
    v = randn((1, 2, 9, 8), gen=gen)
    return q, k, v


def test_strict_mode_raises_on_unsupported(gen):
    q, k, v = _broadcast_batch_inputs(gen)
    flash_ext.set_strict(True)
    assert flash_ext.is_strict()
    with pytest.raises(RuntimeError, match="strict"):
        flash_ext.scaled_dot_product_attention(q, k, v)
    with flash_ext.patch(), pytest.raises(RuntimeError, match="strict"):
        F.scaled_dot_product_attention(q, k, v)


def test_non_strict_warns_once_and_matches_torch(gen):
    q, k, v = _broadcast_batch_inputs(gen)
    flash_ext.set_strict(False)
    assert not flash_ext.is_strict()
    flash_ext.attention._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours = [w for w in caught if "flash_ext" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "falls back" in str(ours[0].message)
    expected = TORCH_SDPA(q, k, v, is_causal=True)
    torch.testing.assert_close(a, expected, atol=0, rtol=0)
    torch.testing.assert_close(b, expected, atol=0, rtol=0)
    torch.testing.assert_close(a, reference_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1),
                                                      is_causal=True), atol=1e-12, rtol=1e-12)


def test_meta_tensors_fall_back_or_raise_in_strict(gen):
    q, k, v = (t.to("meta") for t in (randn((2, 2, 5, 8), gen=gen) for _ in range(3)))
    flash_ext.set_strict(True)
    with pytest.raises(RuntimeError, match="strict"):
        flash_ext.scaled_dot_product_attention(q, k, v)
    flash_ext.set_strict(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flash_ext.scaled_dot_product_attention(q, k, v)
    assert out.device.type == "meta" and out.shape == (2, 2, 5, 8)


def test_nested_tensor_served_in_strict_mode(gen):
    seqs = [randn((2, n, 8), torch.float32, gen=gen) for n in (3, 6)]
    try:
        q = torch.nested.nested_tensor([s.transpose(0, 1) for s in seqs], layout=torch.jagged).transpose(1, 2)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"jagged nested tensors unavailable: {e}")
    flash_ext.set_strict(True)  # served by the varlen kernels: no fallback
    out = flash_ext.scaled_dot_product_attention(q, q, q)
    assert out.is_nested
    for o, s in zip(out.unbind(), seqs):
        torch.testing.assert_close(o, reference_attention(s, s, s).float(), atol=1e-5, rtol=1e-5)
