// Online softmax over score tiles held in registers (rows x cols view of an
// m16n8 accumulator). Scores stay unscaled; scale * log2(e) is folded into one
// FMA before exp2. Rows that see no key keep max = -inf and end with
// out = 0, lse = -inf, never NaN.
#pragma once

#include <cmath>

#include "tile_utils.cuh"

namespace flash_ext::cuda::sm80 {

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // this thread's columns only until finalize()

  // Folds tile `s` (rows x cols, replaced by its probabilities) into the
  // running max / sum, rescaling the output accumulator `o` (rows x dims).
  template <bool kFirst, class S, class O>
  __device__ __forceinline__ void update(S& s, O& o, float scale_log2) {
    static_assert(decltype(size<0>(s))::value == kRows);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float m = kFirst ? -INFINITY : row_max[mi];
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) m = fmaxf(m, s(mi, ni));
      m = quad_allreduce(m, [](float a, float b) { return fmaxf(a, b); });
      // A fully masked row so far: subtract 0, so exp2(-inf) = 0 and no NaN.
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      float sum = 0.f;
      if (!kFirst) {
        const float corr = exp2f(fmaf(row_max[mi], scale_log2, -m_scaled));
        sum = row_sum[mi] * corr;
        CUTE_UNROLL
        for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= corr;
      }
      row_max[mi] = m;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const float p = exp2f(fmaf(s(mi, ni), scale_log2, -m_scaled));
        s(mi, ni) = p;
        sum += p;
      }
      row_sum[mi] = sum;
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
