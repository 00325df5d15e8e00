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

// d = 128 with 176-key tiles (S, P and O just fitting 240 registers) spilled
// in the main loop and measured 7-13 % slower than 128-key tiles
// (benchmarks/NOTES.md, sm90 v1).
template <int kHeadDim, class Element>
using FwdConfig = std::conditional_t<
    kHeadDim == 64, FwdTraits<64, 192, 128, 2, Element>,
    std::conditional_t<kHeadDim == 128, FwdTraits<128, 128, 128, 2, Element>, FwdTraits<256, 128, 64, 2, Element>>>;

template <int kHeadDim, ScalarKind kDtype>
void run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  launch_attention_fwd<FwdConfig<kHeadDim, ElementOf<kDtype>>>(p, stream);
}

}  // namespace flash_ext::cuda::sm90
