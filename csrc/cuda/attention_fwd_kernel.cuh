// Attention forward, sm80 family (FlashAttention-2): one block per (query
// tile, batch*head). K/V tiles stream through shared memory with cp.async
// (K of the next tile loads during softmax and P.V, V during Q.K^T); both
// products run on tensor cores; P stays in registers between them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/mask.h"
#include "common/params.h"
#include "kernel_traits.h"
#include "launch.h"
#include "score_mod.cuh"
#include "softmax.cuh"
#include "tile_utils.cuh"

namespace flash_ext::cuda::sm80 {

// kHasMask: the variant that modifies scores (attn_mask, softcap, ALiBi, each
// checked at run time), so the common path carries none of it. kVarlen: p has
// cu_seqlens (compiled apart so dense batches keep their registers).
template <class Tr, bool kHasMask, bool kDropout, bool kVarlen>
__global__ void __launch_bounds__(Tr::kNThreads, 1) attention_fwd_kernel(const AttentionFwdParams p) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;

  if (p.dropout.rng_state != nullptr && blockIdx.x == 0 && tid == 0) {
    const DropoutRng rng = resolve_dropout(p.dropout);
    p.dropout.rng_state[0] = static_cast<int64_t>(rng.seed);
    p.dropout.rng_state[1] = static_cast<int64_t>(rng.offset);
  }

  // Heaviest (last, under a causal mask) query tiles first. The grid covers
  // the longest sequence; tiles past a varlen sequence's end exit.
  const int64_t m_blocks = ceil_div64(p.q_len, kBlockM);
  const int64_t m_block = m_blocks - 1 - int64_t(blockIdx.x) % m_blocks;
  const int64_t bh = int64_t(blockIdx.x) / m_blocks;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const int64_t m0 = m_block * kBlockM;
  const SequenceBounds seq = sequence_bounds<kVarlen>(p, b);
  if (m0 >= seq.q_len) return;
  const int rows = static_cast<int>(seq.q_len - m0 < kBlockM ? seq.q_len - m0 : kBlockM);
  const int dims = static_cast<int>(p.head_dim);

  Tensor gO = make_tensor(
      make_gmem_ptr(static_cast<Element*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                    (seq.q_row0 + m0) * p.o_stride[2]),
      Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.o_stride[2], _1{}));
  float* lse_out = p.lse + h * seq.lse_head_stride + seq.lse_row0 + m0;

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor acc_o_rc = rowcol(acc_o);
  // (row, col) of each accumulator element within the tile.
  Tensor coord_s = rowcol(thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{})));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  float lse[kRows];

  const KeyRange keys = visible_key_range(seq.window, m0, m0 + rows, seq.kv_len);
  const int n_block_min = static_cast<int>(keys.begin / kBlockN);
  const int n_block_max = static_cast<int>(ceil_div64(keys.end, kBlockN));

  Element* sQ_ptr = reinterpret_cast<Element*>(smem);
  if (n_block_max <= n_block_min) {  // no visible key: out = 0, lse = -inf
    clear(acc_o);
    store_acc_tile<Element, Tr::kNThreads>(acc_o, mma, sQ_ptr, typename Tr::SmemLayoutQ{}, gO, rows, dims);
    for (int r = tid; r < rows; r += Tr::kNThreads) lse_out[r] = -INFINITY;
    return;
  }

  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Tr::SmemLayoutVtNoSwizzle{});

  Tensor gQ = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                    (seq.q_row0 + m0) * p.q_stride[2]),
      Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_stride[2], _1{}));
  // (kBlockN, kHeadDim, key tile)
  const int64_t n_blocks = ceil_div64(seq.kv_len, kBlockN);
  Tensor gK = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] +
                    seq.k_row0 * p.k_stride[2]),
      make_shape(Int<kBlockN>{}, Int<kHeadDim>{}, n_blocks),
      make_stride(p.k_stride[2], _1{}, p.k_stride[2] * kBlockN));
  Tensor gV = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] +
                    seq.k_row0 * p.v_stride[2]),
      make_shape(Int<kBlockN>{}, Int<kHeadDim>{}, n_blocks),
      make_stride(p.v_stride[2], _1{}, p.v_stride[2] * kBlockN));

  typename Tr::Gmem::Load g2s;
  auto g2s_thr = g2s.get_thread_slice(tid);
  Tensor tQgQ = g2s_thr.partition_S(gQ);
  Tensor tQsQ = g2s_thr.partition_D(sQ);
  Tensor tKgK = g2s_thr.partition_S(gK);
  Tensor tKsK = g2s_thr.partition_D(sK);
  Tensor tVgV = g2s_thr.partition_S(gV);
  Tensor tVsV = g2s_thr.partition_D(sV);
  Tensor tQcQ = g2s_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVc = g2s_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  auto kv_rows = [&](int n) { return static_cast<int>(seq.kv_len - int64_t(n) * kBlockN); };

  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  auto s2r_q = make_tiled_copy_A(Copy_Atom<LdsmAtomN, Element>{}, mma);
  auto s2r_q_thr = s2r_q.get_thread_slice(tid);
  Tensor tSsQ = s2r_q_thr.partition_S(sQ);
  auto s2r_k = make_tiled_copy_B(Copy_Atom<LdsmAtomN, Element>{}, mma);
  auto s2r_k_thr = s2r_k.get_thread_slice(tid);
  Tensor tSsK = s2r_k_thr.partition_S(sK);
  auto s2r_v = make_tiled_copy_B(Copy_Atom<LdsmAtomT, Element>{}, mma);
  auto s2r_v_thr = s2r_v.get_thread_slice(tid);
  Tensor tOsVt = s2r_v_thr.partition_S(sVt);

  // Walk key tiles from the last: the tiles needing masks come first.
  int n = n_block_max - 1;
  load_tile(g2s, tQgQ, tQsQ, tQcQ, rows, dims);
  load_tile(g2s, tKgK(_, _, _, n), tKsK, tKVc, kv_rows(n), dims);
  cp_async_commit();

  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = static_cast<float>(p.scale * M_LOG2E);
  AttnMask attn_mask{};
  float slope = 0.f;
  if constexpr (kHasMask) {
    attn_mask = make_attn_mask<Element>(p, b, h);
    slope = alibi_slope(p, b, h);
  }
  DropoutRng rng{};
  if constexpr (kDropout) rng = resolve_dropout(p.dropout);

  OnlineSoftmax<kRows> softmax;
  clear(acc_o);
  for (bool first = true; n >= n_block_min; --n, first = false) {
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K(n) landed; every warp is done with V(n+1)
    load_tile(g2s, tVgV(_, _, _, n), tVsV, tKVc, kv_rows(n), dims);
    cp_async_commit();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, s2r_q, s2r_q_thr, s2r_k, s2r_k_thr);

    Tensor s = rowcol(acc_s);
    const int64_t n0 = int64_t(n) * kBlockN;
    if constexpr (kHasMask) {
      if (p.softcap != 0.f || slope != 0.f) {
        apply_score_mods(s, coord_s, make_score_mods(p, slope, seq.window.diagonal_offset), m0, n0);
      }
      if (attn_mask.kind != MaskKind::kNone) {
        apply_attn_mask<Element>(s, coord_s, attn_mask, m0, n0, seq.q_len, seq.kv_len);
      }
    }
    if (n0 + kBlockN > seq.kv_len || !tile_fully_visible(seq.window, m0, m0 + kBlockM, n0, n0 + kBlockN)) {
      mask_window(s, coord_s, m0, n0, seq.window, seq.kv_len);
    }

    cp_async_wait<0>();
    __syncthreads();  // V(n) landed; every warp is done with K(n)
    if (n > n_block_min) {
      load_tile(g2s, tKgK(_, _, _, n - 1), tKsK, tKVc, kv_rows(n - 1), dims);
      cp_async_commit();
    }

    if (first) {
      softmax.template update<true>(s, acc_o_rc, scale_log2);
    } else {
      softmax.template update<false>(s, acc_o_rc, scale_log2);
    }
    if constexpr (kDropout) {
      for_each_dropout(s, coord_s, rng, static_cast<uint64_t>(bh), m0, n0,
                       [&](int mi, int ni, bool keep) { if (!keep) s(mi, ni) = 0.f; });
    }

    Tensor p_reg = convert_to<Element>(acc_s);
    Tensor tOrP = make_tensor(p_reg.data(), acc_to_a_layout(p_reg.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, mma, s2r_v, s2r_v_thr);
  }

  const float out_scale = kDropout ? 1.f / (1.f - p.dropout.p) : 1.f;
  softmax.finalize(acc_o_rc, scale, out_scale, lse);

  __syncthreads();  // sQ is reused to stage O
  store_acc_tile<Element, Tr::kNThreads>(acc_o, mma, sQ_ptr, typename Tr::SmemLayoutQ{}, gO, rows, dims);
  if (get<1>(coord_s(0, 0)) == 0) {  // one lane of each quad holds the row
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int r = get<0>(coord_s(mi, 0));
      if (r < rows) lse_out[r] = lse[mi];
    }
  }
}

template <class Tr, bool kHasMask, bool kDropout, bool kVarlen>
void launch_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  launch_1d("attention forward (sm80", Tr::kHeadDim, attention_fwd_kernel<Tr, kHasMask, kDropout, kVarlen>,
            ceil_div64(p.q_len, Tr::kBlockM) * p.batch * p.heads, Tr::kNThreads, Tr::kSmemBytes, stream, p);
}

}  // namespace flash_ext::cuda::sm80
