"""One forward and one backward of flash_ext at a benchmark shape, for Nsight
Compute:

    ncu --kernel-name regex:attention_ --launch-skip 2 --launch-count 4 \\
        --section SpeedOfLight --section WarpStateStats ... python3 scripts/ncu_target.py [d] [n] [causal]

The first iteration warms up (skipped by --launch-skip); bf16, batch*n = 16k
tokens, heads*d = 2048, as in benchmarks/bench_prefill.py.
"""
import sys

import torch

import flash_ext

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
causal = len(sys.argv) > 3 and sys.argv[3] == "1"
batch, heads = max(1, 16384 // n), 2048 // d
q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
for _ in range(2):
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(torch.ones_like(out))
torch.cuda.synchronize()
print(f"ran d={d} n={n} causal={causal}: forward by {flash_ext.last_cuda_kernel_family()} kernels")
