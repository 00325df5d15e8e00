// Argument checking and params building for the ops: every error names the
// argument and what was expected, and is raised before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

#include "../common/params.h"

namespace flash_ext {

ScalarKind scalar_kind(at::ScalarType type);

// `name` is float16, bfloat16, float32 or float64.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// `name`'s last dimension has stride 1 (or size <= 1).
void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t);

// The int64 [seed, offset] that forward returned for dropout.
void check_rng_state(const char* op, const at::Tensor& rng_state);

// query (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev): same dtype
// and device, H divisible by Hkv, last dimensions contiguous.
void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v);

// attn_mask: bool or q's dtype, 4-D, each size 1 or equal to (B, H, L, S).
void check_attn_mask(const char* op, const at::Tensor& mask, const at::Tensor& q,
                     const at::Tensor& k);

void check_scalars(const char* op, double dropout_p, double scale, int64_t window_left,
                   int64_t window_right);
// window_size: each side >= 0, or -1 for unbounded.
void check_window(const char* op, int64_t window_left, int64_t window_right);

// softcap >= 0 and finite; alibi_slopes float32 (heads,) or (batch, heads)
// on the query's device.
void check_softcap_alibi(const char* op, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes, int64_t batch,
                         int64_t heads, const at::Device& device);

// Where slopes live and how the batch steps through them (0 = shared).
std::pair<const float*, int64_t> alibi_pointer(const std::optional<at::Tensor>& alibi_slopes);

// Variable-length batches: q (total_q, heads, dim), k (total_k, kv_heads,
// dim), v (total_k, kv_heads, dim_v) with the rules of check_attention_inputs;
// cu_seqlens_q/k int32, 1-D, (batch + 1,), on q's device; max_seqlen >= 0.
// On the CPU also their values: start at 0, nondecreasing, end at total, no
// length above max_seqlen (on CUDA that would need a sync: kernels clamp).
void check_varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                         int64_t max_seqlen_k);

// Params for q, k, v, the optional mask and the window; outputs unset.
AttentionFwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                   double scale, int64_t window_left, int64_t window_right,
                                   bool bottom_right, double softcap,
                                   const std::optional<at::Tensor>& alibi_slopes);

// make_fwd_params for packed (total, heads, dim) q, k, v and their
// cu_seqlens (contiguous int32), see AttentionFwdParams' varlen fields.
AttentionFwdParams make_varlen_fwd_params(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double dropout_p, double scale,
                                          int64_t window_left, int64_t window_right,
                                          bool bottom_right, double softcap,
                                          const std::optional<at::Tensor>& alibi_slopes);

// (total, heads, dim) as the (1, heads, total, dim) view the 4-D rules take.
inline at::Tensor packed_as_4d(const at::Tensor& t) { return t.unsqueeze(0).transpose(1, 2); }

// (batch, head, seq) element strides of a (B, H, L, D) tensor.
void set_strides(int64_t (&dst)[3], const at::Tensor& t);

// An output for (B, H, L, dim) laid out like q: heads-inner memory (B, L, H,
// dim) when q is so, as PyTorch's flash backend returns, else (B, H, L, dim).
at::Tensor empty_like_query_layout(const at::Tensor& q, int64_t dim);

}  // namespace flash_ext
