"""How the state of L2 before a call weighs on long decodes: each call timed
alone (CUDA events around it) after the L2 is flushed two ways.

- ``dirty``: the flush of triton's do_bench (what the benchmarks and the
  anchors use): 256 MB of zeros written, so L2 is full of dirty lines that
  the timed call's reads evict, and their write-back shares DRAM with it;
- ``clean``: the same zeros, then 256 MB read: L2 holds clean lines only.

bf16, d=128, 32 query heads on 8 KV heads, q_len 1 (TABLE.md's decode
setting); flash_ext's decode, PyTorch's cuDNN backend, and a plain read of the
same bytes (``torch.sum`` of a buffer the size of K and V) as a read-rate
reference. Prints per row and implementation the median microseconds and the
effective GB/s (K and V bytes / time) under each flush.

    python scripts/decode_l2_state.py [--rows 1x32768 1x131072 16x32768] [--calls 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext
from decode_latency import FLUSH_BYTES

HEADS, KV_HEADS, DIM = 32, 8, 128


def timed_us(fn: Callable[[], Any], prepare: Callable[[], None], calls: int) -> float:
    """Median microseconds of `calls` calls of fn, each after prepare()."""
    fn()
    times = []
    for _ in range(calls):
        prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["1x32768", "1x131072", "16x32768"], metavar="BxN")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    preparations = {
        "dirty": lambda: flush.zero_(),
        "clean": lambda: (flush.zero_(), flush.sum()),
    }
    print(f"{torch.cuda.get_device_name()}; us (GB/s of K and V) per L2 state")
    print(f"{'row':>10} {'impl':>10} " + " ".join(f"{name:>18}" for name in preparations))
    for row in args.rows:
        batch, n = (int(x) for x in row.split("x"))
        q = torch.randn(batch, 1, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, n, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((batch,), n, dtype=torch.int32, device="cuda")
        nbytes = 2 * k.numel() * k.element_size()
        q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))
        plain = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()

        def ours() -> torch.Tensor:
            return flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths)

        def cudnn() -> torch.Tensor:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q_t, k_t, v_t, enable_gqa=True)

        for name, fn in (("flash_ext", ours), ("cudnn", cudnn), ("read", plain.sum)):
            cells = []
            for prepare in preparations.values():
                us = timed_us(fn, prepare, args.calls)
                cells.append(f"{us:8.1f} ({nbytes / us / 1e3:6.0f})")
            print(f"{row:>10} {name:>10} " + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
