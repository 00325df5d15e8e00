"""CPU: flash_ext against PyTorch's CPU scaled_dot_product_attention.

GPT-2-like shapes (12 heads, head dim 64, causal), float32, bfloat16 and float16,
forward alone (no autograd) and forward+backward. Rows per RESULTS_FORMAT.md
``cpu``; wall-clock medians with the process's thread count. The
implementations take turns, ROUNDS times per setting (common.in_turns), and
each row is the median over its rounds: a shared machine's speed drifts by up to 2x from one
minute to the next, which back-to-back timing would credit to one side.

    python benchmarks/bench_cpu.py [--quick] [--dry-run] [--threads N]
"""
from __future__ import annotations

import functools
import itertools
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

import common

HEADS, HEAD_DIM = 12, 64
ROUNDS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sweep(quick: bool) -> list[tuple[str, int, int]]:
    """(dtype, batch, n) settings."""
    if quick:
        return [(dt, b, n) for dt in DTYPES for b, n in ((1, 512), (4, 256))]
    return [(dt, b, n) for dt, b, n in itertools.product(DTYPES, (1, 4), (256, 512, 1024))]


def implementations(flash_ext: Any) -> dict[str, Callable[..., torch.Tensor] | None]:
    return {
        common.OURS: flash_ext.scaled_dot_product_attention if flash_ext else None,
        "torch_cpu": F.scaled_dot_product_attention,
    }


def measure(impl: Callable[..., torch.Tensor], dtype: torch.dtype, batch: int, n: int,
            rep_ms: float) -> tuple[float, float]:
    """Median forward and forward+backward milliseconds."""
    device = torch.device("cpu")
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        fwd_ms = common.time_ms(lambda: impl(q, k, v, is_causal=True), device, warmup_ms=1, rep_ms=rep_ms)
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn_like(q)
    fwd_bwd_ms = common.time_ms(lambda: impl(q, k, v, is_causal=True).backward(grad), device, warmup_ms=1,
                                rep_ms=rep_ms, grad_to_none=(q, k, v))
    return fwd_ms, fwd_bwd_ms


def not_imported() -> tuple[float, float]:
    raise RuntimeError("flash_ext could not be imported")


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = sweep(args.quick)
    if args.dry_run:
        for dt, b, n in settings:
            print(f"cpu {dt} batch={b} heads={HEADS} n={n} d={HEAD_DIM} causal: flash_ext, torch_cpu")
        return
    device = torch.device("cpu")
    torch.manual_seed(0)
    impls = implementations(common.strict_flash_ext())
    ceilings = common.measure_ceilings(device)
    common.log(f"threads {torch.get_num_threads()}, float32 matmul {ceilings['matmul_fp32_gflops']:.0f} GFLOP/s")
    header = common.run_header("cpu", device, ceilings, args.quick)
    path = common.results_path("cpu", device, args.quick, args.out_dir)
    rows: list[dict[str, Any]] = []
    rep_ms = 50 if args.quick else 150
    for dt, b, n in common.progress(settings, len(settings), "cpu"):
        calls = {name: functools.partial(measure, impl, DTYPES[dt], b, n, rep_ms) if impl else not_imported
                 for name, impl in impls.items()}
        times, errors = common.in_turns(calls, ROUNDS)
        for name in impls:
            row: dict[str, Any] = dict(impl=name, dtype=dt, batch=b, heads=HEADS, n=n, d=HEAD_DIM, causal=True)
            if name in errors:
                row["error"] = errors[name]
            else:
                row["fwd_ms"] = statistics.median(fwd for fwd, _ in times[name])
                row["fwd_bwd_ms"] = statistics.median(fwd_bwd for _, fwd_bwd in times[name])
            rows.append(row)
        common.write_results(path, header, rows)
    print("\n".join(common.compare({**header, "rows": rows})))
    print(f"wrote {common.shown(path)} and .md")


if __name__ == "__main__":
    main()
