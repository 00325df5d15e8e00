"""Bad input: every public function raises ValueError/RuntimeError/TypeError
naming the offending argument, before any kernel runs (caches are left
untouched), and refuses what PyTorch's SDPA refuses."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import flash_ext
from conftest import TORCH_SDPA, randn

ERRORS = (ValueError, RuntimeError, TypeError)
ops = torch.ops.flash_ext


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _sdpa_cases():
    q, k, v = _t(2, 4, 5, 8), _t(2, 4, 6, 8), _t(2, 4, 6, 8)
    return {
        # name: (args, kwargs, regex the message must match)
        "query_1d": ((_t(8), k, v), {}, r"query"),
        "key_1d": ((q, _t(8), v), {}, r"key"),
        "value_1d": ((q, k, _t(6)), {}, r"value"),
        "batch_mismatch": ((q, _t(3, 4, 6, 8), _t(3, 4, 6, 8)), {}, r"batch|query|key"),
        "kv_batch_mismatch": ((q, k, _t(3, 4, 6, 8)), {}, r"key|value"),
        "kv_heads_mismatch": ((q, k, _t(2, 2, 6, 8)), {}, r"key|value"),
        "kv_seq_mismatch": ((q, k, _t(2, 4, 7, 8)), {}, r"key|value"),
        "qk_dim_mismatch": ((q, _t(2, 4, 6, 16), v), {}, r"query|key|head dim"),
        "gqa_without_enable": ((_t(2, 4, 5, 8), _t(2, 2, 6, 8), _t(2, 2, 6, 8)), {}, r"enable_gqa|heads"),
        "gqa_not_divisible": ((_t(2, 6, 5, 8), _t(2, 4, 6, 8), _t(2, 4, 6, 8)), {"enable_gqa": True}, r"heads"),
        "mixed_dtype_k": ((q, k.double(), v), {}, r"dtype"),
        "mixed_dtype_v": ((q, k, v.half()), {}, r"dtype"),
        "mixed_device": ((q, k.to("meta"), v), {}, r"device"),
        "int_query": ((q.int(), k.int(), v.int()), {}, r"query|floating|dtype"),
        "int_value": ((q, k, v.long()), {}, r"value|floating|dtype"),
        "mask_wrong_shape": ((q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}, r"attn_mask"),
        "mask_wrong_shape_4d": ((q, k, v), {"attn_mask": torch.ones(2, 3, 5, 6, dtype=torch.bool)}, r"attn_mask"),
        "mask_int": ((q, k, v), {"attn_mask": torch.ones(5, 6, dtype=torch.int32)}, r"attn_mask"),
        "mask_on_other_device": ((q, k, v), {"attn_mask": torch.ones(5, 6, device="meta")}, r"attn_mask|device"),
        "mask_and_causal": ((q, k, v), {"attn_mask": torch.ones(5, 6, dtype=torch.bool), "is_causal": True},
                            r"attn_mask|is_causal|causal"),
        "dropout_above_one": ((q, k, v), {"dropout_p": 1.5}, r"dropout_p"),
        "dropout_negative": ((q, k, v), {"dropout_p": -0.1}, r"dropout_p"),
        "dropout_nan": ((q, k, v), {"dropout_p": math.nan}, r"dropout_p"),
        "scale_inf": ((q, k, v), {"scale": math.inf}, r"scale"),
        "scale_nan": ((q, k, v), {"scale": math.nan}, r"scale"),
        "scale_type": ((q, k, v), {"scale": [0.5]}, r"scale"),
    }


SDPA_CASES = _sdpa_cases()
# inputs PyTorch's own SDPA refuses as well (same condition); for the rest it
# has no check, but flash_ext's documented contract refuses them.
# (torch 2.14's CPU SDPA silently accepts key/value of different lengths, so
# kv_seq_mismatch is not in this set; torch 2.11 accepts a mask with
# is_causal=True, which 2.14 refuses, so mask_and_causal is not either.)
TORCH_REFUSES = {"query_1d", "key_1d", "value_1d", "batch_mismatch", "kv_batch_mismatch",
                 "qk_dim_mismatch", "gqa_without_enable", "gqa_not_divisible", "mixed_dtype_k", "mixed_dtype_v",
                 "mixed_device", "int_query", "int_value", "mask_wrong_shape", "mask_wrong_shape_4d", "mask_int",
                 "kv_heads_mismatch"}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "default"])
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_bad_input(name, strict):
    flash_ext.set_strict(strict)
    args, kwargs, pattern = SDPA_CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning is not the point here
        with pytest.raises(ERRORS, match=pattern):
            flash_ext.scaled_dot_product_attention(*args, **kwargs)
    if name in TORCH_REFUSES:
        with pytest.raises(Exception):
            TORCH_SDPA(*args, **kwargs)


def test_sdpa_errors_under_patch_are_ours():
    q, k, v = _t(2, 4, 5, 8), _t(2, 4, 6, 8), _t(2, 4, 7, 8)
    with flash_ext.patch():
        with pytest.raises(ERRORS, match=r"key|value"):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------- op level


def _op_cases():
    q, k, v = _t(2, 4, 5, 8), _t(2, 4, 6, 8), _t(2, 4, 6, 8)
    ncq = _t(2, 4, 5, 16)[..., ::2]
    nck = _t(2, 4, 6, 16)[..., ::2]
    ncv = _t(2, 4, 6, 16)[..., ::2]
    return {
        "q_last_dim_stride": ((ncq, k, v, None), r"query"),
        "k_last_dim_stride": ((q, nck, v, None), r"key"),
        "v_last_dim_stride": ((q, k, ncv, None), r"value"),
        "q_3d": ((q[0], k, v, None), r"query"),
        "k_5d": ((q, k[None], v, None), r"key"),
        "batch": ((q, _t(3, 4, 6, 8), _t(3, 4, 6, 8), None), r"batch"),
        "heads": ((_t(2, 3, 5, 8), _t(2, 2, 6, 8), _t(2, 2, 6, 8), None), r"heads"),
        "kv_heads": ((q, k, _t(2, 2, 6, 8), None), r"heads"),
        "kv_seq": ((q, k, _t(2, 4, 5, 8), None), r"sequence"),
        "dim": ((q, _t(2, 4, 6, 4), v, None), r"head dim"),
        "dtype": ((q, k.double(), v, None), r"dtype"),
        "int": ((q.int(), k.int(), v.int(), None), r"query"),
        "device": ((q, k.to("meta"), v, None), r"device"),
        "mask_3d": ((q, k, v, torch.ones(4, 5, 6, dtype=torch.bool)), r"attn_mask"),
        "mask_shape": ((q, k, v, torch.ones(2, 4, 5, 7, dtype=torch.bool)), r"attn_mask"),
        "mask_int": ((q, k, v, torch.ones(2, 4, 5, 6, dtype=torch.int64)), r"attn_mask"),
        "mask_dtype": ((q, k, v, torch.ones(2, 4, 5, 6, dtype=torch.float64)), r"attn_mask"),
    }


OP_CASES = _op_cases()


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_attention_bad_input(name):
    (q, k, v, mask), pattern = OP_CASES[name]
    with pytest.raises(ERRORS, match=pattern):
        ops.attention(q, k, v, mask, 0.0, 0.25, -1, -1, False, False)
    with pytest.raises(ERRORS, match=pattern):
        ops.attention_fwd(q, k, v, mask, 0.0, 0.25, -1, -1, False)


@pytest.mark.parametrize("dropout_p,scale,wl,wr,pattern", [
    (1.0, 0.25, -1, -1, "dropout_p"), (-0.5, 0.25, -1, -1, "dropout_p"), (0.0, math.inf, -1, -1, "scale"),
    (0.0, math.nan, -1, -1, "scale"), (0.0, 0.25, -2, 0, "window"), (0.0, 0.25, 0, -3, "window"),
])
def test_op_attention_bad_scalars(dropout_p, scale, wl, wr, pattern):
    q, k, v = _t(1, 2, 3, 8), _t(1, 2, 3, 8), _t(1, 2, 3, 8)
    with pytest.raises(ERRORS, match=pattern):
        ops.attention(q, k, v, None, dropout_p, scale, wl, wr, False, False)


def test_op_attention_bwd_bad_saved_tensors():
    q, k, v = _t(1, 2, 3, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)
    out, lse, rng = ops.attention_fwd(q, k, v, None, 0.0, 0.25, -1, -1, False)
    g = torch.randn_like(out)
    args = [g, q, k, v, out, lse, rng, None, 0.0, 0.25, -1, -1, False, False, False]
    for i, bad, pattern in [(0, g[..., :4], "grad_out"), (4, out.double(), "out"), (5, lse[:, :1], "lse"),
                            (5, lse.double(), "lse")]:
        a = list(args)
        a[i] = bad
        with pytest.raises(ERRORS, match=pattern):
            ops.attention_bwd(*a)
    a = list(args)
    a[8] = 0.5  # dropout without a forward rng state
    with pytest.raises(ERRORS, match="rng_state"):
        ops.attention_bwd(*a)


def test_op_dropout_keep_mask_bad_input():
    with pytest.raises(ERRORS, match="rng_state"):
        ops.dropout_keep_mask(torch.zeros(3, dtype=torch.int64), 1, 1, 2, 2, 0.5)
    with pytest.raises(ERRORS, match="rng_state"):
        ops.dropout_keep_mask(torch.zeros(2, dtype=torch.int32), 1, 1, 2, 2, 0.5)
    with pytest.raises(ERRORS, match="dropout_p"):
        ops.dropout_keep_mask(torch.zeros(2, dtype=torch.int64), 1, 1, 2, 2, 1.5)
    with pytest.raises(ERRORS, match="sizes|non-negative"):
        ops.dropout_keep_mask(torch.zeros(2, dtype=torch.int64), -1, 1, 2, 2, 0.5)


# --------------------------------------------------------------------------- flash_attn_func


def _fa_cases():
    q, k, v = _t(2, 5, 4, 8), _t(2, 6, 2, 8), _t(2, 6, 2, 8)
    return {
        "q_rank": ((q[0], k, v), {}, r"\bq\b"),
        "k_rank": ((q, k[0], v), {}, r"\bk\b"),
        "v_rank": ((q, k, v[0]), {}, r"\bv\b"),
        "batch": ((q, _t(3, 6, 2, 8), _t(3, 6, 2, 8)), {}, r"batch"),
        "kv_seq": ((q, k, _t(2, 7, 2, 8)), {}, r"key|value|sequence"),
        "heads_not_divisible": ((_t(2, 5, 3, 8), k, v), {}, r"heads"),
        "dim": ((q, _t(2, 6, 2, 4), v), {}, r"head dim|key|query"),
        "dtype": ((q, k.double(), v), {}, r"dtype"),
        "int": ((q.int(), k.int(), v.int()), {}, r"dtype|float|query|\bq\b"),
        "device": ((q, k.to("meta"), v), {}, r"device"),
        "dropout": ((q, k, v), {"dropout_p": 1.0}, r"dropout_p"),
        "scale": ((q, k, v), {"softmax_scale": math.inf}, r"scale"),
        "scale_type": ((q, k, v), {"softmax_scale": "0.5"}, r"scale"),
        "window_len": ((q, k, v), {"window_size": (1, 2, 3)}, r"window_size"),
        "window_value": ((q, k, v), {"window_size": (-5, 0)}, r"window"),
    }


FA_CASES = _fa_cases()


@pytest.mark.parametrize("name", list(FA_CASES))
def test_flash_attn_func_bad_input(name):
    args, kwargs, pattern = FA_CASES[name]
    with pytest.raises(ERRORS, match=pattern):
        flash_ext.flash_attn_func(*args, **kwargs)


# --------------------------------------------------------------------------- kv cache


def _kv_setup(gen, batch=2, max_len=16, kv_heads=2, heads=4, dim=8):
    k_cache = randn((batch, max_len, kv_heads, dim), torch.float32, gen=gen)
    v_cache = randn((batch, max_len, kv_heads, dim), torch.float32, gen=gen)
    q = randn((batch, 1, heads, dim), torch.float32, gen=gen)
    k = randn((batch, 1, kv_heads, dim), torch.float32, gen=gen)
    v = randn((batch, 1, kv_heads, dim), torch.float32, gen=gen)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    return q, k_cache, v_cache, k, v, lens


KV_CASES = {
    # name: (mutator(d) -> kwargs changes, regex)
    "q_rank": (lambda d: {"q": d["q"][0]}, r"\bq\b"),
    "k_cache_rank": (lambda d: {"k_cache": d["k_cache"][0]}, r"k_cache"),
    "v_cache_shape": (lambda d: {"v_cache": d["v_cache"][:, :8]}, r"v_cache|k_cache"),
    "dim_mismatch": (lambda d: {"k_cache": d["k_cache"][..., :4], "v_cache": d["v_cache"][..., :4]},
                     r"k_cache|head dim"),
    "heads_not_divisible": (lambda d: {"q": torch.randn(2, 1, 3, 8)}, r"heads"),
    "q_dtype": (lambda d: {"q": d["q"].double()}, r"dtype|k_cache|\bq\b"),
    "int_q": (lambda d: {"q": d["q"].int()}, r"\bq\b"),
    "cache_device": (lambda d: {"k_cache": d["k_cache"].to("meta"), "v_cache": d["v_cache"].to("meta")},
                     r"k_cache|device"),
    "cache_batch": (lambda d: {"k_cache": d["k_cache"][:1], "v_cache": d["v_cache"][:1]}, r"k_cache|batch"),
    "seqlens_int64": (lambda d: {"cache_seqlens": d["cache_seqlens"].long()}, r"cache_seqlens"),
    "seqlens_float": (lambda d: {"cache_seqlens": d["cache_seqlens"].float()}, r"cache_seqlens"),
    "seqlens_2d": (lambda d: {"cache_seqlens": d["cache_seqlens"][None]}, r"cache_seqlens"),
    "seqlens_len": (lambda d: {"cache_seqlens": torch.tensor([1, 2, 3], dtype=torch.int32)}, r"cache_seqlens"),
    "seqlens_device": (lambda d: {"cache_seqlens": d["cache_seqlens"].to("meta")}, r"cache_seqlens"),
    "seqlens_list": (lambda d: {"cache_seqlens": [3, 7]}, r"cache_seqlens"),
    "seqlens_negative": (lambda d: {"cache_seqlens": torch.tensor([3, -1], dtype=torch.int32)}, r"cache_seqlens"),
    "seqlens_past_cache_after_append": (lambda d: {"cache_seqlens": torch.tensor([3, 16], dtype=torch.int32)},
                                        r"cache_seqlens"),
    "seqlens_past_cache_no_append": (lambda d: {"cache_seqlens": torch.tensor([3, 17], dtype=torch.int32),
                                                "k": None, "v": None}, r"cache_seqlens"),
    "k_without_v": (lambda d: {"v": None}, r"\bk\b.*\bv\b|\bv\b"),
    "v_without_k": (lambda d: {"k": None}, r"\bk\b.*\bv\b|\bk\b"),
    "k_shape": (lambda d: {"k": d["k"][:, :, :1]}, r"\bk\b"),
    "v_dtype": (lambda d: {"v": d["v"].double()}, r"\bv\b"),
    "k_cache_expanded": (lambda d: {"k_cache": d["k_cache"][:, :1].expand(2, 16, 2, 8)}, r"k_cache"),
    "v_cache_expanded": (lambda d: {"v_cache": d["v_cache"][:1].expand(2, 16, 2, 8)}, r"v_cache"),
    "scale_nan": (lambda d: {"softmax_scale": math.nan}, r"scale"),
    "scale_type": (lambda d: {"softmax_scale": object()}, r"scale"),
    "num_splits_negative": (lambda d: {"num_splits": -1}, r"num_splits"),
    "window_value": (lambda d: {"window_size": (-2, 0)}, r"window"),
    "window_len": (lambda d: {"window_size": (4,)}, r"window_size"),
    "no_seqlens_with_append": (lambda d: {"cache_seqlens": None}, r"cache_seqlens"),
}


@pytest.mark.parametrize("name", list(KV_CASES))
def test_kvcache_bad_input_leaves_cache_untouched(name, gen):
    q, k_cache, v_cache, k, v, lens = _kv_setup(gen)
    d = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lens)
    mutate, pattern = KV_CASES[name]
    d.update(mutate(d))
    before = [t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None
              for t in (d["k_cache"], d["v_cache"])]
    with pytest.raises(ERRORS, match=pattern):
        flash_ext.flash_attn_with_kvcache(**d)
    for t, b in zip((d["k_cache"], d["v_cache"]), before):
        if b is not None:
            assert torch.equal(t, b), "the cache was written although the call was refused"


@pytest.mark.parametrize("bad_page", [-1, 6, 100])
def test_kvcache_block_table_out_of_range(bad_page, gen):
    k_cache = randn((6, 4, 1, 8), torch.float32, gen=gen)
    v_cache = randn((6, 4, 1, 8), torch.float32, gen=gen)
    q = randn((2, 1, 2, 8), torch.float32, gen=gen)
    k, v = randn((2, 1, 1, 8), torch.float32, gen=gen), randn((2, 1, 1, 8), torch.float32, gen=gen)
    table = torch.tensor([[0, 1, 2], [3, 4, bad_page]], dtype=torch.int32)
    lens = torch.tensor([5, 9], dtype=torch.int32)  # sequence 1 uses its 3rd page after the append
    kb, vb = k_cache.clone(), v_cache.clone()
    with pytest.raises(ERRORS, match=r"block_table"):
        flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, block_table=table)
    assert torch.equal(k_cache, kb) and torch.equal(v_cache, vb)


@pytest.mark.parametrize("variant", ["dtype", "rank", "rows", "device"])
def test_kvcache_block_table_bad_type(variant, gen):
    k_cache = randn((6, 4, 1, 8), torch.float32, gen=gen)
    v_cache = randn((6, 4, 1, 8), torch.float32, gen=gen)
    q = randn((2, 1, 2, 8), torch.float32, gen=gen)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    table = {"dtype": table.long(), "rank": table.flatten(), "rows": table[:1],
             "device": table.to("meta")}[variant]
    with pytest.raises(ERRORS, match=r"block_table"):
        flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([2, 3], dtype=torch.int32),
                                          block_table=table)


# A C++ ValueError for CUDA tensors, each in its own process, so a crash is a
# failure here rather than the end of the test run: with a statically linked
# libstdc++ of its own, the library once crashed (GPU machine) or dropped the
# text (here) formatting a number into an error message (setup.py, LINK_FLAGS).
_CRASH_PROBE = """
import torch, flash_ext
x = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16)
cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
try:
    if {varlen}:
        flash_ext.flash_attn_varlen_func(x(7, 2, 16), x(7, 2, 16), x(7, 2, 16), cu, cu, -1, 4)
    else:
        torch.ops.flash_ext.attention(x(1, 3, 4, 16), x(1, 2, 4, 16), x(1, 2, 4, 16), None, 0.0, 1.0, -1, -1,
                                      False, False)
except ValueError as e:
    print("raised ValueError:", e)
"""


@pytest.mark.cuda
@pytest.mark.parametrize("varlen", [False, True])
def test_cuda_value_errors_do_not_crash(varlen):
    import subprocess
    import sys
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    run = subprocess.run([sys.executable, "-c", _CRASH_PROBE.format(varlen=varlen)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "raised ValueError:" in run.stdout, (run.returncode, run.stderr[-2000:])
    assert ("-1 and 4" if varlen else "query heads (3) must be a multiple of key/value heads (2)") in run.stdout


def test_error_messages_keep_their_numbers():
    """Numbers formatted into a C++ error message arrive whole (a private
    libstdc++ without LINK_FLAGS cut the message at the first number)."""
    x = lambda *s: torch.randn(*s)  # noqa: E731
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\) for"):
        torch.ops.flash_ext.attention(x(1, 3, 4, 16), x(1, 2, 4, 16), x(1, 2, 4, 16), None, 0.0, 1.0, -1, -1,
                                      False, False)
