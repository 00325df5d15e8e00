// Every flash_ext operator schema, in one place. Kernels for each dispatch
// key are registered beside their implementations.
#include <torch/library.h>

TORCH_LIBRARY(flash_ext, m) {
  // Differentiable attention on (batch, heads, seq, dim) tensors with any
  // strides whose last dimension is contiguous. Query i sees key j when the
  // window allows it (see csrc/common/mask.h; -1 = unbounded, causal is
  // window_right = 0) and attn_mask (bool: True takes part; float: added to
  // the scores) does. softcap > 0 caps scale * q·k at softcap * tanh(. /
  // softcap); alibi_slopes (heads,) or (batch, heads) float32 subtract
  // slope * |i + diagonal - j|. Returns the output and the row log-sum-exp.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, float scale, "
      "int window_left, int window_right, bool bottom_right, bool deterministic, "
      "float softcap=0., Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  // The forward kernel alone: also returns what backward needs to replay
  // dropout ([seed, offset], empty when dropout_p == 0).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap=0., "
      "Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse, Tensor rng_state)");
  // Backward by recomputation from q, k, v, out and lse. grad_bias is the
  // gradient of a float attn_mask (empty unless bias_requires_grad).
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor rng_state, Tensor? attn_mask, float dropout_p, float scale, int window_left, "
      "int window_right, bool bottom_right, bool bias_requires_grad, bool deterministic, "
      "float softcap=0., Tensor? alibi_slopes=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias)");
  // attention over variable-length sequences packed without padding
  // (FlashAttention's varlen): q (total_q, heads, dim), k and v (total_k,
  // kv_heads, dim); sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
  // of q against rows [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k and v
  // (int32, (batch + 1,)); max_seqlen_* bound every length (SymInt: under
  // torch.compile they may come from the data, as a jagged tensor's or an
  // .item() of the lengths' max). bottom_right aligns each sequence's
  // diagonal to its own end. Returns out (total_q, heads, dim_v) and lse
  // (heads, total_q).
  m.def(
      "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, float scale, int window_left, "
      "int window_right, bool bottom_right, bool deterministic, float softcap=0., "
      "Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, float scale, int window_left, "
      "int window_right, bool bottom_right, float softcap=0., Tensor? alibi_slopes=None) "
      "-> (Tensor out, Tensor lse, Tensor rng_state)");
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor rng_state, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float dropout_p, float scale, int window_left, int window_right, "
      "bool bottom_right, bool deterministic, float softcap=0., Tensor? alibi_slopes=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Decoding against a KV cache in FlashAttention's layout: q (batch, q_len,
  // heads, dim); caches (batch, max_len, kv_heads, dim), or paged
  // (num_pages, page_size, kv_heads, dim) with block_table (batch, max_pages).
  // k_new/v_new (batch, new_len, kv_heads, dim) are written into the caches
  // at cache_seqlens first. num_splits = 0 picks the split-KV count. The
  // window (-1 = unbounded) is around each new token's position; causal
  // makes its right side 0.
  m.def(
      "kvcache_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, "
      "Tensor? v_new, Tensor cache_seqlens, Tensor? block_table, float scale, bool causal, "
      "int num_splits, float softcap=0., Tensor? alibi_slopes=None, int window_left=-1, "
      "int window_right=-1) -> (Tensor out, Tensor lse)");
  // The boolean keep-mask that dropout with this rng_state applied to a
  // (batch, heads, q_len, kv_len) score matrix: for tests and debugging.
  m.def(
      "dropout_keep_mask(Tensor rng_state, int batch, int heads, int q_len, int kv_len, "
      "float dropout_p) -> Tensor");
}
