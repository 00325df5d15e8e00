// Backward kernel of the Hopper family for varlen (packed) batches, head dim 128, fp16.
#include "../sm90_bwd_configs.cuh"

namespace flash_ext::cuda::sm90 {
template void run_bwd<128, ScalarKind::kFloat16, true>(const AttentionBwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm90
