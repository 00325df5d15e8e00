"""Variable-length batches against equal-length ones (issue #8's target:
varlen within 5 % of a padding-free batched call of the same shape).

For each (batch, seq): flash_attn_func on (batch, seq, heads, dim) and
flash_attn_varlen_func on the same tokens packed as (batch * seq, heads,
dim) with equal lengths, forward and forward+backward, bf16, causal and not;
prints median milliseconds and varlen / batched. Also a ragged batch with
the same token count, for reference.

    python benchmarks/bench_varlen.py [--quick]
"""
from __future__ import annotations

import argparse

import torch

import common  # noqa: F401  (puts the repository on sys.path, like the other benches)
import flash_ext

HEADS, HEAD_DIM = 16, 128


def median_ms(fn, reps: int = 30) -> float:
    """Median CUDA time of fn() over reps runs, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def timings(call, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(forward, forward+backward) milliseconds."""
    with torch.no_grad():
        fwd = median_ms(lambda: call(*inputs))
    out = call(*inputs)
    grad = torch.randn_like(out)

    def step():
        torch.autograd.grad(call(*inputs), inputs, grad)

    return fwd, median_ms(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    settings = [(8, 1024), (2, 4096)] if args.quick else [(32, 512), (8, 1024), (4, 2048), (2, 4096), (1, 8192)]
    print("batch seq causal | batched fwd / fwd+bwd ms | varlen fwd / fwd+bwd ms | ratio fwd / fwd+bwd "
          "| ragged fwd / fwd+bwd ms")
    for (batch, seq), causal in ((s, c) for s in settings for c in (False, True)):
        q, k, v = (torch.randn(batch, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        batched = timings(lambda q, k, v: flash_ext.flash_attn_func(q, k, v, causal=causal), (q, k, v))
        packed = tuple(t.detach().reshape(batch * seq, HEADS, HEAD_DIM).requires_grad_() for t in (q, k, v))
        cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device="cuda")
        varlen = timings(lambda q, k, v: flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, seq, seq, causal=causal),
                         packed)
        # ragged: lengths seq/2 .. 3seq/2 (same total), longest sets the grid
        lens = torch.linspace(seq // 2, 3 * seq // 2, batch).round().long() if batch > 1 else torch.tensor([seq])
        lens[-1] += batch * seq - lens.sum()
        cu_r = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32).cuda()
        max_r = int(lens.max())
        ragged = timings(lambda q, k, v: flash_ext.flash_attn_varlen_func(q, k, v, cu_r, cu_r, max_r, max_r,
                                                                          causal=causal), packed)
        print(f"{batch:5d} {seq:5d} {causal!s:6} | {batched[0]:7.3f} / {batched[1]:7.3f} | "
              f"{varlen[0]:7.3f} / {varlen[1]:7.3f} | {varlen[0] / batched[0]:.3f} / {varlen[1] / batched[1]:.3f} "
              f"| {ragged[0]:7.3f} / {ragged[1]:7.3f}")


if __name__ == "__main__":
    main()
