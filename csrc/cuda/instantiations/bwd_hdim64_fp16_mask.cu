// Backward kernels of the sm80 family for calls that modify scores, head dim 64, fp16.
#include "../sm80_configs.cuh"

namespace flash_ext::cuda::sm80 {
template void run_bwd_masking<64, ScalarKind::kFloat16, true>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm80
