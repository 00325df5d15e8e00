// Backward kernels of the sm80 family for calls that modify scores, head dim 256, bf16.
#include "../sm80_configs.cuh"

namespace flash_ext::cuda::sm80 {
template void run_bwd_masking<256, ScalarKind::kBFloat16, true>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm80
