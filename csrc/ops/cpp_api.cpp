// The C++ API of csrc/flash_ext.h: thin calls into the dispatcher.
#include "../flash_ext.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

namespace flash_ext {
namespace {

double default_scale(const at::Tensor& q, std::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& attn_mask,
                                             double dropout_p, std::optional<double> scale,
                                             int64_t window_left, int64_t window_right,
                                             bool bottom_right, bool deterministic, double softcap,
                                             const std::optional<at::Tensor>& alibi_slopes) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flash_ext::attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, double, double, int64_t, int64_t, bool, bool,
              double, const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, attn_mask, dropout_p, default_scale(q, scale), window_left,
                 window_right, bottom_right, deterministic, softcap, alibi_slopes);
}

at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v,
                                        const std::optional<at::Tensor>& attn_mask,
                                        double dropout_p, bool is_causal,
                                        std::optional<double> scale, bool enable_gqa) {
  TORCH_CHECK_VALUE(!(is_causal && attn_mask.has_value()),
                    "flash_ext.scaled_dot_product_attention: attn_mask must not be set when is_causal");
  // As PyTorch's: key/value heads other than the query's only with enable_gqa,
  // or one key/value head, which broadcasts. (The op checks the ranks.)
  TORCH_CHECK_VALUE(q.dim() != 4 || k.dim() != 4 || enable_gqa || q.size(1) == k.size(1) || k.size(1) == 1,
                    "flash_ext.scaled_dot_product_attention: query has ", q.size(1), " heads but key/value have ",
                    k.size(1), "; pass enable_gqa = true for grouped-query attention");
  return std::get<0>(attention(q, k, v, attn_mask, dropout_p, scale, -1, is_causal ? 0 : -1));
}

std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& block_table,
    std::optional<double> scale, bool causal, int64_t num_splits, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flash_ext::kvcache_attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const at::Tensor&, const std::optional<at::Tensor>&, double, bool, int64_t, double,
              const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                 default_scale(q, scale), causal, num_splits, softcap, alibi_slopes, window_left,
                 window_right);
}

}  // namespace flash_ext
