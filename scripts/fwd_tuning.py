"""The Hopper forward under FLASH_EXT_FWD_TUNING variants, one process each
(the variable is read once per process), beside cuDNN's forward timed in the
same processes: bf16, benchmarks/bench_prefill.py's shapes (batch * n = 16k
tokens, heads * d = 2048), triton's do_bench median as the prefill bench.

    python scripts/fwd_tuning.py [--variant NAME=SPEC ...] [--head-dims D..] [--seqlens N..] [--causal 0 1]

SPEC as FLASH_EXT_FWD_TUNING (csrc/cuda/sm90_launch.h, FwdTuning), e.g.
"two_stage_max_kv=4096,per_tile_max_q=1024" or "wide_keys_min_kv=1". Prints forward TFLOP/s per
setting and variant, cuDNN's (the best of its runs), and each variant's
largest relative error against cuDNN's output, so a variant that computes
something else shows.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from tuning_variants import run_variants, variants_from

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_VARIANTS = {"default": "", "no_pair_major": "pair_major_max_q=0,pair_major_max_q_causal=0"}
TOKENS, HIDDEN = 16384, 2048


def measure(settings: list[tuple[int, int, int]]) -> dict[str, list[float]]:
    """setting -> [ours TFLOP/s, cuDNN TFLOP/s, relative error of ours against cuDNN]."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import flash_ext
    results = {}
    for d, causal, n in settings:
        batch, heads = max(1, TOKENS // n), HIDDEN // d
        q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * heads * n * n * d / (2 if causal else 1)

        def ours() -> torch.Tensor:
            return flash_ext.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

        def cudnn() -> torch.Tensor:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

        reference = cudnn().float()
        err = ((ours().float() - reference).norm() / reference.norm()).item()
        ms = [do_bench(fn, warmup=25, rep=100, return_mode="median") for fn in (ours, cudnn)]
        results[f"{d} {causal} {n}"] = [round(flops / t / 1e9, 1) for t in ms] + [err]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--causal", type=int, nargs="+", choices=(0, 1), default=[0, 1])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = list(itertools.product(args.head_dims, args.causal, args.seqlens))
    if args.child:
        print(json.dumps(measure(settings)))
        return
    child = [sys.executable, __file__, "--child", "--head-dims", *map(str, args.head_dims),
             "--seqlens", *map(str, args.seqlens), "--causal", *map(str, args.causal)]
    table = run_variants("FLASH_EXT_FWD_TUNING", variants_from(args.variant, DEFAULT_VARIANTS), child)
    print(f"{'d causal n':>12} | " + " | ".join(f"{name:>10}" for name in table) + " |  cuDNN")
    for row in next(iter(table.values())):
        cudnn = max(t[row][1] for t in table.values())
        cells = (f"{t[row][0]:10.0f}" for t in table.values())
        print(f"{row:>12} | " + " | ".join(cells) + f" | {cudnn:6.0f}")
    worst = {name: max(r[2] for r in t.values()) for name, t in table.items()}
    print("forward TFLOP/s per variant; largest relative error against cuDNN: "
          + ", ".join(f"{name} {err:.2e}" for name, err in worst.items()))


if __name__ == "__main__":
    main()
