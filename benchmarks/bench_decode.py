"""Decoding: one query token against a long KV cache, flash_ext against every
PyTorch SDPA backend (flash, cuDNN, efficient, math), FlexAttention (and
FlashInfer when installed), TABLE.md's setting.

bf16, d=128, 32 query heads sharing 8 KV heads (GQA), q_len 1. Ours reads a
(batch, kv_len, 8, 128) cache, contiguous or paged (pages of 64 and 256
tokens, shuffled over the cache's storage as a serving system's free list
leaves them); SDPA and FlexAttention (``flex``, compiled with
``dynamic=False``, no block mask) read (batch, 8, kv_len, 128) with
``enable_gqa=True``. A backend that refuses GQA (efficient did in TABLE.md)
or runs out of memory (math expands K and V to 32 heads) is an error row.
Flex compiles each shape (~5 s on an H100), so the quick check runs it on
its two 8192 settings only; the full sweep and ``--smoke`` on every one.
Effective GB/s = bytes of K and V read once / median time (triton do_bench,
as the anchors). Rows per RESULTS_FORMAT.md ``decode``.

    python benchmarks/bench_decode.py [--quick] [--dry-run] [--smoke] [--no-flex]
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PAGE_SIZES = (64, 256)
# One layout of the cache at a time is on the device; settings above this skip.
MAX_KV_BYTES = 40e9
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
FLEX_BATCHES, FLEX_KV_LENS = (1, 16), (8192, 32768)

Setting = tuple[int, int]  # (batch, kv_len)


def kv_bytes(batch: int, kv_len: int) -> int:
    return 2 * batch * kv_len * KV_HEADS * HEAD_DIM * 2


def sweep(quick: bool, smoke: bool) -> list[Setting]:
    if smoke:
        return [(1, 512), (2, 1024)]
    if quick:
        return [(1, 8192), (1, 131072), (16, 8192), (64, 32768)]
    lengths = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
    return [(b, n) for b, n in itertools.product((1, 16, 64), lengths) if kv_bytes(b, n) <= MAX_KV_BYTES]


def flex_settings(settings: list[Setting], quick: bool) -> list[Setting]:
    """Where FlexAttention runs: every setting of the sweep, except that the
    quick check times a few (each shape costs a compile, ~5 s on an H100)."""
    if not quick:
        return settings
    return [(b, n) for b, n in settings if b in FLEX_BATCHES and n in FLEX_KV_LENS]


def flashinfer_decode() -> Callable[..., Callable[[], torch.Tensor]] | None:
    """FlashInfer's batch decode over our paged cache, or None when it is not installed."""
    try:
        import flashinfer
    except Exception:  # not installed (the usual case): no rows for it
        return None

    def make(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
             block_table: torch.Tensor, page_size: int) -> Callable[[], torch.Tensor]:
        batch, pages_per_seq = block_table.shape
        workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=q.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        indptr = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * pages_per_seq
        last_len = torch.full((batch,), page_size, dtype=torch.int32, device=q.device)
        wrapper.plan(indptr, block_table.reshape(-1), last_len, Q_HEADS, KV_HEADS, HEAD_DIM, page_size,
                     q_data_type=q.dtype)
        q3 = q.reshape(batch, Q_HEADS, HEAD_DIM)
        return lambda: wrapper.run(q3, (k_pages, v_pages))
    return make


def shuffled_pages(batch: int, kv_len: int, page_size: int, device: torch.device) -> torch.Tensor:
    """A (batch, pages per sequence) int32 block table of distinct pages in random order."""
    pages = kv_len // page_size
    return torch.randperm(batch * pages, device=device).to(torch.int32).reshape(batch, pages)


def timed_row(base: dict[str, Any], fn: Callable[[], Any], device: torch.device, nbytes: int) -> dict[str, Any]:
    row = dict(base)
    try:
        fn()
        ms = common.time_ms(fn, device)
        row["us"] = ms * 1e3
        row["GBps"] = nbytes / ms / 1e6
    except Exception as err:  # a refused setting is a row, not the end of the sweep
        row["error"] = common.error_text(err)
    return row


def run_setting(setting: Setting, flash_ext: Any, flashinfer: Any, flex: Callable[..., torch.Tensor] | None,
                with_flex: bool, device: torch.device) -> list[dict[str, Any]]:
    batch, kv_len = setting
    nbytes = kv_bytes(batch, kv_len)
    base = dict(dtype="bfloat16", d=HEAD_DIM, batch=batch, kv_len=kv_len, q_heads=Q_HEADS, kv_heads=KV_HEADS,
                q_len=1, paged=False, page_size=None)
    rows: list[dict[str, Any]] = []
    # Ours: (batch, kv_len, kv_heads, d), then the same storage seen as pages.
    q = torch.randn(batch, 1, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k_cache = torch.randn(batch, kv_len, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)

    def ours(k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        if flash_ext is None:
            def unavailable() -> torch.Tensor:
                raise RuntimeError("flash_ext could not be imported")
            return unavailable
        return lambda: flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table)

    rows.append(timed_row({**base, "impl": common.OURS}, ours(k_cache, v_cache), device, nbytes))
    for page_size in PAGE_SIZES:
        paged = {**base, "impl": common.OURS, "paged": True, "page_size": page_size}
        if kv_len % page_size:
            rows.append({**paged, "error": f"kv_len not a multiple of the page size {page_size}"})
            continue
        table = shuffled_pages(batch, kv_len, page_size, device)
        k_pages = k_cache.view(-1, page_size, KV_HEADS, HEAD_DIM)
        v_pages = v_cache.view(-1, page_size, KV_HEADS, HEAD_DIM)
        rows.append(timed_row(paged, ours(k_pages, v_pages, table), device, nbytes))
        if flashinfer is not None:
            try:
                fn = flashinfer(q, k_pages, v_pages, table, page_size)
                rows.append(timed_row({**paged, "impl": "flashinfer"}, fn, device, nbytes))
            except Exception as err:  # planning refused: a row says so
                rows.append({**paged, "impl": "flashinfer", "error": common.error_text(err)})
    del k_cache, v_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # SDPA: (batch, heads, kv_len, d), its own contiguous layout.
    q_sdpa = q.transpose(1, 2).contiguous()
    k = torch.randn(batch, KV_HEADS, kv_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q_sdpa, k, v, enable_gqa=True)
        rows.append(timed_row({**base, "impl": name}, sdpa, device, nbytes))
    if with_flex:
        rows.append(timed_row({**base, "impl": "flex"}, lambda: flex(q_sdpa, k, v, enable_gqa=True), device, nbytes)
                    if flex else {**base, "impl": "flex", "error": "FlexAttention unavailable"})
    return rows


def check_ours(flash_ext: Any, device: torch.device) -> str | None:
    """Our decode against SDPA on one small random case: a fast wrong kernel must not pass unnoticed."""
    if flash_ext is None:
        return None
    q = torch.randn(2, 1, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4096, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    table = shuffled_pages(2, 4096, 64, device)
    pages = [t.reshape(-1, 64, KV_HEADS, HEAD_DIM) for t in (k, v)]
    # The paged cache's sequence b is its pages table[b], in order.
    kp, vp = (p[table.long()].reshape(2, 4096, KV_HEADS, HEAD_DIM) for p in pages)
    try:
        outs = {"contiguous": (flash_ext.flash_attn_with_kvcache(q, k, v), k, v),
                "paged": (flash_ext.flash_attn_with_kvcache(q, *pages, block_table=table), kp, vp)}
    except Exception as err:
        return f"decode check could not run: {common.error_text(err)}"
    problems = []
    for name, (out, kk, vv) in outs.items():
        ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), kk.transpose(1, 2).float(),
                                             vv.transpose(1, 2).float(), enable_gqa=True).transpose(1, 2)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err <= common.REL_ERR_LIMIT:
            problems.append(f"{name} relative error {err:.3g}")
    return "WARNING flash_ext decode differs from SDPA: " + "; ".join(problems) if problems else None


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any device (checks the script, not the speed)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else common.default_device()
    settings = sweep(args.quick, args.smoke)
    flex_on = [] if args.no_flex else flex_settings(settings, args.quick and not args.smoke)
    flashinfer = flashinfer_decode()
    if args.dry_run:
        others = ", ".join([*SDPA_BACKENDS, *(["flashinfer"] if flashinfer else [])])
        for setting in settings:
            batch, kv_len = setting
            print(f"decode batch={batch} kv_len={kv_len} ({kv_bytes(batch, kv_len) / 1e9:.2f} GB of K+V): "
                  f"flash_ext contiguous + paged {PAGE_SIZES}, {others}{', flex' if setting in flex_on else ''}")
        return
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_decode.py measures CUDA kernels; on a CPU run it with --smoke only")
    torch.manual_seed(0)
    flash_ext = common.strict_flash_ext()
    warning = check_ours(flash_ext, device)
    if warning:
        common.log(warning)
    flex = None
    if flex_on:
        try:
            flex = common.compiled_flex_attention()
        except Exception as err:  # FlexAttention missing from this torch: its rows say so
            common.log(f"FlexAttention unavailable: {common.error_text(err)}")
    ceilings = common.measure_ceilings(device)
    common.log(f"ceilings {ceilings}")
    header = common.run_header("decode", device, ceilings, args.quick)
    if warning:
        header["check"] = warning
    path = common.results_path("decode", device, args.quick, args.out_dir)
    rows: list[dict[str, Any]] = []
    # The first setting once untimed: a process's first timed calls ran slow
    # on the host (session 7, H200: 1 x 1k read 22.9 us, the paged rows right
    # after it 13.2 us, and 13.4 us as a CUDA graph).
    run_setting(settings[0], flash_ext, flashinfer, flex, settings[0] in flex_on, device)
    for setting in common.progress(settings, len(settings), "decode"):
        rows += run_setting(setting, flash_ext, flashinfer, flex, setting in flex_on, device)
        common.write_results(path, header, rows)
    print("\n".join(common.compare({**header, "rows": rows})))
    print(f"wrote {common.shown(path)} and .md")


if __name__ == "__main__":
    main()
