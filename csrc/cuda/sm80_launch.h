// Entry points of the sm80 kernel family, one explicit instantiation per
// (head dim, dtype) in instantiations/, so dispatch.cu needs no CuTe header.
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"

namespace flash_ext::cuda::sm80 {

// Head dims with kernels; others run on the next size up with the extra
// dims zero-filled on load and never stored.
constexpr int head_dim_instance(int64_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

// Query-tile height of the backward kernel (sizes the dq semaphores).
constexpr int bwd_block_m(int) { return 64; }

// Shared memory per block of the forward and backward kernels.
constexpr int fwd_smem_bytes(int head_dim_inst) { return head_dim_inst == 256 ? 128 * 1024 : head_dim_inst == 128 ? 64 * 1024 : 48 * 1024; }
constexpr int bwd_smem_bytes(int head_dim_inst) { return head_dim_inst == 64 ? 88 * 1024 : 144 * 1024; }

template <int kHeadDim, ScalarKind kDtype>
void run_fwd(const AttentionFwdParams& params, cudaStream_t stream);
template <int kHeadDim, ScalarKind kDtype>
void run_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace flash_ext::cuda::sm80
