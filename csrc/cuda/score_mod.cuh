// What turns q.k into the score the softmax sees, element by element of a
// register tile: soft-capping and ALiBi (params.h), the visibility window and
// sequence ends (mask.h), the attn_mask (boolean or additive), and dropout
// (philox.h, the same bits as the CPU kernels). Coordinates come from an
// identity tensor partitioned like the accumulator, viewed (rows x cols).
#pragma once

#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/mask.h"
#include "common/params.h"
#include "common/philox.h"
#include "softcap.cuh"
#include "tile_utils.cuh"

namespace flash_ext::cuda::sm80 {

// Seed and offset of this call: from device memory under graph capture
// (as PyTorch's PhiloxCudaState unpacks), else the host values.
struct DropoutRng {
  uint64_t seed, offset;
  uint32_t keep_threshold;
};

__device__ __forceinline__ DropoutRng resolve_dropout(const DropoutParams& d) {
  DropoutRng r;
  if (d.seed_ptr != nullptr) {
    r.seed = static_cast<uint64_t>(*d.seed_ptr);
    r.offset = static_cast<uint64_t>(*d.offset_ptr) + d.offset_intragraph;
  } else {
    r.seed = d.seed;
    r.offset = d.offset;
  }
  r.keep_threshold = dropout_keep_threshold(d.p);
  return r;
}

// +-2^21: past it a bound of a tile of fewer than 2^8 rows and columns
// masks all of them or none, so clamped tile offsets keep the arithmetic in int.
__device__ __forceinline__ int clamp_tile_offset(int64_t x) {
  return static_cast<int>(x < -(int64_t(1) << 21) ? -(1 << 21) : x > (int64_t(1) << 21) ? 1 << 21 : x);
}

// Sets to -inf the scores of keys outside the window or past kv_len, in a
// tile of queries from m0 and keys from n0: queries along its rows, or with
// kKeysAlongRows (the backward's S^T) along its columns. The bounds are taken
// once per tile, in 64 bits, relative to this thread's first element: each
// element then tests a compile-time key offset against its query's int
// bound, and without a left bound (causal, or kv_len only) one bound: a
// compare and a select.
template <bool kKeysAlongRows = false, class S, class C>
__device__ __forceinline__ void mask_window(S& s, const C& c, int64_t m0, int64_t n0,
                                            const VisibilityWindow& w, int64_t kv_len) {
  constexpr int kQueryMode = kKeysAlongRows ? 1 : 0, kKeyMode = 1 - kQueryMode;
  const auto score_at = [&](int qi, int ki) -> auto& {
    if constexpr (kKeysAlongRows) {
      return s(ki, qi);
    } else {
      return s(qi, ki);
    }
  };
  const int q0 = kKeysAlongRows ? get<1>(c(0, 0)) : get<0>(c(0, 0));
  const int k0 = kKeysAlongRows ? get<0>(c(0, 0)) : get<1>(c(0, 0));
  const int64_t diag0 = m0 + q0 + w.diagonal_offset - n0 - k0;  // query q0's diagonal key
  const int kv_hi = clamp_tile_offset(kv_len - n0 - k0);
  const int hi0 = w.window_right >= 0 ? clamp_tile_offset(diag0 + w.window_right + 1) : 1 << 21;
  const int lo0 = w.window_left >= 0 ? clamp_tile_offset(diag0 - w.window_left) : -(1 << 21);
  const auto mask = [&](auto has_left_bound) {
    CUTE_UNROLL
    for (int qi = 0; qi < size<kQueryMode>(s); ++qi) {
      int q;
      if constexpr (kKeysAlongRows) {
        q = get<1>(c(0, qi)) - q0;
      } else {
        q = get<0>(c(qi, 0)) - q0;
      }
      const int hi = hi0 + q < kv_hi ? hi0 + q : kv_hi;
      const int lo = lo0 + q;
      CUTE_UNROLL
      for (int ki = 0; ki < size<kKeyMode>(s); ++ki) {
        // Written out rather than through a helper taking ki: with one, the
        // d = 64 forward's windowed path kept its compares in predicate
        // registers (P2R, +128 SASS instructions).
        int k;
        if constexpr (kKeysAlongRows) {
          k = get<0>(c(ki, 0)) - k0;
        } else {
          k = get<1>(c(0, ki)) - k0;
        }
        if ((decltype(has_left_bound)::value && k < lo) || k >= hi) score_at(qi, ki) = -INFINITY;
      }
    }
  };
  if (w.window_left >= 0) {
    mask(cute::true_type{});
  } else {
    mask(cute::false_type{});
  }
}

// Soft-capping and ALiBi of head (b, h), applied before the attn_mask. Scores
// are unscaled here (s = q.k), so with z = scale * s the cap
// softcap * tanh(z / softcap) enters as (softcap / scale) * tanh(s * scale /
// softcap) and ALiBi as (slope / scale) * |i + diagonal_offset - j|.
struct ScoreMods {
  float tanh_in;   // 2 log2(e) * scale / softcap (tanh_exp2's argument); 0 = no cap
  float tanh_out;  // softcap / scale
  float slope;     // ALiBi slope / scale; 0 = none
  int64_t diagonal_offset;
};

// Rebuilt per tile from the params (constant memory) rather than held in
// registers across the key loop; the caller loads the slope (alibi_slope).
// diagonal_offset: the sequence's (SequenceBounds::window; a varlen batch's
// differ under bottom-right alignment).
__device__ __forceinline__ ScoreMods make_score_mods(const AttentionFwdParams& p, float slope,
                                                     int64_t diagonal_offset) {
  const float scale = static_cast<float>(p.scale);
  ScoreMods m;
  m.tanh_in = p.softcap > 0.f ? static_cast<float>(kTwoLog2e) * scale / p.softcap : 0.f;
  m.tanh_out = p.softcap / scale;
  m.slope = slope / scale;
  m.diagonal_offset = diagonal_offset;
  return m;
}

__device__ __forceinline__ float alibi_slope(const AttentionFwdParams& p, int64_t b, int64_t h) {
  return p.alibi_slopes != nullptr ? __ldg(p.alibi_slopes + b * p.alibi_batch_stride + h) : 0.f;
}

// Applies `mods` to tile s at origin (m0, n0). With a cap, dtanh[e / 2]
// receives 1 - tanh^2 of elements e, e + 1 (linear index into s), the
// derivative backward needs: float16 pairs, half the registers of a float
// tile (which would spill there), rounded no worse than dS itself.
template <class S, class C>
__device__ __forceinline__ void apply_score_mods(S& s, const C& c, const ScoreMods& mods, int64_t m0,
                                                 int64_t n0, __half2* dtanh = nullptr) {
  if (mods.tanh_in != 0.f) {
    CUTE_UNROLL
    for (int e = 0; e < size(s); e += 2) {
      const float t0 = tanh_exp2(s(e) * mods.tanh_in), t1 = tanh_exp2(s(e + 1) * mods.tanh_in);
      s(e) = mods.tanh_out * t0;
      s(e + 1) = mods.tanh_out * t1;
      if (dtanh != nullptr) dtanh[e / 2] = __floats2half2_rn(1.f - t0 * t0, 1.f - t1 * t1);
    }
  }
  if (mods.slope != 0.f) {
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(s); ++mi) {
      // In int, not float: float column coordinates get hoisted out of the key
      // loop into registers. Exact below 2^24 keys.
      const int64_t d = m0 + get<0>(c(mi, 0)) + mods.diagonal_offset - n0;
      const int diag = static_cast<int>(d < -(1 << 30) ? -(1 << 30) : d > 1 << 30 ? 1 << 30 : d);
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        s(mi, ni) -= mods.slope * static_cast<float>(abs(diag - get<1>(c(0, ni))));
      }
    }
  }
}

// attn_mask for head (b, h): boolean keep-mask or additive bias (Element).
// Scores are unscaled here, so the bias enters divided by the scale.
struct AttnMask {
  MaskKind kind;
  const uint8_t* base;  // at (b, h); element type from kind
  int64_t stride_q, stride_k;
  float inv_scale;
};

template <class Element>
__device__ __forceinline__ AttnMask make_attn_mask(const AttentionFwdParams& p, int64_t b, int64_t h) {
  const int64_t elem = p.mask_kind == MaskKind::kAdditive ? int64_t(sizeof(Element)) : 1;
  return {p.mask_kind,
          static_cast<const uint8_t*>(p.mask) + (b * p.mask_stride[0] + h * p.mask_stride[1]) * elem,
          p.mask_stride[2], p.mask_stride[3], static_cast<float>(1.0 / p.scale)};
}

template <class Element, class S, class C>
__device__ __forceinline__ void apply_attn_mask(S& s, const C& c, const AttnMask& mask, int64_t m0,
                                                int64_t n0, int64_t q_len, int64_t kv_len) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(s); ++mi) {
    const int64_t i = m0 + get<0>(c(mi, 0));
    if (i >= q_len) continue;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      const int64_t j = n0 + get<1>(c(0, ni));
      if (j >= kv_len) continue;
      const int64_t off = i * mask.stride_q + j * mask.stride_k;
      if (mask.kind == MaskKind::kBool) {
        if (__ldg(mask.base + off) == 0) s(mi, ni) = -INFINITY;
      } else {
        const float bias = static_cast<float>(reinterpret_cast<const Element*>(mask.base)[off]);
        s(mi, ni) = fmaf(bias, mask.inv_scale, s(mi, ni));
      }
    }
  }
}

// Calls f(mi, ni, keep) for every element of the tile. Neighbouring column
// pairs share one philox call (same group of four columns).
template <class S, class C, class F>
__device__ __forceinline__ void for_each_dropout(const S& s, const C& c, const DropoutRng& rng,
                                                 uint64_t batch_head, int64_t m0, int64_t n0, F&& f) {
  static_assert(decltype(size<1>(s))::value % 2 == 0);
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(s); ++mi) {
    const uint64_t i = static_cast<uint64_t>(m0 + get<0>(c(mi, 0)));
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ni += 2) {
      const uint64_t j = static_cast<uint64_t>(n0 + get<1>(c(0, ni)));
      const Philox4 bits = dropout_bits4(rng.seed, rng.offset, batch_head, i, j >> 2);
      f(mi, ni, philox_word(bits, int(j & 3)) < rng.keep_threshold);
      f(mi, ni + 1, philox_word(bits, int((j + 1) & 3)) < rng.keep_threshold);
    }
  }
}

}  // namespace flash_ext::cuda::sm80
