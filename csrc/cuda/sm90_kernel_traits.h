// Tile configurations of the Hopper (sm_90a) kernel family: TMA loads into
// 128-byte-swizzled shared memory, wgmma products with operands in shared
// memory (P from registers), mbarrier pipelines between one producer warp
// group and kNumMmaWG consumer warp groups of 64 rows each (query rows
// forward, key rows backward).
#pragma once

// wgmma tiles of any N multiple of 8 (e.g. 176 keys), before any CuTe header.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cstdint>
#include <type_traits>

namespace flash_ext::cuda::sm90 {

using namespace cute;

// Global tensors as TMA sees them: (seq, dim, head, batch), dim contiguous.
template <class Element>
using TmaGmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)),
                                           Shape<int32_t, int32_t, int32_t, int32_t>{},
                                           Stride<int64_t, _1, int64_t, int64_t>{}));

// kQInRegs_: each consumer group copies its Q rows into registers once per
// tile (ldmatrix) and Q K^T takes them as its A operand (wgmma RS), so the
// products read only K from shared memory and the Q rows are released at
// once, the next tile's Q landing during this whole tile.
//
// kClusterM_ = 2: blocks run in pairs (thread-block clusters) on adjacent
// query tiles of one (batch, head) that see the same keys (no mask, no
// window, dense batches); each block loads half of every K/V tile and TMA
// multicasts it to both, so the pair reads each key once from L2 (at 128
// query rows a block streams 512 bytes of K and V per key it multiplies:
// ~6 TB/s from L2 at the matmul rate over 132 SMs). On an H100 the halved
// traffic showed as power: the same cycles at a higher SM clock.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, class Element_, bool kQInRegs_ = false,
          int kClusterM_ = 1>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr bool kQInRegs = kQInRegs_;
  static constexpr int kClusterM = kClusterM_;
  static_assert(kClusterM == 1 || kClusterM == 2);
  using ClusterShape = Shape<Int<kClusterM>, _1, _1>;
  static constexpr int kNumMmaWG = kBlockM / 64;  // each consumer warp group owns 64 query rows
  static constexpr int kNThreads = 128 * (kNumMmaWG + 1);
  static_assert(kHeadDim % 64 == 0 && kBlockM % 64 == 0 && kBlockN % 16 == 0);
  static_assert(kNumMmaWG == 2 || kNumMmaWG == 3);
  // The producer loads group w's Q after the tile's w-th K tile, so the K
  // tiles before the last group's must find free stages: a stage of this
  // tile comes free only once every group, its Q loaded, has used it.
  static_assert(kStages >= kNumMmaWG);
  // setmaxnreg: the producer needs few registers; the rest go to the math.
  // 128 * (producer + kNumMmaWG * consumer) must stay within 64K registers.
  static constexpr int kProducerRegs = kNumMmaWG == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kNumMmaWG == 2 ? 240 : 160;
  // Whether the consumers take their next tile during their last P V of a
  // tile rather than after its epilogue: with three stages the producer is
  // far enough ahead to have announced it (+0-3 % at N = 1k-2k on an H100;
  // d = 256's two stages lost 8 % at causal 512, session 16), and not where
  // the key loop already spills (three groups' 160 registers, d = 128's
  // 176-key tiles), which the tile carried across the epilogue made spill more.
  static constexpr bool kEarlyNextTile = kNumMmaWG == 2 && kStages >= 3 && !(kHeadDim == 128 && kBlockN > 128);
  // Whether the key loop may take a tile's exponentials before its row
  // maxima (FwdArgs::fold_ahead). Measured on H100s (session 32, two runs
  // of alternating rounds): d = 128's 128-key tiles without a mask +2-3 % at
  // N = 512, +4-6 % at 2k, causal -1..+2 %; its 176-key tiles -1 % at 4k,
  // -4.5-7 % at 16k (235 of the 240 registers live); d = 64 causal -3..-5 %,
  // d = 256 level to -2 %.
  static constexpr bool kFoldAhead = kHeadDim == 128 && kBlockN == 128;

  // S = Q K^T (M = queries, N = keys, K = head dim) and O = P V
  // (M = queries, N = head dim, K = keys); warp groups tiled along M.
  using AtomLayout = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using TileShapeS = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;
  using TiledMmaS = decltype(make_tiled_mma(
      std::conditional_t<kQInRegs, decltype(GMMA::rs_op_selector<Element, Element, float, TileShapeS>()),
                         decltype(GMMA::ss_op_selector<Element, Element, float, TileShapeS>())>{},
      AtomLayout{}));
  // V is stored keys x dims (dims contiguous): as the B operand (dims x keys)
  // of O = P V it is MN-major.
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;  // 8 rows x 64 elements, 128-byte swizzle
  // Each consumer group's 64 query rows are one contiguous block, loaded and
  // released on their own barriers, so a group that finishes its tile first
  // gets its next rows without waiting for the others.
  using SmemLayoutQWarpGroup = decltype(tile_to_shape(SmemAtom{}, Shape<_64, Int<kHeadDim>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutQWarpGroup{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using GmemTensor = TmaGmemTensor<Element>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQWarpGroup{},
                                      Shape<_64, Int<kHeadDim>>{}, _1{}));  // one consumer group's rows
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensor{}, SmemLayoutQWarpGroup{},
                                      Shape<_64, Int<kHeadDim>>{}, _1{}));  // one consumer group's rows
  using TmaKVOp = std::conditional_t<kClusterM == 1, SM90_TMA_LOAD, SM90_TMA_LOAD_MULTICAST>;
  using TmaKV = decltype(make_tma_copy(TmaKVOp{}, GmemTensor{}, take<0, 2>(SmemLayoutKV{}),
                                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, Int<kClusterM>{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kQWarpGroupBytes = 64 * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  // Slots of the tile index ring. Before announcing a tile the producer has
  // loaded every group's Q of the tile before, which waited for each group
  // to be done with its previous Q, i.e. to have read the index before that:
  // two slots hold it back only after tiles it loads nothing for.
  static constexpr int kTileSlots = 2;

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    // mbarriers per consumer group: its Q rows landed; it is done with them.
    alignas(16) uint64_t q_full[kNumMmaWG];
    uint64_t q_empty[kNumMmaWG];
    // The producer's tile indices for the consumer groups, a ring with an
    // mbarrier per slot for "written" and "read by every consumer thread".
    uint64_t tile_full[kTileSlots];
    uint64_t tile_empty[kTileSlots];
    int tile_index[kTileSlots];
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
  };
  // O is staged in shared memory for row-contiguous stores: in a buffer of
  // its own where one fits; else in the tile's last K stage, a group that
  // finds no room there (d = 256) in the last V stage, both held back from
  // the producer until the epilogue has read them. Either way a group
  // releases its Q rows after its last Q K^T, so the next tile's Q loads
  // during this one's last P V and epilogue, and three K/V stages stay at
  // d = 128 (O staged in Q's rows instead held the next Q back until O had
  // left).
  struct SharedStorageWithO : SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> o;
  };
  static constexpr bool kSeparateO = sizeof(SharedStorageWithO) <= 227 * 1024;
  using Smem = std::conditional_t<kSeparateO, SharedStorageWithO, SharedStorage>;
  static constexpr int kSmemBytes = int(sizeof(Smem));
  static_assert(kSmemBytes <= 227 * 1024);
  static constexpr int kOGroupElems = 64 * kHeadDim;  // one group's rows of O
  static constexpr int kKVStageElems = kBlockN * kHeadDim;
  static_assert(cosize_v<SmemLayoutKV> == kStages * kKVStageElems);
  static constexpr int kOGroupsPerStage = kKVStageElems / kOGroupElems;
  static constexpr bool kOInV = !kSeparateO && kNumMmaWG > kOGroupsPerStage;
  // The groups wait for each other before staging O in K/V (one named
  // barrier each, two of them).
  static_assert(kSeparateO || (kNumMmaWG == 2 && kOGroupsPerStage >= 1));
  // Group wg's 64 rows of O (SmemLayoutQWarpGroup); `stage`: the tile's last.
  CUTE_DEVICE static Element* o_staging(Smem& smem, int wg, int stage) {
    if constexpr (kSeparateO) {
      return smem.o.data() + wg * kOGroupElems;
    } else {
      Element* kv = wg < kOGroupsPerStage ? smem.k.data() : smem.v.data();
      return kv + stage * kKVStageElems + wg % kOGroupsPerStage * kOGroupElems;
    }
  }
  // Whether the stage O is staged in may be released during the next tile
  // (FwdArgs::o_release_late): d = 128's three-stage 128-key tiles in single
  // blocks, which release a stage alone (a cluster pair's lanes signal for
  // their group after its barrier). Not d = 128's 176-key tiles, whose key
  // loops already spill (the held stage's index added local accesses there,
  // varlen: 2 -> 3 and 5 -> 7 a pass), nor d = 256's two-stage tiles, where
  // it measured -1 % at N = 512 and level from 2k (H100, session 31).
  static constexpr bool kLateOStageRelease = !kSeparateO && kClusterM == 1 && kHeadDim == 128 && kBlockN == 128;
  static_assert(!kLateOStageRelease || kStages >= 3, "released after the next tile's first softmax");
  // One consumer group's O = P V, for its epilogue's copies.
  using TiledMmaOGroup = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>()));
};

// Backward: one block per key tile of kBlockN rows and two consumer warp
// groups, walking query tiles of kBlockM rows through a kStages-deep pipeline
// of Q (+ lse) and dO (+ D). How the groups share the work depends on the
// head dim (kSplitDims):
//  - d <= 128: group w owns key rows [64 w, 64 w + 64) of a 128-key tile
//    (products with keys along M need no transposition in registers); P^T
//    and dS^T go from its S^T, dP^T accumulators straight into dV, dK (A
//    from registers). dK and dV of 64 keys x d stay in registers (2 x 64
//    floats per thread at d = 128), beside S^T and dP^T (2 x kBlockM / 2):
//    192 accumulator floats at d = 128 with 64-row query tiles, and at d = 64
//    with 128-row ones; 208 at d = 128 with 80-row tiles (ptxas: 229 live
//    registers, a few loop values spilled: 7 local accesses a pass).
//  - d = 256: that would be 256 floats of dK and dV alone, so both groups
//    share one 64-key tile and each owns half of the head dims of dK, dV
//    and dQ (64 + 64 + 64 floats). Each computes S^T, dP^T for half of the
//    tile's queries and leaves P^T, dS^T in shared memory, where the other
//    group's dV, dK products (A from shared memory) find them.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, class Element_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kNumMmaWG = 2;
  static constexpr int kNThreads = 128 * (kNumMmaWG + 1);
  static constexpr bool kSplitDims = kHeadDim == 256;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);
  static_assert(kBlockN == (kSplitDims ? 64 : 128));
  static_assert(kBlockM == 64 || (kBlockM == 128 && kHeadDim == 64) || (kBlockM == 80 && kHeadDim == 128));
  // The pre-pass fills D, lse and zeroes dq_accum in whole tiles of this many
  // rows: 128 (holding the 64- and 128-row tiles), or the 80-row tiles.
  static constexpr int kPrepassTileRows = 128 % kBlockM == 0 ? 128 : kBlockM;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // dQ = dS K is split between the groups along the queries when the tile
  // has 64 rows per group (each product then 64 x kHeadDim, as wide as the
  // others), else along the head dims. A query tile that is not a whole
  // number of wgmma rows (80) computes dQ^T = K^T dS^T instead: head dims
  // along M, split between the groups, queries along N.
  static constexpr bool kDqTransposed = kBlockM % 64 != 0;
  static constexpr int kDqWgM = kDqTransposed ? 1 : kBlockM / 64;
  static constexpr int kDqWgN = kNumMmaWG / kDqWgM;
  static constexpr int kDqCols = kHeadDim / kDqWgN;  // dQ columns per consumer group
  // dQ accumulator floats per consumer thread.
  static constexpr int kDqFrag = kBlockM * kHeadDim / (128 * kNumMmaWG);
  static_assert(kDqFrag % 4 == 0);
  // How dQ reaches the bulk-copy engine (d <= 128): at d = 128 each warp
  // stores its part and issues its own reduce-add, waiting for no other
  // warp (+2-7 % on an H100, session 14); at d = 64 one reduce-add per group
  // after a group barrier (the per-warp hand-off measured level, -9 % at
  // causal N = 2k). d = 256 adds dQ with atomics from registers (at d = 128
  // they lost 1.6-3.4 % to this hand-off on an H200, session 36).
  static constexpr bool kWarpDqReduce = kHeadDim == 128;

  // How the groups tile the keys-along-M products: along M (keys) or, with
  // kSplitDims, along N (queries of S^T, dP^T; head dims of dK, dV).
  using AtomLayoutKeys = std::conditional_t<kSplitDims, Layout<Shape<_1, Int<kNumMmaWG>, _1>>,
                                            Layout<Shape<Int<kNumMmaWG>, _1, _1>>>;
  static constexpr int kSdPCols = kSplitDims ? kBlockM / kNumMmaWG : kBlockM;  // queries per group
  static constexpr int kdKVCols = kSplitDims ? kHeadDim / kNumMmaWG : kHeadDim;  // dims per group
  // S^T = K Q^T and dP^T = V dO^T: M = keys, N = queries, K = head dim, all
  // operands stored with the head dim contiguous (K-major).
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockN>, Int<kSdPCols>, Int<kHeadDim>>>(),
      AtomLayoutKeys{}));
  // dV += P^T dO and dK += dS^T Q: M = keys, N = head dim, K = queries. A is
  // the S^T / dP^T accumulator converted in registers, or with kSplitDims
  // P^T / dS^T in shared memory (queries contiguous: K-major); B (dO, Q
  // stored queries x dims) has N contiguous: MN-major.
  using TiledMmadKV = decltype(make_tiled_mma(
      std::conditional_t<kSplitDims,
                         decltype(GMMA::ss_op_selector<Element, Element, float,
                                                       Shape<Int<kBlockN>, Int<kdKVCols>, Int<kBlockM>>,
                                                       GMMA::Major::K, GMMA::Major::MN>()),
                         decltype(GMMA::rs_op_selector<Element, Element, float,
                                                       Shape<Int<kBlockN>, Int<kdKVCols>, Int<kBlockM>>,
                                                       GMMA::Major::K, GMMA::Major::MN>())>{},
      AtomLayoutKeys{}));
  // dQ = dS K: M = queries, N = head dim, K = keys, split as kDqWgM x kDqWgN.
  // A = dS, stored queries-contiguous (MN-major) from the dS^T accumulators;
  // B = K (keys x dims) has N contiguous: MN-major.
  // kDqTransposed: dQ^T = K^T dS^T, M = head dim (split between the groups),
  // N = queries, K = keys; A = K^T (dims contiguous: MN-major), B = dS
  // stored keys-contiguous (K-major).
  static constexpr int kDqGroupM = kDqTransposed ? kDqCols : kBlockM / kDqWgM;  // a group's product, M x N
  static constexpr int kDqGroupN = kDqTransposed ? kBlockM : kDqCols;
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kDqGroupM>, Int<kDqGroupN>, Int<kBlockN>>,
                           GMMA::Major::MN, kDqTransposed ? GMMA::Major::K : GMMA::Major::MN>(),
      Layout<Shape<Int<kDqTransposed ? kDqWgN : kDqWgM>, Int<kDqTransposed ? 1 : kDqWgN>, _1>>{}));
  // The dQ accumulator's tile: (queries, dims), or (dims, queries) transposed.
  using DqTileShape = std::conditional_t<kDqTransposed, Shape<Int<kHeadDim>, Int<kBlockM>>,
                                         Shape<Int<kBlockM>, Int<kHeadDim>>>;

  // K's swizzle spans one group's dQ columns: read MN-major by dQ = dS K, a
  // kDqCols-wide slice must hold whole swizzle rows (64-byte swizzle when
  // the groups split d = 64).
  using SmemAtomK = std::conditional_t<kDqCols * sizeof(Element) % 128 == 0, GMMA::Layout_K_SW128_Atom<Element>,
                                       GMMA::Layout_K_SW64_Atom<Element>>;
  using SmemAtomQ = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtomK{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // also stages dK, dV
  using SmemLayoutKt = decltype(composition(SmemLayoutKV{},
                                            make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{})));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomQ{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));  // also dO
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // dS (queries x keys, queries contiguous), double-buffered so one barrier
  // per query tile separates writing it from the other group's last read.
  // With kSplitDims P takes the same layout.
  // kDqTransposed: keys contiguous (80 queries are not whole 64-query
  // swizzle rows), written by transposing stmatrix.
  using SmemLayoutdS = decltype(tile_to_shape(
      std::conditional_t<kDqTransposed, GMMA::Layout_K_SW128_Atom<Element>, GMMA::Layout_MN_SW128_Atom<Element>>{},
      Shape<Int<kBlockM>, Int<kBlockN>, _2>{}));
  using StoreAtomdS = std::conditional_t<kDqTransposed, SM90_U16x8_STSM_T, SM90_U32x4_STSM_N>;
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, _2>{}, Step<_2, _1, _3>{})));

  using GmemTensor = TmaGmemTensor<Element>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));  // also dO
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutKV{},
                                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  // A stage of Q carries the tile's lse (log2 units) and one of dO its D,
  // kBlockM floats each, on the same barrier.
  static constexpr uint32_t kQStageBytes = kBlockM * kHeadDim * sizeof(Element) + kBlockM * sizeof(float);
  static constexpr uint32_t kKVBytes = 2 * kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
    // kSplitDims: P^T in dS's layout, and dQ added to global memory from
    // registers (its staging tile would not fit beside the rest).
    cute::array_aligned<Element, kSplitDims ? cosize_v<SmemLayoutdS> : 1, 1024> p;
    cute::array_aligned<float, kSplitDims ? 1 : kBlockM * kHeadDim, 128> dq;  // in dq_tile_offset's order
    cute::array_aligned<float, kBlockM * kStages, 128> lse;
    cute::array_aligned<float, kBlockM * kStages, 128> dpsum;
    alignas(16) uint64_t kv_full;  // mbarrier: K and V landed
    typename Pipeline::SharedStorage pipeline_q;
    typename Pipeline::SharedStorage pipeline_do;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024);
};

}  // namespace flash_ext::cuda::sm90
