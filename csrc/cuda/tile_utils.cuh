// Building blocks shared by the CUDA kernels (sm80 family; the Hopper one uses
// the accumulator views, conversion and softmax reductions): tensor-core
// GEMMs over shared-memory tiles, accumulator layout views, predicated tile
// copies and the store of an accumulator tile through shared memory.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include "kernel_traits.h"

#include <cstdint>

namespace flash_ext::cuda::sm80 {

using namespace cute;

// acc += A * B^T with both operands read from shared memory by ldmatrix, the
// next k-slice loaded while the current one multiplies.
// copy_x is the ldmatrix TiledCopy, thr_x its slice for this thread.
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class CopyA, class ThrA,
          class CopyB, class ThrB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& tCrA, RB& tCrB, const SA& tCsA, const SB& tCsB,
                                        const Mma& mma, const CopyA& copy_a, const ThrA& thr_a,
                                        const CopyB& copy_b, const ThrB& thr_b) {
  auto tCrA_view = thr_a.retile_D(tCrA);
  auto tCrB_view = thr_b.retile_D(tCrB);
  copy(copy_a, tCsA(_, _, _0{}), tCrA_view(_, _, _0{}));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  constexpr int kSteps = decltype(size<2>(tCrA))::value;
  CUTE_UNROLL
  for (int k = 0; k < kSteps; ++k) {
    if (k + 1 < kSteps) {
      copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
      copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    }
    gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A * B^T with A already in registers.
template <class Acc, class RA, class RB, class SB, class Mma, class CopyB, class ThrB>
__device__ __forceinline__ void gemm_rs(Acc& acc, const RA& tCrA, RB& tCrB, const SB& tCsB,
                                        const Mma& mma, const CopyB& copy_b, const ThrB& thr_b) {
  auto tCrB_view = thr_b.retile_D(tCrB);
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  constexpr int kSteps = decltype(size<2>(tCrA))::value;
  CUTE_UNROLL
  for (int k = 0; k < kSteps; ++k) {
    if (k + 1 < kSteps) copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// An accumulator layout seen as (rows, cols). m16n8 (mma.sync):
// ((2 cols, 2 rows), MMA_M, MMA_N) -> ((2, MMA_M), (2, MMA_N)); Hopper wgmma
// m64nN: ((2 cols, 2 rows, N/8 col groups), MMA_M, MMA_N) -> ((2, MMA_M), (2, N/8, MMA_N)).
template <class L>
__device__ __forceinline__ auto rowcol_layout(L l) {
  if constexpr (decltype(rank<0>(l))::value == 2) {
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
  } else {
    static_assert(decltype(rank<0>(l))::value == 3);
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
  }
}

template <class T>
__device__ __forceinline__ auto rowcol(T&& t) {
  return make_tensor(t.data(), rowcol_layout(t.layout()));
}

// Two neighbouring n8 accumulator column groups form the k16 A operand of the
// next product. m16n8k16: ((2,2), MMA_M, MMA_N) -> ((2,2,2), MMA_M, MMA_N/2);
// wgmma (register A): ((2,2,N/8), MMA_M, MMA_N) -> ((2,2,2), MMA_M, (N/16, MMA_N)).
template <class L>
__device__ __forceinline__ auto acc_to_a_layout(L l) {
  if constexpr (decltype(rank<0>(l))::value == 2) {
    auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});
    return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
  } else {
    auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
    return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(l),
                       make_layout(get<2, 1>(v), get<2>(l)));
  }
}

template <class To, class T>
__device__ __forceinline__ auto convert_to(const T& src) {
  using From = typename T::value_type;
  constexpr int kN = decltype(size(src))::value;
  cutlass::NumericArrayConverter<To, From, kN> conv;
  Tensor out = make_tensor<To>(src.layout());
  *reinterpret_cast<cutlass::Array<To, kN>*>(out.data()) =
      conv(*reinterpret_cast<const cutlass::Array<From, kN>*>(src.data()));
  return out;
}

// Butterfly reductions across the four lanes that share an accumulator row.
template <class Op>
__device__ __forceinline__ float quad_allreduce(float x, Op op) {
  x = op(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return op(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// cp.async of a (rows, cols) tile partition, zero-filling elements outside
// [0, max_row) x [0, max_col): tails of the sequence and of the head dim.
template <class Copy, class S, class D, class C>
__device__ __forceinline__ void load_tile(const Copy& tiled_copy, const S& src, D& dst,
                                          const C& coords, int max_row, int max_col) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    const bool row_ok = get<0>(coords(0, m, 0)) < max_row;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      const bool ok = row_ok && get<1>(coords(0, 0, k)) < max_col;
      copy(tiled_copy.with(ok), src(_, m, k), dst(_, m, k));
    }
  }
}

__device__ __forceinline__ void cp_async_commit() { cute::cp_async_fence(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  cute::cp_async_wait<N>();
}

// Converts an accumulator fragment of `mma` (a (rows, cols) tile) to Element,
// stages it in shared memory (swizzled `smem_layout`) and writes the rows
// < max_row, columns < max_col to `gdst` with 16-byte stores. The caller
// synchronizes before reusing the shared memory.
template <class Element, int kNThreads, class Mma, class Acc, class SmemLayout, class G>
__device__ __forceinline__ void store_acc_tile(const Acc& acc, const Mma& mma, Element* smem,
                                               SmemLayout smem_layout, G& gdst, int max_row,
                                               int max_col) {
  const int tid = threadIdx.x;
  Tensor s = make_tensor(make_smem_ptr(smem), smem_layout);
  auto r2s = make_tiled_copy_C(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>{}, mma);
  auto r2s_thr = r2s.get_thread_slice(tid);
  Tensor out = convert_to<Element>(acc);
  Tensor src = r2s_thr.retile_S(out);
  Tensor dst = r2s_thr.partition_D(s);
  copy(r2s, src, dst);
  __syncthreads();

  using Store = typename GmemCopies<Element, kNThreads>::Store;
  Store s2g;
  auto s2g_thr = s2g.get_thread_slice(tid);
  Tensor tS = s2g_thr.partition_S(s);
  Tensor tG = s2g_thr.partition_D(gdst);
  Tensor tC = s2g_thr.partition_D(make_identity_tensor(make_shape(size<0>(s), size<1>(s))));
  Tensor reg = make_fragment_like(tS);
  copy(s2g, tS, reg);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(reg); ++m) {
    if (get<0>(tC(0, m, 0)) < max_row) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(reg); ++k) {
        if (get<1>(tC(0, 0, k)) < max_col) copy(s2g, reg(_, m, k), tG(_, m, k));
      }
    }
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace flash_ext::cuda::sm80
