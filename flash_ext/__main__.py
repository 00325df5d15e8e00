"""``python -m flash_ext``: check our attention against PyTorch's on every
device present and print error and speed side by side.

Errors are the largest absolute difference from a float64 reference, for
ours and for PyTorch's SDPA on the same inputs; the run fails (exit 1) if
ours is more than twice PyTorch's error (plus a rounding floor).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import flash_ext

Case = tuple[int, int, int, int, int, bool]  # batch, heads, kv_heads, seq, head dim, causal

CASES: list[Case] = [
    (2, 8, 8, 256, 64, False),
    (2, 8, 8, 512, 64, True),
    (1, 12, 4, 384, 128, True),
]


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _check(device: torch.device, dtype: torch.dtype, case: Case, reps: int) -> tuple[list[str], bool]:
    batch, heads, kv_heads, seq, dim, causal = case
    gen = torch.Generator(device="cpu").manual_seed(hash(case) & 0xFFFF)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=gen).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(batch, heads, seq, dim, generator=gen).to(device, dtype)
    gqa = heads != kv_heads

    def run(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> list[torch.Tensor]:
        out = fn(*inputs, is_causal=causal, enable_gqa=gqa)
        return [out, *torch.autograd.grad(out, inputs, grad.to(out.dtype))]

    reference = run(F.scaled_dot_product_attention, *(t.detach().double().requires_grad_() for t in (q, k, v)))
    ours = run(flash_ext.scaled_dot_product_attention, q, k, v)
    theirs = run(F.scaled_dot_product_attention, q, k, v)
    err_ours = max((a.double() - r).abs().max().item() for a, r in zip(ours, reference))
    err_theirs = max((a.double() - r).abs().max().item() for a, r in zip(theirs, reference))
    floor = 1e-12 if dtype == torch.float64 else 1e-5
    ok = err_ours <= 2 * err_theirs + floor

    times = []
    for fn in (flash_ext.scaled_dot_product_attention, F.scaled_dot_product_attention):
        with torch.no_grad():
            times.append(_time_ms(lambda: fn(q, k, v, is_causal=causal, enable_gqa=gqa), device, reps))
        times.append(_time_ms(lambda: torch.autograd.grad(fn(q, k, v, is_causal=causal, enable_gqa=gqa),
                                                          (q, k, v), grad), device, reps))
    row = [device.type, str(dtype).replace("torch.", ""), f"{batch}x{heads}/{kv_heads}x{seq}x{dim}",
           "yes" if causal else "no", f"{err_ours:.1e}", f"{err_theirs:.1e}",
           f"{times[0]:.2f}", f"{times[2]:.2f}", f"{times[1]:.2f}", f"{times[3]:.2f}", "ok" if ok else "FAIL"]
    return row, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args(argv)

    flash_ext.set_strict(True)  # time our kernels, never a silent fallback
    devices = [torch.device("cpu")]
    dtypes = {"cpu": [torch.float32, torch.bfloat16]}
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        dtypes["cuda"] = [torch.bfloat16, torch.float16]
    print(f"flash_ext {flash_ext.__version__}, torch {torch.__version__}, CUDA kernels built: "
          f"{flash_ext.cuda_built()}, devices: {', '.join(str(d) for d in devices)}")
    header = ["device", "dtype", "BxH/Hkv x N x D", "causal", "err ours", "err torch",
              "fwd ms ours", "fwd ms torch", "f+b ms ours", "f+b ms torch", "check"]
    rows, all_ok = [header], True
    for device in devices:
        for dtype in dtypes[device.type]:
            for case in CASES:
                try:
                    row, ok = _check(device, dtype, case, args.reps)
                except RuntimeError as err:  # a kernel we lack on this device: say so, fail
                    row, ok = [device.type, str(dtype), str(case), "", "error: " + str(err)[:60]], False
                rows.append(row)
                all_ok &= ok
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
