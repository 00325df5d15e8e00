// tanh for logit soft-capping, shared by the sm80 and the decoding kernels.
#pragma once

#include <cuda_runtime.h>

namespace flash_ext::cuda {

// 2 log2(e): callers fold it, with their scales, into the argument.
constexpr double kTwoLog2e = 2.8853900817779268;

// tanh(x) given x2 = 2 log2(e) x, as 1 - 2 / (2^x2 + 1): two MUFU operations
// and an absolute error near 1e-7. tanh.approx.f32 (one operation, relative
// error 2^-11) would put about softcap * 5e-4 of error on each logit, more
// than float16 rounding of the probabilities. Saturates to +-1 without NaN.
__device__ __forceinline__ float tanh_exp2(float x2) {
  return 1.f - __fdividef(2.f, exp2f(x2) + 1.f);
}

}  // namespace flash_ext::cuda
