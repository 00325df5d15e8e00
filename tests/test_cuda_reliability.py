"""GPU reliability: determinism, concurrency, CUDA graphs, steady-state memory,
long sequences and 64-bit offsets. Skipped without a GPU."""
from __future__ import annotations

import math
import threading

import pytest
import torch

import flash_ext
from conftest import HAS_CUDA, decode_reference, reference_attention

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
DEV = "cuda"


def _qkv(shape_q, shape_kv, dtype=torch.bfloat16, seed=0, requires_grad=False):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(shape_q, generator=gen, device=DEV, dtype=dtype)
    k = torch.randn(shape_kv, generator=gen, device=DEV, dtype=dtype)
    v = torch.randn(shape_kv, generator=gen, device=DEV, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def test_cuda_deterministic_backward_is_bitwise_repeatable():
    q, k, v = _qkv((2, 8, 700, 64), (2, 2, 900, 64), requires_grad=True)
    grad = torch.randn(2, 700, 8, 64, device=DEV, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        out = flash_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                        deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), grad))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


def test_cuda_streams_and_threads_match_serial():
    inputs = [_qkv((2, 4, 300 + 17 * i, 64), (2, 4, 400, 64), seed=i) for i in range(6)]
    serial = [flash_ext.scaled_dot_product_attention(*qkv, is_causal=True) for qkv in inputs]
    torch.cuda.synchronize()
    results: list[torch.Tensor | None] = [None] * len(inputs)

    def work(i: int) -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            results[i] = flash_ext.scaled_dot_product_attention(*inputs[i], is_causal=True)
        stream.synchronize()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(serial, results):
        assert torch.equal(want, got)


def test_cuda_graph_capture_and_replay_prefill():
    q, k, v = _qkv((2, 4, 256, 128), (2, 4, 256, 128), seed=1)
    static_out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    for seed in (2, 3):
        fresh = _qkv((2, 4, 256, 128), (2, 4, 256, 128), seed=seed)
        for dst, src in zip((q, k, v), fresh):
            dst.copy_(src)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_cuda_persistent_forward_graph_replays_and_streams():
    """More tiles than SMs at each head dim, so the Hopper forward's blocks
    take most tiles from its per-call counter: every graph replay and every
    stream's call must count from 0 (bitwise the result of a serial call)."""
    shapes = [(2, 16, 1024, 64), (2, 16, 1152, 128), (2, 8, 1280, 256)]
    inputs = [_qkv(shape, shape, seed=i) for i, shape in enumerate(shapes)]
    serial = [flash_ext.scaled_dot_product_attention(*qkv, is_causal=True) for qkv in inputs]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [flash_ext.scaled_dot_product_attention(*qkv, is_causal=True) for qkv in inputs]
    for _ in range(3):
        for out in captured:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for want, got in zip(serial, captured):
            assert torch.equal(want, got)
    streams = [torch.cuda.Stream() for _ in inputs]
    concurrent = []
    for qkv, stream in zip(inputs, streams):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            concurrent.append(flash_ext.scaled_dot_product_attention(*qkv, is_causal=True))
    torch.cuda.synchronize()
    for want, got in zip(serial, concurrent):
        assert torch.equal(want, got)


def test_cuda_graph_decode_loop_with_varying_lengths():
    batch, heads, kv_heads, dim, max_len = 4, 8, 2, 128, 1024
    k_cache = torch.randn(batch, max_len, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 1, heads, dim, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor([5, 100, 600, 1000], dtype=torch.int32, device=DEV)
    out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=4)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=4)
    for new_lens in ([1, 2, 3, 4], [1000, 0, 512, 77]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=4)
        assert torch.equal(out, want)


def _decode_case(batch, lens, seed, heads=32, kv_heads=8, dim=128, max_len=4096):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    k_cache = torch.randn(batch, max_len, kv_heads, dim, generator=gen, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(batch, max_len, kv_heads, dim, generator=gen, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(batch, 1, heads, dim, generator=gen, device=DEV, dtype=torch.bfloat16)
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device=DEV)


def test_cuda_decode_split_merge_across_streams_and_shapes():
    # The split blocks count themselves in per-stream counters that the last
    # split resets: successive calls with other split counts and batch sizes
    # (which grow the counters), and calls on two streams at once, must all
    # merge correctly.
    cases = [(1, [3000], 0, 32), (3, [0, 4000, 70], 1, 7), (8, [4096] * 8, 2, 0), (2, [1, 2048], 3, 128)]
    inputs = [_decode_case(batch, lens, seed) for batch, lens, seed, _ in cases]
    refs = [decode_reference(q, k, v, lens.tolist(), 0, True)[0] for q, k, v, lens in inputs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for rounds in range(3):
        outs = []
        for i, ((q, k, v, lens), (_, _, _, splits)) in enumerate(zip(inputs, cases)):
            with torch.cuda.stream(streams[(i + rounds) % 2]):
                outs.append(flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, num_splits=splits))
        torch.cuda.synchronize()
        for out, ref, case in zip(outs, refs, cases):
            err = (out.double() - ref).abs().max().item()
            assert err < 2e-2, f"case {case}: max error {err:.3e} against float64"


def test_cuda_decode_tuning_variants_agree(tmp_path):
    # The fused merge (last split) and the separate combine kernel run the
    # same merge code in the same order: bitwise equal outputs. So must every
    # pipeline depth, with or without PDL. Up to 8 splits merge inside a
    # thread-block cluster by default on Hopper (other arithmetic, so within
    # rounding of the separate kernel's merge).
    import os
    import subprocess
    import sys
    script = f"""
import torch, flash_ext
gen = torch.Generator(device="cuda").manual_seed(0)
k = torch.randn(3, 8192, 8, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
v = torch.randn(3, 8192, 8, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
q = torch.randn(3, 2, 32, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
lens = torch.tensor([8000, 5, 1234], dtype=torch.int32, device="cuda")
outs = [flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True, num_splits=s, return_lse=True)
        for s in (0, 1, 9, 4, 8)]
torch.save([t.cpu() for pair in outs for t in pair], r"{tmp_path}/" + __import__("sys").argv[1] + ".pt")
"""
    variants = {"default": "", "separate": "fused_combine=0,pdl=0,stages=2,cluster_merge=0"}
    for name, tuning in variants.items():
        env = dict(os.environ, FLASH_EXT_DECODE_TUNING=tuning)
        subprocess.run([sys.executable, "-c", script, name], check=True, env=env, timeout=300)
    default, separate = (torch.load(tmp_path / f"{name}.pt") for name in variants)
    # (out, lse) for num_splits 0 (auto), 1 and 9 (no cluster), then 4 and 8.
    for a, b in zip(default[:6], separate[:6]):
        assert torch.equal(a, b)
    for out_a, out_b in zip(default[6::2], separate[6::2]):
        torch.testing.assert_close(out_a.float(), out_b.float(), rtol=1e-2, atol=2e-3)
        assert out_a.float().abs().max() > 0.1, "an all-zero output would compare close to a tiny one"
    for lse_a, lse_b in zip(default[7::2], separate[7::2]):
        torch.testing.assert_close(lse_a, lse_b, rtol=1e-5, atol=1e-5)


def test_cuda_decode_tuning_set_in_process():
    # flash_ext._C._set_decode_tuning (scripts/decode_tuning.py alternates
    # variants with it) replaces the knobs for the next calls: the separate
    # combine kernel merges 9 splits bit for bit as the fused merge does, 4
    # splits within rounding of the cluster merge; a bad spec raises
    # ValueError naming the key and changes nothing; "" restores the defaults.
    q, k, v, lens = _decode_case(2, [4000, 1234], seed=5)
    set_tuning = flash_ext._C._set_decode_tuning

    def calls() -> list[torch.Tensor]:
        return [flash_ext.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, num_splits=s) for s in (9, 4)]

    try:
        set_tuning("")
        fused = calls()
        set_tuning("fused_combine=0,pdl=0,stages=2,cluster_merge=0")
        separate = calls()
        assert torch.equal(fused[0], separate[0])
        torch.testing.assert_close(fused[1].float(), separate[1].float(), rtol=1e-2, atol=2e-3)
        with pytest.raises(ValueError, match="unknown key 'splits'"):
            set_tuning("splits=3")
        assert torch.equal(calls()[0], separate[0])  # still the last good spec
    finally:
        set_tuning("")
    assert all(torch.equal(a, b) for a, b in zip(calls(), fused))


def test_cuda_no_memory_growth_over_10000_calls():
    q, k, v = _qkv((1, 4, 64, 64), (1, 4, 64, 64), requires_grad=True)
    for _ in range(50):
        flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(10_000):
        flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments, "new device allocations"


def test_cuda_decode_steady_state_allocates_no_device_memory():
    batch, heads, kv_heads, dim, max_len = 2, 32, 8, 128, 4096
    k_cache = torch.randn(batch, max_len, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([100, 200], dtype=torch.int32, device=DEV)
    q = torch.randn(batch, 1, heads, dim, device=DEV, dtype=torch.bfloat16)
    k_new = torch.randn(batch, 1, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    for _ in range(10):
        flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens)
        lens += 1
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(500):
        flash_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens)
        lens += 1
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments


@pytest.mark.slow
def _causal_grads_float32(q, k, v, grad, rows: range, chunk: int = 256):
    """Float32 reference of causal attention (one head, top-left) for the
    query rows in ``rows``: their outputs and dq, and the dk, dv of the keys
    in ``rows`` when ``rows`` ends the sequence (those keys are seen by no
    later row). Chunked over rows, so only chunk x kv_len scores exist."""
    q, k, v, grad = (t.float() for t in (q, k, v, grad))
    scale = 1 / math.sqrt(q.shape[-1])
    out, dq = torch.empty(len(rows), q.shape[-1], device=q.device), torch.empty(len(rows), q.shape[-1], device=q.device)
    dk, dv = torch.zeros(len(rows), k.shape[-1], device=q.device), torch.zeros(len(rows), v.shape[-1], device=q.device)
    for a in range(rows.start, rows.stop, chunk):
        b = min(a + chunk, rows.stop)
        s = (q[a:b] @ k[:b].T) * scale
        s.masked_fill_(torch.arange(b, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None],
                       float("-inf"))
        p = torch.softmax(s, -1)
        o = p @ v[:b]
        ds = p * (grad[a:b] @ v[:b].T - (grad[a:b] * o).sum(-1, keepdim=True))
        out[a - rows.start:b - rows.start] = o
        dq[a - rows.start:b - rows.start] = ds @ k[:b] * scale
        keys = slice(rows.start, b)
        dk[: b - rows.start] += ds[:, keys].T @ q[a:b] * scale
        dv[: b - rows.start] += p[:, keys].T @ grad[a:b]
    return out, dq, dk, dv


def _assert_close_scaled(actual, expected, rel=2e-2):
    """Elementwise, with the tolerance scaled to the tensor's largest value."""
    torch.testing.assert_close(actual.float(), expected, rtol=rel, atol=rel * expected.abs().max().item())


def test_cuda_128k_causal_forward_backward_matches_chunked_reference():
    n, dim, tail = 128 * 1024, 128, 1024
    q, k, v = _qkv((1, 1, n, dim), (1, 1, n, dim), seed=5, requires_grad=True)
    out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    args = (q[0, 0].detach(), k[0, 0].detach(), v[0, 0].detach(), grad[0, 0])
    # The last rows: outputs and dq, and dk, dv of the last keys (complete,
    # as no earlier row sees them); rows in the middle: outputs and dq.
    ref_out, ref_dq, ref_dk, ref_dv = _causal_grads_float32(*args, range(n - tail, n))
    _assert_close_scaled(out[0, 0, n - tail:], ref_out)
    _assert_close_scaled(dq[0, 0, n - tail:], ref_dq)
    _assert_close_scaled(dk[0, 0, n - tail:], ref_dk)
    _assert_close_scaled(dv[0, 0, n - tail:], ref_dv)
    for start in (0, 65536 - 100):
        ref_out, ref_dq, _, _ = _causal_grads_float32(*args, range(start, start + 512))
        _assert_close_scaled(out[0, 0, start:start + 512], ref_out)
        _assert_close_scaled(dq[0, 0, start:start + 512], ref_dq)


@pytest.mark.slow
def test_cuda_tensors_past_2_31_elements():
    # q, k, v of 2^31 + 2^24 elements each: offsets need 64 bits.
    heads, n, dim = 33, 2**20 // 16, 1024 // 8
    batch = (2**31 // (heads * n * dim)) + 1
    q, k, v = _qkv((batch, heads, n, dim), (batch, heads, n // 64, dim), seed=6)
    assert q.numel() > 2**31
    out = flash_ext.scaled_dot_product_attention(q, k, v)
    last = (batch - 1, heads - 1)
    ref = reference_attention(q[last][None, None, -4:], k[last][None, None], v[last][None, None])
    torch.testing.assert_close(out[last][None, None, -4:].double(), ref, atol=2e-2, rtol=2e-2)
