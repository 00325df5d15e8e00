// The standalone split-KV combine kernel: one warp per (sequence, head,
// token) row, merging the partials through kvcache_combine.cuh.
#include "kvcache_combine.cuh"
#include "kvcache_launch.cuh"

namespace flash_ext::cuda::kvcache {
namespace {

constexpr int kRowsPerBlock = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 4) combine_kernel(const __grid_constant__ KVCacheParams p) {
  grid_dependency_wait();     // the partials come from the attention kernel
  allow_dependent_launch();   // whatever follows waits for our completion anyway
  const int64_t rows_total = p.batch * p.heads * p.q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows_total) return;
  combine_row<T>(p, row, threadIdx.x & 31);
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
