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

}  // namespace flash_ext
