// Forward kernel of the Hopper family, head dim 256, bf16.
#include "../sm90_configs.cuh"

namespace flash_ext::cuda::sm90 {
template void run_fwd<256, ScalarKind::kBFloat16, false>(const AttentionFwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm90
