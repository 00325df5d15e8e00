// bfloat16/float16 tile products on the CPU's matrix units (AMX on Intel
// since Sapphire Rapids) through ATen's exported brgemm: 16-bit operands,
// float32 accumulators, as PyTorch's own CPU SDPA runs them. The right-hand
// operands, K^T and V, are packed once per (sequence, kv head) into the VNNI
// layout oneDNN wants, which it takes as K x 64 row-major blocks: 64-key
// blocks of K^T (d x 64) and 64 x 64 blocks of V (keys x value dims).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/mask.h"
#include "../common/params.h"

// FBGEMM's SIMD transposes, where PyTorch ships FBGEMM (x86 builds).
#if defined(__has_include)
#if __has_include(<fbgemm/Utils.h>)
#include <fbgemm/Utils.h>
#define FLASH_EXT_HAVE_FBGEMM 1
#endif
#endif
#ifndef FLASH_EXT_HAVE_FBGEMM
#define FLASH_EXT_HAVE_FBGEMM 0
#endif

namespace flash_ext::cpu {

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
constexpr bool kHavePackedGemm = true;
#else
constexpr bool kHavePackedGemm = false;
#endif

constexpr int64_t kPackedKeys = 64;  // keys (and value dims) per packed block

// Whether this CPU multiplies scalar_t on its matrix units and the head dims
// split into whole 64-wide blocks.
template <typename scalar_t>
bool packed_gemm_usable(int64_t head_dim, int64_t v_head_dim) {
  if constexpr (!kHavePackedGemm ||
                !(std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>)) {
    return false;
  } else {
    return head_dim % kPackedKeys == 0 && v_head_dim % kPackedKeys == 0 &&
           at::native::cpublas::could_pack(c10::CppTypeToScalarType<scalar_t>::value);
  }
}

// c (m x 64, row stride ldc) (+= when add) a (m x k, row stride lda) times a
// packed k x 64 block. k is even.
template <typename scalar_t>
void packed_product(int64_t m, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* packed, float* c,
                    int64_t ldc, bool add) {
  if constexpr (kHavePackedGemm) {
    at::native::cpublas::brgemm(m, kPackedKeys, k, lda, kPackedKeys, ldc, add, a, packed, c);
  }
}

// Gives the matrix units back; their tile configuration is per thread.
inline void packed_gemm_release() {
  if constexpr (kHavePackedGemm) at::native::cpublas::brgemm_release();
}

// dst (cols x rows, row stride ld_dst) = src (rows x cols, row stride
// ld_src) transposed; 16- or 32-bit elements, moved as bits.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4);
#if FLASH_EXT_HAVE_FBGEMM
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, float>;
  fbgemm::transpose_simd<Bits>(rows, cols, reinterpret_cast<const Bits*>(src), ld_src, reinterpret_cast<Bits*>(dst),
                               ld_dst);
#else
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
#endif
}

// Whether cpublas::pack lays a k x 64 block of 16-bit elements out as VNNI
// pairs, [k/2][64][2] (element (r, c) at (r / 2 * 64 + c) * 2 + r % 2), the
// layout of oneDNN's AMX and AVX512-BF16 kernels. Then packing needs no
// oneDNN call: K^T's pairs are K's rows read as 32-bit words, transposed.
// The layout is oneDNN's choice, so it is probed once against pack itself.
template <typename scalar_t>
bool packs_vnni_pairs() {
  static const bool pairs = [] {
    if constexpr (!kHavePackedGemm) {
      return false;
    } else {
      constexpr int64_t k = 32;
      std::vector<scalar_t> src(k * kPackedKeys), packed(k * kPackedKeys);
      for (int64_t i = 0; i < k * kPackedKeys; ++i) src[i] = scalar_t(static_cast<uint16_t>(i), scalar_t::from_bits());
      const auto type = c10::CppTypeToScalarType<scalar_t>::value;
      at::native::cpublas::pack(k, kPackedKeys, kPackedKeys, kPackedKeys, type, type, src.data(), packed.data());
      for (int64_t r = 0; r < k; ++r) {
        for (int64_t c = 0; c < kPackedKeys; ++c) {
          if (packed[(r / 2 * kPackedKeys + c) * 2 + r % 2].x != src[r * kPackedKeys + c].x) return false;
        }
      }
      return true;
    }
  }();
  return pairs;
}

// Rows [0, n) of src (row stride ld) transposed, dims [0, dim): one packed
// dim x 64 block (zero columns past n, n <= 64). In VNNI pairs, one 32-bit
// transpose when the rows are 4-byte aligned; else through `staged` (dim x
// 64) and oneDNN's pack.
template <typename scalar_t>
void pack_transposed_rows(const scalar_t* src, int64_t ld, int64_t n, int64_t dim, scalar_t* staged,
                          scalar_t* packed) {
  if constexpr (kHavePackedGemm) {
    if (packs_vnni_pairs<scalar_t>() && ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
      static_assert(sizeof(scalar_t) == 2);
      auto* words = reinterpret_cast<uint32_t*>(packed);
      transpose(n, dim / 2, reinterpret_cast<const uint32_t*>(src), ld / 2, words, kPackedKeys);
      for (int64_t w = 0; w < dim / 2 && n < kPackedKeys; ++w) {
        std::fill(words + w * kPackedKeys + n, words + (w + 1) * kPackedKeys, 0u);
      }
      return;
    }
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    transpose(n, dim, src, ld, staged, kPackedKeys);
    for (int64_t i = 0; i < dim && n < kPackedKeys; ++i) {
      std::fill(staged + i * kPackedKeys + n, staged + (i + 1) * kPackedKeys, scalar_t(0));
    }
    at::native::cpublas::pack(dim, kPackedKeys, kPackedKeys, kPackedKeys, type, type, staged, packed);
  }
}

// Rows [0, n) of src (row stride ld), its first 64 columns, as one packed
// k x 64 block (zero rows in [n, k); k even). In VNNI pairs, rows 2i and
// 2i + 1 interleaved; else through `staged` (k x 64) and oneDNN's pack.
template <typename scalar_t>
void pack_row_block(const scalar_t* src, int64_t ld, int64_t n, int64_t k, scalar_t* staged, scalar_t* packed) {
  if constexpr (kHavePackedGemm) {
    if (packs_vnni_pairs<scalar_t>()) {
      const uint16_t zeros[kPackedKeys] = {};
      const auto* bits = reinterpret_cast<const uint16_t*>(src);
      for (int64_t r = 0; r < k; r += 2) {
        const uint16_t* even = r < n ? bits + r * ld : zeros;
        const uint16_t* odd = r + 1 < n ? bits + (r + 1) * ld : zeros;
        uint32_t* pairs = reinterpret_cast<uint32_t*>(packed) + r / 2 * kPackedKeys;
        for (int64_t c = 0; c < kPackedKeys; ++c) pairs[c] = uint32_t{even[c]} | uint32_t{odd[c]} << 16;
      }
      return;
    }
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    for (int64_t r = 0; r < k; ++r) {
      scalar_t* row = staged + r * kPackedKeys;
      if (r < n) {
        std::copy_n(src + r * ld, kPackedKeys, row);
      } else {
        std::fill(row, row + kPackedKeys, scalar_t(0));
      }
    }
    at::native::cpublas::pack(k, kPackedKeys, kPackedKeys, kPackedKeys, type, type, staged, packed);
  }
}

// K^T and V of every (sequence, kv head) of a forward call, packed. Keys past
// a sequence's end are zero.
template <typename scalar_t>
class PackedKV {
 public:
  explicit PackedKV(const AttentionFwdParams& p)
      : blocks_((p.kv_len + kPackedKeys - 1) / kPackedKeys),
        d_(p.head_dim),
        dv_(p.v_head_dim),
        // Uninitialized (every block is packed, zeros past a sequence's end):
        // a vector's value-initialization of 16-bit floats ran element by
        // element, 13 % of a bf16 forward at d = 128 (session 7).
        k_(at::empty({p.batch * p.kv_heads * blocks_ * d_ * kPackedKeys},
                     at::TensorOptions(c10::CppTypeToScalarType<scalar_t>::value))),
        v_(at::empty({p.batch * p.kv_heads * blocks_ * dv_ * kPackedKeys},
                     at::TensorOptions(c10::CppTypeToScalarType<scalar_t>::value))) {
    if constexpr (kHavePackedGemm) pack_all(p);
  }

  // Keys [64 block, 64 block + 64) of (sequence, kv head) bk: K^T as d x 64,
  // V's value dims [64 chunk, 64 chunk + 64) as 64 x 64.
  const scalar_t* k_block(int64_t bk, int64_t block) const { return k_.data_ptr<scalar_t>() + k_offset(bk, block); }
  const scalar_t* v_block(int64_t bk, int64_t block, int64_t chunk) const {
    return v_.data_ptr<scalar_t>() + v_offset(bk, block, chunk);
  }

 private:
  int64_t k_offset(int64_t bk, int64_t block) const { return (bk * blocks_ + block) * d_ * kPackedKeys; }
  int64_t v_offset(int64_t bk, int64_t block, int64_t chunk) const {
    return ((bk * blocks_ + block) * dv_ + chunk * kPackedKeys) * kPackedKeys;
  }

  void pack_all(const AttentionFwdParams& p) {
    at::parallel_for(0, p.batch * p.kv_heads * blocks_, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> staged(std::max(d_, kPackedKeys) * kPackedKeys);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % blocks_, bk = item / blocks_;
        const int64_t b = bk / p.kv_heads, kvh = bk % p.kv_heads;
        const SequenceBounds seq = sequence_bounds(p, b);
        const int64_t key0 = block * kPackedKeys;
        const int64_t keys = std::clamp<int64_t>(seq.kv_len - key0, 0, kPackedKeys);
        const auto* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1] +
                        (seq.k_row0 + key0) * p.k_stride[2];
        const auto* v = static_cast<const scalar_t*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1] +
                        (seq.k_row0 + key0) * p.v_stride[2];
        pack_transposed_rows(k, p.k_stride[2], keys, d_, staged.data(), k_.data_ptr<scalar_t>() + k_offset(bk, block));
        // V, 64 value dims at a time.
        for (int64_t c0 = 0; c0 < dv_; c0 += kPackedKeys) {
          pack_row_block(v + c0, p.v_stride[2], keys, kPackedKeys, staged.data(),
                         v_.data_ptr<scalar_t>() + v_offset(bk, block, c0 / kPackedKeys));
        }
      }
    });
  }

  int64_t blocks_, d_, dv_;
  at::Tensor k_, v_;
};

}  // namespace flash_ext::cpu
