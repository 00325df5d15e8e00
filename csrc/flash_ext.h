// flash_ext's C++ API for LibTorch programs: the same operators Python uses,
// called through the dispatcher, so autograd and every device work.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace flash_ext {

// Attention on (batch, heads, seq, dim) tensors with any strides whose last
// dimension is contiguous. heads may be a multiple of key/value heads (GQA).
// window_left/right bound the keys each query sees around its diagonal (-1 =
// unbounded; causal is window_right = 0); the diagonal is aligned top-left
// (PyTorch) or bottom-right (FlashAttention). attn_mask: bool (true takes
// part) or an additive bias of q's dtype, 4-D, each size 1 or full.
// softcap > 0 caps scale * q·k at softcap * tanh(. / softcap); alibi_slopes
// (heads,) or (batch, heads) float32 subtract slope * |i + diagonal - j|.
// Returns the output and the row log-sum-exp; differentiable in q, k, v and
// a float attn_mask.
std::tuple<at::Tensor, at::Tensor> attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask = std::nullopt, double dropout_p = 0.0,
    std::optional<double> scale = std::nullopt, int64_t window_left = -1,
    int64_t window_right = -1, bool bottom_right = false, bool deterministic = false,
    double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// at::scaled_dot_product_attention's signature and semantics on 4-D inputs
// (is_causal aligned top-left; enable_gqa lets query heads share key/value
// heads, of which a single one broadcasts without it).
at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v,
                                        const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                        double dropout_p = 0.0, bool is_causal = false,
                                        std::optional<double> scale = std::nullopt,
                                        bool enable_gqa = false);

// Decoding against a KV cache (FlashAttention's layout), see schema.cpp. The
// window is around each new token's own position (-1 = unbounded).
std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new = std::nullopt,
    const std::optional<at::Tensor>& v_new = std::nullopt,
    const std::optional<at::Tensor>& block_table = std::nullopt,
    std::optional<double> scale = std::nullopt, bool causal = true, int64_t num_splits = 0,
    double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    int64_t window_left = -1, int64_t window_right = -1);

}  // namespace flash_ext
