// Tile configuration of the Hopper backward per head dim (BwdTraits<head
// dim, query tile, key tile, pipeline stages>), query tiles double-buffered.
// d <= 128: 128-key blocks, two consumer warp groups of 64 keys each; d = 64
// takes 128-row query tiles: per tile the same register footprint as
// d = 128's 64 rows, half the tiles (barriers, pipeline waits, dQ
// reductions) for the same work, and S^T, dP^T products 128 wide instead of
// 64. d = 256: 64-key blocks whose head dims the two groups split.
#pragma once

#include "sm90_bwd_kernel.cuh"
#include "sm90_configs.cuh"

namespace flash_ext::cuda::sm90 {

template <int kHeadDim, class Element>
using BwdConfig = BwdTraits<kHeadDim, kHeadDim == 64 ? 128 : 64, kHeadDim == 256 ? 64 : 128, 2, Element>;

// d = 128 may take 80-row query tiles (BwdTuning::d128_tall_min_q, and
// d128_tall_masked under a mask or window): a quarter more work per tile for
// the same barriers, pipeline waits and dQ hand-offs (FlashAttention-3's
// tile without a mask). Instantiated in sm90_bwd_tall_hdim128_*, dense
// batches only.
template <ScalarKind kDtype>
void run_bwd_tall(const AttentionBwdParams& p, cudaStream_t stream) {
  launch_attention_bwd<BwdTraits<128, kTallQueryTileRows, 128, 2, ElementOf<kDtype>>, false>(p, stream);
}
extern template void run_bwd_tall<ScalarKind::kBFloat16>(const AttentionBwdParams&, cudaStream_t);
extern template void run_bwd_tall<ScalarKind::kFloat16>(const AttentionBwdParams&, cudaStream_t);

inline bool bwd_tall_tiles(const AttentionBwdParams& p) {
  const BwdTuning& tuning = bwd_tuning();
  return tuning.d128_tall_min_q > 0 && p.q_len >= tuning.d128_tall_min_q &&
         (!has_window(p.window) || tuning.d128_tall_masked != 0);
}

// Varlen batches take the dense batches' tiles (their sequences are as long).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim == 128 && !kVarlen) {
    if (bwd_tall_tiles(p)) return run_bwd_tall<kDtype>(p, stream);
  }
  launch_attention_bwd<BwdConfig<kHeadDim, ElementOf<kDtype>>, kVarlen>(p, stream);
}

}  // namespace flash_ext::cuda::sm90
