// Backward kernels of the sm80 family without attn_mask, head dim 64, fp16
// (those with one are in bwd_hdim64_fp16_mask.cu, built in parallel).
#include "../sm80_configs.cuh"

namespace flash_ext::cuda::sm80 {
extern template void run_bwd_masking<64, ScalarKind::kFloat16, true>(const AttentionBwdParams&, cudaStream_t);
template void run_bwd<64, ScalarKind::kFloat16>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm80
