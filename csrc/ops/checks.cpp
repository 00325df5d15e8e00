#include "checks.h"

#include <cmath>

namespace flash_ext {

ScalarKind scalar_kind(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kDouble: return ScalarKind::kFloat64;
    default: TORCH_CHECK_TYPE(false, "flash_ext: unsupported dtype ", type);
  }
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat ||
                       type == at::kDouble,
                   op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", type);
}

void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

void check_rng_state(const char* op, const at::Tensor& rng_state) {
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state must be the int64 [seed, offset] that forward returned, got ",
                    rng_state.sizes(), " ", rng_state.scalar_type());
}

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v) {
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"query", &q}, {"key", &k}, {"value", &v}};
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name,
                      " must be a 4-D tensor (batch, heads, seq, dim), got ", t->dim(), "-D");
    check_floating(op, name, *t);
    check_last_dim_contiguous(op, name, *t);
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": query, key and value must have the same dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": query, key and value must be on the same device, got ", q.device(), ", ",
                    k.device(), " and ", v.device());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op,
                    ": query, key and value must have the same batch size, got ", q.size(0), ", ",
                    k.size(0), " and ", v.size(0));
  TORCH_CHECK_VALUE(k.size(1) == v.size(1), op, ": key and value must have the same number of heads, got ",
                    k.size(1), " and ", v.size(1));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": query heads (", q.size(1),
                    ") must be a multiple of key/value heads (", k.size(1), ") for grouped-query attention");
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), op, ": key and value must have the same sequence length, got ",
                    k.size(2), " and ", v.size(2));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": query and key must have the same head dim, got ",
                    q.size(3), " and ", k.size(3));
  TORCH_CHECK_VALUE(q.size(3) > 0 && v.size(3) > 0, op, ": head dims must be positive, got query ",
                    q.size(3), " and value ", v.size(3));
}

namespace {

void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t batch,
                      int64_t total, int64_t max_seqlen, const at::Device& device) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": ", name,
                    " must be 1-D of shape (batch + 1,), got ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == device, op, ": ", name, " must be on the query's device (", device,
                    "), got ", cu.device());
  TORCH_CHECK_VALUE(cu.size(0) == batch + 1, op, ": ", name, " must have batch + 1 = ", batch + 1,
                    " entries like cu_seqlens_q, got ", cu.size(0));
  if (cu.is_cuda()) return;  // reading the values would synchronize; kernels clamp them
  const at::Tensor c = cu.contiguous();
  const int32_t* x = c.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(x[0] == 0, op, ": ", name, " must start at 0, got ", x[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(x[b + 1]) - x[b];
    TORCH_CHECK_VALUE(len >= 0, op, ": ", name, " must be nondecreasing, got ", x[b], " then ",
                      x[b + 1], " at index ", b);
    TORCH_CHECK_VALUE(len <= max_seqlen, op, ": sequence ", b, " has length ", len, " (from ", name,
                      ") above its max_seqlen ", max_seqlen);
  }
  TORCH_CHECK_VALUE(x[batch] == total, op, ": ", name, " must end at the number of packed rows (",
                    total, "), got ", x[batch]);
}

}  // namespace

void check_varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                         int64_t max_seqlen_k) {
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK_VALUE(t->dim() == 3, op, ": ", name,
                      " must be a 3-D tensor (total_tokens, heads, dim), got ", t->dim(), "-D");
  }
  check_attention_inputs(op, packed_as_4d(q), packed_as_4d(k), packed_as_4d(v));
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
                    ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
                    max_seqlen_k);
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op,
                    ": cu_seqlens_q must be 1-D of shape (batch + 1,), got ", cu_seqlens_q.sizes());
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, batch, q.size(0), max_seqlen_q, q.device());
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, batch, k.size(0), max_seqlen_k, q.device());
}

void check_attn_mask(const char* op, const at::Tensor& mask, const at::Tensor& q,
                     const at::Tensor& k) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type(), op,
                   ": attn_mask must be bool or have the query's dtype (", q.scalar_type(), "), got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == q.device(), op, ": attn_mask must be on the query's device (",
                    q.device(), "), got ", mask.device());
  const int64_t expected[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
  bool ok = mask.dim() == 4;
  for (int64_t i = 0; ok && i < 4; ++i) ok = mask.size(i) == expected[i] || mask.size(i) == 1;
  TORCH_CHECK_VALUE(ok, op, ": attn_mask must be 4-D and broadcastable to (batch, heads, q_len, kv_len) = ",
                    at::IntArrayRef(expected), " (each size equal or 1), got ", mask.sizes());
}

void check_scalars(const char* op, double dropout_p, double scale, int64_t window_left,
                   int64_t window_right) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_window(op, window_left, window_right);
}

void check_window(const char* op, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op,
                    ": window sizes must be >= 0, or -1 for unbounded, got (", window_left, ", ",
                    window_right, ")");
}

void check_softcap_alibi(const char* op, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes, int64_t batch,
                         int64_t heads, const at::Device& device) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softcap must be finite and >= 0 (0 = off), got ", softcap);
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& s = *alibi_slopes;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ",
                   s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == device, op, ": alibi_slopes must be on the query's device (", device,
                    "), got ", s.device());
  const bool per_head = s.dim() == 1 && s.size(0) == heads;
  const bool per_batch = s.dim() == 2 && s.size(0) == batch && s.size(1) == heads;
  TORCH_CHECK_VALUE(per_head || per_batch, op, ": alibi_slopes must have shape (heads,) = (", heads,
                    ",) or (batch, heads) = (", batch, ", ", heads, "), got ", s.sizes());
  TORCH_CHECK_VALUE(s.stride(-1) == 1, op, ": alibi_slopes must be contiguous in the head dimension");
}

std::pair<const float*, int64_t> alibi_pointer(const std::optional<at::Tensor>& alibi_slopes) {
  if (!alibi_slopes.has_value()) return {nullptr, 0};
  const at::Tensor& s = *alibi_slopes;
  return {s.data_ptr<float>(), s.dim() == 2 ? s.stride(0) : 0};
}

void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

at::Tensor empty_like_query_layout(const at::Tensor& q, int64_t dim) {
  const bool heads_inner = q.stride(1) < q.stride(2);
  if (heads_inner) {
    return at::empty({q.size(0), q.size(2), q.size(1), dim}, q.options()).transpose(1, 2);
  }
  return at::empty({q.size(0), q.size(1), q.size(2), dim}, q.options());
}

AttentionFwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                   double scale, int64_t window_left, int64_t window_right,
                                   bool bottom_right, double softcap,
                                   const std::optional<at::Tensor>& alibi_slopes) {
  AttentionFwdParams p;
  p.dtype = scalar_kind(q.scalar_type());
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = q.size(2);
  p.kv_len = k.size(2);
  p.head_dim = q.size(3);
  p.v_head_dim = v.size(3);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    p.mask_kind = mask.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    p.mask = mask.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = mask.size(i) == 1 ? 0 : mask.stride(i);
  }
  p.scale = scale;
  p.window.window_left = window_left;
  p.window.window_right = window_right;
  p.window.diagonal_offset = bottom_right ? p.kv_len - p.q_len : 0;
  p.dropout.p = dropout_p;
  p.softcap = static_cast<float>(softcap);
  std::tie(p.alibi_slopes, p.alibi_batch_stride) = alibi_pointer(alibi_slopes);
  return p;
}

AttentionFwdParams make_varlen_fwd_params(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double dropout_p, double scale,
                                          int64_t window_left, int64_t window_right,
                                          bool bottom_right, double softcap,
                                          const std::optional<at::Tensor>& alibi_slopes) {
  AttentionFwdParams p =
      make_fwd_params(packed_as_4d(q), packed_as_4d(k), packed_as_4d(v), std::nullopt, dropout_p,
                      scale, window_left, window_right, false, softcap, alibi_slopes);
  p.batch = cu_seqlens_q.size(0) - 1;
  p.q_len = max_seqlen_q;
  p.kv_len = max_seqlen_k;
  p.q_stride[0] = p.k_stride[0] = p.v_stride[0] = 0;  // rows come from cu_seqlens
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.bottom_right = bottom_right;
  return p;
}

}  // namespace flash_ext
