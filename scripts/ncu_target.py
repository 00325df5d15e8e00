"""One forward and one backward of flash_ext at a benchmark shape, or three
decodes, for Nsight Compute:

    ncu --kernel-name regex:attention_ --launch-skip 2 --launch-count 4 \\
        --section SpeedOfLight --section WarpStateStats ... python3 scripts/ncu_target.py [d] [n] [causal]
    ncu --kernel-name regex:^attention_kernel --launch-skip 2 --launch-count 1 ... python3 scripts/ncu_target.py decode [batch] [kv_len]
    ncu --section LaunchStats --section Occupancy python3 scripts/ncu_target.py 128 512 0 cudnn
    ncu --kernel-name regex:attention_bwd_sm90 --launch-skip 1 --launch-count 1 ... python3 scripts/ncu_target.py 128 512 1 varlen

The `cudnn` form runs PyTorch's cuDNN backend instead, forward and
backward, twice (its kernels' names are cuDNN's: profile them all, or
`regex:bprop` for its backward's main kernel): how it launches (block
shape, shared memory, registers, blocks an SM) and its cycles are what ncu
can tell of it. The `varlen` form runs ours on the same batch packed
(flash_attn_varlen_func, equal lengths), to set beside the dense one.

ncu matches a kernel's own name, without its namespace (the decode kernel
is kvcache::attention_kernel). The first iteration(s) warm up (skipped by
--launch-skip); prefill: bf16, batch*n = 16k tokens, heads*d = 2048, as in
benchmarks/bench_prefill.py; decode: bf16, 32 query heads on 8 KV heads,
d = 128, as in benchmarks/bench_decode.py.
"""
import sys
from pathlib import Path

import torch

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_ext

if len(sys.argv) > 1 and sys.argv[1] == "decode":
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    kv_len = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_len, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
    for _ in range(3):
        flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)
    torch.cuda.synchronize()
    print(f"ran decode batch={batch} kv_len={kv_len}")
    sys.exit(0)

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
causal = len(sys.argv) > 3 and sys.argv[3] == "1"
batch, heads = max(1, 16384 // n), 2048 // d
mode = sys.argv[4] if len(sys.argv) > 4 else "dense"
if mode == "cudnn":
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for _ in range(2):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    print(f"ran cuDNN's forward and backward d={d} n={n} causal={causal}")
    sys.exit(0)
if mode == "varlen":
    # (batch * n, heads, d) packed, every sequence n long.
    q, k, v = (torch.randn(batch * n, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = torch.arange(0, (batch + 1) * n, n, device="cuda", dtype=torch.int32)
    for _ in range(2):
        out = flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=causal)
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    print(f"ran varlen {batch} x {n} d={d} causal={causal}: forward by {flash_ext.last_cuda_kernel_family()} kernels")
    sys.exit(0)
if mode != "dense":
    sys.exit(f"unknown mode {mode!r}: dense (default), cudnn or varlen")
q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
for _ in range(2):
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(torch.ones_like(out))
torch.cuda.synchronize()
print(f"ran d={d} n={n} causal={causal}: forward by {flash_ext.last_cuda_kernel_family()} kernels")
