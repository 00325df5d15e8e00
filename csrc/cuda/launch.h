// Launch of a prefill kernel on a 1-D grid (of thread-block clusters or
// not) with its dynamic shared memory opted in, any CUDA error turned into an
// exception that names the kernel.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flash_ext::cuda {

// Blocks of a grid-stride kernel over `work_blocks` blocks' worth of work:
// capped, as the kernels loop over whatever the grid does not cover.
inline dim3 grid_stride_blocks(int64_t work_blocks) {
  constexpr int64_t kMaxBlocks = 65536 * 16;
  return dim3(static_cast<unsigned>(work_blocks < kMaxBlocks ? work_blocks : kMaxBlocks));
}

// A 1-D launch of `blocks` blocks in thread-block clusters of `cluster`
// along x; `attribute` (which the config points to) holds the cluster shape.
inline cudaLaunchConfig_t cluster_launch_config(int64_t blocks, int cluster, int threads, int smem,
                                                cudaStream_t stream, cudaLaunchAttribute& attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim = {static_cast<unsigned>(cluster), 1, 1};
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// `what` names the kernel in errors, e.g. "attention forward (sm90".
// `cluster`: blocks per thread-block cluster along x (1: no cluster;
// `blocks` a multiple of it).
template <class Kernel, class... Args>
void launch_1d_clusters(const char* what, int head_dim, Kernel kernel, int64_t blocks, int cluster, int threads,
                        int smem, cudaStream_t stream, const Args&... args) {
  if (blocks == 0) return;
  const auto fail = [&](const std::string& why) {
    return std::runtime_error(std::string("flash_ext ") + what + ", head dim " + std::to_string(head_dim) +
                              "): " + why);
  };
  if (blocks > 0x7fffffff) throw fail("grid too large");
  if (blocks % cluster != 0) throw fail("grid not a whole number of clusters");
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess && cluster == 1) {
    kernel<<<dim3(static_cast<unsigned>(blocks)), threads, smem, stream>>>(args...);
    err = cudaGetLastError();
  } else if (err == cudaSuccess) {
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config = cluster_launch_config(blocks, cluster, threads, smem, stream, attribute);
    err = cudaLaunchKernelEx(&config, kernel, args...);
  }
  if (err != cudaSuccess) throw fail(std::string("launch failed: ") + cudaGetErrorString(err));
}

template <class Kernel, class... Args>
void launch_1d(const char* what, int head_dim, Kernel kernel, int64_t blocks, int threads, int smem,
               cudaStream_t stream, const Args&... args) {
  launch_1d_clusters(what, head_dim, kernel, blocks, 1, threads, smem, stream, args...);
}

// How many clusters of `cluster` blocks of `kernel` fit on the device at
// once (a GPC whose SM count is odd leaves an SM out of pairs); asked once
// per device.
template <class Kernel>
int max_active_clusters(Kernel kernel, int cluster, int threads, int smem) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) device = kMaxDevices;
  if (device < kMaxDevices && known[device].load(std::memory_order_relaxed) > 0) {
    return known[device].load(std::memory_order_relaxed);
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch_config(cluster, cluster, threads, smem, nullptr, attribute);
  int clusters = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters <= 0) {
    (void)cudaGetLastError();  // not sticky; the caller then launches a cluster per pair of tiles
    return 0;
  }
  if (device < kMaxDevices) known[device].store(clusters, std::memory_order_relaxed);
  return clusters;
}

}  // namespace flash_ext::cuda
