// Split-KV decoding attention kernel. One thread block serves one
// (sequence, kv head, split, row block): the whole GQA group's query rows
// (heads x new tokens, packed as the M dimension of m16n8k16 tensor-core
// tiles) against a contiguous run of 64-key tiles, so every K/V byte is read
// from memory once per group. K/V tiles stream through a multi-stage cp.async
// pipeline into swizzled shared memory; warps split the rows and/or the keys
// of a tile, each keeping its own online softmax, and are merged at the end.
// New keys (k_new/v_new) are read straight from their tensors and written
// into the cache by the block that owns their tile, so append and attention
// are one kernel.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>

#include "../softcap.cuh"
#include "kvcache_combine.cuh"
#include "kvcache_device.cuh"
#include "kvcache_launch.cuh"

namespace flash_ext::cuda::kvcache {

template <int kHeadDim, int kWarpsM, int kWarpsN>
struct Tile {
  static_assert(kWarpsM * kWarpsN * 32 == kThreads, "four warps");
  static constexpr int kBlockM = 16 * kWarpsM;           // packed query rows per block
  static constexpr int kWarpKeys = kBlockN / kWarpsN;    // keys of a tile per warp
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kChunks = kHeadDim / 8;           // 16-byte chunks per row
  static constexpr int kTileBytes = kBlockN * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;     // K and V
  static constexpr int kQBytes = kBlockM * kRowBytes;
  // Loader: a row's chunks spread over up to 16 threads (256 contiguous bytes
  // per half-warp); each thread then walks rows.
  static constexpr int kThreadsPerRow = kChunks < 16 ? kChunks : 16;
  static constexpr int kChunksPerThread = kChunks / kThreadsPerRow;
  static constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  static constexpr int kPasses = kBlockN / kRowsPerPass;
  // Epilogue: per-warp (max, sum) and float32 outputs, rows padded by 8
  // floats so a quad's float2 stores of 8 rows hit distinct banks.
  static constexpr int kOStride = kHeadDim + 8;
  static constexpr int kEpilogueBytes = kWarpsN * kBlockM * (2 + kOStride) * 4;
  // Beyond d=128 the O accumulators take 128 registers: Q stays in shared
  // memory and is re-read per tile instead of being held as fragments.
  static constexpr bool kQInRegs = kHeadDim <= 128;

  static_assert(kWarpKeys % 16 == 0, "a warp's keys form whole k16 steps");
  static_assert(kChunks >= 8 && kChunks % kThreadsPerRow == 0, "swizzle needs >= 8 chunks");
  static_assert(kBlockN % kRowsPerPass == 0, "whole loader passes");
  static_assert(kEpilogueBytes <= 2 * kStageBytes, "epilogue fits in two stages");
};

// Byte offset of 16-byte chunk `chunk` of row `row`: XOR-swizzled so the 8
// rows an ldmatrix reads at one logical chunk land in 8 different bank groups.
__device__ __forceinline__ int swizzle(int row, int chunk, int row_bytes) {
  return row * row_bytes + ((chunk ^ (row & 7)) << 4);
}

// The swizzle only permutes chunks within aligned groups of 8, so the
// fragment loads of k16 step j of a fixed row need 4 offsets in registers
// (chunk 2j + half, j mod 4) plus a compile-time 128-byte step per 4 steps.
struct SwizzledRow {
  uint32_t off[4];
  __device__ __forceinline__ SwizzledRow(int row, int half, int row_bytes) {
#pragma unroll
    for (int j = 0; j < 4; ++j) off[j] = swizzle(row, 2 * j + half, row_bytes);
  }
  __device__ __forceinline__ uint32_t operator()(int step) const { return off[step & 3] + (step >> 2) * 128; }
};

template <typename T, int kHeadDim, int kWarpsM, int kWarpsN>
__global__ void __launch_bounds__(kThreads, 2)
    attention_kernel(const __grid_constant__ KernelArgs args) {
  using Cfg = Tile<kHeadDim, kWarpsM, kWarpsN>;
  constexpr int kRowBytes = Cfg::kRowBytes;
  constexpr float kNegInf = -INFINITY;
  const KVCacheParams& p = args.p;
  extern __shared__ __align__(128) unsigned char smem[];

  // Grid (sequence x kv head, split, row block): no division by m_blocks.
  const int split = blockIdx.y, mb = blockIdx.z, bk = blockIdx.x;
  const int b = static_cast<int>(args.kv_heads_div.div(static_cast<uint32_t>(bk)));
  const int kvh = bk - b * static_cast<int>(p.kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int q_len = static_cast<int>(p.q_len), head_dim = static_cast<int>(p.head_dim);
  const int new_len = static_cast<int>(p.new_len), num_splits = static_cast<int>(p.num_splits);
  const int row0 = mb * Cfg::kBlockM;
  const int rows_here = min(Cfg::kBlockM, args.rows - row0);
  const int64_t rows_total = p.batch * p.heads * q_len;

  // Packed row m is token m % q_len of the group's head m / q_len (divided
  // by a multiply-high: these indices are on every path, and a division by a
  // run-time int is some twenty instructions).
  const auto head_of = [&](int m) { return static_cast<int>(args.q_div.div(static_cast<uint32_t>(m))); };
  const auto token_of = [&](int m) { return m - head_of(m) * q_len; };
  // (batch, head, token) index of packed row r.
  const auto out_row = [&](int r) -> int64_t {
    const int m = row0 + r;
    return (static_cast<int64_t>(b) * p.heads + kvh * args.group + head_of(m)) * q_len + token_of(m);
  };
  const auto out_ptr = [&](int r) -> T* {
    const int m = row0 + r;
    return static_cast<T*>(p.out) + b * p.o_stride[0] + (kvh * args.group + head_of(m)) * p.o_stride[1] +
           token_of(m) * p.o_stride[2];
  };

  unsigned char* s_q = smem;
  unsigned char* s_kv = smem + Cfg::kQBytes;

  // Fused combine: once its partials are out, a block counts itself in; the
  // group's last split merges every split's partials for its rows.
  __shared__ int is_last_split;
  const auto combine_if_last = [&]() {
    if (num_splits == 1 || p.split_counters == nullptr) return;
    __threadfence();  // this block's partials reach L2 before it is counted
    __syncthreads();
    if (tid == 0) {
      int* counter = p.split_counters + bk * args.m_blocks + mb;
      const bool last = atomicAdd(counter, 1) == num_splits - 1;
      if (last) *counter = 0;  // ready for the next call (and CUDA-graph replay)
      is_last_split = last;
    }
    __syncthreads();
    if (!is_last_split) return;
    __threadfence();  // the other splits' partials, counted before us, are visible
    for (int r = warp; r < rows_here; r += kThreads / 32) combine_row<T>(p, out_row(r), lane);
  };

  // Cluster merge: every split leaves its normalized rows (float, s_o's first
  // slab) and their lse (s_lse) in its own shared memory; after a cluster
  // barrier the group's blocks merge them together, each taking every
  // num_splits-th (row, 8-column chunk), reading the peers' shared memory.
  __shared__ float s_lse[Cfg::kBlockM];
  float* s_o = reinterpret_cast<float*>(s_kv) + 2 * kWarpsN * Cfg::kBlockM;  // epilogue: [kWarpsN][kBlockM][kOStride]
  const auto cluster_merge = [&]() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every split's rows are in its shared memory
    const int chunks = head_dim / 8;
    for (int i = tid * num_splits + split; i < rows_here * chunks; i += kThreads * num_splits) {
      const int r = i / chunks, c = i % chunks;
      float lse_s[kMaxClusterSplits];
      float max_lse = kNegInf;
#pragma unroll
      for (int sp = 0; sp < kMaxClusterSplits; ++sp) {
        lse_s[sp] = sp < num_splits ? cluster.map_shared_rank(s_lse, sp)[r] : kNegInf;
        max_lse = fmaxf(max_lse, lse_s[sp]);
      }
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      float sum = 0.f;
      if (max_lse != kNegInf) {
#pragma unroll
        for (int sp = 0; sp < kMaxClusterSplits; ++sp) {
          // A split without visible keys wrote no rows: skipped, never multiplied.
          if (lse_s[sp] == kNegInf) continue;
          const float w = expf(lse_s[sp] - max_lse);
          const float* src = cluster.map_shared_rank(s_o, sp) + r * Cfg::kOStride + c * 8;
          const float4 lo = *reinterpret_cast<const float4*>(src);
          const float4 hi = *reinterpret_cast<const float4*>(src + 4);
          sum += w;
          acc[0] += w * lo.x; acc[1] += w * lo.y; acc[2] += w * lo.z; acc[3] += w * lo.w;
          acc[4] += w * hi.x; acc[5] += w * hi.y; acc[6] += w * hi.z; acc[7] += w * hi.w;
        }
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      *reinterpret_cast<uint4*>(out_ptr(r) + c * 8) =
          make_uint4(Element<T>::pack(acc[0] * inv, acc[1] * inv), Element<T>::pack(acc[2] * inv, acc[3] * inv),
                     Element<T>::pack(acc[4] * inv, acc[5] * inv), Element<T>::pack(acc[6] * inv, acc[7] * inv));
      if (c == 0) p.lse[out_row(r)] = max_lse == kNegInf ? kNegInf : max_lse + logf(sum);
    }
    cluster.sync();  // no block leaves while a peer may still read its shared memory
#else
    __trap();  // the host launches clusters on sm_90 only
#endif
  };

  grid_dependency_wait();  // q, cache and lengths may come from the previous kernel

  // Q first: it does not depend on the length, so its latency overlaps the
  // length's. It joins the first cp.async group.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
    for (int i = tid; i < Cfg::kBlockM * Cfg::kChunks; i += kThreads) {
      const int r = i / Cfg::kChunks, c = i % Cfg::kChunks, m = row0 + r;
      const bool valid = r < rows_here && c * 8 < head_dim;
      const T* src = valid ? q + (kvh * args.group + head_of(m)) * p.q_stride[1] + token_of(m) * p.q_stride[2] + c * 8
                           : q;
      cp_async_16(smem_addr(s_q + swizzle(r, c, kRowBytes)), src, valid);
    }
  }

  // This split's tiles: the tiles some new token may see, dealt evenly over
  // the splits on the device, so the grid depends only on shapes (CUDA
  // graphs). A left window starts them at the first token's edge, but never
  // past the appended keys, which the blocks that load them also store.
  const int seqlen = p.cache_seqlens[b];
  const int total = seqlen + new_len;
  const int window_left = static_cast<int>(p.window_left), window_right = static_cast<int>(p.window_right);
  const int first_tile = window_left < 0 ? 0 : max(0, min(total - q_len - window_left, seqlen)) / kBlockN;
  const int end_tile = (total + kBlockN - 1) / kBlockN;
  const int per_split = (end_tile - first_tile + num_splits - 1) / num_splits;
  const int t_begin = first_tile + split * per_split;
  const int t_end = min(end_tile, t_begin + per_split);

  // A split without keys (t_begin >= t_end) runs no tile and leaves the
  // epilogue a -inf max: alone (an empty sequence) it writes out = 0 and
  // lse = -inf; among splits, its -inf partial lse tells the merge to skip it.
  // No separate exit, so the merges are compiled once.

  const T* k_cache = static_cast<const T*>(p.k_cache) + kvh * p.k_cache_stride[1];
  const T* v_cache = static_cast<const T*>(p.v_cache) + kvh * p.v_cache_stride[1];
  const T* k_new = new_len > 0 ? static_cast<const T*>(p.k_new) + b * p.k_new_stride[0] + kvh * p.k_new_stride[1]
                               : nullptr;
  const T* v_new = new_len > 0 ? static_cast<const T*>(p.v_new) + b * p.v_new_stride[0] + kvh * p.v_new_stride[1]
                               : nullptr;
  const int ld_row = tid / Cfg::kThreadsPerRow, ld_chunk = tid % Cfg::kThreadsPerRow;

  // Element offsets of cache row `key` in K and V (paged: via the block table).
  const auto cache_offsets = [&](int key, int64_t& k_off, int64_t& v_off) {
    int64_t slot = b;
    int row = key;
    if (p.block_table != nullptr) {
      const int page = static_cast<int>(args.page_div.div(static_cast<uint32_t>(key)));
      row = key - page * static_cast<int>(args.page_div.divisor);
      slot = p.block_table[b * p.block_table_stride + page];
    }
    k_off = slot * p.k_cache_stride[0] + row * p.k_cache_stride[2];
    v_off = slot * p.v_cache_stride[0] + row * p.v_cache_stride[2];
  };

  // Where a tile's cache rows start: its sequence's slot (the batch index, or
  // with pages that hold whole tiles the tile's page from the block table)
  // and the tile's first row in it. The main loop reads the block table one
  // tile ahead, so no cp.async waits on that lookup. Smaller pages are looked
  // up per row.
  const bool whole_tile_pages = p.block_table != nullptr && args.page_div.divisor % kBlockN == 0;
  const auto tile_slot = [&](int tile) -> int {
    if (!whole_tile_pages) return b;
    // Past the sequence's cached keys there is no page to read.
    const int page = static_cast<int>(args.page_div.div(static_cast<uint32_t>(tile * kBlockN)));
    return tile * kBlockN < seqlen ? p.block_table[b * p.block_table_stride + page] : 0;
  };

  const auto load_tile = [&](int tile, int slot, unsigned char* stage) {
    const uint32_t s_k = smem_addr(stage), s_v = s_k + Cfg::kTileBytes;
    const int tile_key0 = tile * kBlockN;
    const int tile_row0 =
        whole_tile_pages ? tile_key0 - static_cast<int>(args.page_div.div(tile_key0) * args.page_div.divisor)
                         : tile_key0;
    const T* k_tile = k_cache + slot * p.k_cache_stride[0] + tile_row0 * p.k_cache_stride[2];
    const T* v_tile = v_cache + slot * p.v_cache_stride[0] + tile_row0 * p.v_cache_stride[2];
    if (tile_key0 + kBlockN <= seqlen && (p.block_table == nullptr || whole_tile_pages)) {
      // Every row cached, at a fixed stride: one address per thread, then
      // fixed steps (the per-row cases below cost ~50 instructions a pass).
      const T* k_src = k_tile + ld_row * p.k_cache_stride[2];
      const T* v_src = v_tile + ld_row * p.v_cache_stride[2];
      const int64_t k_step = Cfg::kRowsPerPass * p.k_cache_stride[2];
      const int64_t v_step = Cfg::kRowsPerPass * p.v_cache_stride[2];
#pragma unroll
      for (int pass = 0; pass < Cfg::kPasses; ++pass, k_src += k_step, v_src += v_step) {
        const int r = pass * Cfg::kRowsPerPass + ld_row;
#pragma unroll
        for (int cc = 0; cc < Cfg::kChunksPerThread; ++cc) {
          const int c = ld_chunk + cc * Cfg::kThreadsPerRow;
          const int off = swizzle(r, c, kRowBytes);
          cp_async_16(s_k + off, k_src + c * 8, c * 8 < head_dim);
          cp_async_16(s_v + off, v_src + c * 8, c * 8 < head_dim);
        }
      }
      return;
    }
#pragma unroll
    for (int pass = 0; pass < Cfg::kPasses; ++pass) {
      const int r = pass * Cfg::kRowsPerPass + ld_row, key = tile_key0 + r;
      const T* k_src = k_cache;
      const T* v_src = v_cache;
      if (key < seqlen) {
        if (p.block_table == nullptr || whole_tile_pages) {
          k_src = k_tile + r * p.k_cache_stride[2];
          v_src = v_tile + r * p.v_cache_stride[2];
        } else {
          int64_t k_off, v_off;
          cache_offsets(key, k_off, v_off);
          k_src += k_off;
          v_src += v_off;
        }
      } else if (key < total) {  // appended now: not in the cache yet
        k_src = k_new + (key - seqlen) * p.k_new_stride[2];
        v_src = v_new + (key - seqlen) * p.v_new_stride[2];
      }
#pragma unroll
      for (int cc = 0; cc < Cfg::kChunksPerThread; ++cc) {
        const int c = ld_chunk + cc * Cfg::kThreadsPerRow;
        const bool valid = key < total && c * 8 < head_dim;
        const int off = swizzle(r, c, kRowBytes);
        cp_async_16(s_k + off, k_src + c * 8, valid);
        cp_async_16(s_v + off, v_src + c * 8, valid);
      }
    }
  };

  // Appended rows of a landed tile go into the cache. Only row block 0 writes;
  // no block reads these rows from the cache, so there is no race.
  const auto store_appended = [&](int tile, const unsigned char* stage) {
#pragma unroll
    for (int pass = 0; pass < Cfg::kPasses; ++pass) {
      const int r = pass * Cfg::kRowsPerPass + ld_row, key = tile * kBlockN + r;
      if (key < seqlen || key >= total) continue;
      int64_t k_off, v_off;
      cache_offsets(key, k_off, v_off);
      T* k_dst = const_cast<T*>(k_cache) + k_off;
      T* v_dst = const_cast<T*>(v_cache) + v_off;
#pragma unroll
      for (int cc = 0; cc < Cfg::kChunksPerThread; ++cc) {
        const int c = ld_chunk + cc * Cfg::kThreadsPerRow;
        if (c * 8 >= head_dim) continue;
        const int off = swizzle(r, c, kRowBytes);
        *reinterpret_cast<uint4*>(k_dst + c * 8) = *reinterpret_cast<const uint4*>(stage + off);
        *reinterpret_cast<uint4*>(v_dst + c * 8) =
            *reinterpret_cast<const uint4*>(stage + Cfg::kTileBytes + off);
      }
    }
  };

  // Pipeline prologue: Q joins the first group.
  const int stages = args.stages;
  for (int i = 0; i < stages - 1; ++i) {
    if (t_begin + i < t_end) load_tile(t_begin + i, tile_slot(t_begin + i), s_kv + i * Cfg::kStageBytes);
    cp_async_commit();
  }
  int next_slot = t_begin + stages - 1 < t_end ? tile_slot(t_begin + stages - 1) : 0;

  // ---- per-warp state -----------------------------------------------------
  // ldmatrix row addresses: lane l feeds row l % 8 of 8x8 matrix l / 8.
  const uint32_t q_base = smem_addr(s_q);
  const SwizzledRow q_row(wm * 16 + (lane & 15), lane >> 4, kRowBytes);
  const SwizzledRow k_row(wn * Cfg::kWarpKeys + ((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1, kRowBytes);
  const SwizzledRow v_row(wn * Cfg::kWarpKeys + (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, kRowBytes);
  const auto load_q_frag = [&](int ks, uint32_t (&a)[4]) { ldmatrix_x4(a, q_base + q_row(ks)); };
  uint32_t q_frag[Cfg::kQInRegs ? kHeadDim / 16 : 1][4];
  cp_async_wait_pending(stages - 2);
  __syncthreads();
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) load_q_frag(ks, q_frag[ks]);
  }

  // Each thread holds rows ra = lane/4 and rb = ra + 8 of its warp's m16 tile.
  const int ra = wm * 16 + (lane >> 2), rb = ra + 8;
  // A row's own position among the keys (bottom-right alignment).
  const auto row_pos = [&](int r) { return total - q_len + token_of(row0 + r); };
  // A row's visible keys: [pos - window_left, pos + window_right] within
  // [0, total) (window_right = 0: causal). common/mask.h's visible_key_range
  // in 32 bits: through it (64-bit) the d = 64 and d = 256 kernels spilled.
  const auto last_key = [&](int r) {
    return window_right < 0 ? total - 1 : min(total - 1, row_pos(r) + window_right);
  };
  const auto first_key = [&](int r) { return window_left < 0 ? 0 : row_pos(r) - window_left; };
  const int last_a = last_key(ra), last_b = last_key(rb);
  const int first_a = first_key(ra), first_b = first_key(rb);
  // Over every row: keys from here on may be past some row's last key, keys
  // before the other bound before some row's first.
  const int right_masked_from = (window_right < 0 ? total - 1 : min(total - 1, total - q_len + window_right)) + 1;
  const int left_masked_below = window_left < 0 ? 0 : total - 1 - window_left;
  const float scale_log2 = args.scale_log2;
  const bool mods = args.tanh_in != 0.f || p.alibi_slopes != nullptr;
  // ALiBi slope of a row over the scale (scores are unscaled); padding rows get 0.
  const auto alibi_slope = [&](int r) {
    const int m = row0 + r;
    return p.alibi_slopes != nullptr && m < args.rows
               ? p.alibi_slopes[b * p.alibi_batch_stride + kvh * args.group + head_of(m)] * args.inv_scale
               : 0.f;
  };

  float m_run[2] = {kNegInf, kNegInf};  // running max, base-2 scaled
  float l_run[2] = {0.f, 0.f};          // this thread's part of the row sums
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int i = 0; i < kHeadDim / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  // ---- main loop ----------------------------------------------------------
  int stage = 0;
  for (int tile = t_begin; tile < t_end; ++tile) {
    cp_async_wait_pending(stages - 2);
    __syncthreads();  // the tile is visible; the stage read last iteration is free
    const unsigned char* cur = s_kv + stage * Cfg::kStageBytes;
    if (mb == 0 && new_len > 0 && (tile + 1) * kBlockN > seqlen) store_appended(tile, cur);
    const int next_stage = stage == 0 ? stages - 1 : stage - 1;
    if (tile + stages - 1 < t_end) load_tile(tile + stages - 1, next_slot, s_kv + next_stage * Cfg::kStageBytes);
    cp_async_commit();
    if (tile + stages < t_end) next_slot = tile_slot(tile + stages);

    // S = Q K^T over this warp's keys.
    const uint32_t k_base = smem_addr(cur), v_base = k_base + Cfg::kTileBytes;
    float s[Cfg::kWarpKeys / 8][4];
#pragma unroll
    for (int i = 0; i < Cfg::kWarpKeys / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a[4];
      if constexpr (Cfg::kQInRegs) {
        a[0] = q_frag[ks][0], a[1] = q_frag[ks][1], a[2] = q_frag[ks][2], a[3] = q_frag[ks][3];
      } else {
        load_q_frag(ks, a);
      }
#pragma unroll
      for (int np = 0; np < Cfg::kWarpKeys / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_base + k_row(ks) + np * 16 * kRowBytes);
        Element<T>::mma(s[2 * np], a, kb[0], kb[1]);
        Element<T>::mma(s[2 * np + 1], a, kb[2], kb[3]);
      }
    }

    const int key0 = tile * kBlockN + wn * Cfg::kWarpKeys + (lane & 3) * 2;
    // Soft-capping and ALiBi (params.h), on unscaled scores like the plain
    // path's. Row values are rederived per tile so they hold no registers
    // across the loop.
    if (mods) {
      const float slope[2] = {alibi_slope(ra), alibi_slope(rb)};
      const int pos[2] = {row_pos(ra), row_pos(rb)};
#pragma unroll
      for (int nt = 0; nt < Cfg::kWarpKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& v = s[nt][e];
          if (args.tanh_in != 0.f) v = args.tanh_out * tanh_exp2(v * args.tanh_in);
          v -= slope[e >> 1] * fabsf(static_cast<float>(pos[e >> 1] - (key0 + nt * 8 + (e & 1))));
        }
      }
    }
    // Online softmax in base 2; masking only on the sequence's last tiles.
    const bool need_mask = (tile + 1) * kBlockN > right_masked_from || tile * kBlockN < left_masked_below;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < Cfg::kWarpKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * scale_log2;
        const int key = key0 + nt * 8 + (e & 1);
        if (need_mask && (key > (e < 2 ? last_a : last_b) || key < (e < 2 ? first_a : first_b))) v = kNegInf;
        s[nt][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float corr[2], base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      base[i] = mx[i] == kNegInf ? 0.f : mx[i];  // fully masked so far: keep exp2 finite
      corr[i] = exp2f(m_run[i] - base[i]);
      m_run[i] = mx[i];
      l_run[i] *= corr[i];
    }
#pragma unroll
    for (int nt = 0; nt < Cfg::kWarpKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        l_run[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int i = 0; i < kHeadDim / 8; ++i) {
      o[i][0] *= corr[0];
      o[i][1] *= corr[0];
      o[i][2] *= corr[1];
      o[i][3] *= corr[1];
    }

    // O += P V: S's accumulator layout is the A-operand layout of P.
#pragma unroll
    for (int kk = 0; kk < Cfg::kWarpKeys / 16; ++kk) {
      const uint32_t a[4] = {Element<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                             Element<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Element<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Element<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_base + v_row(dp) + kk * 16 * kRowBytes);
        Element<T>::mma(o[2 * dp], a, vb[0], vb[1]);
        Element<T>::mma(o[2 * dp + 1], a, vb[2], vb[3]);
      }
    }
    stage = stage + 1 == stages ? 0 : stage + 1;
  }

  // ---- epilogue: merge the warps that split the keys ------------------------
  allow_dependent_launch();  // the combine kernel may get ready meanwhile
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: reuse them
  float* s_stats = reinterpret_cast<float*>(s_kv);  // [kWarpsN][kBlockM][max, sum]
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  if ((lane & 3) == 0) {
    s_stats[(wn * Cfg::kBlockM + ra) * 2] = m_run[0];
    s_stats[(wn * Cfg::kBlockM + ra) * 2 + 1] = l_run[0];
    s_stats[(wn * Cfg::kBlockM + rb) * 2] = m_run[1];
    s_stats[(wn * Cfg::kBlockM + rb) * 2 + 1] = l_run[1];
  }
  __syncthreads();

  float factor[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = i == 0 ? ra : rb;
    float m_all = kNegInf, l_all = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) m_all = fmaxf(m_all, s_stats[(w * Cfg::kBlockM + r) * 2]);
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) {
      const float m_w = s_stats[(w * Cfg::kBlockM + r) * 2];
      if (m_w != kNegInf) l_all += s_stats[(w * Cfg::kBlockM + r) * 2 + 1] * exp2f(m_w - m_all);
    }
    // l_all >= 1 whenever some key is visible (the maximum contributes 1).
    factor[i] = m_run[i] == kNegInf ? 0.f : exp2f(m_run[i] - m_all) / l_all;
    if (wn == 0 && (lane & 3) == 0 && r < rows_here) {
      const float lse = m_all == kNegInf ? kNegInf : (m_all + log2f(l_all)) * 0.6931471805599453f;
      if (num_splits == 1) {
        p.lse[out_row(r)] = lse;
      } else if (args.cluster_merge) {
        s_lse[r] = lse;
      } else {
        p.lse_partial[split * rows_total + out_row(r)] = lse;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kHeadDim / 8; ++i) {
    const int col = i * 8 + (lane & 3) * 2;
    *reinterpret_cast<float2*>(s_o + (wn * Cfg::kBlockM + ra) * Cfg::kOStride + col) =
        make_float2(o[i][0] * factor[0], o[i][1] * factor[0]);
    *reinterpret_cast<float2*>(s_o + (wn * Cfg::kBlockM + rb) * Cfg::kOStride + col) =
        make_float2(o[i][2] * factor[1], o[i][3] * factor[1]);
  }
  __syncthreads();

  const int chunks = head_dim / 8;
  for (int i = tid; i < rows_here * chunks; i += kThreads) {
    const int r = i / chunks, c = i % chunks;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) {
      const float* src = s_o + (w * Cfg::kBlockM + r) * Cfg::kOStride + c * 8;
      const float4 lo = *reinterpret_cast<const float4*>(src);
      const float4 hi = *reinterpret_cast<const float4*>(src + 4);
      acc[0] += lo.x; acc[1] += lo.y; acc[2] += lo.z; acc[3] += lo.w;
      acc[4] += hi.x; acc[5] += hi.y; acc[6] += hi.z; acc[7] += hi.w;
    }
    if (num_splits == 1) {
      const uint4 packed = make_uint4(Element<T>::pack(acc[0], acc[1]), Element<T>::pack(acc[2], acc[3]),
                                      Element<T>::pack(acc[4], acc[5]), Element<T>::pack(acc[6], acc[7]));
      *reinterpret_cast<uint4*>(out_ptr(r) + c * 8) = packed;
    } else if (args.cluster_merge) {  // into warp 0's slab, which only this thread reads here
      float* dst = s_o + r * Cfg::kOStride + c * 8;
      *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    } else {
      float* dst = p.out_partial + (split * rows_total + out_row(r)) * p.v_head_dim + c * 8;
      *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
  }
  if (args.cluster_merge) {
    cluster_merge();
  } else {
    combine_if_last();
  }
}

template <typename T, int kHeadDim, int kWarpsM, int kWarpsN>
void launch_layout(const KernelArgs& args, bool pdl, cudaStream_t stream) {
  const auto kernel = attention_kernel<T, kHeadDim, kWarpsM, kWarpsN>;
  const int smem = attention_smem_bytes(kHeadDim, warp_layout(args.rows), args.stages);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "raising the attention kernel's shared-memory limit");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(args.p.batch * args.p.kv_heads),
                        static_cast<unsigned>(args.p.num_splits), static_cast<unsigned>(args.m_blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attributes[2] = {};
  unsigned num_attributes = 0;
  if (pdl) {
    attributes[num_attributes].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[num_attributes++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (args.cluster_merge) {  // one cluster per group: its splits, along y
    attributes[num_attributes].id = cudaLaunchAttributeClusterDimension;
    attributes[num_attributes++].val.clusterDim = {1, static_cast<unsigned>(args.p.num_splits), 1};
  }
  config.attrs = attributes;
  config.numAttrs = num_attributes;
  check_cuda(cudaLaunchKernelEx(&config, kernel, args), "launching the split-KV attention kernel");
}

template <typename T, int kHeadDim>
void launch_attention(const KernelArgs& args, bool pdl, cudaStream_t stream) {
  switch (warp_layout(args.rows)) {
    case WarpLayout::k1x4: launch_layout<T, kHeadDim, 1, 4>(args, pdl, stream); break;
    case WarpLayout::k2x2: launch_layout<T, kHeadDim, 2, 2>(args, pdl, stream); break;
    case WarpLayout::k4x1: launch_layout<T, kHeadDim, 4, 1>(args, pdl, stream); break;
  }
}

}  // namespace flash_ext::cuda::kvcache
