"""The Hopper backward under FLASH_EXT_BWD_TUNING variants beside cuDNN's
backward, in one process: for each setting the variants take turns
(flash_ext._C._set_bwd_tuning) for --rounds rounds on the same tensors, as
scripts/fwd_tuning.py does for the forward (separate processes of one build
differed by up to 8 % on the same row). bf16, benchmarks/bench_prefill.py's
shapes (batch * n = 16k tokens, heads * d = 2048); the backward alone,
timed by triton's do_bench (median, L2 flushed) on one forward's graph kept
alive, TFLOP/s at 2.5x the forward's FLOPs as the prefill bench.

    python scripts/bwd_tuning.py [--variant NAME=SPEC ...] [--head-dims D..] [--seqlens N..] [--causal 0 1]
                                 [--rounds R]

SPEC as FLASH_EXT_BWD_TUNING (csrc/cuda/sm90_launch.h, BwdTuning), e.g.
"masked_section_rounds=0"; the built-in defaults always run too, first, as
"default". Prints per setting and variant the median backward TFLOP/s over
the rounds and their spread, cuDNN's median, and each variant's largest
relative error of dQ, dK, dV against cuDNN's.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

# fwd_tuning.py beside this file runs the variants; the extension is built in the repo root.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from fwd_tuning import HIDDEN, TOKENS, tuning_main  # noqa: E402


def backward_calls(d: int, causal: int, n: int) -> tuple[Callable[[], Sequence], Callable[[], Sequence], float]:
    """Our backward and cuDNN's, each on its own forward's graph (kept alive), with one output gradient."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash_ext
    batch, heads = max(1, TOKENS // n), HIDDEN // d
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    ours_out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn_out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

    def backward(out: torch.Tensor) -> Sequence:
        return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    return (lambda: backward(ours_out)), (lambda: backward(cudnn_out)), 2.5 * 4 * batch * heads * n * n * d / (
        2 if causal else 1)


if __name__ == "__main__":
    tuning_main(__doc__, "_set_bwd_tuning", backward_calls, "backward", {"default": ""},
                [1024, 2048, 4096, 8192], [1])
