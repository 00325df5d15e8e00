// Attention forward, Hopper family (sm_90a), persistent: one block per SM,
// each taking work tiles (query tile, head, batch) in TileSchedule's order:
// tiles of unequal weight (a causal mask or window, varlen) from a global
// counter as it frees up (block b's first tile is tile b), so the blocks
// still finish together; equal ones in a round robin. Warp group 0 is the producer: one thread takes the
// tiles, passes their indices to the consumer groups through a ring in shared
// memory (TileRing), and issues TMA loads of Q and of the K/V tiles into a
// kStages-deep mbarrier pipeline whose state runs on across tiles, so the
// next tile's loads start while the consumers still work on this one's last
// key tiles and epilogue. The other warp groups (64 query rows each) compute
// S = Q K^T and O += P V with wgmma, overlapping inside a warp group the
// softmax of tile n with the products of tiles n-1 (P V) and n+1 (Q K^T),
// and across warp groups taking turns issuing products (named barriers) so
// one group's softmax hides behind the other's tensor-core work.
//
// Varlen (packed) batches, kVarlen: the TMA descriptors span the whole packed
// (total, dim, heads) tensors, and a tile starts at its sequence's first row
// (cu_seqlens). Tiles may reach into the next sequence's rows: its keys are
// masked like the kv_len tail of a dense batch, and its query rows are
// computed but never stored.
#pragma once

// wgmma tiles of any N multiple of 8 (e.g. 176 keys), before any CuTe header.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/memory.h>
#include <cutlass/arch/reg_reconfig.h>

#include <cstdint>

#include "common/mask.h"
#include "common/params.h"
#include "launch.h"
#include "score_mod.cuh"
#include "sm90_kernel_traits.h"
#include "sm90_launch.h"
#include "softmax.cuh"
#include "tile_schedule.h"
#include "tile_utils.cuh"

namespace flash_ext::cuda::sm90 {

using sm80::acc_to_a_layout;
using sm80::ceil_div64;
using sm80::convert_to;
using sm80::mask_window;
using sm80::rowcol;

// One work tile: query rows [m0, m0 + rows) of sequence b, head h, and the key
// tiles [n_block_min, n_block_max) any of them sees. rows <= 0: a varlen tile
// past its sequence's end.
struct QueryTile {
  int m_block, b, h;
  int64_t m0;
  int rows, n_block_min, n_block_max;
  SequenceBounds seq;
};

// Block `rank` of a cluster of kClusterM takes query tile rank of the
// schedule's kClusterM-tile step (TileSchedule counts those steps).
template <int kClusterM>
__device__ __forceinline__ TileCoord cta_tile_coord(const TileSchedule& s, int tile, int rank) {
  TileCoord c = tile_coord(s, tile);
  c.step = c.step * kClusterM + rank;
  return c;
}

// Whether a block's producer and consumers skip tile t: a varlen tile past
// its sequence's end. In a cluster pair only when the pair's first tile is
// past it too: the pair's blocks load each key tile together, so a second
// tile past the end walks the keys beside its partner and stores nothing
// (its rows are <= 0).
template <int kClusterM, int kBlockM, bool kVarlen>
__device__ __forceinline__ bool skips_tile(const QueryTile& t) {
  if constexpr (kVarlen) {
    return t.m0 - (t.m_block % kClusterM) * kBlockM >= t.seq.q_len;
  } else {
    return false;
  }
}

template <int kBlockM, int kBlockN, bool kVarlen>
__device__ __forceinline__ QueryTile query_tile(const AttentionFwdParams& p, const TileCoord& c) {
  QueryTile t;
  t.m_block = c.step;
  t.b = c.b;
  t.h = c.h;
  t.m0 = int64_t(t.m_block) * kBlockM;
  t.seq = sequence_bounds<kVarlen, int32_t>(p, t.b);  // (the dispatch bounds the rows by 2^31)
  t.rows = static_cast<int>(t.seq.q_len - t.m0 < kBlockM ? t.seq.q_len - t.m0 : kBlockM);
  const KeyRange keys = visible_key_range(t.seq.window, t.m0, t.m0 + t.rows, t.seq.kv_len);
  t.n_block_min = static_cast<int>(keys.begin / kBlockN);
  t.n_block_max = static_cast<int>(ceil_div64(keys.end, kBlockN));
  return t;
}

template <class Tr>
struct FwdArgs {
  AttentionFwdParams p;
  TileSchedule schedule;
  typename Tr::TmaQ tma_q;
  typename Tr::TmaKV tma_k;
  typename Tr::TmaKV tma_v;
  typename Tr::TmaO tma_o;  // O (varlen: a sequence's whole 64-row groups; its last rows go row by row)
  // p.scale and p.scale * log2(e) as floats, converted on the host: from the
  // double, the kernel re-converted it in every epilogue (the compiler
  // rematerializes rather than keep a register; the FP64 compare stalled at
  // N = 512 in ncu).
  float scale, scale_log2;
  // Rows keep a running maximum exceeded by at most this (log2 units;
  // FwdTuning::rescale_slack, OnlineSoftmax::fold).
  float max_slack;
  // FwdTuning::o_release_late: the K stage holding O's staging goes back to
  // the producer during the next tile (Tr::kLateOStageRelease; the kernel's
  // release_held_stage).
  bool o_release_late;
  // FwdTuning::fold_ahead: a key tile's exponentials start before its row
  // maxima are known (Tr::kFoldAhead; OnlineSoftmax::fold_ahead).
  bool fold_ahead;
};

// Tile indices from the producer thread to every consumer thread: a ring of
// kSlots indices in shared memory, each slot with a "full" mbarrier (count 1:
// the producer wrote it) and an "empty" one (count: every consumer thread has
// read it). Both sides walk the slots in order, the parity flipping each lap
// as in the K/V pipelines; the mbarriers' arrive (release) and wait (acquire)
// order the index's store before its loads, and the loads before the next
// store to the slot.
template <int kSlots>
struct TileRing {
  uint32_t passed = 0;  // tiles pushed or popped so far: slot and parity

  template <class Smem>
  __device__ __forceinline__ void push(Smem& smem, int tile) {
    cutlass::arch::ClusterBarrier::wait(&smem.tile_empty[slot()], phase() ^ 1);
    smem.tile_index[slot()] = tile;
    cutlass::arch::ClusterBarrier::arrive(&smem.tile_full[slot()]);
    ++passed;
  }
  template <class Smem>
  __device__ __forceinline__ int pop(Smem& smem) {
    cutlass::arch::ClusterBarrier::wait(&smem.tile_full[slot()], phase());
    const int tile = smem.tile_index[slot()];
    cutlass::arch::ClusterBarrier::arrive(&smem.tile_empty[slot()]);
    ++passed;
    return __shfl_sync(0xffffffff, tile, 0);  // warp-uniform for the compiler, as in next_tile
  }
  __device__ __forceinline__ uint32_t slot() const { return passed % kSlots; }
  __device__ __forceinline__ uint32_t phase() const { return passed / kSlots % 2; }
};

// The producer's next tile after `tile`: a block's first is its own
// (blockIdx.x, or its cluster's index); with a counter the rest go to
// whichever block asks first, in the schedule's order, else every grid-th (a
// round robin; grid: blocks or clusters); a grid of one block per tile takes
// no more. The
// shuffle from lane 0, the producer's one thread, to itself tells the
// compiler the index is warp-uniform, as blockIdx.x is: the tile's values
// then stay in uniform registers, where TMA wants its coordinates, not in
// the producer's 24-32 vector registers (which spilled).
// The counter is left at 0 for the next call: every block takes the tiles
// past the first gridDim.x and then one index past the end, so `tiles`
// increments in all, and the block taking the last one resets it (no block
// touches it after that).
__device__ __forceinline__ int next_tile(int* counter, int tile, int tiles, int grid) {
  if (counter == nullptr) return tile + grid;
  int next = tiles;
  if (grid < tiles) {
    const int taken = atomicAdd(counter, 1);
    if (taken == tiles - 1) atomicExch(counter, 0);
    next = grid + taken;
  }
  return __shfl_sync(1u, next, 0);
}

// L2 eviction priorities of TMA loads: evict-first for what a block reads
// once (it should not push out what others still need), evict-last for
// what many blocks read in turn.
__device__ __forceinline__ TMA::CacheHintSm90 l2_read_once() { return TMA::CacheHintSm90::EVICT_FIRST; }
__device__ __forceinline__ TMA::CacheHintSm90 l2_reused() { return TMA::CacheHintSm90::EVICT_LAST; }

// A consumed stage back to the producers: every consumer thread arrives (one
// block); in a cluster pair, lane 0 of a group's warp w for block w, the
// (blocks x groups) arrivals CUTLASS's pipeline counts for a cluster, from
// fixed lanes (the pipeline's own release holds its per-thread choice in
// registers across the key loop). A lane may signal once its warp's wgmma
// batch reading the stage has retired: the batch is the whole group's,
// issued by every warp after its own reads.
template <int kClusterM, class Pipeline>
__device__ __forceinline__ void release_stage(Pipeline& pipeline, typename Pipeline::SharedStorage& storage,
                                              typename Pipeline::PipelineState state) {
  if constexpr (kClusterM == 1) {
    pipeline.consumer_release(state);
  } else {
    const uint32_t warp = threadIdx.x / 32 % 4;
    storage.empty_barrier_[state.index()].arrive(warp, warp < kClusterM && threadIdx.x % 32 == 0);
  }
}

// Named barriers (ids past CUTLASS's reserved ones, 8 left): one per consumer
// warp group for taking turns, one per group for its epilogue, and, where O
// is staged in the K/V stages (two groups), one per group for "the other
// group is done reading them".
constexpr uint32_t kTurnBarrier = 0;
constexpr uint32_t kEpilogueBarrier = 3;
constexpr uint32_t kStagingBarrier = 6;

// A shared-memory tensor whose address the compiler cannot see through:
// wgmma descriptors partitioned from it are rebuilt at each use (a few
// integer instructions) instead of hoisted out of the loops, where they held
// up to ten registers each and the heavy configurations spilled them,
// reloading them from local memory (L2: the shared-memory carve-out leaves
// L1 little room) at every tile.
template <class Layout, class T>
__device__ __forceinline__ auto opaque_smem_tensor(T* ptr, Layout layout) {
  asm volatile("" : "+l"(ptr));
  return make_tensor(make_smem_ptr(ptr), layout);
}

// acc (+)= A * B over the K mode, issued asynchronously as one wgmma batch;
// the caller waits with warpgroup_wait<N>().
template <bool kZeroInit, class Mma, class A, class B, class C>
__device__ __forceinline__ void wgmma(Mma& mma, const A& a, const B& b, C& c) {
  constexpr bool kRegisterA = !is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<A&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<A&>(a));
}

// Consumer warp groups issue their products in turn (round robin), so the
// tensor cores serve one group while the others run their softmax. The turn
// runs on across tiles: group 0 may start its next tile while the last group
// still finishes this one.
template <int kNumMmaWG>
struct Turns {
  int wg;
  // Group 0 goes first, as if the last group had passed it the turn.
  __device__ __forceinline__ void start() const {
    if (wg == kNumMmaWG - 1) cutlass::arch::NamedBarrier::arrive(256, kTurnBarrier);
  }
  __device__ __forceinline__ void wait() const { cutlass::arch::NamedBarrier::sync(256, kTurnBarrier + wg); }
  __device__ __forceinline__ void pass() const {
    cutlass::arch::NamedBarrier::arrive(256, kTurnBarrier + (wg + 1) % kNumMmaWG);
  }
  // Group 0 takes the turn passed after the block's last product (or start's,
  // without any), so no barrier is left half arrived at exit.
  __device__ __forceinline__ void finish() const {
    if (wg == 0) wait();
  }
};

// kVarlen: p has cu_seqlens (compiled apart so dense batches keep every
// bound a params field, see sequence_bounds).
template <class Tr, bool kVarlen>
__global__ void __launch_bounds__(Tr::kNThreads, 1) attention_fwd_sm90_kernel(const __grid_constant__ FwdArgs<Tr> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  constexpr int kNumMmaWG = Tr::kNumMmaWG;
  const AttentionFwdParams& p = args.p;
  const TileSchedule& schedule = args.schedule;
  const int tiles = schedule.tiles();
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Tr::Smem*>(smem_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  // Cluster pairs: both blocks walk the same tiles of the schedule, block
  // `rank` taking query tile rank of each pair.
  constexpr int kClusterM = Tr::kClusterM;
  const auto rank = [] { return kClusterM > 1 ? static_cast<int>(cute::block_rank_in_cluster()) : 0; };
  const int grid = static_cast<int>(gridDim.x) / kClusterM;
  using Pipeline = typename Tr::Pipeline;
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Tr::kKVBytes;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = kNumMmaWG * 128;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kNumMmaWG; ++w) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.q_full[w], 1);
      cutlass::arch::ClusterBarrier::init(&smem.q_empty[w], 128);
    }
    for (int slot = 0; slot < Tr::kTileSlots; ++slot) {
      cutlass::arch::ClusterBarrier::init(&smem.tile_full[slot], 1);
      cutlass::arch::ClusterBarrier::init(&smem.tile_empty[slot], kNumMmaWG * 128);
    }
  }
  // In a cluster, a stage is free once both blocks' consumers release it
  // (each block's loads land in both).
  Pipeline pipeline_k(smem.pipeline_k, pipe_params, typename Tr::ClusterShape{});
  Pipeline pipeline_v(smem.pipeline_v, pipe_params, typename Tr::ClusterShape{});
  // Barriers initialized (fenced by the pipelines) before anyone waits on
  // them, or, in a cluster, before the other block signals or fills them.
  if constexpr (kClusterM > 1) {
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
  } else {
    __syncthreads();
  }

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Tr::SmemLayoutKV{});
  // Every consumer thread sees the tiles the producer announces, in its order,
  // ending with one >= tiles; each side skips the same ones.
  TileRing<Tr::kTileSlots> tile_ring;
  // Varlen: one batch entry spanning the packed rows, a sequence's tiles
  // offset by its first row (as the descriptors in launch_attention_fwd).
  const int64_t batch = kVarlen ? 1 : p.batch;
  // Tile t's head of Q or O (tma_q's or tma_o's tensor) from its sequence's
  // first row: (rows, dim).
  const auto head_rows = [&](const auto& tma, const QueryTile& t) {
    const auto shape = make_shape(int32_t(kVarlen ? p.total_q : p.q_len), int32_t(p.head_dim), int32_t(p.heads),
                                  int32_t(batch));
    return domain_offset(make_coord(int32_t(t.seq.q_row0), _0{}),
                         tma.get_tma_tensor(shape)(_, _, t.h, kVarlen ? 0 : t.b));
  };

  if (warp_group == 0) {
    // ---- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int64_t kv_rows = kVarlen ? p.total_k : p.kv_len;
    const auto kv_shape = make_shape(int32_t(kv_rows), int32_t(p.head_dim), int32_t(p.kv_heads), int32_t(batch));
    auto write = cutlass::make_producer_start_state<Pipeline>();
    uint32_t q_phase = 0;  // parity of the Q loads
    for (int tile = blockIdx.x / kClusterM;; tile = next_tile(p.tile_counter, tile, tiles, grid)) {
      tile_ring.push(smem, tile);
      if (tile >= tiles) break;
      const QueryTile t = query_tile<kBlockM, kBlockN, kVarlen>(p, cta_tile_coord<kClusterM>(schedule, tile, rank()));
      if (skips_tile<kClusterM, kBlockM, kVarlen>(t) || t.n_block_max <= t.n_block_min) continue;  // nothing to load
      const int64_t tma_b = kVarlen ? 0 : t.b, hk = t.h / (p.heads / p.kv_heads);
      const auto k_row0 = make_coord(int32_t(t.seq.k_row0), _0{});
      Tensor mQ = head_rows(args.tma_q, t);
      Tensor mK = domain_offset(k_row0, args.tma_k.get_tma_tensor(kv_shape)(_, _, hk, tma_b));
      Tensor mV = domain_offset(k_row0, args.tma_v.get_tma_tensor(kv_shape)(_, _, hk, tma_b));
      // (64, kHeadDim, 64-row block) and (kBlockN, kHeadDim, key tile)
      Tensor gQ = local_tile(mQ, Shape<_64, Int<kHeadDim>>{}, make_coord(_, _0{}));
      Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
      Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
      // (64, kHeadDim, consumer group)
      Tensor sQg = local_tile(sQ, Shape<_64, Int<kHeadDim>>{}, make_coord(_, _0{}));
      // (not a structured binding: load_q captures these, which C++17 does not allow of one)
      auto q_parts = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQg), group_modes<0, 2>(gQ));
      auto& tQg = get<0>(q_parts);
      auto& tQs = get<1>(q_parts);
      // In a cluster each block loads its half of a K/V tile into both.
      const auto kv_rank = [&] {
        if constexpr (kClusterM > 1) {
          return rank();
        } else {
          return _0{};
        }
      }();
      auto [tKg, tKs] = tma_partition(args.tma_k, kv_rank, Layout<Int<kClusterM>>{}, group_modes<0, 2>(sK),
                                      group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(args.tma_v, kv_rank, Layout<Int<kClusterM>>{}, group_modes<0, 2>(sV),
                                      group_modes<0, 2>(gV));
      constexpr uint16_t kKVMulticast = kClusterM > 1 ? (1u << kClusterM) - 1 : 0;
      // Group w's rows, once it is done with its last tile's.
      const auto load_q = [&](int w) {
        cutlass::arch::ClusterBarrier::wait(&smem.q_empty[w], q_phase ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.q_full[w], Tr::kQWarpGroupBytes);
        copy(args.tma_q.with(smem.q_full[w], 0, l2_read_once()), tQg(_, t.m_block * kNumMmaWG + w), tQs(_, w));
      };
      // Group i's Q follows the i-th key tile's K, so no wait for a group's
      // Q holds back the loads the groups before it need first. With O
      // staged in the last K/V stage, the stage after the first key tile's
      // may be the one the epilogue holds (2 stages): every Q follows the
      // first key tile's loads.
      const int key_tiles = t.n_block_max - t.n_block_min;
      for (int i = 0; i < key_tiles; ++i) {
        const int n = t.n_block_max - 1 - i;
        pipeline_k.producer_acquire(write);
        copy(args.tma_k.with(*pipeline_k.producer_get_barrier(write), kKVMulticast, l2_reused()), tKg(_, n),
             tKs(_, write.index()));
        if (Tr::kSeparateO ? i < kNumMmaWG : i == 0) load_q(i);
        pipeline_v.producer_acquire(write);
        copy(args.tma_v.with(*pipeline_v.producer_get_barrier(write), kKVMulticast, l2_reused()), tVg(_, n),
             tVs(_, write.index()));
        ++write;
        if (!Tr::kSeparateO && i == 0) {
          for (int w = 1; w < kNumMmaWG; ++w) load_q(w);
        }
      }
      if constexpr (Tr::kSeparateO) {
        for (int w = key_tiles; w < kNumMmaWG; ++w) load_q(w);  // fewer key tiles than groups
      }
      q_phase ^= 1;
    }
    if constexpr (kClusterM > 1) {
      // Stay until both blocks' consumers have released every stage: the
      // other block still signals this one's barriers until then.
      pipeline_k.producer_tail(write);
      pipeline_v.producer_tail(write);
    }
    return;
  }

  // ---- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int tid = threadIdx.x - 128;
  const Turns<kNumMmaWG> turns{warp_group - 1};  // known warp-uniform (canonical_warp_group_idx)
  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Tr::SmemLayoutVt{});
  // kQInRegs: a register copy of this group's Q rows, taken once per tile
  // (ldmatrix); otherwise unused.
  auto tSrQ = [&] {
    if constexpr (Tr::kQInRegs) {
      return thr_s.partition_fragment_A(sQ);
    } else {
      return 0;
    }
  }();
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  // S = Q K^T of K stage `stage`, issued. Q as the A operand: tSrQ with
  // kQInRegs, else descriptors rebuilt at each product (opaque_smem_tensor).
  const auto issue_qk = [&](int stage) {
    if constexpr (Tr::kQInRegs) {
      wgmma<true>(mma_s, tSrQ, tSrK(_, _, _, stage), tSrS);
    } else {
      wgmma<true>(mma_s, thr_s.partition_fragment_A(opaque_smem_tensor(smem.q.data(), typename Tr::SmemLayoutQ{})),
                  tSrK(_, _, _, stage), tSrS);
    }
  };
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor rP = make_tensor<Element>(tSrS.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
  Tensor s = rowcol(tSrS);
  Tensor p_rowcol = rowcol(rP);
  Tensor o = rowcol(tOrO);
  Tensor coord_s = rowcol(thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{})));
  constexpr int kRows = decltype(size<0>(s))::value;
  const float scale_log2 = args.scale_log2, scale = args.scale;
  auto to_p = [&] {
    Tensor converted = convert_to<Element>(tSrS);
    CUTE_UNROLL
    for (int i = 0; i < size(rP); ++i) rP(i) = converted(i);
  };
  // This group is done with its Q rows.
  const auto release_q = [&] { cutlass::arch::ClusterBarrier::arrive(&smem.q_empty[turns.wg]); };
  // O staged in the K/V stages (Tr::o_staging): the other group stages in
  // the last K stage (told once this group's last Q K^T has landed) or in
  // the last V stage (once its last P V has); a group waits for that before
  // writing its rows.
  const int other_wg = (turns.wg + 1) % kNumMmaWG;
  const bool other_stages_in_k = other_wg < Tr::kOGroupsPerStage;
  const auto staging_tell_other = [&] { cutlass::arch::NamedBarrier::arrive(256, kStagingBarrier + other_wg); };
  const auto staging_wait_other = [&] { cutlass::arch::NamedBarrier::sync(256, kStagingBarrier + turns.wg); };
  // Tile t's lse and this group's 64 rows of O (normalized by `sm`, the
  // tile's softmax): O through shared memory (`staging`, this group's rows;
  // stmatrix), then to global memory by one TMA store, or, for a varlen
  // sequence's last rows, by 16-byte row-contiguous stores that stop at the
  // sequence's end (a TMA box would run into the next sequence's). Storing O
  // from registers instead (4 bytes a thread) ran 4-34 % slower on an H100
  // (benchmarks/NOTES.md); the staging's copies, written as plain C++
  // through CuTe's generic copy, compiled to generic 4-byte stores and
  // 16-byte loads with 64-bit addresses (ST.E / LD.E: ~20 % of the
  // consumers' ncu samples at N = 512, more than a key tile).
  // Row m0 of tile t's output; o_stride[0] is 0 for varlen.
  const auto out_rows = [&](const QueryTile& t) {
    return static_cast<Element*>(p.out) + t.b * p.o_stride[0] + t.h * p.o_stride[1] +
           (t.seq.q_row0 + t.m0) * p.o_stride[2];
  };
  const auto lse_rows = [&](const QueryTile& t) {
    return p.lse + t.h * t.seq.lse_head_stride + t.seq.lse_row0 + t.m0;
  };
  // No visible key (also a varlen sequence without keys): out = 0, lse = -inf.
  const auto store_empty_tile = [&](const QueryTile& t) {
    Element* out = out_rows(t);
    float* lse_out = lse_rows(t);
    for (int i = tid; i < t.rows * p.head_dim; i += kNumMmaWG * 128) {
      out[i / p.head_dim * p.o_stride[2] + i % p.head_dim] = Element(0.f);
    }
    for (int r = tid; r < t.rows; r += kNumMmaWG * 128) lse_out[r] = -INFINITY;
  };
  const auto store_tile = [&](const QueryTile& t, auto& sm, Element* staging) {
    float lse[kRows];
    sm.finalize(o, scale, 1.f, lse);
    float* lse_out = lse_rows(t);
    if (get<1>(coord_s(0, 0)) == 0) {  // one lane of each quad holds the row
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const int r = get<0>(coord_s(mi, 0));
        if (r < t.rows) lse_out[r] = lse[mi];
      }
    }
    const int rows = t.rows - turns.wg * 64;
    // Varlen 176-key tiles: the staging's addresses rebuilt here rather than
    // hoisted out of the key loop, where they spilled (ptxas: 88 / 92 bytes
    // against 68 / 68). Elsewhere the opaque pointer cost more than it saved:
    // the compiler then re-read the shared-memory base (S2UR) at the head of
    // every key-loop pass (d = 64, 128-row tiles: 9 instructions a pass, and
    // ncu's samples in the loop 4 % above the dense kernel's; session 24).
    Tensor sO = [&] {
      if constexpr (kVarlen && kBlockN > 128) {
        return opaque_smem_tensor(staging, typename Tr::SmemLayoutQWarpGroup{});
      } else {
        return make_tensor(make_smem_ptr(staging), typename Tr::SmemLayoutQWarpGroup{});
      }
    }();
    // The group's accumulators as one group's product lays them out.
    auto r2s = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, typename Tr::TiledMmaOGroup{});
    auto r2s_thr = r2s.get_thread_slice(tid % 128);
    Tensor o_elem = convert_to<Element>(tOrO);
    copy(r2s, r2s_thr.retile_S(o_elem), r2s_thr.partition_D(sO));
    if (!kVarlen || rows >= 64) {  // (varlen: the group's rows all in the sequence)
      // Every thread's stmatrix visible to TMA (async proxy) before the store.
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier + turns.wg);
      if (tid % 128 == 0 && rows > 0) {
        Tensor gO = local_tile(head_rows(args.tma_o, t), Shape<_64, Int<kHeadDim>>{},
                               make_coord(t.m_block * kNumMmaWG + turns.wg, _0{}));
        auto tma_o = args.tma_o.get_slice(_0{});
        copy(args.tma_o, tma_o.partition_S(sO), tma_o.partition_D(gO));
        tma_store_arrive();  // waited for in wait_store_read
      }
    } else {
      cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier + turns.wg);
      Element* out = out_rows(t) + turns.wg * 64 * p.o_stride[2];
      constexpr int kChunks = kHeadDim / 8;
      for (int i = tid % 128; i < 64 * kChunks; i += 128) {
        const int r = i / kChunks, c = (i % kChunks) * 8;
        if (r < rows && c < p.head_dim) {
          uint4 chunk;
          cutlass::arch::shared_load<16>(&chunk, cast_smem_ptr_to_uint(&sO(r, c)));
          *reinterpret_cast<uint4*>(out + r * p.o_stride[2] + c) = chunk;
        }
      }
      // These generic reads of the staging before the TMA loads (async
      // proxy) that may overwrite it (O staged in a K/V stage): each thread
      // fences its own.
      cutlass::arch::fence_view_async_shared();
    }
  };

  typename Pipeline::PipelineState read;
  uint32_t q_phase = 0;
  // A tile's index from the ring and its coordinates. With
  // Tr::kEarlyNextTile the next tile is taken while this one's last P V
  // runs, so the ring wait and the divisions placing it overlap that
  // product instead of following the epilogue; otherwise at the top of the
  // loop. (Only the index and coordinates cross to the next pass: the rest
  // of a QueryTile, carried, took registers the key loop then spilled.)
  const auto take_tile = [&](int& tile, TileCoord& c) {
    tile = tile_ring.pop(smem);
    if (tile < tiles) c = cta_tile_coord<kClusterM>(schedule, tile, rank());
  };
  int tile;
  TileCoord coord;
  bool taken = false;  // tile and coord hold the next tile already
  // The thread that issued a group's TMA store of O waits for the store to
  // have read the staging before it is written again (tma_store_wait<0>
  // returns at once with no store in flight): a K/V stage right after the
  // store, to release it to the producer; a separate O buffer only at the
  // next tile's first turn (or the block's end), since the next epilogue,
  // its next writer, comes after that turn barrier, which the thread takes
  // part in after its wait. Waiting at once there held the issuing warp, and
  // with it the group's next turn, for the store's latency at every tile's
  // end: measured on an H100 (session 27), d = 64 +1-3 % at N = 512, level
  // from 2k. Releasing a K/V stage that late as well measured -4..+2.4 % at
  // d = 128.
  const auto wait_store_read = [&] {
    if (tid % 128 == 0) tma_store_wait<0>();
  };
  // The K/V stages tile `last`'s O is staged in, back to the producer once
  // the store has read them (O staged in K/V stages only).
  const auto release_o_stages = [&](typename Pipeline::PipelineState last) {
    wait_store_read();
    // In a cluster a few lanes signal for their group: the group's reads of
    // O are done first.
    if constexpr (kClusterM > 1) cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier + turns.wg);
    release_stage<kClusterM>(pipeline_k, smem.pipeline_k, last);
    if constexpr (Tr::kOInV) release_stage<kClusterM>(pipeline_v, smem.pipeline_v, last);
  };
  // With args.o_release_late (Tr::kLateOStageRelease) those stages go back
  // during the next tile rather than at the epilogue's end, so the store's
  // read of them is waited for once it is (nearly) done instead of on the
  // way to the next tile's first product (an H200 trace at d = 128, N = 2k:
  // epilogues of ~1,900 cycles against ~850 where O has a buffer of its
  // own): after the next tile's first softmax (with three stages the
  // producer needs it back only for that tile's third key tile).
  // held_stage: that stage's index, or -1.
  const bool release_late = Tr::kLateOStageRelease && args.o_release_late;
  int held_stage = -1;
  const auto release_held_stage = [&] {
    if constexpr (Tr::kLateOStageRelease) {
      if (held_stage >= 0) {
        release_o_stages(typename Pipeline::PipelineState(held_stage, 0, 0));
        held_stage = -1;
      }
    }
  };
  turns.start();
  for (;;) {
    if (!taken) take_tile(tile, coord);
    taken = false;
    if constexpr (Tr::kEarlyNextTile) {
      // Warp-uniform for the compiler again (as in TileRing::pop): merged
      // from two places, the values otherwise left the uniform datapath and
      // the key loop grew by ~35 instructions.
      tile = __shfl_sync(0xffffffff, tile, 0);
      coord = {__shfl_sync(0xffffffff, coord.step, 0), __shfl_sync(0xffffffff, coord.b, 0),
               __shfl_sync(0xffffffff, coord.h, 0)};
    }
    if (tile >= tiles) {
      wait_store_read();  // (before the block's shared memory goes)
      release_held_stage();
      break;
    }
    const QueryTile t = query_tile<kBlockM, kBlockN, kVarlen>(p, coord);
    if (skips_tile<kClusterM, kBlockM, kVarlen>(t)) continue;
    if (t.n_block_max <= t.n_block_min) {
      store_empty_tile(t);
      continue;
    }

    // Keys past kv_len (zero-filled by TMA, or the next varlen sequence's)
    // are masked to -inf, so their P is 0. Varlen bounds as int32 (the
    // dispatch bounds total_k by 2^31), to take half the registers.
    const int32_t kv_len32 = int32_t(t.seq.kv_len), diag32 = int32_t(t.seq.window.diagonal_offset);
    const int64_t m0 = t.m0;
    const int n_block_min = t.n_block_min, n_block_max = t.n_block_max;
    const auto window = [&] {
      return kVarlen ? VisibilityWindow{p.window.window_left, p.window.window_right, diag32} : p.window;
    };
    const auto kv_len = [&] { return kVarlen ? int64_t(kv_len32) : p.kv_len; };
    // Key tiles [full_first, full_end) need no mask: two ints tested per key
    // tile rather than the window's 64-bit bounds (a chain of compares and
    // branches before every fold).
    const TileRange full = fully_visible_tiles(window(), m0, m0 + kBlockM, kv_len(), kBlockN);
    const int full_first = int(clamp_row<int64_t>(full.first, n_block_min, n_block_max));
    const int full_end = int(clamp_row<int64_t>(full.end, n_block_min, n_block_max));
    sm80::OnlineSoftmax<kRows, 4> softmax;
    float corr[kRows];
    // O's rescale, skipped by a warp none of whose rows changed its maximum
    // (corrections of exactly 1). It sits inside the group's turn, between
    // its two product issues: measured on an H100 (session 28), +2 % at
    // d = 128 from 8k, +3-8 % at d = 64 and 256 on long rows, level below.
    const auto rescale_o = [&] {
      bool changed = false;
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) changed |= corr[mi] != 1.f;
      if (__any_sync(0xffffffff, changed)) decltype(softmax)::rescale(o, corr);
    };
    const auto unmasked = [&](int n) { return n >= full_first && n < full_end; };
    const auto mask = [&](int n) {
      if (!unmasked(n)) mask_window(s, coord_s, m0, int64_t(n) * kBlockN, window(), kv_len());
    };
    // Exponentials ahead of the maxima (Tr::kFoldAhead) once the rows have
    // folded an unmasked tile: after a masked first one (a causal diagonal,
    // where a row saw a few keys) the next tile's maxima often move past the
    // slack, and the warp would fold that tile twice.
    [[maybe_unused]] bool settled = unmasked(n_block_max - 1);

    cutlass::arch::ClusterTransactionBarrier::wait(&smem.q_full[turns.wg], q_phase);
    q_phase ^= 1;
    if constexpr (Tr::kQInRegs) {
      auto q_copy = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma_s);
      auto q_copy_thr = q_copy.get_thread_slice(tid);
      copy(q_copy, q_copy_thr.partition_S(sQ), q_copy_thr.retile_D(tSrQ));
      release_q();  // the next tile's rows may land during all of this one
    }

    // First key tile: S only.
    pipeline_k.consumer_wait(read);
    if constexpr (Tr::kSeparateO) wait_store_read();
    turns.wait();
    issue_qk(read.index());
    turns.pass();
    warpgroup_wait<0>();
    // The tile's last K stage stays held where O is staged in it.
    if (Tr::kSeparateO || n_block_max - 1 > n_block_min) release_stage<kClusterM>(pipeline_k, smem.pipeline_k, read);
    mask(n_block_max - 1);
    softmax.template fold<true>(s, scale_log2, corr, args.max_slack);
    to_p();
    clear(tOrO);
    release_held_stage();

    // Steady state: S of tile n in flight with P V of tile n+1.
    for (int n = n_block_max - 2; n >= n_block_min; --n) {
      const auto read_v = read;
      ++read;
      pipeline_k.consumer_wait(read);
      turns.wait();
      issue_qk(read.index());
      rescale_o();
      pipeline_v.consumer_wait(read_v);
      wgmma<false>(mma_o, tOrP, tOrV(_, _, _, read_v.index()), tOrO);
      turns.pass();
      warpgroup_wait<1>();
      if (Tr::kSeparateO || n > n_block_min) release_stage<kClusterM>(pipeline_k, smem.pipeline_k, read);
      mask(n);
      // Without fold_ahead the fold stays ahead of the wait in the source, the
      // schedule these kernels were measured with (moved behind it, ptxas
      // reorders them: 400-2,200 SASS lines differ). fold_ahead writes P in
      // place of the P V operand, so it comes after that product.
      if constexpr (!Tr::kFoldAhead) softmax.template fold<false>(s, scale_log2, corr, args.max_slack);
      warpgroup_wait<0>();
      release_stage<kClusterM>(pipeline_v, smem.pipeline_v, read_v);
      if constexpr (Tr::kFoldAhead) {
        // fold_ahead's vote is the warp's, so its fallback is register work
        // only: a product (wgmma, its fence or wait) issued by one warp of
        // the group is undefined (NOTES, session 34: a branch whose fallback
        // computed S again did that).
        if (!(settled && args.fold_ahead && softmax.fold_ahead(s, p_rowcol, scale_log2, corr, args.max_slack))) {
          softmax.template fold<false>(s, scale_log2, corr, args.max_slack);
          to_p();
        }
        settled |= unmasked(n);
      } else {
        to_p();
      }
    }
    if constexpr (!Tr::kQInRegs) release_q();  // every Q K^T of the tile has landed
    if (!Tr::kSeparateO && other_stages_in_k) staging_tell_other();

    // Last P V.
    rescale_o();
    pipeline_v.consumer_wait(read);
    turns.wait();
    wgmma<false>(mma_o, tOrP, tOrV(_, _, _, read.index()), tOrO);
    turns.pass();
    if constexpr (Tr::kEarlyNextTile) {  // t keeps this tile's placement for the epilogue
      take_tile(tile, coord);
      taken = true;
    }
    warpgroup_wait<0>();
    if constexpr (!Tr::kOInV) release_stage<kClusterM>(pipeline_v, smem.pipeline_v, read);
    if (Tr::kOInV && !other_stages_in_k) staging_tell_other();
    const auto last = read;
    ++read;  // the next tile's first stage

    if constexpr (!Tr::kSeparateO) staging_wait_other();
    store_tile(t, softmax, Tr::o_staging(smem, turns.wg, last.index()));
    if constexpr (!Tr::kSeparateO) {
      // O read out of the stages (by TMA, waited for here; by a varlen
      // tile's row stores, fenced in store_tile) before TMA loads overwrite
      // them: each thread arrives itself (a block of one CTA counts every
      // consumer thread).
      if (release_late) {
        held_stage = static_cast<int>(last.index());
      } else {
        release_o_stages(last);
      }
    }
  }
  turns.finish();
#endif
}

// TMA needs a valid stride even for a dimension of extent 1, where any
// multiple of 16 bytes will do: the coordinate is always 0.
inline int64_t tma_stride(int64_t stride, int64_t extent) { return extent > 1 ? stride : 8; }

template <class Tr>
typename Tr::GmemTensor gmem_tensor(const void* ptr, int64_t seq, int64_t dim, int64_t heads, int64_t batch,
                                    const int64_t (&stride)[3]) {
  using Element = typename Tr::Element;
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                     make_shape(int32_t(seq), int32_t(dim), int32_t(heads), int32_t(batch)),
                     make_stride(tma_stride(stride[2], seq), _1{}, tma_stride(stride[1], heads),
                                 tma_stride(stride[0], batch)));
}

// Steps of the schedule per (batch, head) pair: kClusterM query tiles each
// (varlen cluster pairs: the last may end past the longest sequence).
template <class Tr>
int64_t query_steps(const AttentionFwdParams& p) {
  return ceil_div64(ceil_div64(p.q_len, Tr::kBlockM), Tr::kClusterM);
}

// Sections of (batch, head) pairs whose K and V take at most kL2Bytes (about
// two thirds of an H100's L2), whole GQA groups each (consecutive heads share
// their K and V). Short rows (FwdTuning::pair_major_max_q*) in sections of
// one pair, so a pair's query tiles are consecutive and the blocks running
// at once read a few pairs' K and V, not one pair each (at N = 512, 128
// pairs' 32 MB from DRAM at once in every fourth round otherwise); on longer
// rows under a causal mask that deals the heaviest tiles last.
template <class Tr>
TileSchedule tile_schedule(const AttentionFwdParams& p) {
  constexpr int64_t kL2Bytes = int64_t(32) << 20;
  const int64_t kv_len = p.kv_len > 0 ? p.kv_len : 1;  // varlen batches may have no key at all
  const int64_t kv_head_bytes = 2 * kv_len * Tr::kHeadDim * int64_t(sizeof(typename Tr::Element));
  const int64_t kv_heads_per_section = kv_head_bytes < kL2Bytes ? kL2Bytes / kv_head_bytes : 1;
  const int64_t batch_heads = p.batch * p.heads;
  const bool pair_major =
      p.q_len <= (has_window(p.window) ? fwd_tuning().pair_major_max_q_causal : fwd_tuning().pair_major_max_q);
  const int64_t section = pair_major ? 1 : kv_heads_per_section * (p.heads / p.kv_heads);
  const bool left_window_only = p.window.window_left >= 0 && p.window.window_right < 0;
  return make_tile_schedule(static_cast<int>(query_steps<Tr>(p)),
                            static_cast<int>(p.heads), static_cast<int>(batch_heads),
                            static_cast<int>(section < batch_heads ? section : batch_heads), !left_window_only);
}

// Whether a call's query tiles can run in Tr's clusters (FwdTraits::
// kClusterM): the tiles of a cluster see the same keys (no mask or window),
// so its blocks walk the same key tiles in the same order, and its blocks
// take the same steps of the schedule, which a counter dealing tiles to
// whichever block asks first (fwd_deals_tiles_dynamically: windows, varlen
// sequences of unequal lengths) would not give them. Dense batches: every
// cluster whole (a multiple of kClusterM query tiles). Varlen: a sequence's
// last pair may end past it (skips_tile).
template <class Tr>
bool fwd_pairs_fit(const AttentionFwdParams& p) {
  return !has_window(p.window) && !fwd_deals_tiles_dynamically(p) &&
         (p.cu_seqlens_q != nullptr || ceil_div64(p.q_len, Tr::kBlockM) % Tr::kClusterM == 0);
}

// kVarlen: the descriptors span the packed (total, dim, heads) tensors as one
// batch entry (their batch strides are 0); the dispatch guarantees total_q,
// total_k > 0.
template <class Tr, bool kVarlen>
void launch_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  const int64_t tiles = query_steps<Tr>(p) * Tr::kClusterM * p.batch * p.heads;
  if (tiles == 0) return;  // before building TMA descriptors of empty tensors
  if (Tr::kClusterM > 1 && !fwd_pairs_fit<Tr>(p)) {
    throw std::runtime_error("flash_ext attention forward (sm90): cluster pairs on a call they do not fit");
  }
  const int64_t q_rows = kVarlen ? p.total_q : p.q_len, kv_rows = kVarlen ? p.total_k : p.kv_len;
  const int64_t batch = kVarlen ? 1 : p.batch;
  FwdArgs<Tr> args{p, tile_schedule<Tr>(p),
                   make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Tr>(p.q, q_rows, p.head_dim, p.heads, batch, p.q_stride),
                                 typename Tr::SmemLayoutQWarpGroup{}, Shape<_64, Int<Tr::kHeadDim>>{}, _1{}),
                   make_tma_copy(typename Tr::TmaKVOp{},
                                 gmem_tensor<Tr>(p.k, kv_rows, p.head_dim, p.kv_heads, batch, p.k_stride),
                                 take<0, 2>(typename Tr::SmemLayoutKV{}),
                                 Shape<Int<Tr::kBlockN>, Int<Tr::kHeadDim>>{}, Int<Tr::kClusterM>{}),
                   make_tma_copy(typename Tr::TmaKVOp{},
                                 gmem_tensor<Tr>(p.v, kv_rows, p.head_dim, p.kv_heads, batch, p.v_stride),
                                 take<0, 2>(typename Tr::SmemLayoutKV{}),
                                 Shape<Int<Tr::kBlockN>, Int<Tr::kHeadDim>>{}, Int<Tr::kClusterM>{}),
                   make_tma_copy(SM90_TMA_STORE{},
                                 gmem_tensor<Tr>(p.out, q_rows, p.head_dim, p.heads, batch, p.o_stride),
                                 typename Tr::SmemLayoutQWarpGroup{}, Shape<_64, Int<Tr::kHeadDim>>{}, _1{}),
                   static_cast<float>(p.scale), static_cast<float>(p.scale * M_LOG2E),
                   static_cast<float>(fwd_tuning().rescale_slack), fwd_tuning().o_release_late != 0,
                   fwd_tuning().fold_ahead != 0};
  // One block per SM (p.num_sms; 0: one per tile). Tiles of unequal
  // weight past the grid's first are dealt through p.tile_counter as blocks
  // free up (fwd_deals_tiles_dynamically): under a causal mask the static
  // round robin loaded some blocks 1.16x (d = 128) to 1.4x (d = 256) the mean
  // by simulation, a greedy deal 1.00-1.02x. At d = 256 with a window up to
  // N = 1024, one block per tile: 0.155 ms against the persistent grid's
  // 0.206 at N = 512 causal (H100, benchmarks/NOTES.md).
  // Cluster pairs: as many pairs as fit at once (an odd GPC leaves an SM
  // out), else one pair per two tiles.
  const auto kernel = attention_fwd_sm90_kernel<Tr, kVarlen>;
  const int64_t slots =
      Tr::kClusterM > 1
          ? int64_t(max_active_clusters(kernel, Tr::kClusterM, Tr::kNThreads, Tr::kSmemBytes)) * Tr::kClusterM
          : p.num_sms;
  const bool one_per_tile = slots <= 0 || p.q_len <= fwd_tuning().per_tile_max_q ||
                            (Tr::kHeadDim == 256 && has_window(p.window) && p.q_len <= 1024);
  const int64_t grid = one_per_tile || tiles < slots ? tiles : slots;
  if (grid < tiles && fwd_deals_tiles_dynamically(p) && p.tile_counter == nullptr) {
    throw std::runtime_error("flash_ext attention forward (sm90): tile_counter workspace missing");
  }
  // Tile indices are int: gridDim.x + the counter (< tiles) must not overflow.
  if (tiles > 0x7fffffff - grid) throw std::runtime_error("flash_ext attention forward (sm90): too many tiles");
  launch_1d_clusters("attention forward (sm90", Tr::kHeadDim, kernel, grid, Tr::kClusterM, Tr::kNThreads,
                     Tr::kSmemBytes, stream, args);
}

}  // namespace flash_ext::cuda::sm90
