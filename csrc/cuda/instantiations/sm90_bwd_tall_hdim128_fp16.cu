// Backward kernel of the Hopper family, head dim 128, 80-row query tiles, fp16.
#include "../sm90_bwd_configs.cuh"

namespace flash_ext::cuda::sm90 {
template void run_bwd_tall<ScalarKind::kFloat16>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm90
