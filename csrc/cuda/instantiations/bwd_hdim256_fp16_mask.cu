// Backward kernels of the sm80 family with an attn_mask, head dim 256, fp16.
#include "../sm80_configs.cuh"

namespace flash_ext::cuda::sm80 {
template void run_bwd_masking<256, ScalarKind::kFloat16, true>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm80
