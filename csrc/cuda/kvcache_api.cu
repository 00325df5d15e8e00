// Split-KV decoding on CUDA: what the glue calls (api.h). Checks, the split
// count heuristic, and dispatch over dtype and head dim to the kernels in
// kvcache/.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

#include "api.h"
#include "kvcache/kvcache_launch.cuh"
#include "softcap.cuh"
#include "tuning_spec.h"

namespace flash_ext::cuda {
namespace kvcache {
namespace {

// Head dims are served by the next instantiated size, with the extra
// dims zero-filled on load and never stored.
int head_dim_instance(int64_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

// Attention blocks that share an SM at the default depth: two up to d=128
// (about 100 KB of stages each), one at d=256.
int blocks_per_sm(int64_t head_dim) { return head_dim <= 128 ? 2 : 1; }

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  check_cuda(cudaGetDevice(&device), "querying the current device");
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), "querying a device attribute");
  return value;
}

// Default pipeline depth: about 100 KB of stages up to d=128 (two blocks per
// SM on an H100), as deep as three fit at d=256; never more than the device
// allows a block.
int choose_stages(int head_dim_inst, WarpLayout layout, int requested, int smem_limit) {
  const int q_bytes = attention_smem_bytes(head_dim_inst, layout, 0);
  const int stage_bytes = attention_smem_bytes(head_dim_inst, layout, 1) - q_bytes;
  int stages = requested;
  if (stages == 0) {
    const int budget = head_dim_inst <= 128 ? std::min(smem_limit, 116 * 1024) : smem_limit;
    stages = std::clamp((budget - q_bytes) / stage_bytes, 2, 3 + (head_dim_inst <= 64 ? 3 : 0));
  }
  if (stages < 2 || stages > kMaxStages) {
    throw std::runtime_error("flash_ext kvcache: pipeline depth " + std::to_string(stages) +
                             " is outside [2, " + std::to_string(kMaxStages) + "]");
  }
  if (attention_smem_bytes(head_dim_inst, layout, stages) > smem_limit) {
    throw std::runtime_error("flash_ext kvcache: head dim " + std::to_string(head_dim_inst) + " needs " +
                             std::to_string(attention_smem_bytes(head_dim_inst, layout, stages)) +
                             " bytes of shared memory per block; this device allows " +
                             std::to_string(smem_limit));
  }
  return stages;
}

template <typename T>
void launch_attention_dim(const KernelArgs& args, int head_dim_inst, bool pdl, cudaStream_t stream) {
  switch (head_dim_inst) {
    case 64: launch_attention<T, 64>(args, pdl, stream); break;
    case 128: launch_attention<T, 128>(args, pdl, stream); break;
    default: launch_attention<T, 256>(args, pdl, stream); break;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Strides of dimensions that are ever stepped must keep 16-byte rows aligned.
bool strides_ok(const int64_t (&stride)[3], bool step0, bool step1, bool step2) {
  return (!step0 || stride[0] % 8 == 0) && (!step1 || stride[1] % 8 == 0) && (!step2 || stride[2] % 8 == 0);
}

}  // namespace

namespace {

// A Tuning from a FLASH_EXT_DECODE_TUNING spec, the defaults for the keys
// it leaves out.
Tuning tuning_from_spec(const std::string& spec) {
  Tuning t;
  parse_tuning_spec("FLASH_EXT_DECODE_TUNING", spec, "stages, pdl, fused_combine, cluster_merge",
                    [&](const std::string& key, int64_t n) {
                      if (key == "stages") {
                        t.stages = static_cast<int>(std::min<int64_t>(n, kMaxStages + 1));  // out of range: refused
                      } else if (key == "pdl") {
                        t.pdl = n != 0;
                      } else if (key == "fused_combine") {
                        t.fused_combine = n != 0;
                      } else if (key == "cluster_merge") {
                        t.cluster_merge = n != 0;
                      } else {
                        return false;
                      }
                      return true;
                    });
  return t;
}

Tuning& mutable_tuning() {
  static Tuning tuning = tuning_from_spec(environment_spec("FLASH_EXT_DECODE_TUNING"));
  return tuning;
}

}  // namespace

const Tuning& current_tuning() { return mutable_tuning(); }

bool merges_in_cluster(int64_t num_splits, int device_major, const Tuning& tuning) {
  return tuning.cluster_merge && device_major == 9 && num_splits >= 2 && num_splits <= kMaxClusterSplits;
}

void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_ext kvcache: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

void run(const KVCacheParams& p, const Tuning& tuning, cudaStream_t stream) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
  if (const char* why = kvcache_unsupported_reason(p, major, minor)) {
    throw std::runtime_error(std::string("flash_ext kvcache: ") + why);
  }
  KernelArgs args;
  args.p = p;
  args.cluster_merge = merges_in_cluster(p.num_splits, major, tuning);
  if (p.num_splits > 1 && !args.cluster_merge && (p.out_partial == nullptr || p.lse_partial == nullptr)) {
    throw std::runtime_error("flash_ext kvcache: num_splits > 1 needs out_partial and lse_partial");
  }
  if (p.block_table != nullptr) args.page_div = FastDivmod(static_cast<uint32_t>(p.page_size));
  args.q_div = FastDivmod(static_cast<uint32_t>(p.q_len > 0 ? p.q_len : 1));
  args.kv_heads_div = FastDivmod(static_cast<uint32_t>(p.kv_heads));
  args.group = static_cast<int>(p.heads / p.kv_heads);
  args.rows = static_cast<int>(args.group * p.q_len);
  const WarpLayout layout = warp_layout(args.rows);
  args.m_blocks = (args.rows + block_rows(layout) - 1) / block_rows(layout);
  args.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  if (p.softcap > 0.f) {
    args.tanh_in = static_cast<float>(kTwoLog2e * p.scale / p.softcap);
    args.tanh_out = static_cast<float>(p.softcap / p.scale);
  }
  args.inv_scale = static_cast<float>(1.0 / p.scale);
  const int head_dim_inst = head_dim_instance(p.head_dim);
  args.stages = choose_stages(head_dim_inst, layout, tuning.stages,
                              device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  if (!tuning.fused_combine || args.cluster_merge) args.p.split_counters = nullptr;
  const bool separate_combine = p.num_splits > 1 && !args.cluster_merge && args.p.split_counters == nullptr;
  const bool pdl = tuning.pdl && major >= 9;

  if (p.dtype == ScalarKind::kBFloat16) {
    launch_attention_dim<__nv_bfloat16>(args, head_dim_inst, pdl, stream);
    if (separate_combine) launch_combine<__nv_bfloat16>(p, pdl, stream);
  } else {
    launch_attention_dim<__half>(args, head_dim_inst, pdl, stream);
    if (separate_combine) launch_combine<__half>(p, pdl, stream);
  }
}

}  // namespace kvcache

void set_decode_tuning(const std::string& spec) {
  kvcache::mutable_tuning() = kvcache::tuning_from_spec(spec);  // throws before assigning
}

const char* kvcache_unsupported_reason(const KVCacheParams& p, int device_major, int device_minor) {
  if (device_major < 8 || device_major > 9 || (device_major == 9 && device_minor != 0)) {
    return "the CUDA decoding kernels are built for sm_80 (and its 8.x relatives) and sm_90";
  }
  if (p.dtype != ScalarKind::kFloat16 && p.dtype != ScalarKind::kBFloat16) {
    return "the CUDA decoding kernels take float16 or bfloat16";
  }
  if (p.head_dim < 8 || p.head_dim > 256 || p.head_dim % 8 != 0) {
    return "the CUDA decoding kernels need a head dim that is a multiple of 8, at most 256";
  }
  if (p.v_head_dim != p.head_dim) return "the CUDA decoding kernels need v's head dim equal to q's";
  if (device_major == 8 && device_minor != 0 && p.head_dim > 128) {
    return "head dims above 128 need more shared memory per block than sm_86/sm_89 offer";
  }
  if (p.batch < 1 || p.heads < 1 || p.kv_heads < 1 || p.heads % p.kv_heads != 0 || p.q_len < 1) {
    return "the CUDA decoding kernels need batch, heads, q_len >= 1 and heads a multiple of kv_heads";
  }
  if (p.num_splits < 1 || p.num_splits > 65535) return "num_splits must be in [1, 65535]";
  if (p.page_size < 1 || p.page_size >= (int64_t{1} << 31)) return "page_size must be in [1, 2^31)";
  const int64_t rows = p.heads / p.kv_heads * p.q_len;
  const int64_t m_blocks = (rows + kvcache::block_rows(kvcache::warp_layout(rows)) - 1) /
                           kvcache::block_rows(kvcache::warp_layout(rows));
  // Grid: (batch x kv heads, splits, row blocks), the last at most 65535.
  if (rows >= (int64_t{1} << 31) || m_blocks > 65535 || p.batch * p.kv_heads >= (int64_t{1} << 31)) {
    return "too many sequences and heads for one CUDA grid";
  }
  // 16-byte vector loads and stores: aligned bases and row strides.
  for (const void* ptr : std::initializer_list<const void*>{p.q, p.k_cache, p.v_cache, p.k_new, p.v_new, p.out}) {
    if (!kvcache::aligned16(ptr)) return "the CUDA decoding kernels need 16-byte aligned tensors";
  }
  const bool several_kv = p.kv_heads > 1;
  if (!kvcache::strides_ok(p.q_stride, p.batch > 1, p.heads > 1, p.q_len > 1) ||
      !kvcache::strides_ok(p.o_stride, p.batch > 1, p.heads > 1, p.q_len > 1) ||
      !kvcache::strides_ok(p.k_cache_stride, true, several_kv, true) ||
      !kvcache::strides_ok(p.v_cache_stride, true, several_kv, true) ||
      (p.new_len > 0 && (!kvcache::strides_ok(p.k_new_stride, p.batch > 1, several_kv, p.new_len > 1) ||
                         !kvcache::strides_ok(p.v_new_stride, p.batch > 1, several_kv, p.new_len > 1)))) {
    return "the CUDA decoding kernels need strides that are multiples of 8 elements (16 bytes)";
  }
  return nullptr;
}

bool kvcache_merges_in_cluster(const KVCacheParams& p, int device_major) {
  return kvcache::merges_in_cluster(p.num_splits, device_major, kvcache::current_tuning());
}

int choose_num_splits(const KVCacheParams& p, int num_sms, int device_major) {
  const int64_t blocks = kvcache_split_groups(p);
  // Longest sequence the cache can hold (a paged cache's table is assumed
  // to be as wide as its row stride).
  int64_t capacity = (p.block_table != nullptr ? p.block_table_stride : 1) * p.page_size;
  // A left window bounds the keys any call reads (plus the appended ones and
  // a tile of misalignment).
  if (p.window_left >= 0) {
    capacity = std::min(capacity, p.window_left + p.q_len + p.new_len + kvcache::kBlockN);
  }
  const int64_t tiles = std::max<int64_t>(1, (capacity + kvcache::kBlockN - 1) / kvcache::kBlockN);
  const int64_t slots = std::max<int64_t>(1, int64_t{num_sms} * kvcache::blocks_per_sm(p.head_dim));
  // Modelled time, in tiles: waves of blocks times the tiles of one split
  // plus a block's fixed cost: about a tile for the pipeline fill and the
  // epilogue, and one more for a merge through global memory (partials, a
  // counter, the last block's reads); a merge inside a cluster costs little.
  // Split counts that would leave a split empty are skipped; ties go to
  // fewer splits.
  const kvcache::Tuning& tuning = kvcache::current_tuning();
  int best = 1;
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t s = 1; s <= std::min<int64_t>(tiles, 128); ++s) {
    const int64_t per_split = (tiles + s - 1) / s;
    if ((tiles + per_split - 1) / per_split != s) continue;
    const bool global_merge = s > 1 && !kvcache::merges_in_cluster(s, device_major, tuning);
    const int64_t cost = (blocks * s + slots - 1) / slots * (per_split + 1 + (global_merge ? 1 : 0));
    if (cost < best_cost) {
      best_cost = cost;
      best = static_cast<int>(s);
    }
  }
  return best;
}

int64_t kvcache_split_groups(const KVCacheParams& p) {
  const int64_t rows = p.heads / p.kv_heads * p.q_len;
  const int64_t per_block = kvcache::block_rows(kvcache::warp_layout(rows));
  return p.batch * p.kv_heads * ((rows + per_block - 1) / per_block);
}

void run_kvcache_fwd(const KVCacheParams& params, cudaStream_t stream) {
  kvcache::run(params, kvcache::current_tuning(), stream);
}

}  // namespace flash_ext::cuda
