// Forward kernels of the sm80 family, head dim 128, bf16.
#include "../sm80_configs.cuh"

namespace flash_ext::cuda::sm80 {
template void run_fwd<128, ScalarKind::kBFloat16>(const AttentionFwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm80
