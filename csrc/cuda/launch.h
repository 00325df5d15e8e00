// Launch of a prefill kernel on a 1-D grid with its dynamic shared memory
// opted in, any CUDA error turned into an exception that names the kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace flash_ext::cuda {

// Blocks of a grid-stride kernel over `work_blocks` blocks' worth of work:
// capped, as the kernels loop over whatever the grid does not cover.
inline dim3 grid_stride_blocks(int64_t work_blocks) {
  constexpr int64_t kMaxBlocks = 65536 * 16;
  return dim3(static_cast<unsigned>(work_blocks < kMaxBlocks ? work_blocks : kMaxBlocks));
}

// `what` names the kernel in errors, e.g. "attention forward (sm90".
template <class Kernel, class... Args>
void launch_1d(const char* what, int head_dim, Kernel kernel, int64_t blocks, int threads, int smem,
               cudaStream_t stream, const Args&... args) {
  if (blocks == 0) return;
  const auto fail = [&](const std::string& why) {
    return std::runtime_error(std::string("flash_ext ") + what + ", head dim " + std::to_string(head_dim) +
                              "): " + why);
  };
  if (blocks > 0x7fffffff) throw fail("grid too large");
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) {
    kernel<<<dim3(static_cast<unsigned>(blocks)), threads, smem, stream>>>(args...);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) throw fail(std::string("launch failed: ") + cudaGetErrorString(err));
}

}  // namespace flash_ext::cuda
