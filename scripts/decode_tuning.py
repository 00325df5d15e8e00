"""Split-KV decoding under FLASH_EXT_DECODE_TUNING variants, in one process:
for each row the variants take turns (flash_ext._C._set_decode_tuning) for
--rounds rounds on the same tensors, so drift and the placement of one
process's tensors weigh on every variant alike. bf16, d=128, 32 query heads
on 8 KV heads, TABLE.md's decode setting. Times each row with triton's
do_bench (L2 flushed, as the anchors) eagerly and as a replayed CUDA graph
(captured once per variant).

    python scripts/decode_tuning.py [--variant NAME=SPEC ...] [--rounds R]

SPEC as FLASH_EXT_DECODE_TUNING (csrc/cuda/kvcache/kvcache_launch.cuh), e.g.
"fused_combine=0,stages=2"; each replaces all the knobs ("" is the built-in
defaults, whatever the environment says). The built-in defaults always run
too, first, as "default" (a comparison needs its baseline in the same
process). Prints per row and variant the
medians over the rounds: eager µs, graph µs and eager GB/s (K and V bytes
read once).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 32768), (1, 131072), (16, 1024), (16, 8192), (64, 1024)]
DEFAULT_VARIANTS = {"default": "", "no_cluster": "cluster_merge=0",
                    "separate_combine": "fused_combine=0,cluster_merge=0"}


def measure(variants: dict[str, str], rounds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """"batch x kv_len" -> variant -> (median eager µs, median graph µs)."""
    import torch
    from triton.testing import do_bench

    import flash_ext
    from decode_latency import graphed
    set_tuning = flash_ext._C._set_decode_tuning
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

        replays = {}
        for name, spec in variants.items():
            set_tuning(spec)
            step()
            replays[name] = graphed(step)
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
        for _ in range(rounds if row > 0 else 1):
            for name, spec in variants.items():
                set_tuning(spec)
                times[name][0].append(do_bench(step, warmup=25, rep=100, return_mode="median") * 1e3)
                times[name][1].append(do_bench(replays[name], warmup=25, rep=100, return_mode="median") * 1e3)
        if row > 0:
            results[f"{batch}x{kv_len}"] = {name: (statistics.median(eager), statistics.median(graph))
                                            for name, (eager, graph) in times.items()}
        del q, k, v, replays
    set_tuning("")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every variant per row")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    variants = {"default": "", **dict(v.split("=", 1) for v in args.variant)} if args.variant else DEFAULT_VARIANTS
    table = measure(variants, args.rounds)
    print(f"{'batch x kv_len':>15} | " + " | ".join(f"{name:>24}" for name in variants))
    for row, per_variant in table.items():
        batch, kv_len = map(int, row.split("x"))
        cells = []
        for eager, graph in per_variant.values():
            gbps = 2 * batch * kv_len * 8 * 128 * 2 / eager / 1e3
            cells.append(f"{eager:7.1f} {graph:6.1f} {gbps:5.0f} GB/s")
        print(f"{row:>15} | " + " | ".join(cells))
    print(f"(per variant: eager µs, CUDA-graph µs, eager GB/s; medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
