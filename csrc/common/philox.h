// Counter-based dropout generator (Philox-4x32-10), identical on host and
// device so the CPU and CUDA kernels drop the same elements for the same seed,
// and backward replays forward's mask from (seed, offset) alone.
#pragma once

#include <cstdint>

#include "macros.h"

namespace flash_ext {

struct Philox4 {
  uint32_t x, y, z, w;
};

FLASH_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FLASH_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi_u32(kMul0, ctr.x), lo0 = kMul0 * ctr.x;
    const uint32_t hi1 = mul_hi_u32(kMul1, ctr.z), lo1 = kMul1 * ctr.z;
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// Four random words for columns 4*col_group .. 4*col_group+3 of row `row` of
// head `batch_head` (= batch * heads + head).
FLASH_HOST_DEVICE Philox4 dropout_bits4(uint64_t seed, uint64_t offset, uint64_t batch_head,
                                        uint64_t row, uint64_t col_group) {
  const Philox4 ctr{static_cast<uint32_t>(col_group), static_cast<uint32_t>(row),
                    static_cast<uint32_t>(batch_head), static_cast<uint32_t>(offset)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(offset >> 32));
}

// Element kept iff its word is below this threshold: keep probability 1 - p.
FLASH_HOST_DEVICE uint32_t dropout_keep_threshold(double p) {
  const double keep = 1.0 - p;
  const double scaled = keep * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

FLASH_HOST_DEVICE uint32_t philox_word(const Philox4& r, int lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

}  // namespace flash_ext
