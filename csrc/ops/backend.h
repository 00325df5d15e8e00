// Per-device pieces of the glue: random seeds, workspaces, streams and the
// kernel entry points. attention.cpp and kvcache.cpp stay device-agnostic.
#pragma once

#include <ATen/ATen.h>

#include "../common/params.h"

namespace flash_ext::backend {

// The tensor as the device's kernels can read it in place, else a
// contiguous copy: CUDA loads 16-byte vectors (aligned start, strides in
// multiples of 16 bytes); the CPU takes any layout with a contiguous last dim.
at::Tensor readable_layout(const at::Tensor& t);

// Fills dropout's seed and offset from the device's default generator and
// returns rng_state ([seed, offset], int64, on q's device) for backward.
at::Tensor seed_dropout(const at::Tensor& q, DropoutParams& dropout);

// Points backward's dropout at the rng_state that forward returned.
void replay_dropout(const at::Tensor& rng_state, DropoutParams& dropout);

void run_attention_fwd(const at::Tensor& q, AttentionFwdParams& params);
void run_attention_bwd(const at::Tensor& q, AttentionBwdParams& params);

// Picks num_splits when it is 0, allocates the split partials and runs.
void run_kvcache(const at::Tensor& q, KVCacheParams& params, int64_t max_keys);

namespace cpu {
at::Tensor seed_dropout(const at::Tensor& q, DropoutParams& dropout);
void replay_dropout(const at::Tensor& rng_state, DropoutParams& dropout);
void run_kvcache(KVCacheParams& params, int64_t max_keys);
}  // namespace cpu

namespace cuda {
at::Tensor seed_dropout(const at::Tensor& q, DropoutParams& dropout);
void replay_dropout(const at::Tensor& rng_state, DropoutParams& dropout);
void run_attention_fwd(const at::Tensor& q, AttentionFwdParams& params);
void run_attention_bwd(const at::Tensor& q, AttentionBwdParams& params);
void run_kvcache(const at::Tensor& q, KVCacheParams& params, int64_t max_keys);
}  // namespace cuda

}  // namespace flash_ext::backend
