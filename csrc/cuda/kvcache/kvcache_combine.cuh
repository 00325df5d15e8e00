// Merging the split-KV partial results of one row through their log-sum-exp:
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s.
// Splits with lse_s = -inf (no visible keys) are skipped, since their partial
// output was not written. Used by the attention kernel's last split of a
// group (fused combine) and by the standalone combine kernel.
#pragma once

#include <cmath>

#include "../../common/params.h"
#include "kvcache_device.cuh"

namespace flash_ext::cuda::kvcache {

// One warp merges packed row `row` = (batch * heads + head) * q_len + token.
// The partials were written by other blocks of a kernel that may still run:
// loads go through L2 (ld.global.cg), never a stale L1 line.
template <typename T>
__device__ __forceinline__ void combine_row(const KVCacheParams& p, int64_t row, int lane) {
  constexpr float kNegInf = -INFINITY;
  const int64_t rows_total = p.batch * p.heads * p.q_len;
  const int splits = static_cast<int>(p.num_splits);
  const float* lse_part = p.lse_partial + row;

  // Lane j holds split j (+32k) of the row. The first 32 splits' lse stay in
  // a register (one L2 round trip in the common case); later ones are
  // re-read where needed.
  const float lse_first = lane < splits ? __ldcg(lse_part + lane * rows_total) : kNegInf;
  float max_lse = lse_first;
  for (int s = lane + 32; s < splits; s += 32) max_lse = fmaxf(max_lse, __ldcg(lse_part + s * rows_total));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));
  float sum = 0.f;
  if (max_lse != kNegInf) {
    sum = expf(lse_first - max_lse);
    for (int s = lane + 32; s < splits; s += 32) sum += expf(__ldcg(lse_part + s * rows_total) - max_lse);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float lse = max_lse == kNegInf ? kNegInf : max_lse + logf(sum);

  const int64_t t = row % p.q_len, bh = row / p.q_len;
  const int64_t h = bh % p.heads, b = bh / p.heads;
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + t * p.o_stride[2];
  const int dim = static_cast<int>(p.v_head_dim);
  const int64_t split_stride = rows_total * dim;
  // Every lane runs every step (the weights move by warp shuffles); lanes
  // past the last column (d < 128) load and store nothing.
  for (int c0 = 0; c0 < dim; c0 += 128) {
    const int c = c0 + lane * 4;
    const bool has_columns = c < dim;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += 32) {
      const float lse_s = s0 == 0                ? lse_first
                          : s0 + lane < splits ? __ldcg(lse_part + (s0 + lane) * rows_total)
                                               : kNegInf;
      const float weight = lse_s == kNegInf ? 0.f : expf(lse_s - lse);
      const int count = min(32, splits - s0);
      // Loads do not wait on the weight, so several are in flight; an empty
      // split's unwritten partial (weight 0) is dropped by a select, never
      // multiplied.
      const float* part = p.out_partial + (s0 * rows_total + row) * dim + c;
#pragma unroll 8
      for (int j = 0; j < count; ++j, part += split_stride) {
        const float4 v = has_columns ? __ldcg(reinterpret_cast<const float4*>(part)) : make_float4(0.f, 0.f, 0.f, 0.f);
        const float w = __shfl_sync(0xffffffffu, weight, j);
        if (w != 0.f) {
          acc.x += w * v.x;
          acc.y += w * v.y;
          acc.z += w * v.z;
          acc.w += w * v.w;
        }
      }
    }
    if (has_columns) {
      *reinterpret_cast<uint2*>(out + c) = make_uint2(Element<T>::pack(acc.x, acc.y), Element<T>::pack(acc.z, acc.w));
    }
  }
  if (lane == 0) p.lse[row] = lse;
}

}  // namespace flash_ext::cuda::kvcache
