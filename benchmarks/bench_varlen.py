"""Variable-length batches against equal-length ones (issue #8's target:
varlen within 5 % of a padding-free batched call of the same shape).

For each (batch, seq): ``flash_attn_func`` on (batch, seq, heads, dim) and
``flash_attn_varlen_func`` on the same tokens packed as (batch * seq, heads,
dim) with equal lengths, forward and forward+backward, bf16, d = 128 (or
--head-dims) with heads = 2048 / d as in the prefill benchmark, causal and
not; the ratio varlen / batched; and, for reference, a ragged batch of the
same token count (lengths seq/2 .. 3 seq/2). Timed as
the other benchmarks (triton do_bench medians, L2 flushed between runs), so
the host's per-call overhead hides behind the GPU work as in a training step.
The three layouts of a setting take turns for --rounds rounds
(common.in_turns) and each reports its median: the same kernel timed in
separate passes moved by up to 7 % on an H100 (session 20), more than the
5 % this compares against.

    python benchmarks/bench_varlen.py [--quick] [--head-dims D..] [--rounds R] [--out-dir DIR]
"""
from __future__ import annotations

from typing import Any, Callable

import statistics

import torch

import common

HIDDEN = 2048  # heads * d


def timings(flash_ext: Any, call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
            device: torch.device) -> dict[str, Any]:
    """Forward and forward+backward milliseconds of call(*inputs), and the
    kernel family each pass ran on."""
    with torch.no_grad():
        fwd_ms = common.time_ms(lambda: call(*inputs), device)
    fwd_family = flash_ext.last_cuda_kernel_family()
    grad = torch.randn_like(call(*inputs))
    fwd_bwd_ms = common.time_ms(lambda: call(*inputs).backward(grad), device, grad_to_none=inputs)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "fwd_family": fwd_family,
            "bwd_family": flash_ext.last_cuda_kernel_family()}


def cu_seqlens(lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32).to(device)


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="turns of the three layouts per setting (median)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128], choices=[64, 128, 256], metavar="D",
                        help="head dims to sweep (64, 128, 256; default 128), heads = 2048 / d")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    device = torch.device(args.device) if args.device else common.default_device()
    settings = [(8, 1024), (2, 4096)] if args.quick else [(32, 512), (8, 1024), (4, 2048), (2, 4096), (1, 8192)]
    sweep = [(d, s, c) for d in args.head_dims for s in settings for c in (False, True)]
    if args.dry_run:
        print("\n".join(f"d {d} batch {b} seq {n} causal {int(c)}" for d, (b, n), c in sweep))
        return
    if device.type != "cuda":
        raise SystemExit("bench_varlen.py measures CUDA kernels")
    flash_ext = common.strict_flash_ext()
    torch.manual_seed(0)
    header = common.run_header("varlen", device, {}, args.quick)
    path = common.results_path("varlen", device, args.quick, args.out_dir)
    rows: list[dict[str, Any]] = []
    for head_dim, (batch, seq), causal in common.progress(sweep, desc="varlen"):
        heads = HIDDEN // head_dim
        q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        packed = tuple(t.detach().reshape(batch * seq, heads, head_dim).requires_grad_() for t in (q, k, v))
        cu = cu_seqlens(torch.full((batch,), seq), device)
        lens = torch.linspace(seq // 2, 3 * seq // 2, batch).round().long() if batch > 1 else torch.tensor([seq])
        lens[-1] += batch * seq - lens.sum()
        cu_ragged, max_ragged = cu_seqlens(lens, device), int(lens.max())
        calls: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = {
            "batched": (lambda q, k, v: flash_ext.flash_attn_func(q, k, v, causal=causal), (q, k, v)),
            "varlen": (lambda q, k, v: flash_ext.flash_attn_varlen_func(q, k, v, cu, cu, seq, seq, causal=causal),
                       packed),
            "ragged": (lambda q, k, v: flash_ext.flash_attn_varlen_func(q, k, v, cu_ragged, cu_ragged, max_ragged,
                                                                        max_ragged, causal=causal), packed),
        }
        base = {"impl": "flash_ext", "dtype": "bfloat16", "d": head_dim, "heads": heads, "batch": batch, "n": seq,
                "causal": int(causal)}
        setting_rows = [{**base, "layout": layout, "rounds": args.rounds} for layout in calls]
        measured, errors = common.in_turns(
            {layout: (lambda call=call, inputs=inputs: timings(flash_ext, call, inputs, device))
             for layout, (call, inputs) in calls.items()}, args.rounds)
        for row in setting_rows:
            if row["layout"] in errors:
                row["error"] = errors[row["layout"]]
                continue
            runs = measured[row["layout"]]
            row.update({key: runs[-1][key] for key in ("fwd_family", "bwd_family")})
            for key in ("fwd_ms", "fwd_bwd_ms"):
                times = [run[key] for run in runs]
                row[key] = statistics.median(times)
                row[f"{key}_spread"] = (max(times) - min(times)) / row[key]
        batched = setting_rows[0]
        for row in setting_rows[1:]:
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if key in row and key in batched:
                    row[f"{key.removesuffix('_ms')}_vs_batched"] = row[key] / batched[key]
        rows += setting_rows
        common.write_results(path, header, rows)
    print(f"median of {args.rounds} rounds (spread: (max - min) / median)")
    print("  d batch    seq causal layout  | fwd ms spread | fwd+bwd ms spread | fwd x batched | fwd+bwd x batched | families")
    for r in rows:
        print(f"{r['d']:3d} {r['batch']:5d} {r['n']:6d} {r['causal']:6d} {r['layout']:7} | {r.get('fwd_ms', float('nan')):6.3f} "
              f"{r.get('fwd_ms_spread', float('nan')):6.1%} | {r.get('fwd_bwd_ms', float('nan')):10.3f} "
              f"{r.get('fwd_bwd_ms_spread', float('nan')):6.1%} | {r.get('fwd_vs_batched', 1.0):13.3f} | "
              f"{r.get('fwd_bwd_vs_batched', 1.0):17.3f} | {r.get('fwd_family', '')}/{r.get('bwd_family', '')}"
              + (f" | {r['error']}" if "error" in r else ""))
    print(f"wrote {common.shown(path)} and .md")


if __name__ == "__main__":
    main()
