// The torch-facing implementations of the schemas in schema.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace flash_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, bool bias_requires_grad,
    bool deterministic, double softcap, const std::optional<at::Tensor>& alibi_slopes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, bool deterministic, double softcap,
    const std::optional<at::Tensor>& alibi_slopes);

std::tuple<at::Tensor, at::Tensor> kvcache_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table, double scale,
    bool causal, int64_t num_splits, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right);

at::Tensor dropout_keep_mask(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                             int64_t q_len, int64_t kv_len, double dropout_p);

}  // namespace flash_ext
