"""Varlen batches of equal lengths with and without cluster pairs, beside
the same batch as dense tensors, in one process: the three take turns for
--rounds rounds (FLASH_EXT_FWD_TUNING knobs set in process), bf16, d = 128,
16 heads, no mask; prints each one's median forward TFLOP/s and its range
of milliseconds. "single" turns the varlen pairs off through
cluster_pairs_varlen_min_q (csrc/cuda/sm90_launch.h), so it is the kernel
varlen batches took before session 20.

    python scripts/varlen_pairs.py [--shapes 1x8192 1x16384 2x8192] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext

HEADS, HEAD_DIM = 16, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["1x8192", "1x16384", "2x8192"], help="BATCHxSEQ")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    set_tuning = flash_ext._C._set_fwd_tuning
    for shape in args.shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        total = batch * seq
        q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.arange(0, total + 1, seq, device="cuda", dtype=torch.int32)
        dense = tuple(t.view(batch, seq, HEADS, HEAD_DIM) for t in (q, k, v))
        calls = {
            "pairs": ("", lambda: flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, seq, seq)),
            "single": ("cluster_pairs_varlen_min_q=2147483647",
                       lambda: flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, seq, seq)),
            "dense": ("", lambda: flash_ext.flash_attn_func(*dense)),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        try:
            for _ in range(args.rounds):
                for name, (spec, call) in calls.items():
                    set_tuning(spec)
                    times[name].append(do_bench(call, warmup=25, rep=100, return_mode="median"))
        finally:
            set_tuning("")
        flops = 4 * batch * HEADS * seq * seq * HEAD_DIM
        print(f"{shape}: " + "  ".join(
            f"{name} {flops / statistics.median(t) / 1e9:.0f} TFLOP/s ({min(t):.3f}-{max(t):.3f} ms)"
            for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
