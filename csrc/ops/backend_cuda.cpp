// CUDA pieces of the glue: the current stream, PyTorch's CUDA generator
// (graph-safe Philox state), workspaces from the caching allocator, and the
// kernels of csrc/cuda behind their plain-params interface.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "../cuda/api.h"
#include "backend.h"
#include "checks.h"

namespace flash_ext::backend::cuda {
namespace {

// Kernels report failures as std::runtime_error; Python sees a RuntimeError.
template <typename Fn>
void run_kernels(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const std::runtime_error& err) {
    TORCH_CHECK(false, "flash_ext CUDA ", what, ": ", err.what());
  }
}

template <typename Params, typename ReasonFn>
void require_supported(const at::Tensor& q, const Params& params, ReasonFn reason_fn) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
  const char* reason = reason_fn(params, prop->major, prop->minor);
  TORCH_CHECK(reason == nullptr, "flash_ext: the CUDA kernels cannot serve this call: ", reason);
}

// int32 counters that kernels find zero and leave zero (the split-KV merge's,
// the persistent forward's tile counter). Eager calls reuse one buffer per
// (device, stream), since calls on one stream run in order; a CUDA graph under
// capture gets its own, zeroed by a node of the graph, because the shared
// buffer would be zeroed only when the graph first replays. Buffers live for
// the process (kept out of static destructors, which run after the CUDA
// runtime may be gone).
int* zero_counters(const at::Tensor& q, int64_t count, cudaStream_t stream, at::Tensor& captured) {
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
    captured = at::zeros({count}, q.options().dtype(at::kInt));
    return captured.data_ptr<int>();
  }
  struct Buffer {
    int* counters = nullptr;
    int64_t count = 0;
  };
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, Buffer> buffers;
  const std::lock_guard<std::mutex> lock(mutex);
  Buffer& buffer = buffers[{q.get_device(), stream}];
  if (buffer.count < count) {
    // Freed in stream order: earlier calls on this stream are done with it.
    if (buffer.counters != nullptr) c10::cuda::CUDACachingAllocator::raw_delete(buffer.counters);
    buffer.count = std::max<int64_t>(count, 2 * buffer.count);
    const size_t bytes = static_cast<size_t>(buffer.count) * sizeof(int);
    buffer.counters = static_cast<int*>(c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes, stream));
    C10_CUDA_CHECK(cudaMemsetAsync(buffer.counters, 0, bytes, stream));
  }
  return buffer.counters;
}

}  // namespace

at::Tensor seed_dropout(const at::Tensor& q, DropoutParams& dropout) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // Each element's counter is its own (row, column) address; advancing the
    // offset by one block of four words keeps successive calls distinct.
    state = gen->philox_cuda_state(4);
  }
  if (state.captured_) {
    dropout.seed_ptr = reinterpret_cast<const int64_t*>(state.seed_.ptr);
    dropout.offset_ptr = reinterpret_cast<const int64_t*>(state.offset_.ptr);
    dropout.offset_intragraph = state.offset_intragraph_;
  } else {
    dropout.seed = state.seed_.val;
    dropout.offset = state.offset_.val;
  }
  at::Tensor rng_state = at::empty({2}, q.options().dtype(at::kLong));
  dropout.rng_state = rng_state.data_ptr<int64_t>();
  return rng_state;
}

void replay_dropout(const at::Tensor& rng_state, DropoutParams& dropout) {
  check_rng_state("flash_ext.attention", rng_state);
  const int64_t* state = rng_state.data_ptr<int64_t>();
  dropout.seed_ptr = state;
  dropout.offset_ptr = state + 1;
  dropout.offset_intragraph = 0;
}

void run_attention_fwd(const at::Tensor& q, AttentionFwdParams& params) {
  require_supported(q, params, flash_ext::cuda::fwd_unsupported_reason);
  params.num_sms = at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor captured_counter;
  if (flash_ext::cuda::fwd_needs_tile_counter(params)) {
    params.tile_counter = zero_counters(q, 1, stream, captured_counter);
  }
  run_kernels("forward", [&] { flash_ext::cuda::run_attention_fwd(params, stream); });
}

void run_attention_bwd(const at::Tensor& q, AttentionBwdParams& params) {
  require_supported(q, params, flash_ext::cuda::bwd_unsupported_reason);
  params.num_sms = at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount;
  const flash_ext::cuda::BwdWorkspace sizes = flash_ext::cuda::bwd_workspace(params);
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t dq_accum_floats = static_cast<int64_t>(sizes.dq_accum_floats);
  const at::Tensor dq_accum =
      sizes.dq_accum_zeroed_by_kernels ? at::empty({dq_accum_floats}, f32) : at::zeros({dq_accum_floats}, f32);
  const at::Tensor softmax_d = at::empty({static_cast<int64_t>(sizes.softmax_d_floats)}, f32);
  params.dq_accum = dq_accum.data_ptr<float>();
  params.softmax_d = softmax_d.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  run_kernels("backward", [&] { flash_ext::cuda::run_attention_bwd(params, stream); });
}

void run_kvcache(const at::Tensor& q, KVCacheParams& params, int64_t /*max_keys*/) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
  if (params.num_splits == 0) {
    params.num_splits = flash_ext::cuda::choose_num_splits(params, prop->multiProcessorCount, prop->major);
  }
  require_supported(q, params, flash_ext::cuda::kvcache_unsupported_reason);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out_partial, lse_partial, captured_counters;
  if (params.num_splits > 1 && !flash_ext::cuda::kvcache_merges_in_cluster(params, prop->major)) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_partial = at::empty({params.num_splits, params.batch, params.heads, params.q_len, params.v_head_dim}, f32);
    lse_partial = at::empty({params.num_splits, params.batch, params.heads, params.q_len}, f32);
    params.out_partial = out_partial.data_ptr<float>();
    params.lse_partial = lse_partial.data_ptr<float>();
    params.split_counters =
        zero_counters(q, flash_ext::cuda::kvcache_split_groups(params), stream, captured_counters);
  }
  run_kernels("KV-cache decode", [&] { flash_ext::cuda::run_kvcache_fwd(params, stream); });
}

}  // namespace flash_ext::backend::cuda
