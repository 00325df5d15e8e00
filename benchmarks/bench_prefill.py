"""Prefill (training/prompt) attention: flash_ext against every PyTorch SDPA
backend and FlexAttention, on the FlashAttention papers' setting (TABLE.md).

bf16, layout (batch, heads, n, d), heads = 2048/d, batch = 16384/n. Forward
and backward TFLOP/s (forward 4·batch·heads·n²·d FLOPs, halved when causal;
backward 2.5x). As measure_anchors.py: forward timed with inputs that require
grad (a training forward), backward = median(forward+backward) - median(forward),
both triton do_bench medians; gradients are reset outside the timed region.
Each of our forward outputs is compared with an SDPA backend's (``rel_err``),
so a fast wrong kernel shows. The math backend (``sdpa_math``), the quadratic-
memory reference, holds batch·heads·n² float32 scores (and more of their size
for the softmax and backward): where those would pass 8 GB its row is an
error saying it was skipped. Rows per RESULTS_FORMAT.md ``prefill``.

    python benchmarks/bench_prefill.py [--quick] [--dry-run] [--smoke] [--no-flex] [--head-dims D..] [--seqlens N..]
                                       [--impls NAME..] [--rounds R]
"""
from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common

SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
HIDDEN, TOKENS = 2048, 16384
# The math backend upcasts bf16 and materialises the scores: above this it skips.
MATH_MAX_SCORE_BYTES = 8e9

Setting = tuple[int, bool, int]  # (d, causal, n)


def sweep(quick: bool, smoke: bool) -> list[Setting]:
    if smoke:
        return [(64, True, 128), (64, False, 256)]
    if quick:
        return list(itertools.product((64, 128), (False, True), (2048, 8192)))
    return list(itertools.product((64, 128, 256), (False, True), (512, 1024, 2048, 4096, 8192, 16384)))


def shape(d: int, n: int, smoke: bool) -> tuple[int, int]:
    """(batch, heads) of a setting."""
    return (1, 2) if smoke else (max(1, TOKENS // n), HIDDEN // d)


def flops_fwd(batch: int, heads: int, n: int, d: int, causal: bool) -> float:
    return 4 * batch * heads * n * n * d / (2 if causal else 1)


def math_skip(batch: int, heads: int, n: int) -> str | None:
    """Why the math backend skips a setting (its float32 scores too large), or None."""
    nbytes = batch * heads * n * n * 4
    if nbytes <= MATH_MAX_SCORE_BYTES:
        return None
    return f"skipped: {nbytes / 1e9:.1f} GB of float32 scores, over {MATH_MAX_SCORE_BYTES / 1e9:g} GB"


def flex_settings(quick: bool, smoke: bool, settings: list[Setting]) -> tuple[list[Setting], bool]:
    """Which settings FlexAttention runs, and whether its backward is timed:
    each shape costs a compile, so the quick check times one (TABLE.md's)."""
    if quick and not smoke:
        return [s for s in settings if s[0] == 128 and s[2] == 8192], False
    return settings, True


class Flex:
    """FlexAttention compiled once, a causal block mask per sequence length."""

    def __init__(self, device: torch.device) -> None:
        from torch.nn.attention.flex_attention import create_block_mask
        self.device = device
        self.fn = common.compiled_flex_attention()
        self.create_block_mask = create_block_mask

    def __call__(self, n: int, causal: bool) -> Callable[..., torch.Tensor]:
        mask = self.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n,
                                      device=self.device) if causal else None
        return lambda q, k, v: self.fn(q, k, v, block_mask=mask)


OURS_SM80 = "flash_ext_sm80"


@contextlib.contextmanager
def cuda_path_of(impl: str) -> Iterator[None]:
    """Our sm80 kernels for OURS_SM80's calls; the automatic choice otherwise."""
    if impl != OURS_SM80:
        yield
        return
    import flash_ext
    flash_ext.set_cuda_path("sm80")
    try:
        yield
    finally:
        flash_ext.set_cuda_path(None)


def hopper_kernels(flash_ext: Any) -> bool:
    """Whether flash_ext serves this GPU with its Hopper family."""
    if not torch.cuda.is_available() or not flash_ext.cuda_built():
        return False
    return "sm90" in flash_ext._support.cuda_families(torch.cuda.get_device_capability()[0])


def implementations(flash_ext: Any, flex: Flex | None, causal: bool, n: int, with_flex: bool,
                    math_skipped: str | None) -> dict[str, Callable[..., torch.Tensor] | str]:
    """name -> forward(q, k, v), or the reason it cannot run."""
    impls: dict[str, Callable[..., torch.Tensor] | str] = {}
    impls[common.OURS] = ((lambda q, k, v: flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal))
                          if flash_ext else "flash_ext could not be imported")
    if flash_ext and hopper_kernels(flash_ext):
        # Our portable kernels on the same GPU, for the notes (run under cuda_path_of).
        impls[OURS_SM80] = impls[common.OURS]
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        impls[name] = math_skipped if name == "sdpa_math" and math_skipped else sdpa
    if with_flex:
        impls["flex"] = flex(n, causal) if flex else "FlexAttention unavailable"
    return impls


def run_setting(setting: Setting, impls: dict[str, Callable[..., torch.Tensor] | str], device: torch.device,
                smoke: bool, flex_bwd: bool, backward: bool = True, rounds: int = 1) -> list[dict[str, Any]]:
    """One row per implementation. With rounds > 1 the implementations take
    turns (common.in_turns) and a row keeps the medians, so a ratio's two
    sides are timed close together."""
    d, causal, n = setting
    batch, heads = shape(d, n, smoke)
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    fwd_flops = flops_fwd(batch, heads, n, d, causal)
    rows: list[dict[str, Any]] = []
    timed: list[tuple[dict[str, Any], Callable[..., torch.Tensor]]] = []
    reference: torch.Tensor | None = None
    ours_out: torch.Tensor | None = None
    for name, fwd in impls.items():
        row: dict[str, Any] = dict(impl=name, dtype="bfloat16", d=d, causal=causal, n=n, batch=batch, heads=heads)
        rows.append(row)
        if isinstance(fwd, str):  # refused before running: the reason is the row's error
            row["error"] = fwd
            continue
        try:
            with cuda_path_of(name):
                out = fwd(q, k, v).detach()
            if name == common.OURS:
                ours_out = out
            elif reference is None and not common.is_ours(name):
                reference = out
            timed.append((row, fwd))
        except Exception as err:  # a refused setting is a row, not the end of the sweep
            row["error"] = common.error_text(err)

    def times_of(row: dict[str, Any], fwd: Callable[..., torch.Tensor]) -> Callable[[], dict[str, float]]:
        """One round of a row: its forward and forward+backward times. A
        failed backward is the row's error and is not timed again; the
        forward's numbers stay."""
        def once() -> dict[str, float]:
            with cuda_path_of(row["impl"]):
                times = {"fwd_ms": common.time_ms(lambda: fwd(q, k, v), device)}
                if backward and "error" not in row and (row["impl"] != "flex" or flex_bwd):
                    try:
                        times["fwd_bwd_ms"] = common.time_ms(lambda: fwd(q, k, v).backward(grad), device,
                                                             grad_to_none=(q, k, v))
                    except Exception as err:
                        row["error"] = "backward: " + common.error_text(err)
            q.grad = k.grad = v.grad = None
            return times
        return once

    runs, errors = common.in_turns({id(row): times_of(row, fwd) for row, fwd in timed}, rounds)
    for row, _ in timed:
        if id(row) in errors:  # a failed forward: no numbers
            row["error"] = errors[id(row)]
            continue
        row["fwd_ms"] = statistics.median(run["fwd_ms"] for run in runs[id(row)])
        row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
        fwd_bwd = [run["fwd_bwd_ms"] for run in runs[id(row)] if "fwd_bwd_ms" in run]
        if "error" not in row and fwd_bwd:
            row["fwd_bwd_ms"] = statistics.median(fwd_bwd)
            row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] / 1e9
        if rounds > 1:
            row["rounds"] = rounds
    if ours_out is not None and reference is not None:
        err = ((ours_out.float() - reference.float()).norm() / reference.float().norm()).item()
        rows[0]["rel_err"] = err
        if not err <= common.REL_ERR_LIMIT:
            common.log(f"WARNING d={d} causal={int(causal)} n={n}: flash_ext output differs from SDPA's "
                       f"(relative error {err:.3g})")
    return rows


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any device (checks the script, not the speed)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    parser.add_argument("--head-dims", type=int, nargs="+", metavar="D", help="only these head dims of the sweep")
    parser.add_argument("--seqlens", type=int, nargs="+", metavar="N", help="only these sequence lengths of the sweep")
    parser.add_argument("--impls", nargs="+", metavar="NAME",
                        help="only these implementations (flash_ext, flash_ext_sm80, sdpa_cudnn, flex, ...)")
    parser.add_argument("--no-backward", action="store_true",
                        help="time the forward only (A/B runs of forward variants take half the time)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="the implementations of a setting take turns this many times (medians)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    device = torch.device(args.device) if args.device else common.default_device()
    settings = [(d, causal, n) for d, causal, n in sweep(args.quick, args.smoke)
                if (not args.head_dims or d in args.head_dims) and (not args.seqlens or n in args.seqlens)]
    if not settings:
        raise SystemExit("bench_prefill.py: --head-dims/--seqlens leave no setting of the sweep")
    flex_on, flex_bwd = flex_settings(args.quick, args.smoke, settings)
    if args.no_flex:
        flex_on = []
    if args.dry_run:
        for d, causal, n in settings:
            batch, heads = shape(d, n, args.smoke)
            skipped = math_skip(batch, heads, n)
            sdpa = [f"{name} ({skipped})" if name == "sdpa_math" and skipped else name for name in SDPA_BACKENDS]
            extra = (", flex" + (" fwd+bwd" if flex_bwd else " fwd")) if (d, causal, n) in flex_on else ""
            print(f"prefill d={d} causal={int(causal)} n={n} batch={batch} heads={heads}: "
                  f"flash_ext, {', '.join(sdpa)}{extra}")
        return
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_prefill.py measures CUDA kernels; on a CPU run bench_cpu.py (or --smoke here)")
    torch.manual_seed(0)
    flash_ext = common.strict_flash_ext()
    flex = None
    if flex_on:
        try:
            flex = Flex(device)
        except Exception as err:  # FlexAttention missing from this torch: its rows say so
            common.log(f"FlexAttention unavailable: {common.error_text(err)}")
    ceilings = common.measure_ceilings(device)
    common.log(f"ceilings {ceilings}")
    header = common.run_header("prefill", device, ceilings, args.quick)
    path = common.results_path("prefill", device, args.quick, args.out_dir)
    rows: list[dict[str, Any]] = []
    for setting in common.progress(settings, len(settings), "prefill"):
        d, causal, n = setting
        impls = implementations(flash_ext, flex, causal, n, setting in flex_on,
                                math_skip(*shape(d, n, args.smoke), n))
        if args.impls:
            impls = {name: fwd for name, fwd in impls.items() if name in args.impls}
        rows += run_setting(setting, impls, device, args.smoke, flex_bwd, backward=not args.no_backward,
                            rounds=args.rounds)
        common.write_results(path, header, rows)
    print("\n".join(common.compare({**header, "rows": rows})))
    print(f"wrote {common.shown(path)} and .md")


if __name__ == "__main__":
    main()
