// Attention backward, Hopper family (sm_90a). Three launches, as sm80's:
//   1. per query row, D = rowsum(dO * O) and lse in log2 units, both into
//      float32 arrays padded to whole query tiles (bwd_preprocess_kernel), so
//      the main kernel loads a tile of each with one bulk copy;
//   2. one block per (key tile, batch * kv_head): warp group 0 is the
//      producer (one thread: TMA of K and V once, then Q + lse and dO + D of
//      every query tile of every query head of the GQA group through two
//      kStages-deep pipelines); consumer group w owns keys [64 w, 64 w + 64)
//      of the tile and computes, per query tile,
//        S^T = K Q^T, dP^T = V dO^T                 (wgmma, operands in smem)
//        P^T = exp2(S^T scale log2(e) - lse), dS^T = P^T (dP^T - D)
//        dV += P^T dO                               (wgmma, A from registers)
//      then writes dS^T to shared memory, and after a barrier of both groups
//      computes its half of dQ = dS K (with 80-row query tiles, its half of
//      the head dims of dQ^T = K^T dS^T: wgmma tiles are 64 rows), then
//      dK += dS^T Q (A from registers); it adds dQ to the float32 dq
//      accumulator with bulk reduce-adds (cp.reduce.async.bulk) from shared
//      memory while dK runs;
//      dK, dV stay in registers until the end. At d = 256
//      (BwdTraits::kSplitDims) both groups share 64 keys: each computes S^T,
//      dP^T for half the queries, leaves P^T and dS^T in shared memory, and
//      owns half of the head dims of dV, dK (A from shared memory) and dQ,
//      which it adds with vector atomics from registers;
//   3. dq = scale * dq_accum in the input dtype (convert_dq_sm90_kernel).
// dq_accum has sm80's size and row layout (dq_workspace, dense or varlen),
// but each query tile's kBlockM x kHeadDim floats are stored in
// dq_tile_offset's order (the order of the consumer threads'
// accumulators), not row-major.
// Varlen (packed) batches, kVarlen: as the forward's, the TMA descriptors
// span the packed tensors and a tile starts at its sequence's first row.
#pragma once

// wgmma tiles of any N multiple of 8 (80 queries), before any CuTe header.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cuda_runtime.h>

#include <cutlass/arch/memory.h>

#include <cstdint>

#include "attention_bwd_kernel.cuh"
#include "sm90_fwd_kernel.cuh"
#include "sm90_launch.h"

namespace flash_ext::cuda::sm90 {

using sm80::DqWorkspace;
using sm80::mask_window;

template <class Tr>
struct BwdArgs {
  AttentionBwdParams p;
  DqWorkspace ws;
  int64_t softmax_head_rows;
  TileSchedule order;  // blockIdx.x -> (key tile, batch entry, kv head)
  typename Tr::TmaQ tma_q;
  typename Tr::TmaQ tma_do;
  typename Tr::TmaKV tma_k;
  typename Tr::TmaKV tma_v;
};

// Named barriers: both consumer groups (dS written; at the end, K and V
// read for the last time), and one per group (its dQ or, at the end, its
// part of dK and dV staged).
constexpr uint32_t kDsBarrier = 0;
constexpr uint32_t kDqBarrier = 1;

// Where the pre-pass leaves D and lse: softmax_head_rows rows per head
// (and batch, unless varlen) each, D first.
__host__ __device__ __forceinline__ float* dpsum_ptr(const AttentionBwdParams& p) { return p.softmax_d; }
__host__ __device__ __forceinline__ float* lse_log2_ptr(const AttentionBwdParams& p, int64_t head_rows) {
  return p.softmax_d + (p.cu_seqlens_q != nullptr ? 1 : p.batch) * p.heads * head_rows;
}

// D and lse of every query row of every (sequence, head), and of the rows
// past a sequence's end up to its last whole tile of kTileRows rows (which
// hold the main kernel's query tiles, BwdTraits::kPrepassTileRows): D = 0 and
// lse = +inf there, as in rows without any visible key (lse = -inf), so
// that P = exp2(s - lse) = 0. The same rows of dq_accum are zeroed for the
// main kernel's reduce-adds: whole query tiles, only those some key tile
// adds to (a varlen batch's padding between sequences is left alone, and
// there is no separate memset). kHeadDim / 8 lanes per row, 8 dims each, so
// a warp covers 256 / kHeadDim rows (a memory-bound pass: every lane loads).
template <class Element, int kHeadDim, int kTileRows, bool kVarlen>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(const AttentionBwdParams p, int64_t head_rows,
                                                             const DqWorkspace ws) {
  constexpr int kLanes = kHeadDim / 8, kRowsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x % 32, col = lane % kLanes * 8;
  // (batch, head, row) with rows up to the longest sequence's, padded.
  const int64_t padded = whole_tiles(p.q_len, kTileRows);
  const int64_t rows = p.batch * p.heads * padded;
  float* dpsum = dpsum_ptr(p);
  float* lse_log2 = lse_log2_ptr(p, head_rows);
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  // The loop bound is warp-uniform: every lane takes part in the shuffles.
  for (int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * kRowsPerWarp; first < rows;
       first += warps * kRowsPerWarp) {
    const int64_t row = first + lane / kLanes;
    const int64_t i = row % padded, bh = row / padded;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const bool in_range = row < rows;  // else b may be past the batch
    const SequenceBounds seq = sequence_bounds<kVarlen>(p, in_range ? b : 0);
    const bool valid = in_range && i < seq.q_len;
    float acc = valid && col < p.v_head_dim ? sm80::out_dout_dot8<Element>(p, b, h, seq.q_row0 + i, col) : 0.f;
    CUTE_UNROLL
    for (int s = kLanes / 2; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    const bool in_tiles = in_range && i < whole_tiles(seq.q_len, kTileRows);
    if (in_tiles) {
      // Row i's kHeadDim floats: the rows of a tile together cover its run,
      // whatever order dq_tile_offset keeps inside it.
      float* dq = p.dq_accum + (sm80::dq_accum_row0(kVarlen, p, ws, seq, b, h) + i) * kHeadDim + col;
      reinterpret_cast<float4*>(dq)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      reinterpret_cast<float4*>(dq)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (col == 0 && in_tiles) {
      const float l = valid ? p.lse[h * seq.lse_head_stride + seq.lse_row0 + i] : -INFINITY;
      const int64_t out_row = softmax_row0<kVarlen>(p, head_rows, seq.q_row0, seq.q_len, b, h) + i;
      dpsum[out_row] = acc;
      lse_log2[out_row] = l == -INFINITY ? INFINITY : l * float(M_LOG2E);
    }
  }
}

// gmem[0, bytes) += smem[0, bytes) in float32, by the bulk-copy engine; the
// issuing thread tracks completion with cp.async.bulk.commit_group / wait_group.
// The lines stay in L2 evict-last: every key tile's block adds to them.
__device__ __forceinline__ void bulk_reduce_add(float* gmem, const float* smem, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.L2::cache_hint.add.f32 [%0], [%1], %2, %3;\n"
               :
               : "l"(gmem), "r"(cute::cast_smem_ptr_to_uint(smem)), "r"(bytes),
                 "l"(static_cast<uint64_t>(l2_reused()))
               : "memory");
}

// gmem[0, 4) += {a, b, c, d} in float32, a reduction that returns nothing
// (REDG). atomicAdd(float4*) compiles to the same SASS here, but ptxas
// decides: on session 38's branch, whose blocks also counted themselves
// done through cutlass's GenericBarrier (a release fence), it became a
// returning ATOMG, each add waiting for L2, and the d = 256 backward ran
// 25-30 % slower on an H100.
__device__ __forceinline__ void red_add_f32x4(float* gmem, float a, float b, float c, float d) {
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(gmem), "f"(a), "f"(b), "f"(c),
               "f"(d)
               : "memory");
}

// Where float4 j of consumer thread tid's dQ accumulator (its elements
// 4 j .. 4 j + 3, in the fragment's logical order) lies in a dQ tile: warp
// by warp, and within a warp j-major, so each warp's part (and each
// group's, its four warps') is one contiguous run (one bulk reduce-add) and
// the 16-byte stores of a warp cover 512 consecutive bytes (no bank
// conflicts).
template <class Tr>
__host__ __device__ __forceinline__ int dq_tile_offset(int tid, int j) {
  return (tid / 32) * 32 * Tr::kDqFrag + j * 32 * 4 + (tid % 32) * 4;
}

// kVarlen: p has cu_seqlens; the TMA descriptors span the packed tensors
// (see launch_attention_bwd) and tiles start at their sequence's first row.
// Tiles may reach into the next sequence's rows: its keys are masked as
// the kv_len tail of a dense batch, its queries have lse = +inf (P = 0).
template <class Tr, bool kVarlen>
__global__ void __launch_bounds__(Tr::kNThreads, 1) attention_bwd_sm90_kernel(const __grid_constant__ BwdArgs<Tr> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  const AttentionBwdParams& p = args.p;
  const DqWorkspace& ws = args.ws;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);

  // The block's key tile (args.order: heaviest first under a mask). Varlen:
  // p.kv_len is the longest sequence's; tiles past this one's end exit. In
  // 32-bit multiply-highs (the grid is below 2^31 blocks, launch_1d): 64-bit
  // divisions were ~160 instructions ahead of the loads of the sequence's
  // bounds, on every block of a grid of short blocks.
  const TileCoord place = tile_coord(args.order, static_cast<int>(blockIdx.x));
  const int64_t n_block = place.step, b = place.b, hk = place.h;
  const int64_t group = static_cast<uint32_t>(p.heads) / static_cast<uint32_t>(p.kv_heads);  // (int32 in the TMA descriptors)
  const int64_t n0 = n_block * kBlockN;
  const SequenceBounds seq = sequence_bounds<kVarlen>(p, b);

  // Barriers set up while the bounds load (varlen), before any use of them:
  // a block that exits below has waited on none of them.
  const int warp_group = cutlass::canonical_warp_group_idx();
  using Pipeline = typename Tr::Pipeline;
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Tr::kQStageBytes;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Tr::kNumMmaWG * 128;
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&smem.kv_full, 1);
  Pipeline pipeline_q(smem.pipeline_q, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_do(smem.pipeline_do, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // barriers initialized (fenced by the pipelines) before anyone waits on them

  if (kVarlen && n0 >= seq.kv_len) return;
  const int key_rows = static_cast<int>(seq.kv_len - n0 < kBlockN ? seq.kv_len - n0 : kBlockN);
  const KeyRange qrange = sm80::visible_query_range(seq.window, n0, n0 + key_rows, seq.q_len);
  const int m_block_min = static_cast<int>(qrange.begin / kBlockM);
  const int m_block_max = static_cast<int>(ceil_div64(qrange.end, kBlockM));

  // Rows n0 + r of this sequence; dk_stride[0] is 0 for varlen.
  Element* dk = static_cast<Element*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1] +
                (seq.k_row0 + n0) * p.dk_stride[2];
  Element* dv = static_cast<Element*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1] +
                (seq.k_row0 + n0) * p.dv_stride[2];
  if (m_block_max <= m_block_min) {  // no query sees these keys: dK = dV = 0
    for (int i = threadIdx.x; i < key_rows * p.head_dim; i += Tr::kNThreads) {
      dk[(i / p.head_dim) * p.dk_stride[2] + i % p.head_dim] = Element(0.f);
      dv[(i / p.head_dim) * p.dv_stride[2] + i % p.head_dim] = Element(0.f);
    }
    return;
  }
  // Both roles walk the query tiles of each head of the group in turn.
  const int64_t h_begin = hk * group, h_end = h_begin + group;

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Tr::SmemLayoutKV{});

  if (warp_group == 0) {
    // ---- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x != 0) return;
    // Varlen: one batch entry spanning the packed rows, this sequence's
    // tiles offset by its first row (as the descriptors in launch_attention_bwd).
    const int64_t q_rows = kVarlen ? p.total_q : p.q_len, kv_rows = kVarlen ? p.total_k : p.kv_len;
    const int64_t batch = kVarlen ? 1 : p.batch, tma_b = kVarlen ? 0 : b;
    const auto q_shape = make_shape(int32_t(q_rows), int32_t(p.head_dim), int32_t(p.heads), int32_t(batch));
    const auto kv_shape = make_shape(int32_t(kv_rows), int32_t(p.head_dim), int32_t(p.kv_heads), int32_t(batch));
    const auto q_row0 = make_coord(int32_t(seq.q_row0), _0{}, _0{});
    const auto k_row0 = make_coord(int32_t(seq.k_row0), _0{});
    // (kBlockM, kHeadDim, query tile, head) views, partitioned once.
    Tensor gQ = local_tile(domain_offset(q_row0, args.tma_q.get_tma_tensor(q_shape)(_, _, _, tma_b)),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
    Tensor gdO = local_tile(domain_offset(q_row0, args.tma_do.get_tma_tensor(q_shape)(_, _, _, tma_b)),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
    Tensor gK = local_tile(domain_offset(k_row0, args.tma_k.get_tma_tensor(kv_shape)(_, _, hk, tma_b)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));
    Tensor gV = local_tile(domain_offset(k_row0, args.tma_v.get_tma_tensor(kv_shape)(_, _, hk, tma_b)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));
    auto [tQg, tQs] = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tdOg, tdOs] = tma_partition(args.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
    auto [tKg, tKs] = tma_partition(args.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(args.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.kv_full, Tr::kKVBytes);
    // K and V: read once, by this block; Q and dO: by every key tile's block.
    copy(args.tma_k.with(smem.kv_full, 0, l2_read_once()), tKg, tKs);
    copy(args.tma_v.with(smem.kv_full, 0, l2_read_once()), tVg, tVs);

    auto write = cutlass::make_producer_start_state<Pipeline>();
    // Not unrolled: the producer lives in kProducerRegs registers.
    CUTE_NO_UNROLL
    for (int64_t h = h_begin; h < h_end; ++h) {
      // lse and D of query tile m_block of head h: kBlockM floats at offset m_block * kBlockM.
      const int64_t row0 = softmax_row0<kVarlen>(p, args.softmax_head_rows, seq.q_row0, seq.q_len, b, h);
      const float* lse_log2 = lse_log2_ptr(p, args.softmax_head_rows) + row0;
      const float* dpsum = dpsum_ptr(p) + row0;
      CUTE_NO_UNROLL
      for (int m_block = m_block_min; m_block < m_block_max; ++m_block) {
        pipeline_q.producer_acquire(write);
        uint64_t* q_bar = pipeline_q.producer_get_barrier(write);
        copy(args.tma_q.with(*q_bar, 0, l2_reused()), tQg(_, m_block, h), tQs(_, write.index()));
        SM90_BULK_COPY_G2S::copy(lse_log2 + m_block * kBlockM, q_bar, smem.lse.data() + write.index() * kBlockM,
                                 kBlockM * sizeof(float));
        pipeline_do.producer_acquire(write);
        uint64_t* do_bar = pipeline_do.producer_get_barrier(write);
        copy(args.tma_do.with(*do_bar, 0, l2_reused()), tdOg(_, m_block, h), tdOs(_, write.index()));
        SM90_BULK_COPY_G2S::copy(dpsum + m_block * kBlockM, do_bar, smem.dpsum.data() + write.index() * kBlockM,
                                 kBlockM * sizeof(float));
        ++write;
      }
    }
    return;
  }

  // ---- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int tid = threadIdx.x - 128;
  const int wg = tid / 128;
  typename Tr::TiledMmaSdP mma_sdp;
  typename Tr::TiledMmadKV mma_dkv;
  typename Tr::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);

  Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Tr::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Tr::SmemLayoutQt{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Tr::SmemLayoutKt{});
  Tensor sdS = make_tensor(make_smem_ptr(smem.ds.data()), typename Tr::SmemLayoutdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem.ds.data()), typename Tr::SmemLayoutdSt{});

  // This group's part of each product (see BwdTraits: its keys, or with
  // kSplitDims its queries of S^T, dP^T and its head dims of dK, dV, dQ).
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);      // (MMA, MMA_N, MMA_K, stage)
  Tensor tdPrV = thr_sdp.partition_fragment_A(sV);
  Tensor tdPrdO = thr_sdp.partition_fragment_B(sdO);
  Tensor tdVrdO = thr_dkv.partition_fragment_B(sdOt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tdKrQ = thr_dkv.partition_fragment_B(sQt);
  // dQ = dS K: A = dS (MMA, MMA_M, MMA_K, buffer), B = K; transposed, A = K^T
  // and B = dS.
  auto tdQrdS = [&] {
    if constexpr (Tr::kDqTransposed) return thr_dq.partition_fragment_B(sdS);
    else return thr_dq.partition_fragment_A(sdS);
  }();
  auto tdQrK = [&] {
    if constexpr (Tr::kDqTransposed) return thr_dq.partition_fragment_A(sKt);
    else return thr_dq.partition_fragment_B(sKt);
  }();

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  // S^T-shaped accumulators (dS^T; with kSplitDims also P^T) -> shared
  // memory by stmatrix (8 consecutive queries, or keys with kDqTransposed,
  // are 16 contiguous bytes of dS). CuTe's generic copy compiled to 4-byte
  // generic stores, each with a 64-bit address held in registers across the
  // key loop.
  auto r2s_ds = make_tiled_copy_C(Copy_Atom<typename Tr::StoreAtomdS, Element>{}, mma_sdp);
  auto r2s_ds_thr = r2s_ds.get_thread_slice(tid);
  Tensor tdSsdS = r2s_ds_thr.partition_D(sdSt);  // (CPY, CPY_M, CPY_N, buffer)

  // (key, query) of each S^T accumulator element.
  Tensor coord_st = rowcol(thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{})));
  const float scale_log2 = static_cast<float>(p.scale * M_LOG2E);
  // Lane 0 of each warp (kWarpDqReduce) or thread 0 of each group hands its
  // part of dQ to the bulk-copy engine.
  const bool dq_issuer = Tr::kWarpDqReduce ? tid % 32 == 0 : tid % 128 == 0;
  float* const sdq_group = smem.dq.data() + dq_tile_offset<Tr>(tid - tid % 128, 0);

  // Query tiles [full_first, full_end) see all of this key tile unmasked:
  // two ints tested per query tile, not the window's 64-bit bounds.
  const TileRange full = fully_visible_query_tiles(seq.window, n0, n0 + kBlockN, seq.kv_len, kBlockM);
  const int full_first = int(clamp_row<int64_t>(full.first, m_block_min, m_block_max));
  const int full_end = int(clamp_row<int64_t>(full.end, m_block_min, m_block_max));

  typename Pipeline::PipelineState read;
  cutlass::arch::ClusterTransactionBarrier::wait(&smem.kv_full, 0);
  int buffer = 0;
  for (int64_t h = h_begin; h < h_end; ++h) {
    for (int m_block = m_block_min; m_block < m_block_max; ++m_block, buffer ^= 1) {
      const int64_t m0 = int64_t(m_block) * kBlockM;
      const int stage = read.index();

      pipeline_q.consumer_wait(read);
      Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
      wgmma<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
      pipeline_do.consumer_wait(read);
      Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
      wgmma<true>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);

      // P^T while dP^T is in flight. Query rows past q_len and rows without
      // any visible key have lse = +inf: P = 0.
      warpgroup_wait<1>();
      Tensor s = rowcol(tSrS);
      if (m_block < full_first || m_block >= full_end) {
        mask_window</*kKeysAlongRows=*/true>(s, coord_st, m0, n0, seq.window, seq.kv_len);
      }
      const float* lse = smem.lse.data() + stage * kBlockM;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const float l = lse[get<1>(coord_st(0, ni))];
        CUTE_UNROLL
        for (int mi = 0; mi < size<0>(s); ++mi) s(mi, ni) = exp2f(fmaf(s(mi, ni), scale_log2, -l));
      }
      warpgroup_wait<0>();
      Tensor dp = rowcol(tdPrdP);
      const float* dpsum = smem.dpsum.data() + stage * kBlockM;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(dp); ++ni) {
        const float d = dpsum[get<1>(coord_st(0, ni))];
        CUTE_UNROLL
        for (int mi = 0; mi < size<0>(dp); ++mi) dp(mi, ni) = s(mi, ni) * (dp(mi, ni) - d);
      }

      // The 16-bit P^T and dS^T (keys x queries).
      Tensor rP = convert_to<Element>(tSrS);
      Tensor rdS = convert_to<Element>(tdPrdP);
      if constexpr (Tr::kSplitDims) {
        // Both groups' queries of P^T and dS^T in shared memory, then dV and dK
        // of this group's dims over all of the tile's queries.
        Tensor sPt = make_tensor(make_smem_ptr(smem.p.data()), typename Tr::SmemLayoutdSt{});
        copy(r2s_ds, r2s_ds_thr.retile_S(rP), r2s_ds_thr.partition_D(sPt)(_, _, _, buffer));
        copy(r2s_ds, r2s_ds_thr.retile_S(rdS), tdSsdS(_, _, _, buffer));
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores before wgmma reads them
        cutlass::arch::NamedBarrier::sync(256, kDsBarrier);
        Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);  // (MMA, MMA_M, MMA_K, buffer)
        wgmma<false>(mma_dkv, tdVrPt(_, _, _, buffer), tdVrdO(_, _, _, stage), acc_dv);
      } else {
        // P^T as a wgmma A operand straight from the accumulators.
        Tensor tdVrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
        wgmma<false>(mma_dkv, tdVrP, tdVrdO(_, _, _, stage), acc_dv);
        copy(r2s_ds, r2s_ds_thr.retile_S(rdS), tdSsdS(_, _, _, buffer));
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores before wgmma reads them
        // Both halves of dS in shared memory; and the previous tile's dQ left
        // the staging tile (its issuing threads waited for the bulk reads).
        if (!Tr::kWarpDqReduce && dq_issuer) tma_store_wait<0>();
        cutlass::arch::NamedBarrier::sync(256, kDsBarrier);
      }

      // dQ before dK: batches retire in order, so dQ lands while dK still
      // runs and its reduction (shared memory and a bulk add, or atomics)
      // overlaps this group's dK product rather than following it (+4-6 %
      // at d = 256, ~1 % at d = 128 on an H100, session 14).
      Tensor tdQrdQ = partition_fragment_C(mma_dq, typename Tr::DqTileShape{});
      if constexpr (Tr::kDqTransposed) {
        wgmma<true>(mma_dq, tdQrK, tdQrdS(_, _, _, buffer), tdQrdQ);
      } else {
        wgmma<true>(mma_dq, tdQrdS(_, _, _, buffer), tdQrK, tdQrdQ);
      }
      if constexpr (Tr::kSplitDims) {
        Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
        wgmma<false>(mma_dkv, tdKrdSt(_, _, _, buffer), tdKrQ(_, _, _, stage), acc_dk);
      } else {
        Tensor tdKrdS = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
        wgmma<false>(mma_dkv, tdKrdS, tdKrQ(_, _, _, stage), acc_dk);
      }
      warpgroup_wait<1>();  // dV and dQ done: dO is free
      pipeline_do.consumer_release(read);

      // The tile's kBlockM rows are consecutive in dq_accum (padded to whole
      // tiles), so the tile is one run of kBlockM * kHeadDim floats.
      float* dq_tile = p.dq_accum + (sm80::dq_accum_row0(kVarlen, p, ws, seq, b, h) + m0) * kHeadDim;
      static_assert(decltype(size(tdQrdQ))::value == Tr::kDqFrag);
      if constexpr (Tr::kSplitDims) {
        // Vector reductions from registers: 512 consecutive bytes per warp.
        CUTE_UNROLL
        for (int j = 0; j < Tr::kDqFrag / 4; ++j) {
          red_add_f32x4(dq_tile + dq_tile_offset<Tr>(tid, j), tdQrdQ(4 * j), tdQrdQ(4 * j + 1), tdQrdQ(4 * j + 2),
                        tdQrdQ(4 * j + 3));
        }
      } else if constexpr (Tr::kWarpDqReduce) {
        // Each warp hands its own run to the bulk-copy engine: no wait for
        // the group's other warps. Its lane 0 saw the previous tile's run read.
        if (dq_issuer) tma_store_wait<0>();
        __syncwarp();
        CUTE_UNROLL
        for (int j = 0; j < Tr::kDqFrag / 4; ++j) {
          *reinterpret_cast<float4*>(smem.dq.data() + dq_tile_offset<Tr>(tid, j)) =
              make_float4(tdQrdQ(4 * j), tdQrdQ(4 * j + 1), tdQrdQ(4 * j + 2), tdQrdQ(4 * j + 3));
        }
        cutlass::arch::fence_view_async_shared();  // before the bulk-copy engine reads it
        __syncwarp();
        if (dq_issuer) {
          const int run = dq_tile_offset<Tr>(tid, 0);
          bulk_reduce_add(dq_tile + run, smem.dq.data() + run, 32 * Tr::kDqFrag * sizeof(float));
          tma_store_arrive();
        }
      } else {
        CUTE_UNROLL
        for (int j = 0; j < Tr::kDqFrag / 4; ++j) {
          *reinterpret_cast<float4*>(smem.dq.data() + dq_tile_offset<Tr>(tid, j)) =
              make_float4(tdQrdQ(4 * j), tdQrdQ(4 * j + 1), tdQrdQ(4 * j + 2), tdQrdQ(4 * j + 3));
        }
        cutlass::arch::fence_view_async_shared();  // before the bulk-copy engine reads it
        cutlass::arch::NamedBarrier::sync(128, kDqBarrier + wg);
        if (dq_issuer) {
          bulk_reduce_add(dq_tile + (sdq_group - smem.dq.data()), sdq_group, 128 * Tr::kDqFrag * sizeof(float));
          tma_store_arrive();
        }
      }
      warpgroup_wait<0>();  // dK done: Q and this dS buffer are free
      pipeline_q.consumer_release(read);
      ++read;
    }
  }

  // dK = scale * dS^T Q and dV leave through shared memory (K, V once both
  // groups are past their last reads of them), then 16-byte row stores.
  CUTE_UNROLL
  for (int e = 0; e < size(acc_dk); ++e) acc_dk(e) *= static_cast<float>(p.scale);
  cutlass::arch::NamedBarrier::sync(256, kDsBarrier);
  auto r2s_kv = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_dkv);
  auto r2s_kv_thr = r2s_kv.get_thread_slice(tid);
  Tensor dk_elem = convert_to<Element>(acc_dk);
  Tensor dv_elem = convert_to<Element>(acc_dv);
  copy(r2s_kv, r2s_kv_thr.retile_S(dk_elem), r2s_kv_thr.partition_D(sK));
  copy(r2s_kv, r2s_kv_thr.retile_S(dv_elem), r2s_kv_thr.partition_D(sV));
  cutlass::arch::NamedBarrier::sync(128, kDqBarrier + wg);  // this group's part staged
  // A group's part: its 64 key rows, or with kSplitDims its head dims.
  constexpr int kRows = Tr::kSplitDims ? kBlockN : 64, kChunks = Tr::kdKVCols / 8;
  const int row0 = Tr::kSplitDims ? 0 : wg * 64, col0 = Tr::kSplitDims ? wg * Tr::kdKVCols : 0;
  for (int i = tid % 128; i < kRows * kChunks; i += 128) {
    const int r = row0 + i / kChunks, c = col0 + (i % kChunks) * 8;
    if (r < key_rows && c < p.head_dim) {
      uint4 dk_chunk, dv_chunk;  // shared-memory loads (a generic pointer compiled to generic ones)
      cutlass::arch::shared_load<16>(&dk_chunk, cast_smem_ptr_to_uint(&sK(r, c)));
      cutlass::arch::shared_load<16>(&dv_chunk, cast_smem_ptr_to_uint(&sV(r, c)));
      *reinterpret_cast<uint4*>(dk + r * p.dk_stride[2] + c) = dk_chunk;
      *reinterpret_cast<uint4*>(dv + r * p.dv_stride[2] + c) = dv_chunk;
    }
  }
  // The last dQ reductions complete before the block exits.
  if constexpr (!Tr::kSplitDims) {
    if (dq_issuer) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
#endif
}

// dq = scale * dq_accum in the input dtype, one block per (batch * head,
// query tile) at a time: thread tid reads what consumer thread tid added
// (16-byte loads, coalesced), finds each element's (row, column) as that
// thread's dQ accumulator does and stages the converted tile in shared
// memory, from where whole rows leave in 16-byte stores.
template <class Tr, bool kVarlen>
__global__ void __launch_bounds__(128 * Tr::kNumMmaWG) convert_dq_sm90_kernel(const AttentionBwdParams p,
                                                                              const DqWorkspace ws) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kHeadDim = Tr::kHeadDim, kThreads = 128 * Tr::kNumMmaWG;
  // 16 bytes of padding per row: the 8 rows x 4 column pairs of a warp's
  // staging stores fall into 32 different banks.
  constexpr int kPitch = kHeadDim + 8, kChunks = kHeadDim / 8;
  __shared__ __align__(16) Element staged[kBlockM * kPitch];
  const int tid = threadIdx.x;
  typename Tr::TiledMmadQ mma_dq;
  Tensor coord = mma_dq.get_thread_slice(tid).partition_C(make_identity_tensor(typename Tr::DqTileShape{}));
  constexpr int kRowMode = Tr::kDqTransposed ? 1 : 0;  // the query's mode of coord
  static_assert(decltype(size(coord))::value == Tr::kDqFrag);
  const float scale = static_cast<float>(p.scale);
  const int64_t m_blocks = ceil_div64(p.q_len, kBlockM);
  for (int64_t tile = blockIdx.x; tile < p.batch * p.heads * m_blocks; tile += gridDim.x) {
    const int64_t bh = tile / m_blocks, m0 = (tile % m_blocks) * kBlockM;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const SequenceBounds seq = sequence_bounds<kVarlen>(p, b);
    if (m0 >= seq.q_len) continue;  // block-uniform: a varlen tile past its sequence's end
    const float* src = p.dq_accum + (sm80::dq_accum_row0(kVarlen, p, ws, seq, b, h) + m0) * kHeadDim;
    CUTE_UNROLL
    for (int j = 0; j < Tr::kDqFrag / 4; ++j) {
      const float4 v4 = *reinterpret_cast<const float4*>(src + dq_tile_offset<Tr>(tid, j));
      const float v[4] = {v4.x, v4.y, v4.z, v4.w};
      CUTE_UNROLL
      for (int e = 0; e < 4; ++e) {
        staged[get<kRowMode>(coord(4 * j + e)) * kPitch + get<1 - kRowMode>(coord(4 * j + e))] =
            static_cast<Element>(v[e] * scale);
      }
    }
    __syncthreads();
    const int rows = static_cast<int>(seq.q_len - m0 < kBlockM ? seq.q_len - m0 : kBlockM);
    Element* dst = static_cast<Element*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1] +
                   (seq.q_row0 + m0) * p.dq_stride[2];
    for (int i = tid; i < rows * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks * 8;
      if (c < p.head_dim) {
        *reinterpret_cast<uint4*>(dst + r * p.dq_stride[2] + c) = *reinterpret_cast<const uint4*>(&staged[r * kPitch + c]);
      }
    }
    __syncthreads();  // staged read out before the next tile overwrites it
  }
}

// The blocks' order (a TileSchedule of key tiles). Equal key tiles (no mask
// or window) go pair by pair, the pair's tiles running together over its
// Q, dO and dQ rows. Under a mask, in sections of pairs holding about two
// rounds of tiles (BwdTuning::masked_section_rounds * num_sms), so that a
// section's light tiles fill in at its end, and whose Q, dO and dQ
// accumulator rows take at most kL2Bytes (the blocks running at once span
// a section or two, and each pair's rows are read and reduced into by all
// its key tiles).
template <class Tr>
TileSchedule key_tile_order(const AttentionBwdParams& p, int n_blocks) {
  constexpr int64_t kL2Bytes = int64_t(32) << 20;
  int64_t section = 1;
  const int64_t rounds = bwd_tuning().masked_section_rounds;
  if (has_window(p.window) && p.num_sms > 0 && rounds > 0) {
    const int64_t q_len = p.q_len > 0 ? p.q_len : 1;
    const int64_t row_bytes = Tr::kHeadDim * int64_t(2 * sizeof(typename Tr::Element) + sizeof(float)) +
                              2 * int64_t(sizeof(float));  // Q, dO, dQ accumulator; lse, D
    const int64_t pair_bytes = (p.heads / p.kv_heads) * q_len * row_bytes;
    const int64_t fit = pair_bytes < kL2Bytes ? kL2Bytes / pair_bytes : 1;
    const int64_t filling = ceil_div64(rounds * p.num_sms, n_blocks);
    section = filling < fit ? filling : fit;
  }
  const int64_t pairs = p.batch * p.kv_heads;
  const bool left_window_only = p.window.window_left >= 0 && p.window.window_right < 0;
  return make_tile_schedule(n_blocks, static_cast<int>(p.kv_heads), static_cast<int>(pairs),
                            static_cast<int>(section < pairs ? section : pairs), left_window_only);
}

// kVarlen: the Q, dO, K and V descriptors span the packed (total, dim,
// heads) tensors as one batch entry (their batch strides are 0); the
// dispatch guarantees total_q, total_k > 0.
template <class Tr, bool kVarlen>
void launch_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Element = typename Tr::Element;
  const DqWorkspace ws = sm80::dq_workspace(p, Tr::kHeadDim, Tr::kBlockM);
  static_assert(128 % Tr::kBlockM == 0 || Tr::kBlockM == kTallQueryTileRows,
                "query tiles must not reach past padded_query_rows");
  const int64_t head_rows = softmax_head_rows(p);
  const int64_t rows = p.batch * p.heads * whole_tiles(p.q_len, Tr::kPrepassTileRows);
  if (rows > 0) {
    const int64_t rows_per_block = 8 * (256 / Tr::kHeadDim);  // 8 warps
    bwd_preprocess_kernel<Element, Tr::kHeadDim, Tr::kPrepassTileRows, kVarlen>
        <<<grid_stride_blocks(ceil_div64(rows, rows_per_block)), 256, 0, stream>>>(p, head_rows, ws);
    sm80::launch_checked("sm90 backward pre-pass kernel", cudaGetLastError());
  }
  const int64_t n_blocks = ceil_div64(p.kv_len, Tr::kBlockN);
  const int64_t blocks = n_blocks * p.batch * p.kv_heads;
  if (blocks > 0) {  // before building TMA descriptors of empty tensors
    using TileQ = Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>;
    using TileKV = Shape<Int<Tr::kBlockN>, Int<Tr::kHeadDim>>;
    const auto smem_q = take<0, 2>(typename Tr::SmemLayoutQ{});
    const int64_t q_rows = kVarlen ? p.total_q : p.q_len, kv_rows = kVarlen ? p.total_k : p.kv_len;
    const int64_t batch = kVarlen ? 1 : p.batch;
    BwdArgs<Tr> args{
        p, ws, head_rows, key_tile_order<Tr>(p, static_cast<int>(n_blocks)),
        make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Tr>(p.q, q_rows, p.head_dim, p.heads, batch, p.q_stride),
                      smem_q, TileQ{}, _1{}),
        make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Tr>(p.dout, q_rows, p.head_dim, p.heads, batch, p.do_stride),
                      smem_q, TileQ{}, _1{}),
        make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Tr>(p.k, kv_rows, p.head_dim, p.kv_heads, batch, p.k_stride),
                      typename Tr::SmemLayoutKV{}, TileKV{}, _1{}),
        make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Tr>(p.v, kv_rows, p.head_dim, p.kv_heads, batch, p.v_stride),
                      typename Tr::SmemLayoutKV{}, TileKV{}, _1{})};
    launch_1d("attention backward (sm90", Tr::kHeadDim, attention_bwd_sm90_kernel<Tr, kVarlen>, blocks,
              Tr::kNThreads, Tr::kSmemBytes, stream, args);
  }
  const int64_t tiles = p.batch * p.heads * ceil_div64(p.q_len, Tr::kBlockM);
  if (tiles > 0) {
    convert_dq_sm90_kernel<Tr, kVarlen><<<grid_stride_blocks(tiles), 128 * Tr::kNumMmaWG, 0, stream>>>(p, ws);
    sm80::launch_checked("sm90 dq conversion kernel", cudaGetLastError());
  }
}

}  // namespace flash_ext::cuda::sm90
