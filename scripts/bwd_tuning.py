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

import argparse
import itertools
import statistics
import sys
from pathlib import Path

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS, HIDDEN = 16384, 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--causal", type=int, nargs="+", choices=(0, 1), default=[1])
    parser.add_argument("--rounds", type=int, default=3, help="turns of every variant per setting")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import flash_ext
    set_tuning = flash_ext._C._set_bwd_tuning
    variants = {"default": "", **dict(v.split("=", 1) for v in args.variant)}
    names = [*variants, "cuDNN"]
    print(f"{'d causal n':>12} | " + " | ".join(f"{name:>16}" for name in names), flush=True)
    worst = dict.fromkeys(variants, 0.0)
    for d, causal, n in itertools.product(args.head_dims, args.causal, args.seqlens):
        batch, heads = max(1, TOKENS // n), HIDDEN // d
        q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        flops = 2.5 * 4 * batch * heads * n * n * d / (2 if causal else 1)
        ours_out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn_out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

        def backward(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        reference = [g.float() for g in backward(cudnn_out)]
        row: dict[str, list[float]] = {name: [] for name in names}
        for name, spec in variants.items():
            set_tuning(spec)
            err = max(((g.float() - r).norm() / r.norm()).item() for g, r in zip(backward(ours_out), reference))
            worst[name] = max(worst[name], err)
        for _ in range(args.rounds):
            for name, spec in variants.items():
                set_tuning(spec)
                row[name].append(flops / do_bench(lambda: backward(ours_out), warmup=25, rep=100,
                                                  return_mode="median") / 1e9)
            row["cuDNN"].append(flops / do_bench(lambda: backward(cudnn_out), warmup=25, rep=100,
                                                 return_mode="median") / 1e9)
        set_tuning("")
        cells = (f"{statistics.median(row[name]):6.0f} ({min(row[name]):4.0f}-{max(row[name]):4.0f})"
                 for name in names)
        print(f"{d:4d} {causal} {n:5d} | " + " | ".join(cells), flush=True)
    print(f"backward TFLOP/s: median (min-max) of {args.rounds} rounds; "
          "largest relative error against cuDNN: " + ", ".join(f"{name} {err:.2e}" for name, err in worst.items()))


if __name__ == "__main__":
    main()
