"""SM clock and board power while ours and PyTorch's cuDNN attention each
run back to back for a few seconds (forward, then forward+backward; bf16,
benchmarks/bench_prefill.py's shapes: batch * n = 16k tokens, heads * d =
2048): whether one implementation runs at a lower clock under the power
cap, which kernel timings at ncu's locked clock cannot show.

    python3 scripts/clock_probe.py [--head-dim 128] [--seqlen 8192] [--causal] [--seconds 3] [--rounds 2]

Samples nvidia-smi every 50 ms (the first 400 ms of each run dropped, the
clock settling), and prints per implementation and round the time per call,
the median and lowest SM clock and the median power.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext

SAMPLE_MS = 50


def probe(step: Callable[[], None], seconds: float) -> tuple[float, list[tuple[float, float]]]:
    """Milliseconds per call of step() over `seconds`, and (MHz, W) samples."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", str(SAMPLE_MS)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.time()
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(10):
            step()
        calls += 10
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    text, _ = smi.communicate()
    samples = [(float(a), float(b)) for a, b in (line.split(",") for line in text.strip().splitlines() if "," in line)]
    settled = samples[400 // SAMPLE_MS:-2] or samples
    return start.elapsed_time(end) / calls, settled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    d, n = args.head_dim, args.seqlen
    q, k, v = (torch.randn(max(1, 16384 // n), 2048 // d, n, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def run(attention: Callable[..., torch.Tensor], backward: bool) -> Callable[[], None]:
        def step() -> None:
            if backward:
                torch.autograd.grad(attention(q, k, v, is_causal=args.causal), (q, k, v), grad)
            else:
                with torch.no_grad():
                    attention(q, k, v, is_causal=args.causal)
        return step

    def cudnn(*a, **kw) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(*a, **kw)

    steps = {"ours fwd": run(flash_ext.scaled_dot_product_attention, False), "cudnn fwd": run(cudnn, False),
             "ours fwd+bwd": run(flash_ext.scaled_dot_product_attention, True), "cudnn fwd+bwd": run(cudnn, True)}
    print(f"d = {d}, N = {n}, causal {args.causal}, {q.shape[0]} x {q.shape[1]} heads")
    for r in range(args.rounds):
        for name, step in steps.items():
            ms, samples = probe(step, args.seconds)
            clocks, power = [s[0] for s in samples], [s[1] for s in samples]
            print(f"round {r} {name:14s}: {ms:7.3f} ms/call, SM clock median {statistics.median(clocks):.0f} MHz "
                  f"(lowest {min(clocks):.0f}), power median {statistics.median(power):.0f} W ({len(samples)} samples)",
                  flush=True)
            time.sleep(1.0)


if __name__ == "__main__":
    main()
