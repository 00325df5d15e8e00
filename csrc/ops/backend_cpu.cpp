// CPU pieces of the glue.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <mutex>

#include "../cpu/attention_cpu.h"
#include "backend.h"
#include "checks.h"

namespace flash_ext::backend::cpu {

at::Tensor seed_dropout(const at::Tensor& q, DropoutParams& dropout) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt,
                                                                  at::detail::getDefaultCPUGenerator());
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    dropout.seed = gen->random64();
  }
  dropout.offset = 0;
  at::Tensor rng_state = at::empty({2}, q.options().dtype(at::kLong));
  rng_state[0] = static_cast<int64_t>(dropout.seed);
  rng_state[1] = static_cast<int64_t>(dropout.offset);
  return rng_state;
}

void replay_dropout(const at::Tensor& rng_state, DropoutParams& dropout) {
  check_rng_state("flash_ext.attention", rng_state);
  const int64_t* state = rng_state.data_ptr<int64_t>();
  dropout.seed = static_cast<uint64_t>(state[0]);
  dropout.offset = static_cast<uint64_t>(state[1]);
}

void run_kvcache(KVCacheParams& params, int64_t max_keys) {
  if (params.num_splits == 0) {
    // Enough splits to give every thread work, each split at least a few key blocks.
    constexpr int64_t kMinKeysPerSplit = 512;
    const int64_t items = params.batch * params.kv_heads;
    const int64_t wanted = (at::get_num_threads() + items - 1) / items;
    const int64_t by_length = std::max<int64_t>(1, max_keys / kMinKeysPerSplit);
    params.num_splits = std::max<int64_t>(1, std::min(wanted, by_length));
  }
  flash_ext::cpu::kvcache_fwd(params);
}

}  // namespace flash_ext::backend::cpu
