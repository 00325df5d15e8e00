// Forward kernels of the sm80 family, head dim 256, fp16.
#include "../sm80_configs.cuh"

namespace flash_ext::cuda::sm80 {
template void run_fwd<256, ScalarKind::kFloat16>(const AttentionFwdParams&, cudaStream_t);
}  // namespace flash_ext::cuda::sm80
