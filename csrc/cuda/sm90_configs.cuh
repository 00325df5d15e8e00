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
// windowed ones at d = 64 (d64_narrow_tiles). kQInRegs: Q K^T with Q in
// registers (FwdTraits), for the configurations with room for it.
template <int kHeadDim, bool kNarrow, class Element, bool kQInRegs = false>
using FwdConfig = std::conditional_t<
    kHeadDim == 64, FwdTraits<64, kNarrow ? 128 : 192, 128, 3, Element, kQInRegs>,
    std::conditional_t<kHeadDim == 128, FwdTraits<128, 128, 128, kNarrow ? 2 : 3, Element, kQInRegs>,
                       FwdTraits<256, 128, 80, 2, Element>>>;

// d = 128 without a window, long rows (FwdTuning::wide_keys_min_kv): 176-key
// tiles in 2 stages, fewer per-tile costs (O's rescale, the row reductions,
// the turn) per key. They spill ~70 bytes, in the masking path mostly.
// Measured (session 11): 3-9 % slower up to N = 2048; within 1 % at 4k and
// 8k and +2 % at 16k on an H200; +4 % at 8k on an H100.
template <class Element>
using FwdConfigWideKeys = FwdTraits<128, 128, 176, 2, Element>;

// Q in registers (FwdTuning::q_in_registers; compiled only in session 14)
// where 32 more registers a thread fit: d = 128's 128 x 128 tiles (2 and 3
// stages) and d = 64's 128-row ones. Two expected gains: at d = 128 per key
// tile the two groups' Q K^T read 64 KB of K from shared memory instead of
// 96 KB of Q and K (with Q from shared memory, both products' operands and
// the TMA writes come to ~85 % of the shared memory's 128 bytes a clock at
// the tensor pipe's peak rate; with Q in registers ~73 %); and on short
// rows the next tile's Q lands during all of this one (ncu at N = 512:
// the wait for Q at the start of a tile was the top stall).
template <int kHeadDim, bool kNarrow>
constexpr bool kHasQInRegsConfig = kHeadDim == 128 || (kHeadDim == 64 && kNarrow);

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

// Varlen batches take the dense batches' tiles (their sequences are as long;
// kv_len is the longest's).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  using Element = ElementOf<kDtype>;
  const bool windowed = has_window(p.window);
  if constexpr (kHeadDim == 128) {
    const int64_t wide_min = fwd_tuning().wide_keys_min_kv;
    if (!windowed && wide_min > 0 && p.kv_len >= wide_min) {
      launch_attention_fwd<FwdConfigWideKeys<Element>, kVarlen>(p, stream);
      return;
    }
  }
  const bool narrow = kHeadDim == 128 ? windowed || p.kv_len <= fwd_tuning().two_stage_max_kv
                                      : kHeadDim == 64 && d64_narrow_tiles(p, windowed);
  const bool q_in_registers = fwd_tuning().q_in_registers != 0;
  const auto launch = [&](auto narrow_config) {
    constexpr bool kNarrow = decltype(narrow_config)::value;
    if constexpr (kHasQInRegsConfig<kHeadDim, kNarrow>) {
      if (q_in_registers) {
        launch_attention_fwd<FwdConfig<kHeadDim, kNarrow, Element, true>, kVarlen>(p, stream);
        return;
      }
    }
    launch_attention_fwd<FwdConfig<kHeadDim, kNarrow, Element>, kVarlen>(p, stream);
  };
  if (narrow) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

}  // namespace flash_ext::cuda::sm90
