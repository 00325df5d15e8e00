"""A representative call of every CUDA kernel, small enough for
compute-sanitizer: forward and backward (plain, causal both alignments, GQA,
bool mask, float bias with its gradient, dropout, softcap and ALiBi, odd
lengths, every head-dim instantiation, varlen batches), and decode
(contiguous, paged, append, several splits, softcap and ALiBi).
``--family NAME`` runs only the prefill calls of one kernel family, and
``--decode`` only the decode calls (quick checks of a changed kernel).
Exits non-zero if any result is non-finite, so the sanitizer run also checks
that every output element was written."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext

DEV = "cuda"
flash_ext.set_strict(True)
torch.manual_seed(0)


def check(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert torch.isfinite(t).all(), f"{name}: non-finite values"
    print(f"ok  {name}")


def prefill(dtype: torch.dtype, dim: int, q_len: int, kv_len: int, heads: int, kv_heads: int, **kw) -> None:
    q = torch.randn(2, heads, q_len, dim, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, kv_len, dim, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, dim, device=DEV, dtype=dtype, requires_grad=True)
    mask = kw.pop("mask", None)
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    out = flash_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads, **kw)
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    check(f"prefill {dtype} d={dim} L={q_len} S={kv_len} H={heads}/{kv_heads} {sorted(kw)}", out, *grads)


def flash_causal(dtype: torch.dtype, dim: int, q_len: int, kv_len: int, **kw) -> None:
    q = torch.randn(1, q_len, 4, dim, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_len, 4, dim, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_len, 4, dim, device=DEV, dtype=dtype, requires_grad=True)
    out = flash_ext.flash_attn_func(q, k, v, causal=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    check(f"flash_attn_func causal bottom-right d={dim} L={q_len} S={kv_len} {sorted(kw)}", out, *grads)


def decode(dtype: torch.dtype, dim: int, paged: bool, num_splits: int, q_len: int, **kw) -> None:
    batch, heads, kv_heads, page = 3, 8, 2, 16
    lens = torch.tensor([0, 37, 250], dtype=torch.int32, device=DEV)
    if paged:
        table = torch.randperm(3 * 17, device=DEV, dtype=torch.int32).view(3, 17)
        k_cache = torch.randn(3 * 17, page, kv_heads, dim, device=DEV, dtype=dtype)
    else:
        table = None
        k_cache = torch.randn(batch, 17 * page, kv_heads, dim, device=DEV, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, q_len, heads, dim, device=DEV, dtype=dtype)
    k_new = torch.randn(batch, q_len, kv_heads, dim, device=DEV, dtype=dtype)
    v_new = torch.randn_like(k_new)
    out, lse = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens,
                                                 num_splits=num_splits, return_lse=True, block_table=table, **kw)
    check(f"decode {dtype} d={dim} paged={paged} splits={num_splits} q_len={q_len} {sorted(kw)}", out, lse)


def varlen(dtype: torch.dtype, dim: int, lens: list[int], **kw) -> None:
    cu = torch.tensor([0] + lens, device=DEV).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 4, dim, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
    out = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    check(f"varlen {dtype} d={dim} lens={lens} {sorted(kw)}", out, *grads)


def family_cases(family: str) -> None:
    """The prefill calls every family serves: each head-dim instantiation and
    dtype, GQA/MQA, causal both alignments, a sliding window."""
    flash_ext.set_cuda_path(family)
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (32, 64, 96, 128, 256):
            prefill(dtype, dim, 77, 131, 4, 2)
    prefill(torch.bfloat16, 128, 300, 700, 2, 1, is_causal=True)
    flash_causal(torch.bfloat16, 64, 333, 200)
    flash_causal(torch.float16, 128, 250, 250, window_size=(64, 16))
    varlen(torch.bfloat16, 128, [100, 0, 257, 3], causal=True)
    varlen(torch.float16, 64, [200, 1, 130])
    varlen(torch.bfloat16, 256, [70, 129], causal=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None, help="only the prefill calls of this kernel family")
    parser.add_argument("--decode", action="store_true", help="only the decode calls")
    args = parser.parse_args()
    if args.family:
        family_cases(args.family)
        return
    if args.decode:
        decode_cases()
        return
    # Every kernel family this GPU runs (the Hopper and the sm80 kernels on an H100).
    for family in flash_ext._support.cuda_families(torch.cuda.get_device_capability()[0]):
        family_cases(family)
    flash_ext.set_cuda_path(None)
    prefill(torch.bfloat16, 64, 129, 65, 4, 4, is_causal=True)
    prefill(torch.bfloat16, 64, 200, 200, 4, 1, dropout_p=0.2)
    prefill(torch.bfloat16, 128, 90, 150, 2, 2, mask=torch.rand(90, 150, device=DEV) > 0.3)
    bias = torch.randn(1, 2, 90, 150, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    prefill(torch.bfloat16, 128, 90, 150, 2, 2, mask=bias)
    flash_causal(torch.float16, 64, 100, 300)
    slopes = torch.rand(4, device=DEV)
    flash_causal(torch.bfloat16, 128, 100, 300, softcap=5.0, alibi_slopes=slopes)
    flash_causal(torch.float16, 64, 77, 77, softcap=5.0, dropout_p=0.1)
    decode_cases()


def decode_cases() -> None:
    """Contiguous and paged caches, one and several splits (merged by the
    last split), every head dim, appends, windows, softcap and ALiBi."""
    for paged in (False, True):
        for splits in (1, 3):
            decode(torch.bfloat16, 128, paged, splits, 1)
    decode(torch.float16, 64, False, 0, 4)
    decode(torch.float16, 64, True, 5, 1)
    decode(torch.bfloat16, 128, False, 4, 3, window_size=(40, 0))
    decode(torch.bfloat16, 256, True, 2, 2)
    decode(torch.bfloat16, 128, True, 3, 2, softcap=5.0, alibi_slopes=torch.rand(8, device=DEV))


if __name__ == "__main__":
    main()
