// Online softmax over score tiles held in registers (rows x cols view of an
// m16n8 accumulator). Scores stay unscaled; scale * log2(e) is folded into one
// FMA before exp2. Rows that see no key keep max = -inf and end with
// out = 0, lse = -inf, never NaN.
#pragma once

#include <cmath>
#include <type_traits>

#include "tile_utils.cuh"

namespace flash_ext::cuda::sm80 {

// kChains: the row maxima and sums as that many interleaved partial results,
// so each is a few short dependency chains rather than one as long as the
// row (the max is exact in any order; the sum's rounding changes slightly).
// The Hopper forward takes 4; the sm80 kernels keep 1, as their registers
// are full (4 chains spilled 760 B instead of 388 at d = 64).
template <int kRows, int kChains = 1>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // this thread's columns only until finalize()

  // Folds tile `s` (rows x cols, replaced by its probabilities) into the
  // running max / sum, rescaling the output accumulator `o` (rows x dims).
  template <bool kFirst, class S, class O>
  __device__ __forceinline__ void update(S& s, O& o, float scale_log2) {
    float corr[kRows];
    fold<kFirst>(s, scale_log2, corr);
    if (!kFirst) rescale(o, corr);
  }

  // update() in two steps, for kernels whose product into `o` is still in
  // flight while the next tile's softmax runs: fold() returns each row's
  // correction of `o`, rescale() applies it once the product has landed.
  // max_slack: a row keeps its running maximum while the tile's exceeds it
  // by at most this much (log2 units of the scaled scores), so its
  // correction is exactly 1; probabilities then reach up to 2^max_slack,
  // and the output and the LSE are the same in exact arithmetic.
  template <bool kFirst, class S>
  __device__ __forceinline__ void fold(S& s, float scale_log2, float (&corr)[kRows], float max_slack = 0.f) {
    static_assert(decltype(size<0>(s))::value == kRows);
    constexpr int kCols = decltype(size<1>(s))::value;
    static_assert(kCols % kChains == 0, "whole chains per row");
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float part[kChains];
      CUTE_UNROLL
      for (int c = 0; c < kChains; ++c) part[c] = c == 0 && !kFirst ? row_max[mi] : -INFINITY;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) part[ni % kChains] = fmaxf(part[ni % kChains], s(mi, ni));
      float m = row_allmax(part);
      // A kept maximum corrects by exactly 1 (the FMA would leave the
      // product's rounding error), which lets the Hopper forward skip O's
      // rescale where no row of a warp moved.
      const bool keep = !kFirst && keeps_max(mi, m, scale_log2, max_slack);
      if (keep) m = row_max[mi];
      const float m_scaled = exponent_offset(m, scale_log2);
      corr[mi] = kFirst || keep ? 1.f : exp2f(fmaf(row_max[mi], scale_log2, -m_scaled));
      row_max[mi] = m;
      CUTE_UNROLL
      for (int c = 0; c < kChains; ++c) part[c] = c == 0 && !kFirst ? row_sum[mi] * corr[mi] : 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float x = fmaf(s(mi, ni), scale_log2, -m_scaled);
        const float p = exp2f(x);
        s(mi, ni) = p;
        part[ni % kChains] += p;
      }
      row_sum[mi] = chain_sum(part);
    }
  }

  // fold<false>() with the tile's exponentials taken before its row maxima
  // are known: against the running maxima, written converted to `p` (the
  // 16-bit P, rows x cols as `s`), the maxima reduced beside them (on other
  // units than MUFU's, so they leave the chain). Where every row of the warp
  // keeps its running maximum (fold()'s rule, max_slack) that is fold()'s
  // result bit for bit and it returns true; else it returns false with the
  // row statistics and `s` unchanged, and the caller folds the tile with
  // fold() (and converts P again).
  template <class S, class P>
  __device__ __forceinline__ bool fold_ahead(const S& s, P& p, float scale_log2, float (&corr)[kRows],
                                             float max_slack) {
    static_assert(decltype(size<0>(s))::value == kRows);
    constexpr int kCols = decltype(size<1>(s))::value;
    static_assert(kCols % kChains == 0 && kCols % 2 == 0, "whole chains and pairs of columns per row");
    static_assert(decltype(shape<1, 0>(p.layout()))::value == 2 && decltype(stride<1, 0>(p.layout()))::value == 1,
                  "each pair of columns in neighbouring registers");
    using Element = typename std::decay_t<P>::value_type;
    using Pair = cutlass::Array<Element, 2>;
    cutlass::NumericArrayConverter<Element, float, 2> convert;
    bool keep = true;
    float sum[kRows];
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      // A row without a key so far (-inf) never keeps: its exponentials
      // here are discarded.
      const float m_scaled = exponent_offset(row_max[mi], scale_log2);
      float max_part[kChains], sum_part[kChains];
      CUTE_UNROLL
      for (int c = 0; c < kChains; ++c) {
        max_part[c] = c == 0 ? row_max[mi] : -INFINITY;
        sum_part[c] = c == 0 ? row_sum[mi] : 0.f;
      }
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ni += 2) {
        cutlass::Array<float, 2> e;
        CUTE_UNROLL
        for (int j = 0; j < 2; ++j) {
          max_part[(ni + j) % kChains] = fmaxf(max_part[(ni + j) % kChains], s(mi, ni + j));
          e[j] = exp2f(fmaf(s(mi, ni + j), scale_log2, -m_scaled));
          sum_part[(ni + j) % kChains] += e[j];
        }
        *reinterpret_cast<Pair*>(&p(mi, ni)) = convert(e);
      }
      keep &= keeps_max(mi, row_allmax(max_part), scale_log2, max_slack);
      sum[mi] = chain_sum(sum_part);
    }
    if (!__all_sync(0xffffffffu, keep)) return false;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      row_sum[mi] = sum[mi];
      corr[mi] = 1.f;
    }
    return true;
  }

  // fold()'s rule, shared by fold_ahead(): row mi keeps its running maximum
  // while the tile moves it by at most max_slack (NaN, false, where both are
  // -inf: a row without a key so far).
  __device__ __forceinline__ bool keeps_max(int mi, float m, float scale_log2, float max_slack) const {
    return (m - row_max[mi]) * scale_log2 <= max_slack;
  }

  // What exp2's argument subtracts for a row of maximum m: 0 for a row
  // without a key so far, so exp2(-inf) = 0 and no NaN.
  __device__ __forceinline__ static float exponent_offset(float m, float scale_log2) {
    return m == -INFINITY ? 0.f : m * scale_log2;
  }

  // A row's maximum from this thread's partial chains and its quad's.
  __device__ __forceinline__ static float row_allmax(const float (&part)[kChains]) {
    float m = part[0];
    CUTE_UNROLL
    for (int c = 1; c < kChains; ++c) m = fmaxf(m, part[c]);
    return quad_allreduce(m, [](float a, float b) { return fmaxf(a, b); });
  }

  // This thread's part of a row's sum, its chains added in order.
  __device__ __forceinline__ static float chain_sum(const float (&part)[kChains]) {
    float sum = part[0];
    CUTE_UNROLL
    for (int c = 1; c < kChains; ++c) sum += part[c];
    return sum;
  }

  template <class O>
  __device__ __forceinline__ static void rescale(O& o, const float (&corr)[kRows]) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= corr[mi];
    }
  }

  // Normalizes `o` (times the dropout rescale) and returns each row's
  // natural-log LSE of scale * score in lse[].
  template <class O>
  __device__ __forceinline__ void finalize(O& o, float scale, float out_scale, float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float sum = quad_allreduce(row_sum[mi], [](float a, float b) { return a + b; });
      const bool empty = !(sum > 0.f);
      const float inv = empty ? 0.f : out_scale / sum;
      lse[mi] = empty ? -INFINITY : row_max[mi] * scale + logf(sum);
      CUTE_UNROLL
      for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= inv;
    }
  }
};

}  // namespace flash_ext::cuda::sm80
