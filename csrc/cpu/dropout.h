// The dropout mask of one (batch, head) on the CPU: the same Philox words as
// the CUDA kernels, so a seed drops the same elements on either device.
#pragma once

#include <cstdint>

#include "../common/params.h"
#include "../common/philox.h"

namespace flash_ext::cpu {

struct DropoutMask {
  uint64_t seed = 0, offset = 0, batch_head = 0;
  uint32_t threshold = 0;

  DropoutMask(const DropoutParams& d, uint64_t bh)
      : seed(d.seed), offset(d.offset), batch_head(bh), threshold(dropout_keep_threshold(d.p)) {}

  bool dropped(int64_t i, int64_t j) const {
    const Philox4 r = dropout_bits4(seed, offset, batch_head, static_cast<uint64_t>(i),
                                    static_cast<uint64_t>(j) >> 2);
    return philox_word(r, static_cast<int>(j & 3)) >= threshold;
  }
};

}  // namespace flash_ext::cpu
