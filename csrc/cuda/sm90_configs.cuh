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

// Measured on an H100 (benchmarks/NOTES.md, sm90 v1): a third K/V stage
// gains ~3 % at d = 128 without a window but loses ~3 % under a causal one
// (224 KB of shared memory, no room left to overlap anything); 128-row query
// tiles at d = 64 lose 6-13 % against 192 on long rows. Session 11: 80-key
// tiles at d = 256 ran 1-7 % faster than 64 from N = 1024 on (+0-5 % at
// 512), with or without a causal mask.
// kNarrow: the configuration of windowed calls at d = 128, and of short or
// windowed ones at d = 64 (d64_narrow_tiles). d = 64's 128-row tiles take
// Q K^T with Q in registers (FwdTraits::kQInRegs: 16 more registers a thread,
// Q released at a tile's start so the next tile's lands during this one):
// +1-1.5 % at N = 512 and causal 2k in both rounds of session 15's A/B
// (H100). At d = 128 the 32 registers spilled (60-80 bytes, local loads in
// the key loop) and ran 0-5 % slower.
template <int kHeadDim, bool kNarrow, class Element>
using FwdConfig = std::conditional_t<
    kHeadDim == 64, FwdTraits<64, kNarrow ? 128 : 192, 128, 3, Element, kNarrow>,
    std::conditional_t<kHeadDim == 128, FwdTraits<128, 128, 128, kNarrow ? 2 : 3, Element>,
                       FwdTraits<256, 128, 80, 2, Element>>>;

// d = 128 without a window, long rows (FwdTuning::wide_keys_min_kv): 176-key
// tiles in 2 stages, fewer per-tile costs (O's rescale, the row reductions,
// the turn) per key. They spill ~70 bytes, in the masking path mostly.
// Measured (session 11): 3-9 % slower up to N = 2048; within 1 % at 4k and
// 8k and +2 % at 16k on an H200; +4 % at 8k on an H100.
// kClusterM = 2: the blocks in cluster pairs sharing their K/V loads
// (FwdTraits; FwdTuning::cluster_pairs_min_kv). Measured (session 17, H100,
// three alternating rounds): +2 % at 8k, +3 % at 16k, the same cycles in
// ncu at a 4 % higher SM clock (half the L2 traffic under the power cap);
// pairs of 128-key tiles lost 1 % at 2k, and d = 256's ran -3..+2 %.
template <class Element, int kClusterM = 1>
using FwdConfigWideKeys = FwdTraits<128, 128, 176, 2, Element, false, kClusterM>;

// d = 128 on 192-row query tiles of 80 keys in 3 stages (FwdTuning::
// d128_tall_min, d128_tall_max_kv, d128_tall_min_windowed): three consumer
// groups at 160 registers (no spill, 148 live at most), each group's
// products and softmax ~60 % of a 128-key tile's, and two other groups to
// hide them under. Measured (H100, session 35, three runs of 3-7
// alternating rounds against 128-key tiles at 2k and 176-key cluster pairs
// at 4k-8k): 2k +1.3 / +1.6 / +2.1 %, 3k +7 %, 4k +2.0 % each time, 8k
// level; 1k -6 %, 512 -11 % (a 192-row tile is a larger share of a short
// row). 64-key tiles in 4 stages lost 1-9 %. Causal calls on them were
// level at 2k-8k (H200, session 36). kClusterM = 2: in cluster pairs
// sharing their K/V loads (FwdTuning::d128_tall_pairs_min_kv; +0.3-0.9 %
// at 8k-16k on an H200, inside the spread; ptxas: 32 bytes of spill, 8
// local accesses a pass around the K/V loads' TMA issue, against the
// 176-key pairs' 26).
template <class Element, int kClusterM = 1>
using FwdConfigTall = FwdTraits<128, 192, 80, 3, Element, false, kClusterM>;

// Dense d = 128 calls that take FwdConfigTall.
inline bool d128_tall_tiles(const AttentionFwdParams& p, bool windowed) {
  const int64_t min = windowed ? fwd_tuning().d128_tall_min_windowed : fwd_tuning().d128_tall_min;
  return min > 0 && p.q_len >= min && p.kv_len >= min && p.kv_len <= fwd_tuning().d128_tall_max_kv;
}

// d = 64: 192-row query tiles (three consumer groups) run long rows 10-15 %
// faster, but short sequences and the diagonal of a causal mask or window
// favour 128 rows: less of the last tile is past q_len, and the diagonal is
// covered in finer steps (at N = 512 causal, 13.5 tile pairs of 128 x 128 for
// 8 of visible work, against 10). Measured on the H100 (persistent kernel,
// benchmarks/NOTES.md): 128 rows win up to N = 1024 without a mask (+1-3 %)
// and up to 2048 with one (+17 % at 512, +2 % at 2048), 192 beyond.
inline bool d64_narrow_tiles(const AttentionFwdParams& p, bool windowed) {
  return p.q_len <= (windowed ? fwd_tuning().d64_narrow_max_q_causal : fwd_tuning().d64_narrow_max_q);
}

// Cluster pairs on a varlen batch (equal lengths, so q_len is every
// sequence's: fwd_pairs_fit): a sequence of an odd number T of query tiles
// computes T + 1, the last past its end (skips_tile), so pairs pay on long
// sequences only, where the shared K/V loads gained 2-4 % at 8k-16k on
// dense batches (sessions 17 and 20): by default 2048 rows (16 tiles) or
// more (FwdTuning::cluster_pairs_varlen_min_q).
inline bool varlen_pairs_pay(const AttentionFwdParams& p) {
  return p.q_len >= fwd_tuning().cluster_pairs_varlen_min_q;
}

// Config<Element, 2> (blocks in cluster pairs sharing their K/V loads)
// where kv_len reaches pairs_min (0: never), pairs_pay and the pairs fit the
// call (fwd_pairs_fit), else Config<Element, 1>.
template <template <class, int> class Config, class Element, bool kVarlen>
void launch_fwd_maybe_paired(const AttentionFwdParams& p, cudaStream_t stream, int64_t pairs_min, bool pairs_pay) {
  if (pairs_min > 0 && p.kv_len >= pairs_min && pairs_pay && fwd_pairs_fit<Config<Element, 2>>(p)) {
    launch_attention_fwd<Config<Element, 2>, kVarlen>(p, stream);
  } else {
    launch_attention_fwd<Config<Element, 1>, kVarlen>(p, stream);
  }
}

// Varlen batches take the dense batches' tiles (their sequences are as long;
// kv_len is the longest's), except the 192-row ones (not measured there).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  using Element = ElementOf<kDtype>;
  const bool windowed = has_window(p.window);
  if constexpr (kHeadDim == 128) {
    if constexpr (!kVarlen) {  // (constexpr: the varlen instances compile no 192-row kernel)
      if (d128_tall_tiles(p, windowed)) {
        launch_fwd_maybe_paired<FwdConfigTall, Element, kVarlen>(p, stream, fwd_tuning().d128_tall_pairs_min_kv, true);
        return;
      }
    }
    const int64_t wide_min = fwd_tuning().wide_keys_min_kv;
    if (!windowed && wide_min > 0 && p.kv_len >= wide_min) {
      launch_fwd_maybe_paired<FwdConfigWideKeys, Element, kVarlen>(p, stream, fwd_tuning().cluster_pairs_min_kv,
                                                                   !kVarlen || varlen_pairs_pay(p));
      return;
    }
  }
  const bool narrow = kHeadDim == 128 ? windowed || p.kv_len <= fwd_tuning().two_stage_max_kv
                                      : kHeadDim == 64 && d64_narrow_tiles(p, windowed);
  if (narrow) {
    launch_attention_fwd<FwdConfig<kHeadDim, true, Element>, kVarlen>(p, stream);
  } else {
    launch_attention_fwd<FwdConfig<kHeadDim, false, Element>, kVarlen>(p, stream);
  }
}

}  // namespace flash_ext::cuda::sm90
