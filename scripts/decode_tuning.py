"""Split-KV decoding under FLASH_EXT_DECODE_TUNING variants, one process each
(the variable is read once per process): bf16, d=128, 32 query heads on 8 KV
heads, TABLE.md's decode setting. Times each row with triton's do_bench (L2
flushed, as the anchors) eagerly and as a replayed CUDA graph.

    python scripts/decode_tuning.py [--variant NAME=SPEC ...]

SPEC as FLASH_EXT_DECODE_TUNING (csrc/cuda/kvcache/kvcache_launch.cuh), e.g.
"fused_combine=0,stages=2". Prints a table: eager µs, graph µs and
eager GB/s (K and V bytes read once) per row and variant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuning_variants import run_variants, variants_from

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 32768), (1, 131072), (16, 1024), (16, 8192), (64, 1024)]
DEFAULT_VARIANTS = {"default": "", "no_cluster": "cluster_merge=0",
                    "separate_combine": "fused_combine=0,cluster_merge=0"}


def measure() -> dict[str, list[float]]:
    import torch
    from triton.testing import do_bench

    import flash_ext
    from decode_latency import graphed
    results = {}
    # The first row twice, the first time untimed: a process's first timed
    # calls run slow on the host (bench_decode.py says more).
    for row, (batch, kv_len) in enumerate([ROWS[0], *ROWS]):
        q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_len, 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")

        def step() -> torch.Tensor:
            return flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)

        step()
        eager_us = do_bench(step, warmup=25, rep=100, return_mode="median") * 1e3
        graph_us = do_bench(graphed(step), warmup=25, rep=100, return_mode="median") * 1e3
        gbps = 2 * batch * kv_len * 8 * 128 * 2 / eager_us / 1e3
        if row > 0:
            results[f"{batch}x{kv_len}"] = [round(eager_us, 2), round(graph_us, 2), round(gbps)]
        del q, k, v
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    table = run_variants("FLASH_EXT_DECODE_TUNING", variants_from(args.variant, DEFAULT_VARIANTS),
                         [sys.executable, __file__, "--child"])
    print(f"{'batch x kv_len':>15} | " + " | ".join(f"{name:>24}" for name in table))
    for row in next(iter(table.values())):
        cells = (f"{t[row][0]:7.1f} {t[row][1]:6.1f} {t[row][2]:5d} GB/s" for t in table.values())
        print(f"{row:>15} | " + " | ".join(cells))
    print("(per variant: eager µs, CUDA-graph µs, eager GB/s)")


if __name__ == "__main__":
    main()
