"""Sliding-window (local) attention against full attention at one long length
(issue #8's target: N = 16k, window 1k at least 10x faster than full causal).

bf16, d = 128, batch 1, 16 heads, N = 16384 through ``flash_attn_func``:
full attention, full causal, and windows (1024, 0) (each query sees itself
and the 1024 keys before it, Mistral's sliding window) and (512, 512). Prints
and writes forward and forward+backward milliseconds and the speedup of each
window over full causal. The window's floor: (1024, 0) keeps 1025 of the
~8192 keys a causal row sees on average, so by work alone it can be at most
~8x faster than causal (and 16x faster than full attention).

    python benchmarks/bench_window.py [--out-dir DIR]
"""
from __future__ import annotations

from typing import Any

import torch

import common

N, HEADS, HEAD_DIM = 16384, 16, 128
# name -> (causal, window_size)
SETTINGS: dict[str, tuple[bool, tuple[int, int]]] = {
    "full": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "window (1024, 0)": (False, (1024, 0)),
    "window (512, 512)": (False, (512, 512)),
}


def pairs(causal: bool, window: tuple[int, int]) -> int:
    """Query-key pairs attended (the work, in units of one score)."""
    rows = torch.arange(N)
    left, right = window
    lo = (rows - left).clamp(min=0) if left >= 0 else torch.zeros_like(rows)
    hi = rows if causal else ((rows + right).clamp(max=N - 1) if right >= 0 else torch.full_like(rows, N - 1))
    return int((hi - lo + 1).sum())


def main() -> None:
    parser = common.base_parser(__doc__)
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else common.default_device()
    if args.dry_run:
        print("\n".join(f"{name}: causal {int(c)} window {w}" for name, (c, w) in SETTINGS.items()))
        return
    if device.type != "cuda":
        raise SystemExit("bench_window.py measures CUDA kernels")
    flash_ext = common.strict_flash_ext()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, N, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    header = common.run_header("window", device, {}, args.quick)
    path = common.results_path("window", device, args.quick, args.out_dir)
    rows: list[dict[str, Any]] = []
    for name, (causal, window) in SETTINGS.items():
        def fwd() -> torch.Tensor:
            return flash_ext.flash_attn_func(q, k, v, causal=causal, window_size=window)
        row: dict[str, Any] = {"impl": "flash_ext", "setting": name, "n": N, "d": HEAD_DIM, "heads": HEADS,
                               "pairs": pairs(causal, window)}
        try:
            with torch.no_grad():
                row["fwd_ms"] = common.time_ms(fwd, device)
            row["fwd_family"] = flash_ext.last_cuda_kernel_family()
            row["fwd_bwd_ms"] = common.time_ms(lambda: fwd().backward(grad), device, grad_to_none=(q, k, v))
            row["bwd_family"] = flash_ext.last_cuda_kernel_family()
        except Exception as err:
            row["error"] = common.error_text(err)
        rows.append(row)
    causal_row = next(r for r in rows if r["setting"] == "causal")
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in r and key in causal_row:
                r[f"{key.removesuffix('_ms')}_speedup_vs_causal"] = causal_row[key] / r[key]
        r["work_ratio_vs_causal"] = causal_row["pairs"] / r["pairs"]
    common.write_results(path, header, rows)
    print(f"{'setting':>18} | fwd ms | fwd+bwd ms | fwd x | fwd+bwd x | work x")
    for r in rows:
        print(f"{r['setting']:>18} | {r.get('fwd_ms', float('nan')):6.3f} | {r.get('fwd_bwd_ms', float('nan')):10.3f} | "
              f"{r.get('fwd_speedup_vs_causal', float('nan')):5.2f} | {r.get('fwd_bwd_speedup_vs_causal', float('nan')):9.2f} | "
              f"{r['work_ratio_vs_causal']:6.2f}" + (f" | {r['error']}" if "error" in r else ""))
    print(f"wrote {common.shown(path)} and .md")


if __name__ == "__main__":
    main()
