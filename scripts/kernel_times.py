"""Per-kernel GPU time of one forward+backward, dense against the same batch
packed as varlen: which kernel makes the difference between the two calls
(torch.profiler, CUDA activity only, averaged over --iters calls after a
warmup; bf16, FlashAttention's layout).

    python3 scripts/kernel_times.py --batch 8 --seqlen 1024 --heads 16 --head-dim 128 --causal
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext


def kernel_times(step: Callable[[], None], iters: int) -> dict[str, float]:
    """Kernel name -> microseconds per call of step()."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / iters
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    b, n, h, d = args.batch, args.seqlen, args.heads, args.head_dim
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    packed = [t.detach().reshape(b * n, h, d).requires_grad_() for t in (q, k, v)]
    cu = torch.arange(0, (b + 1) * n, n, device="cuda", dtype=torch.int32)
    grad = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)

    def dense() -> None:
        flash_ext.flash_attn_func(q, k, v, causal=args.causal).backward(grad)

    def varlen() -> None:
        flash_ext.flash_attn_varlen_func(*packed, cu, cu, n, n, causal=args.causal).backward(grad.reshape(b * n, h, d))

    times = {name: kernel_times(step, args.iters) for name, step in (("dense", dense), ("varlen", varlen))}
    print(f"batch {b} x {n}, {h} heads, d = {d}, causal {args.causal}: us per forward+backward")
    for name, table in times.items():
        print(f"== {name}: {sum(table.values()):.1f} us in all")
        for kernel, us in sorted(table.items(), key=lambda kv: -kv[1]):
            print(f"  {us:9.1f}  {kernel[:110]}")


if __name__ == "__main__":
    main()
