// Tile configurations of the Hopper family per head dim (FwdTraits<head dim,
// query tile, key tile, pipeline stages>): a 64-row query slice per consumer
// warp group; key tiles as wide as the registers of S, P and O allow.
#pragma once

#include <cutlass/numeric_types.h>

#include <type_traits>

#include "sm90_fwd_kernel.cuh"
#include "sm90_kernel_traits.h"
#include "sm90_launch.h"

namespace flash_ext::cuda::sm90 {

template <ScalarKind kDtype>
using ElementOf = std::conditional_t<kDtype == ScalarKind::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

// Measured on an H100 (benchmarks/NOTES.md, sm90 v1): 176-key tiles at
// d = 128 spilled in the main loop and ran 7-13 % slower than 128; a third
// K/V stage gains ~3 % at d = 128 without a window but loses ~3 % under a
// causal one (224 KB of shared memory, no room left to overlap anything);
// 128-row query tiles at d = 64 lose 6-13 % against 192 on long rows. At
// d = 256, 80-key tiles ran 1-7 % faster than 64 without a window from
// N = 1024 on (H200, session 11).
// kNarrow: the configuration of windowed calls at d = 128 and 256, and of
// short or windowed ones at d = 64 (d64_narrow_tiles).
template <int kHeadDim, bool kNarrow, class Element, bool kDirectO = false>
using FwdConfig = std::conditional_t<
    kHeadDim == 64, FwdTraits<64, kNarrow ? 128 : 192, 128, 3, Element, kDirectO>,
    std::conditional_t<kHeadDim == 128, FwdTraits<128, 128, 128, kNarrow ? 2 : 3, Element, kDirectO>,
                       FwdTraits<256, 128, kNarrow ? 64 : 80, 2, Element, kDirectO>>>;

// d = 64: 192-row query tiles (three consumer groups) run long rows 10-15 %
// faster, but short sequences and the diagonal of a causal mask or window
// favour 128 rows: less of the last tile is past q_len, and the diagonal is
// covered in finer steps (at N = 512 causal, 13.5 tile pairs of 128 x 128 for
// 8 of visible work, against 10). Measured on the H100 (persistent kernel,
// benchmarks/NOTES.md): 128 rows win up to N = 1024 without a mask (+1-3 %)
// and up to 2048 with one (+17 % at 512, +2 % at 2048), 192 beyond.
inline bool d64_narrow_tiles(const AttentionFwdParams& p, bool windowed) {
  return p.q_len <= (windowed ? 2048 : 1024);
}

// The FwdTuning experiments (dense batches, d = 128 and 256): wider key
// tiles (176 keys at d = 128 without a window, 80 at d = 256 with one) and
// O stored from registers. Returns false where none applies.
template <int kHeadDim, class Element>
bool run_fwd_tuned(const AttentionFwdParams& p, bool narrow, cudaStream_t stream) {
  const FwdTuning& tuning = fwd_tuning();
  const bool wide = tuning.wide_keys_min_kv > 0 && p.kv_len >= tuning.wide_keys_min_kv;
  if constexpr (kHeadDim == 128) {
    if (wide && !has_window(p.window)) {
      launch_attention_fwd<FwdTraits<128, 128, 176, 2, Element>, false>(p, stream);
      return true;
    }
    if (tuning.direct_o && !narrow) {
      launch_attention_fwd<FwdConfig<128, false, Element, true>, false>(p, stream);
      return true;
    }
  } else if constexpr (kHeadDim == 256) {
    if (tuning.direct_o) {
      if (narrow && !wide) {
        launch_attention_fwd<FwdConfig<256, true, Element, true>, false>(p, stream);
      } else {
        launch_attention_fwd<FwdConfig<256, false, Element, true>, false>(p, stream);
      }
      return true;
    }
    if (wide && narrow) {
      launch_attention_fwd<FwdConfig<256, false, Element>, false>(p, stream);
      return true;
    }
  }
  return false;
}

// Varlen batches take the dense batches' tiles (their sequences are as long).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  const bool windowed = has_window(p.window);
  const bool narrow = kHeadDim == 128   ? windowed || p.kv_len <= fwd_tuning().two_stage_max_kv
                      : kHeadDim == 256 ? windowed
                                        : d64_narrow_tiles(p, windowed);
  if constexpr (!kVarlen && kHeadDim != 64) {
    if (run_fwd_tuned<kHeadDim, ElementOf<kDtype>>(p, narrow, stream)) return;
  }
  if (narrow) {
    launch_attention_fwd<FwdConfig<kHeadDim, true, ElementOf<kDtype>>, kVarlen>(p, stream);
  } else {
    launch_attention_fwd<FwdConfig<kHeadDim, false, ElementOf<kDtype>>, kVarlen>(p, stream);
  }
}

}  // namespace flash_ext::cuda::sm90
