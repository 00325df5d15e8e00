// Split-KV decoding (flash-decoding) on CUDA: what the launcher files share.
// The kernels live in kvcache_kernel.cuh (attention) and kvcache_combine.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../common/fast_divmod.h"
#include "../../common/params.h"

namespace flash_ext::cuda::kvcache {

// Keys per pipeline stage: one shared-memory tile of K and one of V.
constexpr int kBlockN = 64;
constexpr int kThreads = 128;  // four warps
constexpr int kMaxStages = 6;
// Most splits merged inside a thread-block cluster (the portable cluster size).
constexpr int kMaxClusterSplits = 8;

// Knobs with defaults that FLASH_EXT_DECODE_TUNING overrides, so that
// scripts/decode_tuning.py can time the choices side by side.
struct Tuning {
  int stages = 0;             // cp.async pipeline depth, 2..kMaxStages; 0 = by head dim
  bool pdl = true;            // programmatic dependent launch where the device has it
  bool fused_combine = true;  // the last split merges (needs p.split_counters)
  bool cluster_merge = true;  // sm90, up to kMaxClusterSplits splits: merge in a cluster
};

// Whether the splits of a group run as one thread-block cluster and merge
// through distributed shared memory: no partials in global memory, no
// counters, no last-block hand-off. Hopper, 2..kMaxClusterSplits splits.
bool merges_in_cluster(int64_t num_splits, int device_major, const Tuning& tuning);

using flash_ext::FastDivmod;  // common/fast_divmod.h

// Warps along M (packed query rows) x warps along N (keys). One GQA group's
// rows = group * q_len: up to 16 rows take one m16 tile and split the keys
// four ways; more rows trade key-parallelism for row-parallelism.
enum class WarpLayout : int { k1x4 = 0, k2x2 = 1, k4x1 = 2 };

inline WarpLayout warp_layout(int64_t rows) {
  return rows <= 16 ? WarpLayout::k1x4 : rows <= 32 ? WarpLayout::k2x2 : WarpLayout::k4x1;
}
inline int block_rows(WarpLayout layout) { return 16 << static_cast<int>(layout); }

// Kernel arguments: the caller's params plus values derived once on the host.
struct KernelArgs {
  KVCacheParams p;
  FastDivmod page_div;
  FastDivmod q_div;         // by q_len: packed row -> (head in group, token)
  FastDivmod kv_heads_div;  // by kv_heads: block -> (sequence, kv head)
  int group = 1;      // query heads per kv head
  int rows = 1;       // group * q_len packed query rows per (sequence, kv head)
  int m_blocks = 1;   // thread blocks along the packed rows
  int stages = 2;
  float scale_log2 = 1.f;  // softmax scale * log2(e): scores live in base 2
  bool cluster_merge = false;  // the splits form a cluster (merges_in_cluster)
  // Soft-capping and ALiBi on unscaled scores s = q.k (as score_mod.cuh):
  // s -> tanh_out * tanh_exp2(s * tanh_in), tanh_in = 0 when off; ALiBi
  // slopes enter times inv_scale.
  float tanh_in = 0.f, tanh_out = 0.f, inv_scale = 1.f;
};

// Shared memory of one attention block: Q tile, then the K/V stages (which
// the epilogue reuses for its cross-warp reduction).
inline int attention_smem_bytes(int head_dim_inst, WarpLayout layout, int stages) {
  return block_rows(layout) * head_dim_inst * 2 + stages * 2 * kBlockN * head_dim_inst * 2;
}

template <typename T, int kHeadDim>
void launch_attention(const KernelArgs& args, bool pdl, cudaStream_t stream);

template <typename T>
void launch_combine(const KVCacheParams& p, bool pdl, cudaStream_t stream);

// The defaults, overridden for benchmarks by FLASH_EXT_DECODE_TUNING, e.g.
// "stages=3,pdl=0,fused_combine=0" (read at the first call), or later by
// set_decode_tuning (api.h).
const Tuning& current_tuning();

// run_kvcache_fwd with explicit tuning.
void run(const KVCacheParams& p, const Tuning& tuning, cudaStream_t stream);

// Throws std::runtime_error naming `what` unless err (or, for a launch that
// returned success, the last error) is cudaSuccess.
void check_cuda(cudaError_t err, const char* what);

}  // namespace flash_ext::cuda::kvcache
