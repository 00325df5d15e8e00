// Tile configurations chosen per head dim (after FlashAttention-2's sm80
// choices, picked by H100 timings) and the dispatch over the compile-time features of a call.
#pragma once

#include <cutlass/numeric_types.h>

#include "attention_bwd_kernel.cuh"
#include "attention_fwd_kernel.cuh"
#include "kernel_traits.h"
#include "sm80_launch.h"

namespace flash_ext::cuda::sm80 {

template <ScalarKind kDtype>
using ElementOf = std::conditional_t<kDtype == ScalarKind::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

// FwdTraits<head dim, query tile, key tile, warps>. Four warps at d <= 128
// spill a little but measured faster on H100 than eight (which do not spill):
// eight warps read each K/V tile from shared memory twice as often.
template <int kHeadDim, class Element>
using FwdConfig = std::conditional_t<
    kHeadDim == 64, FwdTraits<64, 128, 128, 4, Element>,
    std::conditional_t<kHeadDim == 128, FwdTraits<128, 128, 64, 4, Element>, FwdTraits<256, 128, 64, 8, Element>>>;

// BwdTraits<head dim, query tile, key tile, warps, warps along M of S/dP,
// warps along N of dK/dV, warps along M of dQ, double-buffered Q>
template <int kHeadDim, class Element>
using BwdConfig = std::conditional_t<
    kHeadDim == 64, BwdTraits<64, 64, 128, 8, 2, 4, 2, true, Element>,
    std::conditional_t<kHeadDim == 128, BwdTraits<128, 64, 128, 8, 2, 4, 2, true, Element>,
                       BwdTraits<256, 64, 64, 8, 4, 2, 2, false, Element>>>;

// Calls whose scores need more than the window (attn_mask, softcap, ALiBi)
// take the kernels' kHasMask variant; the rest run without that code.
inline bool modifies_scores(const AttentionFwdParams& p) {
  return p.mask_kind != MaskKind::kNone || p.softcap != 0.f || p.alibi_slopes != nullptr;
}

template <int kHeadDim, ScalarKind kDtype>
void run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  using Tr = FwdConfig<kHeadDim, ElementOf<kDtype>>;
  static_assert(Tr::kSmemBytes == fwd_smem_bytes(kHeadDim));
  const bool mask = modifies_scores(p);  // varlen calls: softcap and ALiBi, never an attn_mask
  const bool dropout = p.dropout.p > 0.f;
  if (p.cu_seqlens_q != nullptr) {
    if (mask) {
      dropout ? launch_attention_fwd<Tr, true, true, true>(p, stream) : launch_attention_fwd<Tr, true, false, true>(p, stream);
    } else {
      dropout ? launch_attention_fwd<Tr, false, true, true>(p, stream) : launch_attention_fwd<Tr, false, false, true>(p, stream);
    }
  } else if (mask) {
    dropout ? launch_attention_fwd<Tr, true, true, false>(p, stream) : launch_attention_fwd<Tr, true, false, false>(p, stream);
  } else {
    dropout ? launch_attention_fwd<Tr, false, true, false>(p, stream) : launch_attention_fwd<Tr, false, false, false>(p, stream);
  }
}

// Split in two files per (head dim, dtype) for build parallelism: calls that
// modify scores and calls that do not.
template <int kHeadDim, ScalarKind kDtype, bool kHasMask>
void run_bwd_masking(const AttentionBwdParams& p, cudaStream_t stream) {
  using Tr = BwdConfig<kHeadDim, ElementOf<kDtype>>;
  static_assert(Tr::kSmemBytes == bwd_smem_bytes(kHeadDim) && Tr::kBlockM == bwd_block_m(kHeadDim));
  // Varlen calls carry softcap or ALiBi at most, never an attn_mask.
  if (p.cu_seqlens_q != nullptr) {
    p.dropout.p > 0.f ? launch_attention_bwd<Tr, kHasMask, true, true>(p, stream)
                      : launch_attention_bwd<Tr, kHasMask, false, true>(p, stream);
    return;
  }
  if (p.dropout.p > 0.f) {
    launch_attention_bwd<Tr, kHasMask, true, false>(p, stream);
  } else {
    launch_attention_bwd<Tr, kHasMask, false, false>(p, stream);
  }
}

template <int kHeadDim, ScalarKind kDtype>
void run_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  if (modifies_scores(p)) {
    run_bwd_masking<kHeadDim, kDtype, true>(p, stream);
  } else {
    run_bwd_masking<kHeadDim, kDtype, false>(p, stream);
  }
}

}  // namespace flash_ext::cuda::sm80
