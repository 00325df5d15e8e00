// Tile configurations of the Hopper family per head dim (FwdTraits<head dim,
// query tile, key tile, pipeline stages>): a 64-row query slice per consumer
// warp group; key tiles as wide as the registers of S, P and O allow.
#pragma once

#include <cutlass/numeric_types.h>

#include <cstdlib>
#include <type_traits>

#include "sm90_fwd_kernel.cuh"
#include "sm90_kernel_traits.h"
#include "sm90_launch.h"

namespace flash_ext::cuda::sm90 {

template <ScalarKind kDtype>
using ElementOf = std::conditional_t<kDtype == ScalarKind::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

// d = 128 with 176-key tiles (S, P and O just fitting 240 registers) spilled
// in the main loop and measured 7-13 % slower than 128-key tiles
// (benchmarks/NOTES.md, sm90 v1).
// EXPERIMENT (removed once measured): FLASH_EXT_SM90_VARIANT=1 tries three
// pipeline stages; =2 tries 128-row query tiles at d=64.
template <int kHeadDim, int kVariant, class Element>
using FwdConfig = std::conditional_t<
    kHeadDim == 64, FwdTraits<64, kVariant == 2 ? 128 : 192, 128, kVariant == 1 ? 3 : 2, Element>,
    std::conditional_t<kHeadDim == 128, FwdTraits<128, 128, 128, kVariant == 1 ? 3 : 2, Element>,
                       FwdTraits<256, 128, 64, 2, Element>>>;

inline int experiment_variant() {
  static const int v = [] {
    const char* e = std::getenv("FLASH_EXT_SM90_VARIANT");
    return e == nullptr ? 0 : std::atoi(e);
  }();
  return v;
}

template <int kHeadDim, ScalarKind kDtype>
void run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  switch (kHeadDim == 256 ? 0 : experiment_variant()) {
    case 1: return launch_attention_fwd<FwdConfig<kHeadDim, 1, ElementOf<kDtype>>>(p, stream);
    case 2: return launch_attention_fwd<FwdConfig<kHeadDim, 2, ElementOf<kDtype>>>(p, stream);
    default: return launch_attention_fwd<FwdConfig<kHeadDim, 0, ElementOf<kDtype>>>(p, stream);
  }
}

}  // namespace flash_ext::cuda::sm90
