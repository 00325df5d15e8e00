// Portable qualifiers so the shared tile logic compiles for host (CPU kernels)
// and device (CUDA kernels) alike, without pulling in any torch header.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLASH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASH_HOST_DEVICE inline
#endif
