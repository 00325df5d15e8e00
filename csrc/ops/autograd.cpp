// Autograd for flash_ext::attention in C++, so gradients flow from Python and
// from LibTorch alike: forward saves q, k, v, out, lse and the dropout seed,
// never anything of size L x S; backward recomputes through attention_bwd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops.h"

namespace flash_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The scalar arguments forward keeps for backward (both autograd functions).
struct SavedOptions {
  double dropout_p, scale, softcap;
  int64_t window_left, window_right;
  bool bottom_right, deterministic;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["deterministic"] = deterministic;
  }

  static SavedOptions load(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return {d["dropout_p"].toDouble(),   d["scale"].toDouble(),        d["softcap"].toDouble(),
            d["window_left"].toInt(),    d["window_right"].toInt(),    d["bottom_right"].toBool(),
            d["deterministic"].toBool()};
  }
};

// The output's gradient as the backward kernels read it: zeros when autograd
// passes none, last dimension contiguous.
at::Tensor readable_grad(const at::Tensor& grad, const at::Tensor& out) {
  if (!grad.defined()) return at::zeros_like(out);
  return grad.stride(-1) == 1 ? grad : grad.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flash_ext::attention_fwd", "")
                             .typed<decltype(attention_fwd)>();
  return op.call(q, k, v, mask, dropout_p, scale, window_left, window_right, bottom_right, softcap,
                 alibi_slopes);
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  // The mask travels as std::optional: Function::apply would ask an undefined
  // tensor for its device.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
                               double dropout_p,
                               double scale, int64_t window_left, int64_t window_right,
                               bool bottom_right, bool deterministic, double softcap,
                               const std::optional<at::Tensor>& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor mask = attn_mask.value_or(at::Tensor());
    auto [out, lse, rng_state] = call_fwd(q, k, v, attn_mask, dropout_p, scale, window_left,
                                          window_right, bottom_right, softcap, alibi_slopes);
    ctx->save_for_backward({q, k, v, out, lse, rng_state, mask, alibi_slopes.value_or(at::Tensor())});
    SavedOptions{dropout_p, scale, softcap, window_left, window_right, bottom_right, deterministic}.save(ctx);
    ctx->saved_data["bias_requires_grad"] = mask.defined() && mask.requires_grad();
    ctx->mark_non_differentiable({lse});
    // lse has no gradient to pass on; materialized, autograd would fill a
    // float32 zeros tensor of its size for every backward (readable_grad
    // covers an output gradient autograd leaves undefined).
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flash_ext::attention_bwd", "")
                               .typed<decltype(attention_bwd)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3];
    const at::Tensor &lse = saved[4], &rng_state = saved[5], &mask = saved[6], &slopes = saved[7];
    const SavedOptions o = SavedOptions::load(ctx);
    const bool bias_grad = ctx->saved_data["bias_requires_grad"].toBool();
    auto [dq, dk, dv, dbias] = op.call(readable_grad(grads[0], out), q, k, v, out, lse, rng_state,
                                       optional_tensor(mask), o.dropout_p, o.scale, o.window_left,
                                       o.window_right, o.bottom_right, bias_grad, o.deterministic,
                                       o.softcap, optional_tensor(slopes));
    return {dq, dk, dv, bias_grad ? dbias : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, bool deterministic,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const variable_list outs = AttentionFunction::apply(
      q, k, v, attn_mask, dropout_p, scale, window_left, window_right,
      bottom_right, deterministic, softcap, alibi_slopes);
  return {outs[0], outs[1]};
}

// Below autograd (inference mode, or tensors without autograd): forward only.
std::tuple<at::Tensor, at::Tensor> attention_inference(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, bool /*deterministic*/,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  auto [out, lse, rng_state] = call_fwd(q, k, v, attn_mask, dropout_p, scale, window_left,
                                        window_right, bottom_right, softcap, alibi_slopes);
  return {out, lse};
}

// The varlen ops' max_seqlen_* are SymInts: symbolic under torch.compile
// (the device kernels take them as int64_t, concrete by then).
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flash_ext::attention_varlen_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              c10::SymInt, c10::SymInt, double, double, int64_t, int64_t, bool, double,
              const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                 window_left, window_right, bottom_right, softcap, alibi_slopes);
}

// attention_varlen's autograd: as AttentionFunction, with the cu_seqlens saved.
class VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                               c10::SymInt max_seqlen_k, double dropout_p, double scale,
                               int64_t window_left, int64_t window_right, bool bottom_right,
                               bool deterministic, double softcap,
                               const std::optional<at::Tensor>& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, rng_state] =
        call_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        scale, window_left, window_right, bottom_right, softcap, alibi_slopes);
    ctx->save_for_backward({q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k,
                            alibi_slopes.value_or(at::Tensor())});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    SavedOptions{dropout_p, scale, softcap, window_left, window_right, bottom_right, deterministic}.save(ctx);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // as AttentionFunction's
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("flash_ext::attention_varlen_bwd", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                c10::SymInt, double, double, int64_t, int64_t, bool, bool, double,
                const std::optional<at::Tensor>&)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3];
    const at::Tensor &lse = saved[4], &rng_state = saved[5], &slopes = saved[8];
    const SavedOptions o = SavedOptions::load(ctx);
    auto [dq, dk, dv] = op.call(readable_grad(grads[0], out), q, k, v, out, lse, rng_state, saved[6],
                                saved[7], ctx->saved_data["max_seqlen_q"].toSymInt(),
                                ctx->saved_data["max_seqlen_k"].toSymInt(), o.dropout_p, o.scale,
                                o.window_left, o.window_right, o.bottom_right, o.deterministic,
                                o.softcap, optional_tensor(slopes));
    variable_list grad_inputs(15);
    grad_inputs[0] = dq;
    grad_inputs[1] = dk;
    grad_inputs[2] = dv;
    return grad_inputs;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_varlen_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, bool deterministic,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const variable_list outs = VarlenAttentionFunction::apply(
      q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
      window_left, window_right, bottom_right, deterministic, softcap, alibi_slopes);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_inference(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right,
    bool /*deterministic*/, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  auto [out, lse, rng_state] =
      call_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      scale, window_left, window_right, bottom_right, softcap, alibi_slopes);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_ext, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("attention_varlen", &attention_varlen_autograd);
  // The others are not differentiable (attention's backward is once
  // differentiable): differentiating through them raises instead of silently
  // giving zero gradients.
  for (const char* name : {"attention_fwd", "attention_bwd", "attention_varlen_fwd",
                           "attention_varlen_bwd", "kvcache_attention", "dropout_keep_mask"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(flash_ext, CompositeExplicitAutograd, m) {
  m.impl("attention", &attention_inference);
  m.impl("attention_varlen", &attention_varlen_inference);
}

}  // namespace flash_ext
