// The CUDA backend as the torch glue sees it: plain params in, kernels
// launched on the given stream. No torch header here or below.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../common/params.h"

namespace flash_ext::cuda {

// Why a call cannot be served by the CUDA kernels (nullptr when it can). The
// glue checks this before allocating anything; Python then falls back.
const char* fwd_unsupported_reason(const AttentionFwdParams& params, int device_major,
                                   int device_minor);
const char* bwd_unsupported_reason(const AttentionBwdParams& params, int device_major,
                                   int device_minor);
const char* kvcache_unsupported_reason(const KVCacheParams& params, int device_major,
                                       int device_minor);

// Workspace (bytes) the backward needs beyond params' own buffers:
// the glue allocates it and passes it as dq_accum / softmax_d.
struct BwdWorkspace {
  size_t dq_accum_floats;   // float32 elements for dq accumulation
  size_t softmax_d_floats;  // float32 elements for D = rowsum(dO * O)
  // The kernels zero the dq_accum rows they use themselves: the glue may
  // leave it uninitialized. Otherwise it must be zeroed on the stream.
  bool dq_accum_zeroed_by_kernels = false;
};
BwdWorkspace bwd_workspace(const AttentionBwdParams& params);
// Whether the forward wants params.tile_counter (an int32, zero before the
// call, which the call leaves zero).
bool fwd_needs_tile_counter(const AttentionFwdParams& params);

void run_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);
void run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);
void run_kvcache_fwd(const KVCacheParams& params, cudaStream_t stream);

// Number of split-KV partitions for num_splits = 0 (chosen from the SM count).
int choose_num_splits(const KVCacheParams& params, int num_sms, int device_major);
// Whether params.num_splits splits merge inside a thread-block cluster, which
// needs neither out_partial/lse_partial nor split_counters.
bool kvcache_merges_in_cluster(const KVCacheParams& params, int device_major);
// How many int32 params.split_counters holds: one per (sequence, kv head,
// row block), the groups whose splits are merged together.
int64_t kvcache_split_groups(const KVCacheParams& params);

// The family whose attention kernel was launched last (forward or backward,
// any thread: backward runs on autograd's device thread).
const char* last_kernel_family();

// Replaces the Hopper forward's knobs by `spec`'s (FLASH_EXT_FWD_TUNING's
// syntax, defaults for the keys it leaves out; "" restores the defaults), so
// timing scripts can alternate settings in one process. For benchmarks:
// not synchronized with calls on other threads. Throws std::invalid_argument
// on a bad spec (nothing changed) or without Hopper kernels.
void set_fwd_tuning(const std::string& spec);
// The same for the Hopper backward's FLASH_EXT_BWD_TUNING knobs.
void set_bwd_tuning(const std::string& spec);
// The same for the split-KV decoding's FLASH_EXT_DECODE_TUNING knobs.
void set_decode_tuning(const std::string& spec);

}  // namespace flash_ext::cuda
