// Forward kernel of the Hopper family, head dim 128, fp16.
#include "../sm90_configs.cuh"

namespace flash_ext::cuda::sm90 {
template void run_fwd<128, ScalarKind::kFloat16, false>(const AttentionFwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm90
