// Split-KV attention kernels for __nv_bfloat16, head dim 256 (one file per
// instantiation keeps compile times parallel).
#include "kvcache_kernel.cuh"

namespace flash_ext::cuda::kvcache {
template void launch_attention<__nv_bfloat16, 256>(const KernelArgs&, bool, cudaStream_t);
}  // namespace flash_ext::cuda::kvcache
