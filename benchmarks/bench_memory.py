"""Peak extra memory of attention forward+backward against sequence length:
flash_ext and PyTorch SDPA's backends, the math backend only while its n²
scores fit (its quadratic wall is the point).

One sequence of 16 heads x n x 128, causal. CUDA: bf16, the peak of
torch.cuda.max_memory_allocated over the run minus what q, k, v and the
incoming gradient held before it (as measure_anchors.py). CPU: float32 and
smaller n, each measurement in a fresh process, the peak resident set
(VmHWM, reset through /proc/self/clear_refs) minus the resident set before
the run. Rows per RESULTS_FORMAT.md ``memory``.

    python benchmarks/bench_memory.py [--quick] [--dry-run] [--max-n N]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common

HEADS, HEAD_DIM = 16, 128
BACKENDS = {"cuda": {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                     "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH},
            "cpu": {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}}


def lengths(device: torch.device, quick: bool, max_n: int | None) -> list[int]:
    if device.type == "cuda":
        ns = [4096, 16384] if quick else [2**i for i in range(10, 19)]  # 1k .. 256k
    else:
        ns = [512, 1024] if quick else [512, 1024, 2048, 4096]
    return [n for n in ns if max_n is None or n <= max_n]


def attention(impl: str, device: torch.device) -> Callable[..., torch.Tensor]:
    if impl == common.OURS:
        flash_ext = common.strict_flash_ext()
        if flash_ext is None:
            raise RuntimeError("flash_ext could not be imported")
        return lambda q, k, v: flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    backend = BACKENDS[device.type][impl]

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return sdpa


def inputs(n: int, device: torch.device) -> list[torch.Tensor]:
    """q, k, v (requiring grad) and the output's gradient."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, g = (torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype) for _ in range(4))
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g]


def peak_cuda(impl: str, n: int, device: torch.device) -> float:
    """MiB over what the inputs hold, at the peak of forward+backward."""
    fn = attention(impl, device)
    q, k, v, g = inputs(n, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn(q, k, v).backward(g)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_cpu_child(impl: str, n: int) -> float:
    """In a fresh process: MiB of resident memory at the peak over the resident
    set before forward+backward."""
    device = torch.device("cpu")
    fn = attention(impl, device)
    q, k, v, g = inputs(n, device)
    fn(*inputs(64, device)[:3]).sum().backward()  # one-time allocations (thread pools) before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    fn(q, k, v).backward(g)
    return max(0, _status_kib("VmHWM") - base) / 1024


def peak_cpu(impl: str, n: int) -> float:
    child = subprocess.run([sys.executable, __file__, "--child", impl, str(n)], capture_output=True, text=True)
    if child.returncode == -9:
        raise RuntimeError("child killed (out of memory)")
    if child.returncode:
        lines = (child.stderr or child.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"child exited with {child.returncode}")
    return float(json.loads(child.stdout.strip().splitlines()[-1])["peak_extra_MiB"])


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--max-n", type=int, default=None, help="longest sequence to try")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"peak_extra_MiB": peak_cpu_child(args.child[0], int(args.child[1]))}))
        return
    device = torch.device(args.device) if args.device else common.default_device()
    ns = lengths(device, args.quick, args.max_n)
    impls = [common.OURS, *BACKENDS[device.type]]
    if args.dry_run:
        for n in ns:
            print(f"memory {device.type} n={n} heads={HEADS} d={HEAD_DIM} causal: {', '.join(impls)} "
                  "(math until it runs out of memory)")
        return
    torch.manual_seed(0)
    header = common.run_header("memory", device, {}, args.quick)
    path = common.results_path("memory", device, args.quick, args.out_dir)
    rows: list[dict[str, Any]] = []
    walled: dict[str, int] = {}  # impl -> the n at which it ran out of memory
    for n in common.progress(ns, len(ns), "memory"):
        for impl in impls:
            row: dict[str, Any] = dict(impl=impl, n=n, d=HEAD_DIM, heads=HEADS, causal=True,
                                       dtype="bfloat16" if device.type == "cuda" else "float32")
            if impl in walled:
                row["error"] = f"skipped: out of memory at n={walled[impl]}"
                rows.append(row)
                continue
            try:
                row["peak_extra_MiB"] = peak_cuda(impl, n, device) if device.type == "cuda" else peak_cpu(impl, n)
            except Exception as err:  # out of memory is the result for math at long n
                row["error"] = common.error_text(err)
                if common.is_oom(err):
                    walled[impl] = n
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
        common.write_results(path, header, rows)
    print("\n".join(common.compare({**header, "rows": rows})))
    print(f"wrote {common.shown(path)} and .md")


if __name__ == "__main__":
    main()
