// Entry points of the Hopper (sm_90a) kernel family, one explicit
// instantiation per (head dim, dtype) in instantiations/sm90_*, so dispatch.cu
// needs no CuTe header. Built only when FLASH_EXT_CUDA_ARCHS includes 9.0a
// (setup.py defines FLASH_EXT_SM90A).
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"

namespace flash_ext::cuda::sm90 {

// Head dims with kernels; others run on the next size up: TMA zero-fills the
// extra dims on load and the epilogue never stores them.
constexpr int head_dim_instance(int64_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

// kVarlen: params has cu_seqlens (instantiated in sm90_fwd_varlen_*).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_fwd(const AttentionFwdParams& params, cudaStream_t stream);

// Backward at head dims 64, 128 and 256 (instances); it wants a softmax_d
// workspace of bwd_softmax_d_floats: D and lse per query row, padded like
// the rows of dq_accum (sm80's dq_workspace, which also sizes dq_accum).
template <int kHeadDim, ScalarKind kDtype>
void run_bwd(const AttentionBwdParams& params, cudaStream_t stream);
constexpr int64_t bwd_softmax_d_floats(int64_t batch, int64_t heads, int64_t q_len) {
  return 2 * batch * heads * ((q_len + 127) / 128 * 128);
}

}  // namespace flash_ext::cuda::sm90
