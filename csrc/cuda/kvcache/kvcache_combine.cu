// Merges the split-KV partial results through their log-sum-exp:
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s.
// One warp per (sequence, head, token) row; splits with lse_s = -inf (no
// visible keys) are skipped, since their partial output was not written.
#include <cmath>

#include "kvcache_device.cuh"
#include "kvcache_launch.cuh"

namespace flash_ext::cuda::kvcache {
namespace {

constexpr int kRowsPerBlock = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 4) combine_kernel(const __grid_constant__ KVCacheParams p) {
  constexpr float kNegInf = -INFINITY;
  grid_dependency_wait();     // the partials come from the attention kernel
  allow_dependent_launch();   // whatever follows waits for our completion anyway
  const int64_t rows_total = p.batch * p.heads * p.q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows_total) return;
  const int lane = threadIdx.x & 31, splits = static_cast<int>(p.num_splits);
  const float* lse_part = p.lse_partial + row;

  // Lane j holds split j (+32k) of the row.
  float max_lse = kNegInf;
  for (int s = lane; s < splits; s += 32) max_lse = fmaxf(max_lse, lse_part[s * rows_total]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));
  float sum = 0.f;
  if (max_lse != kNegInf) {
    for (int s = lane; s < splits; s += 32) sum += expf(lse_part[s * rows_total] - max_lse);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float lse = max_lse == kNegInf ? kNegInf : max_lse + logf(sum);

  const int64_t t = row % p.q_len, bh = row / p.q_len;
  const int64_t h = bh % p.heads, b = bh / p.heads;
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + t * p.o_stride[2];
  const int dim = static_cast<int>(p.v_head_dim);
  const int64_t split_stride = rows_total * dim;
  for (int c = lane * 4; c < dim; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += 32) {
      const float lse_s = s0 + lane < splits ? lse_part[(s0 + lane) * rows_total] : kNegInf;
      const float weight = lse_s == kNegInf ? 0.f : expf(lse_s - lse);
      const int count = min(32, splits - s0);
      // Loads are unconditional so that several are in flight; an empty
      // split's unwritten partial (weight 0) is dropped by a select, never
      // multiplied.
      const float* part = p.out_partial + (s0 * rows_total + row) * dim + c;
#pragma unroll 8
      for (int j = 0; j < count; ++j, part += split_stride) {
        const float4 v = *reinterpret_cast<const float4*>(part);
        const float w = __shfl_sync(0xffffffffu, weight, j);
        if (w != 0.f) {
          acc.x += w * v.x;
          acc.y += w * v.y;
          acc.z += w * v.z;
          acc.w += w * v.w;
        }
      }
    }
    *reinterpret_cast<uint2*>(out + c) =
        make_uint2(Element<T>::pack(acc.x, acc.y), Element<T>::pack(acc.z, acc.w));
  }
  if (lane == 0) p.lse[row] = lse;
}

}  // namespace

template <typename T>
void launch_combine(const KVCacheParams& p, bool pdl, cudaStream_t stream) {
  const int64_t rows_total = p.batch * p.heads * p.q_len;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>((rows_total + kRowsPerBlock - 1) / kRowsPerBlock));
  config.blockDim = dim3(32 * kRowsPerBlock);
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, combine_kernel<T>, p), "launching the split-KV combine kernel");
}

template void launch_combine<__half>(const KVCacheParams&, bool, cudaStream_t);
template void launch_combine<__nv_bfloat16>(const KVCacheParams&, bool, cudaStream_t);

}  // namespace flash_ext::cuda::kvcache
