// Forward kernel of the Hopper family, head dim 64, fp16.
#include "../sm90_configs.cuh"

namespace flash_ext::cuda::sm90 {
template void run_fwd<64, ScalarKind::kFloat16, false>(const AttentionFwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm90
