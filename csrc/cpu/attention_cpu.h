// The CPU backend as the torch glue sees it: plain params in, work done with
// at::parallel_for before returning.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/params.h"

namespace flash_ext::cpu {

void attention_fwd(const AttentionFwdParams& params);
void attention_bwd(const AttentionBwdParams& params);
void kvcache_fwd(const KVCacheParams& params);

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<scalar_t>{}) for the params' element type.
template <typename Fn>
void dispatch_scalar(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat16: return fn(TypeTag<c10::Half>{});
    case ScalarKind::kBFloat16: return fn(TypeTag<c10::BFloat16>{});
    case ScalarKind::kFloat32: return fn(TypeTag<float>{});
    case ScalarKind::kFloat64: return fn(TypeTag<double>{});
  }
}

// The saved log-sum-exp is float64 for float64 inputs and float32 otherwise.
inline void store_lse(const AttentionFwdParams& p, int64_t index, double value) {
  if (p.lse_f64 != nullptr) {
    p.lse_f64[index] = value;
  } else {
    p.lse[index] = static_cast<float>(value);
  }
}

inline double load_lse(const AttentionFwdParams& p, int64_t index) {
  return p.lse_f64 != nullptr ? p.lse_f64[index] : static_cast<double>(p.lse[index]);
}

}  // namespace flash_ext::cpu
