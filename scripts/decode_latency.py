"""Where the time of a short decode goes: kernel time against what do_bench
reports, per split count, beside PyTorch's backends and an empty baseline.

bf16, d=128, 32 query heads on 8 KV heads, q_len 1 (TABLE.md's decode
setting), for a few (batch, cache length) rows. For each implementation:

- ``bench``: triton do_bench median (L2 flushed between calls, as the anchors)
  of the eager call and of a replayed CUDA graph of it;
- ``loop``: mean time per call of graph replays queued back to back (L2 warm);
- ``host``: mean wall time per eager call queued back to back (the larger of
  the host's cost and the GPU's);
- ``kernels``: what CUPTI (torch.profiler) saw the GPU run per call, after the
  same L2 flush: the number of kernels and the sum of their mean durations.

The baseline is a one-element add: the least any launch costs on this timing.

    python scripts/decode_latency.py [--rows 1x1024 1x8192 ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext

FLUSH_BYTES = 256 * 1024 * 1024


def graphed(fn: Callable[[], Any]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up call on a side stream, as
    capture wants): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def host_us(fn: Callable[[], Any], calls: int = 300) -> float:
    """Mean wall µs per eager call queued back to back: the host's cost when
    it is above the kernel's (do_bench's eager timing waits on it then)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def back_to_back_us(replay: Callable[[], None], calls: int = 200) -> float:
    """Mean µs per call of replays queued back to back (L2 warm): a serving loop's rate."""
    replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def kernel_time_us(fn: Callable[[], Any], flush: torch.Tensor, calls: int = 30) -> tuple[float, str]:
    """Per call: summed mean kernel durations (µs) and the kernels' short names."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    total, names = 0.0, []
    for event in prof.key_averages():
        if event.device_time_total <= 0 or "FillFunctor" in event.key:
            continue
        per_call = event.device_time_total / calls
        total += per_call
        names.append(f"{event.key[:40]}x{event.count // calls}:{per_call:.1f}")
    return total, "; ".join(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["1x1024", "1x8192", "16x1024"])
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)

    def report(name: str, fn: Callable[[], Any]) -> None:
        fn()
        eager = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
        graph = do_bench(graphed(fn), warmup=25, rep=100, return_mode="median") * 1e3
        loop = back_to_back_us(graphed(fn))
        host = host_us(fn)
        kernels, names = kernel_time_us(fn, flush)
        print(f"{name:>28} | eager {eager:7.1f} | graph {graph:7.1f} | loop {loop:6.1f} | host {host:6.1f} | "
              f"kernels {kernels:7.1f} | {names}", flush=True)

    one = torch.zeros(1, device=device)
    report("baseline (1-element add)", lambda: one.add_(1))
    for row in args.rows:
        batch, kv_len = (int(x) for x in row.split("x"))
        print(f"--- batch {batch}, cache {kv_len}", flush=True)
        q = torch.randn(batch, 1, 32, 128, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, kv_len, 8, 128, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
        for splits in (0, 1, 2, 4, 8, 16, 32):
            report(f"flash_ext splits={splits or 'auto'}",
                   lambda s=splits: flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, num_splits=s))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def sdpa(backend: SDPBackend = backend) -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            try:
                report(name, sdpa)
            except Exception as err:  # a backend that refuses is a line, not the end
                print(f"{name:>28} | refused: {str(err)[:100]}")


if __name__ == "__main__":
    main()
