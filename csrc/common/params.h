// Plain parameter structs shared by every backend. Kernels see only these:
// no torch header, so nvcc compiles kernel code alone.
//
// Layout convention: every tensor is addressed as (batch, head, seq, dim) with
// element strides for the first three dimensions; the last one is contiguous.
// PyTorch's (B, H, L, D) and FlashAttention's (B, L, H, D) are both just
// strides.
#pragma once

#include <cstdint>

namespace flash_ext {

enum class ScalarKind : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// How attn_mask enters the scores: a boolean keep-mask (stored as one byte per
// element, nonzero = take part) or an additive bias of the input dtype.
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kAdditive = 2 };

// Which keys a query sees, beyond attn_mask. Query i sees key j iff
//   (window_left  < 0 || j >= i + diagonal_offset - window_left) &&
//   (window_right < 0 || j <= i + diagonal_offset + window_right)
// Causal is window_right = 0. diagonal_offset is 0 for PyTorch's top-left
// alignment and kv_len - q_len for FlashAttention's bottom-right alignment.
struct VisibilityWindow {
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t diagonal_offset = 0;
};

// Dropout keeps element (batch*heads+head, i, j) iff philox(seed, offset, ...)
// falls below keep_threshold (see philox.h). On CUDA under graph capture the
// seed and offset live in device memory (the *_ptr fields) and the kernel
// stores the values it used into rng_state so backward can replay them.
struct DropoutParams {
  double p = 0.0;                     // probability of dropping
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;  // CUDA graph capture: read on device
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  int64_t* rng_state = nullptr;       // [seed, offset], written by forward
};

struct AttentionFwdParams {
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t batch = 0, heads = 0, kv_heads = 0;  // heads % kv_heads == 0 (GQA)
  int64_t q_len = 0, kv_len = 0;
  int64_t head_dim = 0, v_head_dim = 0;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (batch, heads, q_len) contiguous, natural log
  double* lse_f64 = nullptr;  // used instead of lse for float64 inputs (CPU)

  int64_t q_stride[3] = {0, 0, 0};  // batch, head, seq
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};

  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};  // batch, head, q, k; 0 = broadcast

  double scale = 1.0;  // float64 inputs need it unrounded; kernels may narrow it
  VisibilityWindow window;
  DropoutParams dropout;

  // Logit soft-capping (Gemma-2): s -> softcap * tanh(s / softcap), applied to
  // scale * q·k before ALiBi and attn_mask; 0 = off.
  float softcap = 0.f;
  // ALiBi: s -= slope * |i + diagonal_offset - j|; float32 slopes per
  // (batch, head), alibi_batch_stride 0 when the batch shares them.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // Variable-length (packed) batches, FlashAttention's varlen layout: when
  // cu_seqlens_q is set, sequence b owns query rows [cu_seqlens_q[b],
  // cu_seqlens_q[b+1]) of a (total_q, heads, dim) tensor and key rows
  // [cu_seqlens_k[b], cu_seqlens_k[b+1]) of (total_k, kv_heads, dim) ones
  // (batch strides 0, see SequenceBounds). q_len and kv_len are then the
  // largest lengths, which size grids and workspaces; lse is (heads, total_q).
  // With bottom_right, each sequence's diagonal is its kv_len - q_len.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  bool bottom_right = false;

  // CUDA: multiprocessors of the device, set by the glue from PyTorch's
  // cached device properties (the persistent Hopper forward launches one
  // block per SM, 0 one per tile; the Hopper backward orders its blocks by
  // rounds of num_sms, 0 pair by pair).
  int num_sms = 0;
  // CUDA: one int32, zero before each call that wants it
  // (fwd_needs_tile_counter) and left zero by it: the persistent Hopper
  // forward's blocks take their tiles after the first from it. The glue keeps
  // one per stream (calls on a stream run in order), and a graph under
  // capture its own.
  int* tile_counter = nullptr;
};

struct AttentionBwdParams : AttentionFwdParams {
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t do_stride[3] = {0, 0, 0};
  int64_t dq_stride[3] = {0, 0, 0};
  int64_t dk_stride[3] = {0, 0, 0};  // dk, dv have kv_heads heads
  int64_t dv_stride[3] = {0, 0, 0};

  // Gradient of an additive bias, written for every (batch, head, i, j) with
  // these strides (the glue reduces over broadcast dimensions afterwards).
  void* dbias = nullptr;
  int64_t dbias_stride[4] = {0, 0, 0, 0};
  // dbias is float32 rather than the inputs' dtype: a broadcast mask's
  // gradient is summed before its one rounding.
  bool dbias_float = false;

  // Scratch owned by the glue: float32 (batch, heads, q_len) for
  // D = rowsum(dO * O), and float32 dq accumulators where a backend needs them.
  float* softmax_d = nullptr;
  float* dq_accum = nullptr;
  bool deterministic = false;
};

// Decoding against a KV cache: q_len new query tokens per sequence attend to
// cache_seqlens[b] cached keys plus, when k_new/v_new are given, the new keys
// appended (in place) at cache_seqlens[b].
struct KVCacheParams {
  ScalarKind dtype = ScalarKind::kFloat16;
  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t q_len = 0, new_len = 0;  // new_len = 0 when nothing is appended
  int64_t head_dim = 0, v_head_dim = 0;

  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (batch, heads, q_len)

  int64_t q_stride[3] = {0, 0, 0};  // batch, head, seq
  int64_t o_stride[3] = {0, 0, 0};
  int64_t k_new_stride[3] = {0, 0, 0};
  int64_t v_new_stride[3] = {0, 0, 0};
  // Cache strides: (batch or page, head, row). For a paged cache the first
  // index is the physical page id taken from block_table.
  int64_t k_cache_stride[3] = {0, 0, 0};
  int64_t v_cache_stride[3] = {0, 0, 0};

  const int32_t* cache_seqlens = nullptr;  // (batch,) cached length before append
  const int32_t* block_table = nullptr;    // (batch, max_pages) or null
  int64_t block_table_stride = 0;
  int64_t page_size = 0;   // rows per page (max_len for a contiguous cache)

  double scale = 1.0;  // float64 inputs need it unrounded; kernels may narrow it
  // Keys each new token t sees: [pos - window_left, pos + window_right] around
  // its own position pos = total - q_len + t, -1 = unbounded on that side
  // (window_right = 0: causal among the new tokens).
  int64_t window_left = -1, window_right = 0;
  float softcap = 0.f;     // as in AttentionFwdParams
  // ALiBi slopes (batch, heads) float32; distance |total - q_len + t - j|.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  int64_t num_splits = 1;  // split-KV partitions, >= 1

  // Partial results of each split, float32, owned by the glue:
  // out_partial (num_splits, batch, heads, q_len, v_head_dim),
  // lse_partial (num_splits, batch, heads, q_len).
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
  // One zeroed int per (sequence, kv head, row block) when num_splits > 1:
  // the split blocks count themselves in, the last one merges the partials
  // and resets the count to 0. Null: a separate combine kernel merges them.
  int* split_counters = nullptr;
};

}  // namespace flash_ext
