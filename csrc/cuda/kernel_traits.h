// Tile configurations of the sm80 kernel family (FlashAttention-2 design):
// mma.sync tensor-core atoms, swizzled shared-memory layouts, ldmatrix and
// cp.async copies, all through CuTe. Every head dim here is a multiple of 64,
// so one 8x64 swizzle atom (128-byte rows) serves every operand.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace flash_ext::cuda::sm80 {

using namespace cute;

template <typename Element>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>;
};
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>;
};

// Warps tiled kAtomM x (kNWarps / kAtomM) over an (M, N) accumulator.
template <typename Element, int kNWarps, int kAtomM>
using TiledMmaFor = TiledMMA<typename MmaAtomFor<Element>::type,
                             Layout<Shape<Int<kAtomM>, Int<kNWarps / kAtomM>, _1>>,
                             Tile<Int<16 * kAtomM>, Int<16 * kNWarps / kAtomM>, _16>>;

// Row-major 8x64 atom with a 128-byte XOR swizzle: conflict-free for both
// the 16-byte cp.async writes and the ldmatrix reads.
using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));

template <int kRows, int kCols>
using SmemTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kCols>>{}));

// The transpose of a (kRows, kCols) tile as a (kCols, kRows) view of the same bytes.
template <int kRows, int kCols>
using SmemTileT = decltype(composition(SmemTile<kRows, kCols>{},
                                       make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));

// Global <-> shared copies: 16-byte vectors, 8 threads per 64-element row.
template <typename Element, int kNThreads>
struct GmemCopies {
  using ThreadLayout = Layout<Shape<Int<kNThreads / 8>, _8>, Stride<_8, _1>>;
  // Out-of-range rows / columns are zero-filled (the predicate goes through .with()).
  using Load = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{}, ThreadLayout{},
      Layout<Shape<_1, _8>>{}));
  using Store = decltype(make_tiled_copy(
      Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{}, ThreadLayout{},
      Layout<Shape<_1, _8>>{}));
};

using LdsmAtomN = SM75_U32x4_LDSM_N;  // operand stored K-contiguous
using LdsmAtomT = SM75_U16x8_LDSM_T;  // operand stored MN-contiguous (transposed view)

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0 && kBlockM % (16 * kNWarps) == 0);

  // Warps split the query rows; each warp owns whole rows, so softmax needs
  // only quad shuffles.
  using TiledMma = TiledMmaFor<Element, kNWarps, kNWarps>;

  using SmemLayoutQ = SmemTile<kBlockM, kHeadDim>;  // also stages O
  using SmemLayoutKV = SmemTile<kBlockN, kHeadDim>;
  using SmemLayoutVt = SmemTileT<kBlockN, kHeadDim>;
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using Gmem = GmemCopies<Element, kNThreads>;

  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Element));
};

// Backward: one block owns a key tile and walks the query tiles. kAtomMSdP,
// kAtomNdKV and kAtomMdQ lay the warps over the S/dP, dK/dV and dQ products.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kAtomMSdP_, int kAtomNdKV_,
          int kAtomMdQ_, bool kDoubleBufferQ_, typename Element_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = kNWarps * 32;
  static constexpr bool kDoubleBufferQ = kDoubleBufferQ_;
  static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0 && kBlockM % 64 == 0);

  using TiledMmaSdP = TiledMmaFor<Element, kNWarps, kAtomMSdP_>;
  using TiledMmadKV = TiledMmaFor<Element, kNWarps, kAtomNdKV_>;
  using TiledMmadQ = TiledMmaFor<Element, kNWarps, kAtomMdQ_>;

  using SmemLayoutQdO = SmemTile<kBlockM, kHeadDim>;
  using SmemLayoutQdOt = SmemTileT<kBlockM, kHeadDim>;
  using SmemLayoutQdOtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutQdOt{}));
  using SmemLayoutKV = SmemTile<kBlockN, kHeadDim>;  // also stages dK / dV
  using SmemLayoutKt = SmemTileT<kBlockN, kHeadDim>;
  using SmemLayoutKtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutKt{}));
  using SmemLayoutPdS = SmemTile<kBlockM, kBlockN>;
  using SmemLayoutPdSt = SmemTileT<kBlockM, kBlockN>;
  using SmemLayoutPdStNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutPdSt{}));

  using Gmem = GmemCopies<Element, kNThreads>;

  static constexpr int kQdOTileBytes = kBlockM * kHeadDim * int(sizeof(Element));
  static constexpr int kKVTileBytes = kBlockN * kHeadDim * int(sizeof(Element));
  static constexpr int kPdSTileBytes = kBlockM * kBlockN * int(sizeof(Element));
  // Q (one or two buffers), dO, K, V, P, dS.
  static constexpr int kSmemBytes =
      (kDoubleBufferQ ? 3 : 2) * kQdOTileBytes + 2 * kKVTileBytes + 2 * kPdSTileBytes;
};

}  // namespace flash_ext::cuda::sm80
