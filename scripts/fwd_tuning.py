"""The Hopper forward under FLASH_EXT_FWD_TUNING variants beside cuDNN's
forward, in one process: for each setting the variants take turns
(flash_ext._C._set_fwd_tuning) for --rounds rounds on the same tensors, so
drift over time and the placement of one process's tensors weigh on every
variant alike (separate processes of one build differed by up to 8 % on
the same row in sessions 12 and 17). bf16, benchmarks/bench_prefill.py's
shapes (batch * n = 16k tokens, heads * d = 2048), triton's do_bench median
as the prefill bench.

    python scripts/fwd_tuning.py [--variant NAME=SPEC ...] [--head-dims D..] [--seqlens N..] [--causal 0 1]
                                 [--rounds R]

SPEC as FLASH_EXT_FWD_TUNING (csrc/cuda/sm90_launch.h, FwdTuning), e.g.
"two_stage_max_kv=4096,per_tile_max_q=1024" or "wide_keys_min_kv=1"; each
replaces all the knobs ("" is the built-in defaults, whatever the
environment says). The built-in defaults always run too, first, as
"default" (a comparison needs its baseline in the same process). Prints per setting and variant the median forward
TFLOP/s over the rounds and their spread, cuDNN's median, and each variant's
largest relative error against cuDNN's output, so a variant that computes
something else shows. Each setting's row is printed as it is done.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

# The extension is built in place in the repo root; scripts run from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_VARIANTS = {"default": "", "no_pair_major": "pair_major_max_q=0,pair_major_max_q_causal=0"}
TOKENS, HIDDEN = 16384, 2048

Setting = tuple[int, int, int]  # (head dim, causal, n)
# A setting's timed calls: ours and cuDNN's (each returning the tensors that
# are compared), and the FLOPs of one call.
Calls = Callable[[int, int, int], tuple[Callable[[], Sequence], Callable[[], Sequence], float]]


def forward_calls(d: int, causal: int, n: int) -> tuple[Callable[[], Sequence], Callable[[], Sequence], float]:
    """Our forward and cuDNN's on fresh bf16 tensors of the prefill bench's shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash_ext
    batch, heads = max(1, TOKENS // n), HIDDEN // d
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def ours() -> Sequence:
        return (flash_ext.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)),)

    def cudnn() -> Sequence:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return (F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)),)

    return ours, cudnn, 4 * batch * heads * n * n * d / (2 if causal else 1)


def measure(settings: list[Setting], variants: dict[str, str], rounds: int, set_tuning: Callable[[str], None],
            calls: Calls, report: Callable[[Setting, dict[str, list[float]]], None]
            ) -> dict[Setting, dict[str, list[float]]]:
    """setting -> {variant or "cuDNN": TFLOP/s of each round, variant + " err": [largest relative error of
    ours against cuDNN's tensors]}; report(setting, row) as each setting is done (a run stopped early keeps
    what it printed)."""
    from triton.testing import do_bench

    results = {}
    for setting in settings:
        ours, cudnn, flops = calls(*setting)
        reference = [t.float() for t in cudnn()]
        row: dict[str, list[float]] = {name: [] for name in [*variants, "cuDNN"]}
        for name, spec in variants.items():
            set_tuning(spec)
            row[name + " err"] = [max(((t.float() - r).norm() / r.norm()).item() for t, r in zip(ours(), reference))]
        for _ in range(rounds):
            for name, spec in variants.items():
                set_tuning(spec)
                row[name].append(flops / do_bench(ours, warmup=25, rep=100, return_mode="median") / 1e9)
            row["cuDNN"].append(flops / do_bench(cudnn, warmup=25, rep=100, return_mode="median") / 1e9)
        results[setting] = row
        report(setting, row)
    set_tuning("")
    return results


def tuning_main(description: str, set_tuning_name: str, calls: Calls, what: str,
                default_variants: dict[str, str], default_seqlens: list[int], default_causal: list[int]) -> None:
    """The command line of a tuning script: variants against the defaults and cuDNN, one row a setting."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqlens", type=int, nargs="+", default=default_seqlens)
    parser.add_argument("--causal", type=int, nargs="+", choices=(0, 1), default=default_causal)
    parser.add_argument("--rounds", type=int, default=3, help="turns of every variant per setting")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    variants = {"default": "", **dict(v.split("=", 1) for v in args.variant)} if args.variant else default_variants
    names = [*variants, "cuDNN"]
    print(f"{'d causal n':>12} | " + " | ".join(f"{name:>16}" for name in names), flush=True)

    def report(setting: Setting, row: dict[str, list[float]]) -> None:
        d, causal, n = setting
        cells = (f"{statistics.median(row[name]):6.0f} ({min(row[name]):4.0f}-{max(row[name]):4.0f})"
                 for name in names)
        print(f"{d:4d} {causal} {n:5d} | " + " | ".join(cells), flush=True)

    import flash_ext
    table = measure(list(itertools.product(args.head_dims, args.causal, args.seqlens)), variants, args.rounds,
                    getattr(flash_ext._C, set_tuning_name), calls, report)
    worst = {name: max(row[name + " err"][0] for row in table.values()) for name in variants}
    print(f"{what} TFLOP/s: median (min-max) of {args.rounds} rounds; "
          "largest relative error against cuDNN: " + ", ".join(f"{name} {err:.2e}" for name, err in worst.items()))


if __name__ == "__main__":
    tuning_main(__doc__, "_set_fwd_tuning", forward_calls, "forward", DEFAULT_VARIANTS,
                [512, 1024, 2048, 4096], [0, 1])
