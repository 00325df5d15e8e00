// Backward kernel of the Hopper family, head dim 256, bf16.
#include "../sm90_bwd_configs.cuh"

namespace flash_ext::cuda::sm90 {
template void run_bwd<256, ScalarKind::kBFloat16, false>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm90
