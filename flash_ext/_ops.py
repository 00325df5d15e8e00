"""Loads the compiled operators and gives them fake (meta) kernels, so that
torch.compile traces them with no graph break and opcheck can verify them."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.flash_ext.*)

ops = torch.ops.flash_ext


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved log-sum-exp is float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_like_query_layout(q: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, H, L, dim) laid out like q: heads-inner memory when q is so (as
    PyTorch's flash backend returns it), else (B, H, L, dim) contiguous.
    Mirrors empty_like_query_layout in csrc/ops/checks.cpp."""
    b, h, n, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty((b, n, h, dim)).transpose(1, 2)
    return q.new_empty((b, h, n, dim))


def _check_devices(op: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """The device check the real kernels make (csrc/ops), which a fake kernel
    would otherwise skip when one input is a meta tensor."""
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: {name} must be on the same device as the query ({first.device}), "
                             f"got {t.device}")


@torch.library.register_fake("flash_ext::attention_fwd")
def _attention_fwd_fake(q, k, v, attn_mask, dropout_p, scale, window_left, window_right, bottom_right,
                        softcap=0.0, alibi_slopes=None):
    _check_devices("flash_ext.attention", q, key=k, value=v, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
    out = empty_like_query_layout(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    rng_state = q.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int64)
    return out, lse, rng_state


@torch.library.register_fake("flash_ext::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, rng_state, attn_mask, dropout_p, scale,
                        window_left, window_right, bottom_right, bias_requires_grad, deterministic,
                        softcap=0.0, alibi_slopes=None):
    _check_devices("flash_ext.attention", q, key=k, value=v, attn_mask=attn_mask, grad_out=grad_out, out=out,
                   lse=lse)
    bias_grad = bias_requires_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    grad_bias = attn_mask.new_empty(attn_mask.shape) if bias_grad else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_bias


@torch.library.register_fake("flash_ext::attention_varlen_fwd")
def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               scale, window_left, window_right, bottom_right, softcap=0.0, alibi_slopes=None):
    _check_devices("flash_ext.attention_varlen", q, key=k, value=v, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    total_q, heads, _ = q.shape
    out = q.new_empty((total_q, heads, v.shape[-1]))
    lse = q.new_empty((heads, total_q), dtype=lse_dtype(q.dtype))
    rng_state = q.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int64)
    return out, lse, rng_state


@torch.library.register_fake("flash_ext::attention_varlen_bwd")
def _attention_varlen_bwd_fake(grad_out, q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p, scale, window_left, window_right, bottom_right,
                               deterministic, softcap=0.0, alibi_slopes=None):
    _check_devices("flash_ext.attention_varlen", q, key=k, value=v, grad_out=grad_out, out=out, lse=lse,
                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("flash_ext::kvcache_attention")
def _kvcache_attention_fake(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, scale,
                            causal, num_splits, softcap=0.0, alibi_slopes=None, window_left=-1, window_right=-1):
    _check_devices("flash_ext.flash_attn_with_kvcache", q, k_cache=k_cache, v_cache=v_cache, k=k_new, v=v_new,
                   cache_seqlens=cache_seqlens, block_table=block_table, alibi_slopes=alibi_slopes)
    b, n, h, _ = q.shape
    out = q.new_empty((b, n, h, v_cache.shape[-1]))
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("flash_ext::dropout_keep_mask")
def _dropout_keep_mask_fake(rng_state, batch, heads, q_len, kv_len, dropout_p):
    return rng_state.new_empty((batch, heads, q_len, kv_len), dtype=torch.bool)
