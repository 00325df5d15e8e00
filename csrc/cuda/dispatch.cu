// The attention entry points of api.h: which kernel family serves a device
// (a table, so the Hopper family slots in beside sm80), what it cannot do,
// and routing by head dim and dtype to the instantiations.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include "api.h"
#include "bwd_workspace.h"
#include "sm80_launch.h"
#include "tuning_spec.h"
#if defined(FLASH_EXT_SM90A)
#include "sm90_launch.h"
#endif

namespace flash_ext::cuda {
namespace {

// Largest dynamic shared memory a block may opt into, by compute capability.
int smem_per_block_optin(int major, int minor) {
  if (major == 9 || major == 10) return 227 * 1024;
  if (major == 8 && (minor == 0 || minor == 7)) return 163 * 1024;
  return 99 * 1024;  // sm_86, sm_89, sm_120 and anything unknown
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether `ok` holds for the stride of every dimension with more than one
// index (a dimension of extent 1 may carry any stride).
template <class Pred>
bool strides_all(const int64_t (&stride)[3], int64_t d0, int64_t d1, int64_t d2, Pred ok) {
  const int64_t extent[3] = {d0, d1, d2};
  for (int i = 0; i < 3; ++i) {
    if (extent[i] > 1 && !ok(stride[i])) return false;
  }
  return true;
}

// 16-byte vector access needs strides that are multiples of 8 elements.
bool strides_vectorizable(const int64_t (&stride)[3], int64_t d0, int64_t d1, int64_t d2) {
  return strides_all(stride, d0, d1, d2, [](int64_t s) { return s % 8 == 0; });
}

const char* sm80_common_reason(const AttentionFwdParams& p, int major, int minor, bool backward) {
  if (major < 8) return "the CUDA attention kernels need compute capability 8.0 or newer";
  if (p.dtype != ScalarKind::kFloat16 && p.dtype != ScalarKind::kBFloat16) {
    return "the CUDA attention kernels take float16 and bfloat16 only";
  }
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > 256) {
    return "the CUDA attention kernels need a head dim that is a multiple of 8, at most 256";
  }
  if (p.v_head_dim != p.head_dim) return "the CUDA attention kernels need v_head_dim == head_dim";
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0) return "heads must be a multiple of kv_heads";
  if (!(p.scale > 0.0)) return "the CUDA attention kernels need a positive scale";
  if (p.dropout.p < 0.f || p.dropout.p >= 1.f) return "the CUDA attention kernels need 0 <= dropout_p < 1";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out) ||
      !strides_vectorizable(p.q_stride, p.batch, p.heads, p.q_len) ||
      !strides_vectorizable(p.k_stride, p.batch, p.kv_heads, p.kv_len) ||
      !strides_vectorizable(p.v_stride, p.batch, p.kv_heads, p.kv_len) ||
      !strides_vectorizable(p.o_stride, p.batch, p.heads, p.q_len)) {
    return "the CUDA attention kernels need 16-byte aligned q/k/v/out with strides that are multiples of 8";
  }
  const int inst = sm80::head_dim_instance(p.head_dim);
  const int need = backward ? sm80::bwd_smem_bytes(inst) : sm80::fwd_smem_bytes(inst);
  if (need > smem_per_block_optin(major, minor)) {
    return backward ? "this GPU has too little shared memory per block for the CUDA attention backward at this head dim"
                    : "this GPU has too little shared memory per block for the CUDA attention forward at this head dim";
  }
  return nullptr;
}

const char* sm80_fwd_reason(const AttentionFwdParams& p, int major, int minor) {
  return sm80_common_reason(p, major, minor, false);
}

const char* sm80_bwd_reason(const AttentionBwdParams& p, int major, int minor) {
  if (const char* r = sm80_common_reason(p, major, minor, true)) return r;
  if (!aligned16(p.dout) || !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv) ||
      !strides_vectorizable(p.do_stride, p.batch, p.heads, p.q_len) ||
      !strides_vectorizable(p.dq_stride, p.batch, p.heads, p.q_len) ||
      !strides_vectorizable(p.dk_stride, p.batch, p.kv_heads, p.kv_len) ||
      !strides_vectorizable(p.dv_stride, p.batch, p.kv_heads, p.kv_len)) {
    return "the CUDA attention backward needs 16-byte aligned dout/dq/dk/dv with strides that are multiples of 8";
  }
  return nullptr;
}

template <int kHeadDim>
void sm80_fwd_dtype(const AttentionFwdParams& p, cudaStream_t s) {
  p.dtype == ScalarKind::kBFloat16 ? sm80::run_fwd<kHeadDim, ScalarKind::kBFloat16>(p, s)
                                   : sm80::run_fwd<kHeadDim, ScalarKind::kFloat16>(p, s);
}

template <int kHeadDim>
void sm80_bwd_dtype(const AttentionBwdParams& p, cudaStream_t s) {
  p.dtype == ScalarKind::kBFloat16 ? sm80::run_bwd<kHeadDim, ScalarKind::kBFloat16>(p, s)
                                   : sm80::run_bwd<kHeadDim, ScalarKind::kFloat16>(p, s);
}

// The family whose kernel ran last (tests check routing).
std::atomic<const char*> last_family{""};

void sm80_fwd(const AttentionFwdParams& p, cudaStream_t s) {
  last_family = "sm80";
  switch (sm80::head_dim_instance(p.head_dim)) {
    case 64: return sm80_fwd_dtype<64>(p, s);
    case 128: return sm80_fwd_dtype<128>(p, s);
    default: return sm80_fwd_dtype<256>(p, s);
  }
}

void sm80_bwd(const AttentionBwdParams& p, cudaStream_t s) {
  last_family = "sm80";
  switch (sm80::head_dim_instance(p.head_dim)) {
    case 64: return sm80_bwd_dtype<64>(p, s);
    case 128: return sm80_bwd_dtype<128>(p, s);
    default: return sm80_bwd_dtype<256>(p, s);
  }
}

BwdWorkspace sm80_workspace(const AttentionBwdParams& p) {
  const int inst = sm80::head_dim_instance(p.head_dim);
  const sm80::DqWorkspace ws = sm80::dq_workspace(p, inst, sm80::bwd_block_m(inst));
  return {static_cast<size_t>(ws.floats + ws.semaphores), static_cast<size_t>(p.batch * p.heads * p.q_len)};
}

#if defined(FLASH_EXT_SM90A)
using sm90::FwdTuning;
constexpr std::pair<const char*, int64_t FwdTuning::*> kFwdKnobs[] = {
    {"two_stage_max_kv", &FwdTuning::two_stage_max_kv},
    {"per_tile_max_q", &FwdTuning::per_tile_max_q},
    {"wide_keys_min_kv", &FwdTuning::wide_keys_min_kv},
    {"pair_major_max_q", &FwdTuning::pair_major_max_q},
    {"pair_major_max_q_causal", &FwdTuning::pair_major_max_q_causal},
    {"cluster_pairs_min_kv", &FwdTuning::cluster_pairs_min_kv},
    {"cluster_pairs_varlen_min_q", &FwdTuning::cluster_pairs_varlen_min_q},
    {"d64_narrow_max_q", &FwdTuning::d64_narrow_max_q},
    {"d64_narrow_max_q_causal", &FwdTuning::d64_narrow_max_q_causal},
    {"rescale_slack", &FwdTuning::rescale_slack},
    {"o_release_late", &FwdTuning::o_release_late},
    {"fold_ahead", &FwdTuning::fold_ahead},
    {"d128_tall_min", &FwdTuning::d128_tall_min},
    {"d128_tall_max_kv", &FwdTuning::d128_tall_max_kv},
    {"d128_tall_min_windowed", &FwdTuning::d128_tall_min_windowed},
    {"d128_tall_pairs_min_kv", &FwdTuning::d128_tall_pairs_min_kv},
};

// The forward's knobs: FLASH_EXT_FWD_TUNING's at the first call, then
// whatever set_fwd_tuning last set.
FwdTuning& current_fwd_tuning() {
  static FwdTuning tuning = tuning_from_environment("FLASH_EXT_FWD_TUNING", kFwdKnobs);
  return tuning;
}

using sm90::BwdTuning;
constexpr std::pair<const char*, int64_t BwdTuning::*> kBwdKnobs[] = {
    {"masked_section_rounds", &BwdTuning::masked_section_rounds},
    {"d128_tall_min_q", &BwdTuning::d128_tall_min_q},
    {"d128_tall_masked", &BwdTuning::d128_tall_masked},
};

BwdTuning& current_bwd_tuning() {
  static BwdTuning tuning = tuning_from_environment("FLASH_EXT_BWD_TUNING", kBwdKnobs);
  return tuning;
}

// TMA cannot address a stride-0 (broadcast) dimension.
bool nonzero_strides(const int64_t (&stride)[3], int64_t d0, int64_t d1, int64_t d2) {
  return strides_all(stride, d0, d1, d2, [](int64_t s) { return s != 0; });
}

// Scores without a mask, dropout, softcap or ALiBi: all the Hopper kernels compute.
bool sm90_plain_scores(const AttentionFwdParams& p) {
  return p.mask_kind == MaskKind::kNone && p.dropout.p == 0.0 && p.softcap == 0.f && p.alibi_slopes == nullptr;
}

// Whether the Hopper forward serves a dense call the sm80 kernels accept;
// what it does not cover yet (attn_mask, dropout, softcap, ALiBi, stride-0
// broadcasts, which TMA cannot address, an empty key sequence) runs on the
// sm80 kernels, also on a Hopper GPU.
bool sm90_fwd_serves_dense(const AttentionFwdParams& p) {
  return sm90_plain_scores(p) && p.cu_seqlens_q == nullptr && p.kv_len > 0 && p.q_len < (int64_t(1) << 31) &&
         p.kv_len < (int64_t(1) << 31) && nonzero_strides(p.q_stride, p.batch, p.heads, p.q_len) &&
         nonzero_strides(p.k_stride, p.batch, p.kv_heads, p.kv_len) &&
         nonzero_strides(p.v_stride, p.batch, p.kv_heads, p.kv_len);
}

// Varlen batches the same way, their TMA descriptors spanning the packed
// tensors (batch stride 0, one batch entry): nonempty (no descriptor of an
// empty tensor) with int32 row coordinates and nonzero head and row strides.
bool sm90_fwd_serves_varlen(const AttentionFwdParams& p) {
  const int64_t kMaxRows = int64_t(1) << 31;
  return p.cu_seqlens_q != nullptr && p.cu_seqlens_k != nullptr && sm90_plain_scores(p) && p.total_q > 0 &&
         p.total_k > 0 && p.total_q < kMaxRows && p.total_k < kMaxRows && p.q_len < kMaxRows && p.kv_len < kMaxRows &&
         nonzero_strides(p.q_stride, 1, p.heads, p.total_q) &&
         nonzero_strides(p.k_stride, 1, p.kv_heads, p.total_k) &&
         nonzero_strides(p.v_stride, 1, p.kv_heads, p.total_k);
}

bool sm90_fwd_serves(const AttentionFwdParams& p) {
  return p.cu_seqlens_q != nullptr ? sm90_fwd_serves_varlen(p) : sm90_fwd_serves_dense(p);
}

// The persistent Hopper forward deals unequal tiles through the counter.
bool sm90_fwd_tile_counter(const AttentionFwdParams& p) {
  return sm90_fwd_serves(p) && sm90::fwd_deals_tiles_dynamically(p);
}

template <int kHeadDim, bool kVarlen>
void sm90_fwd_dtype(const AttentionFwdParams& p, cudaStream_t s) {
  p.dtype == ScalarKind::kBFloat16 ? sm90::run_fwd<kHeadDim, ScalarKind::kBFloat16, kVarlen>(p, s)
                                   : sm90::run_fwd<kHeadDim, ScalarKind::kFloat16, kVarlen>(p, s);
}

template <bool kVarlen>
void sm90_fwd_head_dim(const AttentionFwdParams& p, cudaStream_t s) {
  switch (sm90::head_dim_instance(p.head_dim)) {
    case 64: return sm90_fwd_dtype<64, kVarlen>(p, s);
    case 128: return sm90_fwd_dtype<128, kVarlen>(p, s);
    default: return sm90_fwd_dtype<256, kVarlen>(p, s);
  }
}

void sm90_fwd(const AttentionFwdParams& p, cudaStream_t s) {
  if (!sm90_fwd_serves(p)) return sm80_fwd(p, s);
  last_family = "sm90";
  p.cu_seqlens_q != nullptr ? sm90_fwd_head_dim<true>(p, s) : sm90_fwd_head_dim<false>(p, s);
}

// Whether the Hopper backward serves a call the sm80 kernels accept: what
// its forward serves, minus deterministic dq (its dq reductions are
// unordered), dbias (comes only with an attn_mask anyway), an empty query
// sequence (no TMA descriptor of it), and stride-0 dout.
bool sm90_bwd_serves(const AttentionBwdParams& p) {
  const bool layout = p.cu_seqlens_q != nullptr
                          ? sm90_fwd_serves_varlen(p) && nonzero_strides(p.do_stride, 1, p.heads, p.total_q)
                          : sm90_fwd_serves_dense(p) && p.q_len > 0 &&
                                nonzero_strides(p.do_stride, p.batch, p.heads, p.q_len);
  return layout && !p.deterministic && p.dbias == nullptr;
}

// The dq accumulator has sm80's size (without deterministic semaphores),
// each query tile in the sm90 kernel's own order; softmax_d holds D and lse
// per query row (bwd_workspace.h's softmax_head_rows).
BwdWorkspace sm90_workspace(const AttentionBwdParams& p) {
  BwdWorkspace w = sm80_workspace(p);
  if (sm90_bwd_serves(p)) {
    w.softmax_d_floats = static_cast<size_t>(sm90::bwd_softmax_d_floats(p));
    w.dq_accum_zeroed_by_kernels = true;  // by the pre-pass (sm90_bwd_kernel.cuh)
  }
  return w;
}

template <int kHeadDim, bool kVarlen>
void sm90_bwd_dtype(const AttentionBwdParams& p, cudaStream_t s) {
  p.dtype == ScalarKind::kBFloat16 ? sm90::run_bwd<kHeadDim, ScalarKind::kBFloat16, kVarlen>(p, s)
                                   : sm90::run_bwd<kHeadDim, ScalarKind::kFloat16, kVarlen>(p, s);
}

template <bool kVarlen>
void sm90_bwd_head_dim(const AttentionBwdParams& p, cudaStream_t s) {
  switch (sm90::head_dim_instance(p.head_dim)) {
    case 64: return sm90_bwd_dtype<64, kVarlen>(p, s);
    case 128: return sm90_bwd_dtype<128, kVarlen>(p, s);
    default: return sm90_bwd_dtype<256, kVarlen>(p, s);
  }
}

void sm90_bwd(const AttentionBwdParams& p, cudaStream_t s) {
  if (!sm90_bwd_serves(p)) return sm80_bwd(p, s);
  last_family = "sm90";
  p.cu_seqlens_q != nullptr ? sm90_bwd_head_dim<true>(p, s) : sm90_bwd_head_dim<false>(p, s);
}
#endif

// A kernel family: the devices it runs on and its entry points. Families are
// tried in order; a forced path picks one by name.
struct Family {
  const char* name;
  bool (*runs_on)(int major, int minor);
  const char* (*fwd_reason)(const AttentionFwdParams&, int, int);
  const char* (*bwd_reason)(const AttentionBwdParams&, int, int);
  BwdWorkspace (*workspace)(const AttentionBwdParams&);
  bool (*fwd_tile_counter)(const AttentionFwdParams&);
  void (*fwd)(const AttentionFwdParams&, cudaStream_t);
  void (*bwd)(const AttentionBwdParams&, cudaStream_t);
};

// The Hopper family serves everything the sm80 one does: calls its kernels do
// not cover go to the sm80 kernels.
constexpr Family kFamilies[] = {
#if defined(FLASH_EXT_SM90A)
    {"sm90", [](int major, int) { return major == 9; }, sm80_fwd_reason, sm80_bwd_reason, sm90_workspace,
     sm90_fwd_tile_counter, sm90_fwd, sm90_bwd},
#endif
    {"sm80", [](int major, int) { return major >= 8; }, sm80_fwd_reason, sm80_bwd_reason, sm80_workspace,
     [](const AttentionFwdParams&) { return false; }, sm80_fwd, sm80_bwd},
};

constexpr const char* kBuiltFamilies =
#if defined(FLASH_EXT_SM90A)
    "sm90, sm80";
#else
    "sm80";
#endif

bool known_family(const std::string& name) {
  for (const Family& f : kFamilies) {
    if (name == f.name) return true;
  }
  return false;
}

// FLASH_EXT_CUDA_PATH forces a family (read on every call, so tests and
// flash_ext.set_cuda_path() can switch it); unset, empty or "auto" = by device.
std::string forced_name() {
  const char* env = std::getenv("FLASH_EXT_CUDA_PATH");
  const std::string name = env == nullptr ? "" : env;
  if (!name.empty() && name != "auto" && !known_family(name)) {
    throw std::invalid_argument("flash_ext: FLASH_EXT_CUDA_PATH='" + name +
                                "' names no built CUDA kernel family (built: " + kBuiltFamilies + ")");
  }
  return name == "auto" ? "" : name;
}

const Family* find_family(int major, int minor) {
  const std::string forced = forced_name();
  for (const Family& f : kFamilies) {
    if (forced.empty() ? f.runs_on(major, minor) : forced == f.name) return &f;
  }
  return nullptr;
}

void current_capability(int& major, int& minor) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_ext: querying the CUDA device failed: ") + cudaGetErrorString(err));
  }
}

const Family& family_for_current_device() {
  int major = 0, minor = 0;
  current_capability(major, minor);
  const Family* f = find_family(major, minor);
  if (f == nullptr || !f->runs_on(major, minor)) {
    throw std::runtime_error("flash_ext: no CUDA attention kernel family runs on compute capability " +
                             std::to_string(major) + "." + std::to_string(minor));
  }
  return *f;
}

const char* no_family_reason(const Family* f, int major, int minor) {
  if (f == nullptr) return "the CUDA attention kernels need compute capability 8.0 or newer";
  if (!f->runs_on(major, minor)) return "the forced CUDA kernel family does not run on this GPU";
  return nullptr;
}

}  // namespace

#if defined(FLASH_EXT_SM90A)
const sm90::FwdTuning& sm90::fwd_tuning() { return current_fwd_tuning(); }
const sm90::BwdTuning& sm90::bwd_tuning() { return current_bwd_tuning(); }
#endif

void set_fwd_tuning(const std::string& spec) {
#if defined(FLASH_EXT_SM90A)
  current_fwd_tuning() = tuning_from_spec("FLASH_EXT_FWD_TUNING", spec, kFwdKnobs);  // throws before assigning
#else
  throw std::invalid_argument("flash_ext: no Hopper kernels were built, so there is no forward tuning to set");
#endif
}

void set_bwd_tuning(const std::string& spec) {
#if defined(FLASH_EXT_SM90A)
  current_bwd_tuning() = tuning_from_spec("FLASH_EXT_BWD_TUNING", spec, kBwdKnobs);  // throws before assigning
#else
  throw std::invalid_argument("flash_ext: no Hopper kernels were built, so there is no backward tuning to set");
#endif
}

const char* fwd_unsupported_reason(const AttentionFwdParams& params, int device_major, int device_minor) {
  const Family* f = find_family(device_major, device_minor);
  if (const char* r = no_family_reason(f, device_major, device_minor)) return r;
  return f->fwd_reason(params, device_major, device_minor);
}

const char* bwd_unsupported_reason(const AttentionBwdParams& params, int device_major, int device_minor) {
  const Family* f = find_family(device_major, device_minor);
  if (const char* r = no_family_reason(f, device_major, device_minor)) return r;
  return f->bwd_reason(params, device_major, device_minor);
}

BwdWorkspace bwd_workspace(const AttentionBwdParams& params) {
  return family_for_current_device().workspace(params);
}

bool fwd_needs_tile_counter(const AttentionFwdParams& params) {
  return family_for_current_device().fwd_tile_counter(params);
}

void run_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  family_for_current_device().fwd(params, stream);
}

void run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  if (params.dq_accum == nullptr || params.softmax_d == nullptr) {
    throw std::runtime_error("flash_ext attention backward: dq_accum / softmax_d workspace missing");
  }
  family_for_current_device().bwd(params, stream);
}

const char* last_kernel_family() { return last_family; }

}  // namespace flash_ext::cuda
