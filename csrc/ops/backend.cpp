#include "backend.h"

#include "../cpu/attention_cpu.h"

namespace flash_ext::backend {
namespace {

void require_cuda_build(const at::Tensor& q) {
#ifndef FLASH_EXT_WITH_CUDA
  TORCH_CHECK(false, "flash_ext was built without CUDA support, but got tensors on ", q.device(),
              "; rebuild with nvcc available (or FLASH_EXT_CUDA=1)");
#endif
}

}  // namespace

at::Tensor readable_layout(const at::Tensor& t) {
  if (!t.is_cuda()) return t;
  const int64_t vector = 16 / static_cast<int64_t>(t.element_size());
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; aligned && d + 1 < t.dim(); ++d) {
    aligned = t.size(d) == 1 || t.stride(d) % vector == 0;
  }
  // A copy even where the strides are contiguous already: a view that starts
  // off a 16-byte boundary stays there through contiguous().
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor seed_dropout(const at::Tensor& q, DropoutParams& dropout) {
  if (!q.is_cuda()) return cpu::seed_dropout(q, dropout);
  require_cuda_build(q);
  return cuda::seed_dropout(q, dropout);
}

void replay_dropout(const at::Tensor& rng_state, DropoutParams& dropout) {
  if (!rng_state.is_cuda()) return cpu::replay_dropout(rng_state, dropout);
  require_cuda_build(rng_state);
  cuda::replay_dropout(rng_state, dropout);
}

void run_attention_fwd(const at::Tensor& q, AttentionFwdParams& params) {
  if (!q.is_cuda()) return flash_ext::cpu::attention_fwd(params);
  require_cuda_build(q);
  cuda::run_attention_fwd(q, params);
}

void run_attention_bwd(const at::Tensor& q, AttentionBwdParams& params) {
  if (!q.is_cuda()) return flash_ext::cpu::attention_bwd(params);
  require_cuda_build(q);
  cuda::run_attention_bwd(q, params);
}

void run_kvcache(const at::Tensor& q, KVCacheParams& params, int64_t max_keys) {
  if (!q.is_cuda()) return cpu::run_kvcache(params, max_keys);
  require_cuda_build(q);
  cuda::run_kvcache(q, params, max_keys);
}

}  // namespace flash_ext::backend
