// Split-KV attention kernels for __half, head dim 128 (one file per
// instantiation keeps compile times parallel).
#include "kvcache_kernel.cuh"

namespace flash_ext::cuda::kvcache {
template void launch_attention<__half, 128>(const KernelArgs&, bool, cudaStream_t);
}  // namespace flash_ext::cuda::kvcache
