// Integer division by a run-time constant through a multiply-high
// (Granlund-Montgomery, as CUTLASS's FastDivmod): the decode kernel divides
// its indices (paged-cache row -> page, packed row -> head and token, block
// -> sequence and kv head) this way, as a division by a run-time int is some
// twenty GPU instructions. Host and device, so the C++ tests check it.
#pragma once

#include <cstdint>

#include "macros.h"

namespace flash_ext {

// Exact for divisors in [1, 2^31] and dividends below 2^31.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 0, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  FLASH_HOST_DEVICE uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(n, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((uint64_t{n} * multiplier) >> 32);
#endif
    return (high + n) >> shift;
  }
};

}  // namespace flash_ext
