// Which keys a query row sees under a (causal / sliding) window, per element
// and per tile, shared by every backend so masking and tile skipping agree.
#pragma once

#include <cstdint>

#include "macros.h"
#include "params.h"

namespace flash_ext {

FLASH_HOST_DEVICE bool key_visible(const VisibilityWindow& w, int64_t i, int64_t j) {
  const int64_t diag = i + w.diagonal_offset;
  return (w.window_left < 0 || j >= diag - w.window_left) &&
         (w.window_right < 0 || j <= diag + w.window_right);
}

// Whether the window bounds the keys at all (causal included): then tiles
// differ in how many keys they see.
FLASH_HOST_DEVICE bool has_window(const VisibilityWindow& w) {
  return w.window_left >= 0 || w.window_right >= 0;
}

// Half-open key range [begin, end) that any query row in [row_begin, row_end)
// may see, clamped to [0, kv_len). Tiles outside it are skipped, not computed.
struct KeyRange {
  int64_t begin, end;
};

FLASH_HOST_DEVICE KeyRange visible_key_range(const VisibilityWindow& w, int64_t row_begin,
                                             int64_t row_end, int64_t kv_len) {
  int64_t begin = 0, end = kv_len;
  if (w.window_left >= 0) {
    const int64_t b = row_begin + w.diagonal_offset - w.window_left;
    begin = b > 0 ? b : 0;
  }
  if (w.window_right >= 0) {
    const int64_t e = row_end - 1 + w.diagonal_offset + w.window_right + 1;
    end = e < kv_len ? e : kv_len;
  }
  if (end < begin) end = begin;
  return {begin, end};
}

// True when every (i, j) of the tile is visible, so per-element tests can be
// skipped.
FLASH_HOST_DEVICE bool tile_fully_visible(const VisibilityWindow& w, int64_t row_begin,
                                          int64_t row_end, int64_t col_begin, int64_t col_end) {
  return key_visible(w, row_begin, col_end - 1) && key_visible(w, row_end - 1, col_begin) &&
         key_visible(w, row_begin, col_begin) && key_visible(w, row_end - 1, col_end - 1);
}

// Key tiles [first, end) of width block_n that need no per-element mask for
// rows [row_begin, row_end): every key inside kv_len and inside every row's
// window (tile_fully_visible and a full tile, without testing each tile).
// Visibility bounds only grow with the row, so the last row bounds the left
// edge and the first row the right one; the set is one contiguous range.
struct TileRange {
  int64_t first, end;
};

// Division rounding down / up for any sign of a (b > 0): window bounds can
// lie before the first key.
FLASH_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return q * b > a ? q - 1 : q;
}

FLASH_HOST_DEVICE int64_t signed_ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

FLASH_HOST_DEVICE TileRange fully_visible_tiles(const VisibilityWindow& w, int64_t row_begin,
                                                int64_t row_end, int64_t kv_len, int64_t block_n) {
  int64_t first = 0, end = floor_div(kv_len, block_n);
  if (w.window_left >= 0) {  // first key >= row_end - 1 + offset - left
    first = signed_ceil_div(row_end - 1 + w.diagonal_offset - w.window_left, block_n);
  }
  if (w.window_right >= 0) {  // last key <= row_begin + offset + right
    const int64_t e = floor_div(row_begin + w.diagonal_offset + w.window_right + 1, block_n);
    end = e < end ? e : end;
  }
  return {first, end};
}

// The same from the keys' side (the backward's loop over query tiles): query
// tiles [first, end) of height block_m that see every key of [col_begin,
// col_end) with no mask; none where the keys pass kv_len.
FLASH_HOST_DEVICE TileRange fully_visible_query_tiles(const VisibilityWindow& w, int64_t col_begin,
                                                      int64_t col_end, int64_t kv_len, int64_t block_m) {
  constexpr int64_t kUnbounded = int64_t(1) << 40;
  if (col_end > kv_len) return {0, 0};
  int64_t first = 0, end = kUnbounded;
  if (w.window_left >= 0) {  // last row <= col_begin + left - offset
    end = floor_div(col_begin + w.window_left - w.diagonal_offset + 1, block_m);
  }
  if (w.window_right >= 0) {  // first row >= col_end - 1 - offset - right
    first = signed_ceil_div(col_end - 1 - w.diagonal_offset - w.window_right, block_m);
  }
  return {first, end};
}

// Where sequence b of a batch lies: its lengths, its first query and key rows
// (0 unless varlen) and its window. Varlen bounds are clamped to the packed
// tensors and to the maximum lengths, so bad cu_seqlens never address memory
// outside them (the CUDA glue cannot check their values without a sync).
struct SequenceBounds {
  int64_t q_row0, k_row0, q_len, kv_len;
  // lse of (head h, query i) is at lse[h * lse_head_stride + lse_row0 + i].
  int64_t lse_row0, lse_head_stride;
  VisibilityWindow window;
};

template <class Index>
FLASH_HOST_DEVICE Index clamp_row(Index x, Index lo, Index hi) {
  return x < lo ? lo : x > hi ? hi : x;
}

// kMayBeVarlen = false (kernels compiled for dense batches) keeps every
// bound a plain params field, which costs no register to keep live.
// Index = int32_t: the varlen clamps in 32-bit arithmetic, for kernels whose
// dispatch keeps total_q, total_k, q_len and kv_len below 2^31 (the Hopper
// family): the 64-bit compares and selects were ~30 instructions of every
// work tile's placement in the sm90 forward.
template <bool kMayBeVarlen = true, class Index = int64_t>
FLASH_HOST_DEVICE SequenceBounds sequence_bounds(const AttentionFwdParams& p, int64_t b) {
  if (!kMayBeVarlen || p.cu_seqlens_q == nullptr) {
    return {0, 0, p.q_len, p.kv_len, b * p.heads * p.q_len, p.q_len, p.window};
  }
  const Index total_q = static_cast<Index>(p.total_q), total_k = static_cast<Index>(p.total_k);
  const Index q0 = clamp_row<Index>(p.cu_seqlens_q[b], 0, total_q);
  const Index k0 = clamp_row<Index>(p.cu_seqlens_k[b], 0, total_k);
  const Index q_len = clamp_row<Index>(p.cu_seqlens_q[b + 1], q0, total_q) - q0;
  const Index kv_len = clamp_row<Index>(p.cu_seqlens_k[b + 1], k0, total_k) - k0;
  const Index max_q = static_cast<Index>(p.q_len), max_k = static_cast<Index>(p.kv_len);
  SequenceBounds s{q0, k0, q_len < max_q ? q_len : max_q, kv_len < max_k ? kv_len : max_k, q0, p.total_q, p.window};
  if (p.bottom_right) s.window.diagonal_offset = static_cast<Index>(s.kv_len) - static_cast<Index>(s.q_len);
  return s;
}

}  // namespace flash_ext
