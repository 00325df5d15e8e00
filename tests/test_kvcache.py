"""flash_attn_with_kvcache: ragged lengths, append in place, causal q_len > 1,
GQA, num_splits, paged caches with shuffled block tables, return_lse.

Cache rows past each sequence's length are poisoned with NaN: reading them
would show up in the output."""
from __future__ import annotations

import math

import pytest
import torch

import flash_ext
from conftest import (
    DEVICES, LOW_PRECISION, TORCH_SDPA, assert_matches_reference, decode_reference, randn,
    shifted_by_one_element, skip_unless_served, window_visible,
)


def _make_cache(batch, max_len, kv_heads, dim, v_dim, lens, dtype, device, gen):
    k_cache = randn((batch, max_len, kv_heads, dim), dtype, device, gen)
    v_cache = randn((batch, max_len, kv_heads, v_dim), dtype, device, gen)
    for b, n in enumerate(lens):
        k_cache[b, n:] = math.nan
        v_cache[b, n:] = math.nan
    return k_cache, v_cache


def _expected_cache(cache, new, lens):
    exp = cache.clone()
    if new is not None:
        for b, n in enumerate(lens):
            exp[b, n:n + new.shape[1]] = new[b]
    return exp


def _torch_decode(q, k_full, v_full, lens, new_len, causal, window=(-1, -1)):
    """PyTorch's SDPA on the same low-precision inputs (rows with no key -> 0)."""
    window = (window[0], 0) if causal else window
    outs = []
    for b, n in enumerate(lens):
        total = n + new_len
        qb = q[b:b + 1].transpose(1, 2)
        kb = k_full[b:b + 1, :total].transpose(1, 2)
        vb = v_full[b:b + 1, :total].transpose(1, 2)
        vis = window_visible(q.shape[1], total, window[0], window[1], True, device=q.device)
        empty = ~vis.any(-1)
        vis[empty] = True
        if total == 0:
            outs.append(torch.zeros_like(q[b:b + 1, :, :, :v_full.shape[-1]]))
            continue
        o = TORCH_SDPA(qb, kb, vb, attn_mask=vis, enable_gqa=True).transpose(1, 2).clone()
        o[:, empty] = 0
        outs.append(o)
    return torch.cat(outs)


DECODE_CASES = [
    # (batch, heads, kv_heads, q_len, new_len, max_len, dim, v_dim, lens, causal)
    (3, 4, 4, 1, 0, 40, 16, 16, [0, 17, 40], True),
    (3, 4, 2, 1, 1, 64, 32, 32, [0, 5, 63], True),
    (2, 6, 2, 3, 3, 50, 16, 16, [0, 30], True),     # GQA 3, several new tokens
    (4, 8, 1, 4, 2, 300, 64, 64, [299 - 2 + 1 - 1, 0, 1, 150], True),  # MQA, q_len > new_len
    (2, 8, 8, 5, 5, 37, 8, 8, [32, 7], False),
    (2, 4, 2, 2, 0, 33, 40, 24, [1, 33], True),     # value dim != query dim, no append
    (1, 5, 5, 7, 0, 20, 16, 16, [3], True),         # q_len > cache length: early rows see nothing
    (2, 8, 2, 1, 1, 600, 128, 128, [511, 257], True),
    (2, 8, 4, 6, 6, 70, 32, 32, [0, 64], False),
    (2, 4, 2, 1, 1, 45, 20, 12, [44, 9], True),     # dims off 8 lanes: the 16-bit conversions' tails
]


def _case_id(c):
    return f"b{c[0]}h{c[1]}kv{c[2]}-q{c[3]}new{c[4]}-max{c[5]}-d{c[6]}v{c[7]}-c{int(c[9])}"


def _check_decode(batch, heads, kv_heads, q_len, new_len, max_len, dim, v_dim, lens, dtype, device, gen,
                  causal=True, window=(-1, -1), lse_name="return_lse", **call_kwargs):
    """One flash_attn_with_kvcache call on a NaN-poisoned cache with fresh
    inputs: the cache contents exact afterwards, the output and lse against
    the float64 reference."""
    k_cache, v_cache = _make_cache(batch, max_len, kv_heads, dim, v_dim, lens, dtype, device, gen)
    q = randn((batch, q_len, heads, dim), dtype, device, gen)
    k_new = v_new = None
    if new_len:
        k_new = randn((batch, new_len, kv_heads, dim), dtype, device, gen)
        v_new = randn((batch, new_len, kv_heads, v_dim), dtype, device, gen)
    k_exp, v_exp = _expected_cache(k_cache, k_new, lens), _expected_cache(v_cache, v_new, lens)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                                 causal=causal, window_size=window, **{lse_name: True},
                                                 **call_kwargs)
    # the cache: new rows written at cache_seqlens, everything else untouched (NaN poison too)
    torch.testing.assert_close(k_cache, k_exp, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(seqlens.cpu(), torch.tensor(lens, dtype=torch.int32)), "cache_seqlens must not change"
    assert out.shape == (batch, q_len, heads, v_dim) and out.dtype == dtype
    assert lse.shape == (batch, heads, q_len) and lse.dtype == torch.float32
    ref, ref_lse = decode_reference(q, k_exp, v_exp, lens, new_len, causal, window=window)
    torch_out = (_torch_decode(q, k_exp, v_exp, lens, new_len, causal, window=window)
                 if dtype in LOW_PRECISION else None)
    assert_matches_reference(out, ref, dtype, torch_out)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu())
    lse_tol = 1e-5 if dtype in (torch.float64, torch.float32) else 2e-2
    torch.testing.assert_close(lse[~empty].double().cpu(), ref_lse[~empty].cpu(), atol=lse_tol, rtol=lse_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_kvcache_against_reference(case, dtype, device, gen):
    batch, heads, kv_heads, q_len, new_len, max_len, dim, v_dim, lens, causal = case
    skip_unless_served(device, dtype, dim, v_dim)
    _check_decode(batch, heads, kv_heads, q_len, new_len, max_len, dim, v_dim, lens, dtype, device, gen,
                  causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 0])
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
def test_kvcache_num_splits_and_gqa(num_splits, ratio, device, gen):
    dtype = torch.float32 if device == "cpu" else torch.float16
    kv_heads, q_len = 2, 2
    heads = kv_heads * ratio
    lens = [0, 1, 6, 130, 257]
    max_len, dim = 260, 32
    k_cache, v_cache = _make_cache(len(lens), max_len, kv_heads, dim, dim, lens, dtype, device, gen)
    q = randn((len(lens), q_len, heads, dim), dtype, device, gen)
    k_new = randn((len(lens), 1, kv_heads, dim), dtype, device, gen)
    v_new = randn((len(lens), 1, kv_heads, dim), dtype, device, gen)
    k_exp, v_exp = _expected_cache(k_cache, k_new, lens), _expected_cache(v_cache, v_new, lens)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                                 num_splits=num_splits, return_lse=True, softmax_scale=0.2)
    torch.testing.assert_close(k_cache, k_exp, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0, equal_nan=True)
    ref, ref_lse = decode_reference(q, k_exp, v_exp, lens, 1, True, scale=0.2)
    torch_out = _torch_decode(q, k_exp, v_exp, lens, 1, True) if dtype in LOW_PRECISION else None
    assert_matches_reference(out, ref, dtype, torch_out)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu())
    torch.testing.assert_close(lse[~empty].double().cpu(), ref_lse[~empty].cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 12])
def test_kvcache_group_rows_over_several_blocks(num_splits, device, gen):
    # 16 query heads per kv head x 8 new tokens = 128 packed rows: on CUDA
    # two row blocks per (sequence, kv head), each with its own splits and
    # merge (12 splits: past a cluster, through the split counters).
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    _check_decode(3, 32, 2, 8, 8, 700, 64, 64, [0, 100, 650], dtype, device, gen, causal=True,
                  num_splits=num_splits)


def test_kvcache_splits_agree_exactly_enough(gen):
    """Every split count gives the same float64 result."""
    lens = [3, 200, 77]
    k_cache, v_cache = _make_cache(3, 210, 2, 16, 16, lens, torch.float64, "cpu", gen)
    q = randn((3, 1, 4, 16), gen=gen)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    outs = [flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=s)
            for s in (1, 2, 3, 7, 0, 64)]
    ref, _ = decode_reference(q, k_cache, v_cache, lens, 0, True)
    for s, o in zip((1, 2, 3, 7, 0, 64), outs):
        torch.testing.assert_close(o, ref, atol=1e-12, rtol=1e-12, msg=lambda m: f"num_splits={s}: {m}")


def test_kvcache_int_seqlens_and_default_seqlens(gen):
    k_cache, v_cache = _make_cache(2, 30, 2, 16, 16, [30, 30], torch.float64, "cpu", gen)
    q = randn((2, 1, 2, 16), gen=gen)
    full = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache)  # cache_seqlens None = whole cache
    ref, _ = decode_reference(q, k_cache, v_cache, [30, 30], 0, True)
    torch.testing.assert_close(full, ref, atol=1e-12, rtol=1e-12)
    part = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=11)
    ref, _ = decode_reference(q, k_cache, v_cache, [11, 11], 0, True)
    torch.testing.assert_close(part, ref, atol=1e-12, rtol=1e-12)


def test_kvcache_noncontiguous_q_and_cache(gen):
    """q and caches as views (last dim contiguous): a cache carved from a
    larger buffer, q a slice of a packed qkv."""
    lens = [4, 19]
    big_k = randn((2, 25, 3, 16), gen=gen)
    big_v = randn((2, 25, 3, 16), gen=gen)
    k_cache, v_cache = big_k[:, :, 1:3], big_v[:, :, 0:2]
    assert not k_cache.is_contiguous()
    qkv = randn((2, 2, 3, 4, 16), gen=gen)
    q = qkv[:, :, 0]
    k_new, v_new = qkv[:, :, 1, :2], qkv[:, :, 2, 2:]
    k_exp, v_exp = _expected_cache(k_cache, k_new, lens), _expected_cache(v_cache, v_new, lens)
    untouched_k = big_k[:, :, 0].clone()
    out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                            cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    torch.testing.assert_close(k_cache, k_exp, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0)
    assert torch.equal(big_k[:, :, 0], untouched_k)
    ref, _ = decode_reference(q, k_exp, v_exp, lens, 2, True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_misaligned_q_and_new_keys_are_read(device, gen):
    """q, k and v start off a 16-byte boundary (the CUDA kernels' vector
    loads cannot read them in place): the call reads them through copies. A
    cache off that boundary, written in place, is refused on CUDA by name."""
    dtype = torch.bfloat16
    skip_unless_served(device, dtype, 64)
    lens = [5, 40]
    k_cache, v_cache = _make_cache(2, 48, 2, 64, 64, lens, dtype, device, gen)
    q, k_new, v_new = (shifted_by_one_element(randn((2, n, h, 64), dtype, device, gen))
                       for n, h in ((1, 4), (1, 2), (1, 2)))
    k_exp, v_exp = _expected_cache(k_cache, k_new, lens), _expected_cache(v_cache, v_new, lens)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(k_cache, k_exp, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0, equal_nan=True)
    ref, _ = decode_reference(q, k_exp, v_exp, lens, 1, True)
    # PyTorch's yardstick from an aligned copy: its cuDNN backend fails on the
    # misaligned q ("mha_graph.execute ... is_good()", H100, torch 2.11).
    assert_matches_reference(out, ref, dtype, _torch_decode(q.clone(), k_exp, v_exp, lens, 1, True))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="16-byte aligned"):
            flash_ext.flash_attn_with_kvcache(q, shifted_by_one_element(k_cache), v_cache, cache_seqlens=seqlens)


# --------------------------------------------------------------------------- paged


WINDOW_CASES = [
    # (window_size, causal, q_len, new_len, lens, num_splits)
    ((16, -1), True, 1, 1, [0, 15, 700, 1000], 0),      # Mistral-style decode: the last 17 keys
    ((100, 0), False, 4, 4, [3, 200, 640, 1020], 3),    # several new tokens, each its own window edge
    ((0, 0), False, 2, 0, [1, 64, 129, 1000], 1),       # each token sees itself only
    ((5, 3), False, 3, 2, [0, 70, 300, 999], 7),        # right window reaching past the last key
    ((10, -1), True, 1, 40, [0, 100, 500, 960], 0),     # appended keys outside every window: still stored
    ((300, -1), False, 2, 0, [50, 290, 301, 1024], 2),  # left window wider than some sequences
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"w{c[0][0]}_{c[0][1]}-c{int(c[1])}-q{c[2]}new{c[3]}-s{c[5]}")
def test_kvcache_sliding_window(case, dtype, device, gen):
    window, causal, q_len, new_len, lens, num_splits = case
    skip_unless_served(device, dtype, 64)
    # FlashAttention's name for return_lse, on the way
    _check_decode(len(lens), 8, 2, q_len, new_len, 1024 + 40, 64, 64, lens, dtype, device, gen, causal=causal,
                  window=window, lse_name="return_softmax_lse", num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_window_wider_than_the_cache_is_unbounded(device, gen):
    # Windows past 32 bits (or past every key) attend to everything.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    k_cache, v_cache = _make_cache(2, 300, 2, 64, 64, [7, 290], dtype, device, gen)
    q = randn((2, 3, 4, 64), dtype, device, gen)
    lens = torch.tensor([7, 290], dtype=torch.int32, device=device)
    full = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=False)
    for window in ((2**32 + 3, -1), (-1, 2**33 + 1), (2**40, 2**40), (300, 2)):
        out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=False,
                                                window_size=window)
        assert torch.equal(out, full), window


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_sliding_window_paged(device, gen):
    skip_unless_served(device, torch.bfloat16, 64)
    dtype, page_size, pages_per_seq, lens = torch.bfloat16, 64, 6, [10, 200, 383]
    batch, max_len = len(lens), page_size * pages_per_seq
    k_cache, v_cache = _make_cache(batch, max_len, 2, 64, 64, lens, dtype, device, gen)
    block_table = torch.randperm(batch * pages_per_seq, generator=gen).view(batch, pages_per_seq).to(torch.int32)
    k_paged = _to_paged(k_cache, page_size, block_table, batch * pages_per_seq)
    v_paged = _to_paged(v_cache, page_size, block_table, batch * pages_per_seq)
    q = randn((batch, 1, 4, 64), dtype, device, gen)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out_c = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, window_size=(70, 0))
    out_p = flash_ext.flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=seqlens,
                                              block_table=block_table.to(device), window_size=(70, 0))
    torch.testing.assert_close(out_p, out_c, atol=0, rtol=0)
    ref, _ = decode_reference(q, k_cache, v_cache, lens, 0, True, window=(70, 0))
    assert_matches_reference(out_p, ref, dtype, _torch_decode(q, k_cache, v_cache, lens, 0, True, window=(70, 0)))


def _to_paged(cache, page_size, block_table, num_pages, poison=math.nan):
    batch, max_len = cache.shape[:2]
    paged = torch.full((num_pages, page_size, *cache.shape[2:]), poison, dtype=cache.dtype, device=cache.device)
    for b in range(batch):
        for i in range(max_len // page_size):
            paged[block_table[b, i]] = cache[b, i * page_size:(i + 1) * page_size]
    return paged


def _from_paged(paged, block_table, max_len):
    page_size = paged.shape[1]
    return torch.stack([torch.cat([paged[block_table[b, i]] for i in range(max_len // page_size)])
                        for b in range(block_table.shape[0])])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("append", [False, True])
def test_kvcache_paged_equals_contiguous(append, page_size, dtype, device, gen):
    skip_unless_served(device, dtype, 32)
    batch, heads, kv_heads, dim, pages_per_seq = 3, 4, 2, 32, 4
    max_len = page_size * pages_per_seq
    new_len = 2 if append else 0
    lens = [0, page_size - 1 - new_len + 1, max_len - new_len]  # empty, page boundary, full
    q_len = 2
    k_cache, v_cache = _make_cache(batch, max_len, kv_heads, dim, dim, lens, dtype, device, gen)
    num_pages = batch * pages_per_seq + 3  # spare pages, poisoned, never referenced
    perm = torch.randperm(num_pages, generator=gen)[: batch * pages_per_seq]
    block_table = perm.view(batch, pages_per_seq).to(torch.int32).to(device)
    k_paged = _to_paged(k_cache, page_size, block_table.cpu(), num_pages)
    v_paged = _to_paged(v_cache, page_size, block_table.cpu(), num_pages)
    q = randn((batch, q_len, heads, dim), dtype, device, gen)
    k_new = v_new = None
    if append:
        k_new = randn((batch, new_len, kv_heads, dim), dtype, device, gen)
        v_new = randn((batch, new_len, kv_heads, dim), dtype, device, gen)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    spare_before = k_paged[[p for p in range(num_pages) if p not in set(perm.tolist())]].clone()

    out_c, lse_c = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                                     return_lse=True)
    out_p, lse_p = flash_ext.flash_attn_with_kvcache(q, k_paged, v_paged, k_new, v_new, cache_seqlens=seqlens,
                                                     block_table=block_table, return_lse=True)
    torch.testing.assert_close(out_p, out_c, atol=0, rtol=0)
    torch.testing.assert_close(lse_p, lse_c, atol=0, rtol=0)
    # appended rows landed in the right pages, and unreferenced pages are untouched
    torch.testing.assert_close(_from_paged(k_paged, block_table.cpu(), max_len), k_cache, atol=0, rtol=0,
                               equal_nan=True)
    torch.testing.assert_close(_from_paged(v_paged, block_table.cpu(), max_len), v_cache, atol=0, rtol=0,
                               equal_nan=True)
    spare_after = k_paged[[p for p in range(num_pages) if p not in set(perm.tolist())]]
    torch.testing.assert_close(spare_after, spare_before, atol=0, rtol=0, equal_nan=True)
    # and both equal the reference
    ref, _ = decode_reference(q, k_cache, v_cache, lens, new_len, True)
    torch_out = _torch_decode(q, k_cache, v_cache, lens, new_len, True) if dtype in LOW_PRECISION else None
    assert_matches_reference(out_p, ref, dtype, torch_out)


@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_kvcache_paged_num_splits(num_splits, gen):
    page_size, pages_per_seq, batch = 16, 5, 2
    lens = [33, 79]
    k_cache, v_cache = _make_cache(batch, page_size * pages_per_seq, 1, 8, 8, lens, torch.float64, "cpu", gen)
    num_pages = batch * pages_per_seq
    block_table = torch.randperm(num_pages, generator=gen).view(batch, pages_per_seq).to(torch.int32)
    k_paged = _to_paged(k_cache, page_size, block_table, num_pages)
    v_paged = _to_paged(v_cache, page_size, block_table, num_pages)
    q = randn((batch, 3, 4, 8), gen=gen)
    k_new, v_new = randn((batch, 1, 1, 8), gen=gen), randn((batch, 1, 1, 8), gen=gen)
    out = flash_ext.flash_attn_with_kvcache(q, k_paged, v_paged, k_new, v_new,
                                            cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                            block_table=block_table, num_splits=num_splits)
    k_exp, v_exp = _expected_cache(k_cache, k_new, lens), _expected_cache(v_cache, v_new, lens)
    ref, _ = decode_reference(q, k_exp, v_exp, lens, 1, True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_kvcache_successive_decode_steps_match_prefill(gen):
    """Decoding token by token with append equals causal attention over the
    whole sequence (flash_attn_func)."""
    b, n, h, d = 2, 12, 2, 16
    q, k, v = (randn((b, n, h, d), gen=gen) for _ in range(3))
    k_cache = torch.full((b, n, h, d), math.nan, dtype=torch.float64)
    v_cache = torch.full((b, n, h, d), math.nan, dtype=torch.float64)
    outs = []
    for t in range(n):
        lens = torch.full((b,), t, dtype=torch.int32)
        outs.append(flash_ext.flash_attn_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1],
                                                      v[:, t:t + 1], cache_seqlens=lens))
    torch.testing.assert_close(k_cache, k, atol=0, rtol=0)
    full = flash_ext.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-12, rtol=1e-12)
