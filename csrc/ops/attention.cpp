// attention_fwd / attention_bwd: checks, outputs and params, then the
// device's kernels. Registered for CPU and CUDA alike; backend.h branches.
#include <ATen/DeviceGuard.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "../cpu/dropout.h"
#include "backend.h"
#include "checks.h"
#include "ops.h"

namespace flash_ext {
namespace {

constexpr const char* kOp = "flash_ext.attention";

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void set_lse(AttentionFwdParams& p, const at::Tensor& lse) {
  if (lse.scalar_type() == at::kDouble) {
    p.lse_f64 = lse.data_ptr<double>();
  } else {
    p.lse = lse.data_ptr<float>();
  }
}

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
                  int64_t window_left, int64_t window_right, double softcap,
                  const std::optional<at::Tensor>& alibi_slopes) {
  check_attention_inputs(kOp, q, k, v);
  if (attn_mask.has_value()) check_attn_mask(kOp, *attn_mask, q, k);
  check_scalars(kOp, dropout_p, scale, window_left, window_right);
  check_softcap_alibi(kOp, softcap, alibi_slopes, q.size(0), q.size(1), q.device());
}

// Backward's tensors beyond forward's, all in the (B, H, N, D) view.
void set_bwd_tensors(AttentionBwdParams& params, const at::Tensor& out, const at::Tensor& dout,
                     const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv) {
  params.out = out.data_ptr();
  set_strides(params.o_stride, out);
  set_lse(params, lse);
  params.dout = dout.data_ptr();
  set_strides(params.do_stride, dout);
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  set_strides(params.dq_stride, dq);
  set_strides(params.dk_stride, dk);
  set_strides(params.dv_stride, dv);
}

constexpr const char* kVarlenOp = "flash_ext.attention_varlen";

void check_varlen_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
                         double scale, int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes) {
  check_varlen_inputs(kVarlenOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_scalars(kVarlenOp, dropout_p, scale, window_left, window_right);
  check_softcap_alibi(kVarlenOp, softcap, alibi_slopes, cu_seqlens_q.size(0) - 1, q.size(1),
                      q.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_common(q_in, k_in, v_in, attn_mask, dropout_p, scale, window_left, window_right, softcap,
               alibi_slopes);
  const at::OptionalDeviceGuard guard(q_in.device());
  const at::Tensor q = backend::readable_layout(q_in), k = backend::readable_layout(k_in),
                   v = backend::readable_layout(v_in);

  at::Tensor out = empty_like_query_layout(q_in, v.size(3));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
  AttentionFwdParams params = make_fwd_params(q, k, v, attn_mask, dropout_p, scale, window_left,
                                              window_right, bottom_right, softcap, alibi_slopes);
  at::Tensor rng_state = dropout_p > 0.0 ? backend::seed_dropout(q, params.dropout)
                                         : at::empty({0}, q.options().dtype(at::kLong));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse, rng_state};
  if (k.size(2) == 0) {  // no keys: every row is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse, rng_state};
  }
  params.out = out.data_ptr();
  set_strides(params.o_stride, out);
  set_lse(params, lse);
  backend::run_attention_fwd(q, params);
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, bool bias_requires_grad,
    bool deterministic, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_common(q_in, k_in, v_in, attn_mask, dropout_p, scale, window_left, window_right, softcap,
               alibi_slopes);
  const at::Tensor q = backend::readable_layout(q_in), k = backend::readable_layout(k_in),
                   v = backend::readable_layout(v_in);
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK_VALUE(out.sizes() == out_shape && out.scalar_type() == q.scalar_type(), kOp,
                    ": out must be forward's output of shape ", at::IntArrayRef(out_shape), ", got ",
                    out.sizes(), " ", out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.sizes() == out_shape && grad_out.scalar_type() == q.scalar_type(), kOp,
                    ": grad_out must match the output's shape ", at::IntArrayRef(out_shape),
                    " and dtype ", q.scalar_type(), ", got ", grad_out.sizes(), " ",
                    grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.stride(3) == 1 && out.stride(3) == 1, kOp,
                    ": grad_out and out must have a contiguous last dimension");
  const at::Tensor dout_r = backend::readable_layout(grad_out), out_r = backend::readable_layout(out);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(out_shape).slice(0, 3) &&
                        lse.scalar_type() == lse_dtype(q) && lse.is_contiguous(),
                    kOp, ": lse must be forward's contiguous ", lse_dtype(q), " log-sum-exp of shape ",
                    at::IntArrayRef(out_shape).slice(0, 3));
  const bool bias_grad = bias_requires_grad && attn_mask.has_value() &&
                         attn_mask->scalar_type() != at::kBool;
  const at::OptionalDeviceGuard guard(q.device());

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // A mask broadcast over some dimensions gets its gradient summed over them:
  // for fp16/bf16 inputs the kernels then write float32 so that the sum is
  // rounded once.
  const std::vector<int64_t> dbias_shape = {q.size(0), q.size(1), q.size(2), k.size(2)};
  const bool dbias_reduced = bias_grad && at::isReducedFloatingType(q.scalar_type()) &&
                             attn_mask->sizes() != at::IntArrayRef(dbias_shape);
  at::Tensor dbias_full =
      bias_grad ? at::empty(dbias_shape, q.options().dtype(dbias_reduced ? at::kFloat : q.scalar_type()))
                : at::Tensor();
  const auto bias_grad_result = [&]() {
    if (!bias_grad) return at::empty({0}, q.options());
    return dbias_full.sum_to_size(attn_mask->sizes()).to(q.scalar_type());
  };
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    if (bias_grad) dbias_full.zero_();
    return {dq, dk, dv, bias_grad_result()};
  }

  AttentionBwdParams params;
  static_cast<AttentionFwdParams&>(params) = make_fwd_params(
      q, k, v, attn_mask, dropout_p, scale, window_left, window_right, bottom_right, softcap,
      alibi_slopes);
  if (dropout_p > 0.0) backend::replay_dropout(rng_state, params.dropout);
  set_bwd_tensors(params, out_r, dout_r, lse, dq, dk, dv);
  if (bias_grad) {
    params.dbias = dbias_full.data_ptr();
    params.dbias_float = dbias_reduced;
    for (int i = 0; i < 4; ++i) params.dbias_stride[i] = dbias_full.stride(i);
  }
  params.deterministic = deterministic;
  backend::run_attention_bwd(q, params);
  return {dq, dk, dv, bias_grad_result()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_seqlens_q_in, const at::Tensor& cu_seqlens_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_varlen_common(q_in, k_in, v_in, cu_seqlens_q_in, cu_seqlens_k_in, max_seqlen_q,
                      max_seqlen_k, dropout_p, scale, window_left, window_right, softcap,
                      alibi_slopes);
  const at::OptionalDeviceGuard guard(q_in.device());
  const at::Tensor q = backend::readable_layout(q_in), k = backend::readable_layout(k_in),
                   v = backend::readable_layout(v_in);
  const at::Tensor cu_seqlens_q = cu_seqlens_q_in.contiguous(), cu_seqlens_k = cu_seqlens_k_in.contiguous();

  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_dtype(q)));
  AttentionFwdParams params = make_varlen_fwd_params(
      q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
      window_left, window_right, bottom_right, softcap, alibi_slopes);
  at::Tensor rng_state = dropout_p > 0.0 ? backend::seed_dropout(q, params.dropout)
                                         : at::empty({0}, q.options().dtype(at::kLong));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse, rng_state};
  if (k.size(0) == 0) {  // no keys: every row is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse, rng_state};
  }
  const at::Tensor out4 = packed_as_4d(out);
  params.out = out.data_ptr();
  set_strides(params.o_stride, out4);
  params.o_stride[0] = 0;
  set_lse(params, lse);
  backend::run_attention_fwd(q, params);
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
    const at::Tensor& cu_seqlens_q_in, const at::Tensor& cu_seqlens_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, bool deterministic, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_varlen_common(q_in, k_in, v_in, cu_seqlens_q_in, cu_seqlens_k_in, max_seqlen_q,
                      max_seqlen_k, dropout_p, scale, window_left, window_right, softcap,
                      alibi_slopes);
  const at::Tensor q = backend::readable_layout(q_in), k = backend::readable_layout(k_in),
                   v = backend::readable_layout(v_in);
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), v.size(2)};
  TORCH_CHECK_VALUE(out.sizes() == out_shape && out.scalar_type() == q.scalar_type(), kVarlenOp,
                    ": out must be forward's output of shape ", at::IntArrayRef(out_shape), ", got ",
                    out.sizes(), " ", out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.sizes() == out_shape && grad_out.scalar_type() == q.scalar_type(),
                    kVarlenOp, ": grad_out must match the output's shape ", at::IntArrayRef(out_shape),
                    " and dtype ", q.scalar_type(), ", got ", grad_out.sizes(), " ",
                    grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.stride(2) == 1 && out.stride(2) == 1, kVarlenOp,
                    ": grad_out and out must have a contiguous last dimension");
  const std::vector<int64_t> lse_shape = {q.size(1), q.size(0)};
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.scalar_type() == lse_dtype(q) && lse.is_contiguous(),
                    kVarlenOp, ": lse must be forward's contiguous ", lse_dtype(q),
                    " log-sum-exp of shape (heads, total_q) = ", at::IntArrayRef(lse_shape));
  const at::OptionalDeviceGuard guard(q.device());
  const at::Tensor cu_seqlens_q = cu_seqlens_q_in.contiguous(), cu_seqlens_k = cu_seqlens_k_in.contiguous();
  const at::Tensor dout_r = backend::readable_layout(grad_out), out_r = backend::readable_layout(out);

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AttentionBwdParams params;
  static_cast<AttentionFwdParams&>(params) = make_varlen_fwd_params(
      q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
      window_left, window_right, bottom_right, softcap, alibi_slopes);
  if (dropout_p > 0.0) backend::replay_dropout(rng_state, params.dropout);
  set_bwd_tensors(params, packed_as_4d(out_r), packed_as_4d(dout_r), lse, packed_as_4d(dq),
                  packed_as_4d(dk), packed_as_4d(dv));
  for (int64_t* stride : {params.o_stride, params.do_stride, params.dq_stride, params.dk_stride,
                          params.dv_stride}) {
    stride[0] = 0;
  }
  params.deterministic = deterministic;
  backend::run_attention_bwd(q, params);
  return {dq, dk, dv};
}

at::Tensor dropout_keep_mask(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                             int64_t q_len, int64_t kv_len, double dropout_p) {
  check_scalars("flash_ext.dropout_keep_mask", dropout_p, 1.0, -1, -1);
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 0 && q_len >= 0 && kv_len >= 0,
                    "flash_ext.dropout_keep_mask: sizes must be non-negative");
  check_rng_state("flash_ext.dropout_keep_mask", rng_state);
  DropoutParams dropout;
  dropout.p = dropout_p;
  backend::replay_dropout(rng_state.cpu(), dropout);
  at::Tensor keep = at::empty({batch, heads, q_len, kv_len}, at::kBool);
  bool* data = keep.data_ptr<bool>();
  at::parallel_for(0, batch * heads * q_len, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const cpu::DropoutMask mask(dropout, static_cast<uint64_t>(row / q_len));
      for (int64_t j = 0; j < kv_len; ++j) data[row * kv_len + j] = !mask.dropped(row % q_len, j);
    }
  });
  return keep.to(rng_state.device());
}

TORCH_LIBRARY_IMPL(flash_ext, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

TORCH_LIBRARY_IMPL(flash_ext, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

TORCH_LIBRARY_IMPL(flash_ext, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask);
}

}  // namespace flash_ext
