// Attention backward, sm80 family (FlashAttention-2). Three launches:
//   1. D = rowsum(dO * O) per query row (softmax_d);
//   2. one block per (key tile, batch * kv_head): K and V stay in shared memory
//      while the block walks the query tiles of every query head of its GQA
//      group, recomputing P = exp(S - lse); dK and dV accumulate in registers
//      (so GQA sums need no atomics), dQ goes to a float32 workspace with
//      atomicAdd, in key-tile order per query tile when deterministic;
//   3. dq = scale * dq_accum in the input dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bwd_workspace.h"
#include "common/mask.h"
#include "common/params.h"
#include "kernel_traits.h"
#include "launch.h"
#include "score_mod.cuh"
#include "tile_utils.cuh"

namespace flash_ext::cuda::sm80 {

// sum(dO * O) over dims [col, col + 8) of query row `row` of (b, h).
template <class Element>
__device__ __forceinline__ float out_dout_dot8(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t row,
                                               int col) {
  const Element* o = static_cast<const Element*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                     row * p.o_stride[2] + col;
  const Element* d = static_cast<const Element*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] +
                     row * p.do_stride[2] + col;
  const uint4 ov = *reinterpret_cast<const uint4*>(o);
  const uint4 dv = *reinterpret_cast<const uint4*>(d);
  const Element* oe = reinterpret_cast<const Element*>(&ov);
  const Element* de = reinterpret_cast<const Element*>(&dv);
  float acc = 0.f;
  CUTE_UNROLL
  for (int e = 0; e < 8; ++e) acc = fmaf(static_cast<float>(oe[e]), static_cast<float>(de[e]), acc);
  return acc;
}

// One element of dbias at `offset` (elements): float32 or the inputs' dtype,
// as the glue allocated it.
template <class Element>
__device__ __forceinline__ void store_dbias(const AttentionBwdParams& p, int64_t offset, float value) {
  if (p.dbias_float) {
    static_cast<float*>(p.dbias)[offset] = value;
  } else {
    static_cast<Element*>(p.dbias)[offset] = static_cast<Element>(value);
  }
}

// D = rowsum(dO * O) of query row `row` of (b, h), by one warp (every lane
// returns it): lanes hold 8 consecutive dims each (up to 256).
template <class Element>
__device__ __forceinline__ float row_dot_out_dout(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t row,
                                                  int lane) {
  float acc = lane * 8 < p.v_head_dim ? out_dout_dot8<Element>(p, b, h, row, lane * 8) : 0.f;
  CUTE_UNROLL
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  return acc;
}

// One warp per row.
template <class Element>
__global__ void __launch_bounds__(256) softmax_d_kernel(const AttentionBwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.heads * p.q_len;
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t i = row % p.q_len, bh = row / p.q_len;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const SequenceBounds seq = sequence_bounds(p, b);
    if (i >= seq.q_len) continue;  // warp-uniform: past a varlen sequence's end
    const float acc = row_dot_out_dout<Element>(p, b, h, seq.q_row0 + i, lane);
    if (lane == 0) p.softmax_d[row] = acc;
  }
}

// dq = scale * dq_accum, 8 dims per thread.
template <class Element>
__global__ void __launch_bounds__(256) convert_dq_kernel(const AttentionBwdParams p, DqWorkspace w) {
  const int64_t chunks = p.head_dim / 8;
  const int64_t total = p.batch * p.heads * p.q_len * chunks;
  const float scale = static_cast<float>(p.scale);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % chunks, row = idx / chunks;
    const int64_t i = row % p.q_len, bh = row / p.q_len;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const SequenceBounds seq = sequence_bounds(p, b);
    if (i >= seq.q_len) continue;
    const float* src = p.dq_accum + (dq_accum_row0(p.cu_seqlens_q != nullptr, p, w, seq, b, h) + i) * w.dims + c * 8;
    const float4 lo = *reinterpret_cast<const float4*>(src);
    const float4 hi = *reinterpret_cast<const float4*>(src + 4);
    const float vals[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    uint4 packed;
    Element* out = reinterpret_cast<Element*>(&packed);
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) out[e] = static_cast<Element>(vals[e] * scale);
    *reinterpret_cast<uint4*>(static_cast<Element*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1] +
                              (seq.q_row0 + i) * p.dq_stride[2] + c * 8) = packed;
  }
}

// Query rows [begin, end) that see any key of [n0, n1) under the window.
__device__ __forceinline__ KeyRange visible_query_range(const VisibilityWindow& w, int64_t n0,
                                                        int64_t n1, int64_t q_len) {
  int64_t begin = 0, end = q_len;
  if (w.window_right >= 0) {
    const int64_t b = n0 - w.diagonal_offset - w.window_right;
    begin = b > 0 ? b : 0;
  }
  if (w.window_left >= 0) {
    const int64_t e = n1 - 1 - w.diagonal_offset + w.window_left + 1;
    end = e < q_len ? e : q_len;
  }
  if (end < begin) end = begin;
  return {begin, end};
}

__device__ __forceinline__ int load_acquire(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// kHasMask: the variant that modifies scores (attn_mask, softcap, ALiBi, each
// checked at run time), so the common path carries none of it. kVarlen: p has
// cu_seqlens (compiled apart so dense batches keep their registers).
template <class Tr, bool kHasMask, bool kDropout, bool kVarlen>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    attention_bwd_kernel(const AttentionBwdParams p, const DqWorkspace ws) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  constexpr int kNThreads = Tr::kNThreads;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;

  const int64_t n_blocks = ceil_div64(p.kv_len, kBlockN);
  const int64_t n_block = int64_t(blockIdx.x) % n_blocks;
  const int64_t bk = int64_t(blockIdx.x) / n_blocks;
  const int64_t b = bk / p.kv_heads, hk = bk % p.kv_heads;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t n0 = n_block * kBlockN;
  // The grid covers the longest sequence; key tiles past a varlen sequence's
  // end exit (no query tile waits on them in deterministic mode).
  const SequenceBounds seq = sequence_bounds<kVarlen>(p, b);
  if (n0 >= seq.kv_len) return;
  const int key_rows = static_cast<int>(seq.kv_len - n0 < kBlockN ? seq.kv_len - n0 : kBlockN);
  const int dims = static_cast<int>(p.head_dim);

  const KeyRange qrange = visible_query_range(seq.window, n0, n0 + key_rows, seq.q_len);
  const int m_block_min = static_cast<int>(qrange.begin / kBlockM);
  const int m_block_max = static_cast<int>(ceil_div64(qrange.end, kBlockM));
  const int m_count = m_block_max > m_block_min ? m_block_max - m_block_min : 0;
  const int steps = static_cast<int>(group) * m_count;

  // dbias of query rows this tile never visits is zero.
  if (p.dbias != nullptr) {
    const int64_t lo = int64_t(m_block_min) * kBlockM;
    const int64_t hi = m_count > 0 ? (int64_t(m_block_max) * kBlockM < seq.q_len ? int64_t(m_block_max) * kBlockM : seq.q_len) : lo;
    const int64_t skipped = seq.q_len - (hi - lo);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t db = b * p.dbias_stride[0] + (hk * group + g) * p.dbias_stride[1];
      for (int64_t e = tid; e < skipped * key_rows; e += kNThreads) {
        int64_t i = e / key_rows;
        i = i < lo ? i : i + (hi - lo);
        store_dbias<Element>(p, db + i * p.dbias_stride[2] + (n0 + e % key_rows) * p.dbias_stride[3], 0.f);
      }
    }
  }

  Element* smem_q = reinterpret_cast<Element*>(smem);
  constexpr int kQElems = kBlockM * kHeadDim;
  Element* smem_do = smem_q + (Tr::kDoubleBufferQ ? 2 : 1) * kQElems;
  Element* smem_k = smem_do + kQElems;
  Element* smem_v = smem_k + kBlockN * kHeadDim;
  Element* smem_p = smem_v + kBlockN * kHeadDim;
  Element* smem_ds = smem_p + kBlockM * kBlockN;

  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Tr::SmemLayoutQdO{});
  Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Tr::SmemLayoutQdOt{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Tr::SmemLayoutQdO{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem_do), typename Tr::SmemLayoutQdOt{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tr::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Tr::SmemLayoutKt{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Tr::SmemLayoutKV{});
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Tr::SmemLayoutPdS{});
  Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Tr::SmemLayoutPdSt{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Tr::SmemLayoutPdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Tr::SmemLayoutPdSt{});

  typename Tr::TiledMmaSdP mma_sdp;
  typename Tr::TiledMmadKV mma_dkv;
  typename Tr::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  if (steps > 0) {
    typename Tr::Gmem::Load g2s;
    auto g2s_thr = g2s.get_thread_slice(tid);
    Tensor cQ = g2s_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor cKV = g2s_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    Tensor tQsQ = g2s_thr.partition_D(sQ);
    Tensor tdOsdO = g2s_thr.partition_D(sdO);
    {
      Tensor gK = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k) + b * p.k_stride[0] +
                                            hk * p.k_stride[1] + (seq.k_row0 + n0) * p.k_stride[2]),
                              Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(p.k_stride[2], _1{}));
      Tensor gV = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v) + b * p.v_stride[0] +
                                            hk * p.v_stride[1] + (seq.k_row0 + n0) * p.v_stride[2]),
                              Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(p.v_stride[2], _1{}));
      Tensor tKsK = g2s_thr.partition_D(sK);
      Tensor tVsV = g2s_thr.partition_D(sV);
      load_tile(g2s, g2s_thr.partition_S(gK), tKsK, cKV, key_rows, dims);
      load_tile(g2s, g2s_thr.partition_S(gV), tVsV, cKV, key_rows, dims);
    }
    // The walk over (head of the group, query tile) is carried as the tile
    // index, bh and the Q / dO source views, advanced by strides (no
    // divisions or 64-bit products live across the loop). A varlen sequence's
    // rows start at seq.q_row0 of every head, so the head step is the same.
    int m_block = m_block_min;
    int64_t bh = b * p.heads + hk * group;
    const int64_t m0_first = int64_t(m_block_min) * kBlockM;
    const int64_t q_row_first = seq.q_row0 + m0_first;
    Tensor tQgQ = g2s_thr.partition_S(make_tensor(
        make_gmem_ptr(static_cast<const Element*>(p.q) + b * p.q_stride[0] + hk * group * p.q_stride[1] + q_row_first * p.q_stride[2]),
        Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_stride[2], _1{})));
    Tensor tdOgdO = g2s_thr.partition_S(make_tensor(
        make_gmem_ptr(static_cast<const Element*>(p.dout) + b * p.do_stride[0] + hk * group * p.do_stride[1] + q_row_first * p.do_stride[2]),
        Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.do_stride[2], _1{})));
    // Element offset from the tile at m_block to the next one of the walk
    // (the first tile of the next head after the last one).
    auto next_offset = [&](int64_t head_stride, int64_t row_stride) {
      return m_block + 1 < m_block_max ? kBlockM * row_stride
                                       : head_stride - int64_t(m_count - 1) * kBlockM * row_stride;
    };
    auto next_rows = [&]() {
      return static_cast<int>(seq.q_len - int64_t(m_block + 1 < m_block_max ? m_block + 1 : m_block_min) * kBlockM);
    };
    load_tile(g2s, tQgQ, tQsQ, cQ, static_cast<int>(seq.q_len - m0_first), dims);
    load_tile(g2s, tdOgdO, tdOsdO, cQ, static_cast<int>(seq.q_len - m0_first), dims);
    cp_async_commit();

    // S = Q K^T and dP = dO V^T
    Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);
    Tensor tSrK = thr_sdp.partition_fragment_B(sK);
    Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
    Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
    auto s2r_sdp_a = make_tiled_copy_A(Copy_Atom<LdsmAtomN, Element>{}, mma_sdp);
    auto s2r_sdp_a_thr = s2r_sdp_a.get_thread_slice(tid);
    auto s2r_sdp_b = make_tiled_copy_B(Copy_Atom<LdsmAtomN, Element>{}, mma_sdp);
    auto s2r_sdp_b_thr = s2r_sdp_b.get_thread_slice(tid);
    Tensor tSsQ = s2r_sdp_a_thr.partition_S(sQ);
    Tensor tdPsdO = s2r_sdp_a_thr.partition_S(sdO);
    Tensor tSsK = s2r_sdp_b_thr.partition_S(sK);
    Tensor tdPsV = s2r_sdp_b_thr.partition_S(sV);
    // P and dS into shared memory
    auto r2s_pds = make_tiled_copy_C(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>{}, mma_sdp);
    auto r2s_pds_thr = r2s_pds.get_thread_slice(tid);
    Tensor tPsP = r2s_pds_thr.partition_D(sP);
    Tensor tdSsdS = r2s_pds_thr.partition_D(sdS);
    // dV += P^T dO, dK += dS^T Q
    Tensor tdVrPt = thr_dkv.partition_fragment_A(make_tensor(sPt.data(), typename Tr::SmemLayoutPdStNoSwizzle{}));
    Tensor tdVrdOt = thr_dkv.partition_fragment_B(make_tensor(sdOt.data(), typename Tr::SmemLayoutQdOtNoSwizzle{}));
    Tensor tdKrdSt = thr_dkv.partition_fragment_A(make_tensor(sdSt.data(), typename Tr::SmemLayoutPdStNoSwizzle{}));
    Tensor tdKrQt = thr_dkv.partition_fragment_B(make_tensor(sQt.data(), typename Tr::SmemLayoutQdOtNoSwizzle{}));
    auto s2r_dkv_a = make_tiled_copy_A(Copy_Atom<LdsmAtomT, Element>{}, mma_dkv);
    auto s2r_dkv_a_thr = s2r_dkv_a.get_thread_slice(tid);
    auto s2r_dkv_b = make_tiled_copy_B(Copy_Atom<LdsmAtomT, Element>{}, mma_dkv);
    auto s2r_dkv_b_thr = s2r_dkv_b.get_thread_slice(tid);
    Tensor tdVsPt = s2r_dkv_a_thr.partition_S(sPt);
    Tensor tdKsdSt = s2r_dkv_a_thr.partition_S(sdSt);
    Tensor tdVsdOt = s2r_dkv_b_thr.partition_S(sdOt);
    Tensor tdKsQt = s2r_dkv_b_thr.partition_S(sQt);
    // dQ = dS K
    Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
    Tensor tdQrKt = thr_dq.partition_fragment_B(make_tensor(sKt.data(), typename Tr::SmemLayoutKtNoSwizzle{}));
    auto s2r_dq_a = make_tiled_copy_A(Copy_Atom<LdsmAtomN, Element>{}, mma_dq);
    auto s2r_dq_a_thr = s2r_dq_a.get_thread_slice(tid);
    auto s2r_dq_b = make_tiled_copy_B(Copy_Atom<LdsmAtomT, Element>{}, mma_dq);
    auto s2r_dq_b_thr = s2r_dq_b.get_thread_slice(tid);
    Tensor tdQsdS = s2r_dq_a_thr.partition_S(sdS);
    Tensor tdQsKt = s2r_dq_b_thr.partition_S(sKt);

    Tensor coord_s = rowcol(thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{})));
    Tensor coord_dq = rowcol(thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{})));
    constexpr int kRows = decltype(size<0>(coord_s))::value;

    const float scale_log2 = static_cast<float>(p.scale * M_LOG2E);
    DropoutRng rng{};
    if constexpr (kDropout) rng = resolve_dropout(p.dropout);
    const float keep_scale = kDropout ? 1.f / (1.f - p.dropout.p) : 1.f;
    int* semaphores = reinterpret_cast<int*>(p.dq_accum + ws.floats);
    const int64_t m_blocks_total = ceil_div64(p.q_len, kBlockM);

    for (int step = 0; step < steps; ++step) {
      const int64_t h = bh - b * p.heads;
      const int64_t m0 = int64_t(m_block) * kBlockM;
      const int rows = static_cast<int>(seq.q_len - m0);
      // lse in log2 units (+inf for empty or padding rows so P = 0).
      float lse_log2[kRows];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const int r = get<0>(coord_s(mi, 0));
        const float l = r < rows ? p.lse[h * seq.lse_head_stride + seq.lse_row0 + m0 + r] : -INFINITY;
        lse_log2[mi] = l == -INFINITY ? INFINITY : l * float(M_LOG2E);
      }

      cp_async_wait<0>();
      __syncthreads();  // Q, dO (and at first K, V) landed
      if (Tr::kDoubleBufferQ && step + 1 < steps) {
        Tensor next = make_tensor(tQsQ.data() + ((step + 1) & 1) * kQElems, tQsQ.layout());
        tQgQ.data() = tQgQ.data() + next_offset(p.q_stride[1], p.q_stride[2]);
        load_tile(g2s, tQgQ, next, cQ, next_rows(), dims);
        cp_async_commit();
      }

      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma_sdp, s2r_sdp_a, s2r_sdp_a_thr, s2r_sdp_b, s2r_sdp_b_thr);
      Tensor s = rowcol(acc_s);
      // Score modifications before dP exists: fewer registers live.
      __half2 dtanh[decltype(size(s))::value / 2];  // only the kHasMask variant uses it
      if constexpr (kHasMask) {
        const float slope = alibi_slope(p, b, h);
        if (p.softcap != 0.f || slope != 0.f) {
          apply_score_mods(s, coord_s, make_score_mods(p, slope, seq.window.diagonal_offset), m0, n0, dtanh);
        }
        if (p.mask_kind != MaskKind::kNone) {
          apply_attn_mask<Element>(s, coord_s, make_attn_mask<Element>(p, b, h), m0, n0, seq.q_len, seq.kv_len);
        }
      }
      if (n0 + kBlockN > seq.kv_len || !tile_fully_visible(seq.window, m0, m0 + kBlockM, n0, n0 + kBlockN)) {
        mask_window(s, coord_s, m0, n0, seq.window, seq.kv_len);
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(s); ++ni) s(mi, ni) = exp2f(fmaf(s(mi, ni), scale_log2, -lse_log2[mi]));
      }
      // P before dP = dO V^T (as in FlashAttention-2): lse is dead and D
      // live only through the dP product, where S, dP, dK and dV peak.
      float row_d[kRows];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        row_d[mi] = get<0>(coord_s(mi, 0)) < rows ? p.softmax_d[bh * p.q_len + m0 + get<0>(coord_s(mi, 0))] : 0.f;
      }
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_dp);
      gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma_sdp, s2r_sdp_a, s2r_sdp_a_thr, s2r_sdp_b, s2r_sdp_b_thr);
      Tensor dp = rowcol(acc_dp);
      // dS = P * (dP - D) with dP through the dropout mask; s becomes the
      // dropped, rescaled P that multiplies dO.
      if constexpr (kDropout) {
        for_each_dropout(s, coord_s, rng, static_cast<uint64_t>(bh), m0, n0, [&](int mi, int ni, bool keep) {
          const float pv = s(mi, ni);
          dp(mi, ni) = pv * ((keep ? dp(mi, ni) * keep_scale : 0.f) - row_d[mi]);
          s(mi, ni) = keep ? pv * keep_scale : 0.f;
        });
      } else {
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) {
          CUTE_UNROLL
          for (int ni = 0; ni < size<1>(s); ++ni) dp(mi, ni) = s(mi, ni) * (dp(mi, ni) - row_d[mi]);
        }
      }
      if (kHasMask && p.dbias != nullptr) {  // dbias is the gradient of an additive attn_mask
        const int64_t db = b * p.dbias_stride[0] + h * p.dbias_stride[1];
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) {
          const int64_t i = m0 + get<0>(coord_s(mi, 0));
          if (i >= seq.q_len) continue;
          CUTE_UNROLL
          for (int ni = 0; ni < size<1>(s); ++ni) {
            const int64_t j = n0 + get<1>(coord_s(0, ni));
            if (j < seq.kv_len) store_dbias<Element>(p, db + i * p.dbias_stride[2] + j * p.dbias_stride[3], dp(mi, ni));
          }
        }
      }
      // dS so far is w.r.t. the capped score; through the cap it picks up 1 - tanh^2.
      if constexpr (kHasMask) {
        if (p.softcap != 0.f) {
          CUTE_UNROLL
          for (int e = 0; e < size(dp); e += 2) {
            const float2 f = __half22float2(dtanh[e / 2]);
            dp(e) *= f.x;
            dp(e + 1) *= f.y;
          }
        }
      }

      {
        Tensor p_el = convert_to<Element>(acc_s);
        Tensor ds_el = convert_to<Element>(acc_dp);
        copy(r2s_pds, r2s_pds_thr.retile_S(p_el), tPsP);
        copy(r2s_pds, r2s_pds_thr.retile_S(ds_el), tdSsdS);
      }
      __syncthreads();  // P, dS visible to all warps

      gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, mma_dkv, s2r_dkv_a, s2r_dkv_a_thr, s2r_dkv_b, s2r_dkv_b_thr);
      gemm_ss(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt, mma_dkv, s2r_dkv_a, s2r_dkv_a_thr, s2r_dkv_b, s2r_dkv_b_thr);
      // dQ last, so its accumulator is live only until the atomics and not
      // next to dK and dV through their products.
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      clear(acc_dq);
      gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, s2r_dq_a, s2r_dq_a_thr, s2r_dq_b, s2r_dq_b_thr);

      int* sem = nullptr;
      if (p.deterministic) {
        // Key tiles add into a query tile in increasing order; lower tiles have
        // lower block ids, so they were scheduled first and cannot wait on us.
        sem = semaphores + bh * m_blocks_total + m_block;
        const int rows_end = static_cast<int>(m0 + kBlockM < seq.q_len ? kBlockM : seq.q_len - m0);
        const int64_t first_n = visible_key_range(seq.window, m0, m0 + rows_end, seq.kv_len).begin / kBlockN;
        if (tid == 0) {
          while (load_acquire(sem) != static_cast<int>(n_block - first_n)) {
          }
          __threadfence();
        }
        __syncthreads();
      }
      {
        // ws.dims == kHeadDim: compile-time row offsets fold into the atomics.
        float* dq = p.dq_accum + (dq_accum_row0(kVarlen, p, ws, seq, b, h) + m0) * kHeadDim;
        Tensor acc = rowcol(acc_dq);
        CUTE_UNROLL
        for (int mi = 0; mi < size<0>(acc); ++mi) {
          float* row = dq + get<0>(coord_dq(mi, 0)) * kHeadDim;
          CUTE_UNROLL
          for (int ni = 0; ni < size<1>(acc); ++ni) atomicAdd(row + get<1>(coord_dq(0, ni)), acc(mi, ni));
        }
      }
      if (p.deterministic) {
        __threadfence();
        __syncthreads();
        if (tid == 0) atomicAdd(sem, 1);
      }

      // Move the Q views to the buffer of the next step.
      if constexpr (Tr::kDoubleBufferQ) {
        const int delta = (step & 1) ? -kQElems : kQElems;
        tSsQ.data() = tSsQ.data() + delta;
        tdKsQt.data() = tdKsQt.data() + delta;
      }
      __syncthreads();  // every warp is done with dO, P, dS (and a single Q buffer)
      if (step + 1 < steps) {
        const int rows_next = next_rows();
        if constexpr (!Tr::kDoubleBufferQ) {
          tQgQ.data() = tQgQ.data() + next_offset(p.q_stride[1], p.q_stride[2]);
          load_tile(g2s, tQgQ, tQsQ, cQ, rows_next, dims);
        }
        tdOgdO.data() = tdOgdO.data() + next_offset(p.do_stride[1], p.do_stride[2]);
        load_tile(g2s, tdOgdO, tdOsdO, cQ, rows_next, dims);
        cp_async_commit();
      }
      if (m_block + 1 < m_block_max) {
        ++m_block;
      } else {
        m_block = m_block_min;
        ++bh;
      }
    }
  }

  // dK = scale * dS^T Q; both tiles leave through shared memory (K, V are dead).
  CUTE_UNROLL
  for (int e = 0; e < size(acc_dk); ++e) acc_dk(e) *= static_cast<float>(p.scale);
  __syncthreads();
  Tensor gdK = make_tensor(make_gmem_ptr(static_cast<Element*>(p.dk) + b * p.dk_stride[0] +
                                         hk * p.dk_stride[1] + (seq.k_row0 + n0) * p.dk_stride[2]),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(p.dk_stride[2], _1{}));
  Tensor gdV = make_tensor(make_gmem_ptr(static_cast<Element*>(p.dv) + b * p.dv_stride[0] +
                                         hk * p.dv_stride[1] + (seq.k_row0 + n0) * p.dv_stride[2]),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(p.dv_stride[2], _1{}));
  store_acc_tile<Element, kNThreads>(acc_dk, mma_dkv, smem_k, typename Tr::SmemLayoutKV{}, gdK, key_rows, dims);
  store_acc_tile<Element, kNThreads>(acc_dv, mma_dkv, smem_v, typename Tr::SmemLayoutKV{}, gdV, key_rows, dims);
}

inline void launch_checked(const char* what, cudaError_t err) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_ext attention backward: ") + what + ": " + cudaGetErrorString(err));
  }
}

template <class Tr, bool kHasMask, bool kDropout, bool kVarlen>
void launch_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Element = typename Tr::Element;
  const DqWorkspace ws = dq_workspace(p, Tr::kHeadDim, Tr::kBlockM);
  const int64_t rows = p.batch * p.heads * p.q_len;
  if (rows > 0) {
    const int64_t blocks = (rows + 7) / 8;
    softmax_d_kernel<Element><<<grid_stride_blocks(blocks), 256, 0, stream>>>(p);
    launch_checked("softmax_d kernel", cudaGetLastError());
  }
  const int64_t n_blocks = ceil_div64(p.kv_len, Tr::kBlockN) * p.batch * p.kv_heads;
  launch_1d("attention backward (sm80", Tr::kHeadDim, attention_bwd_kernel<Tr, kHasMask, kDropout, kVarlen>,
            n_blocks, Tr::kNThreads, Tr::kSmemBytes, stream, p, ws);
  const int64_t chunks = rows * (p.head_dim / 8);
  if (chunks > 0) {
    const int64_t blocks = (chunks + 255) / 256;
    convert_dq_kernel<Element><<<grid_stride_blocks(blocks), 256, 0, stream>>>(p, ws);
    launch_checked("dq conversion kernel", cudaGetLastError());
  }
}

}  // namespace flash_ext::cuda::sm80
