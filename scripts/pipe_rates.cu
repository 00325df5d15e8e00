// Issue rates of the forward softmax's instruction kinds on an SM
// sub-partition (SMSP): MUFU.EX2, F2FP (cvt.rn.bf16x2.f32), FMNMX, IMAD, PRMT,
// FFMA, alone and in pairs in one loop (a pair sharing a pipe takes the sum
// of their cycles, a pair on two pipes the larger). Eight independent chains
// per thread, eight warps per SMSP, so latency does not limit.
//
//   nvcc -arch=sm_90a -O3 -o /tmp/pipe_rates scripts/pipe_rates.cu && /tmp/pipe_rates
//
// H100 (session 32, benchmarks/NOTES.md): MUFU.EX2 8 cycles a warp
// instruction; F2FP, FMNMX, IMAD, PRMT 2; FFMA 1; MUFU+F2FP 8 (F2FP is not on
// MUFU's pipe); FMNMX+PRMT 4 (one pipe); FMNMX+IMAD 2.1 (two).
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

// A failed CUDA call ends the run with its message rather than a wrong rate.
#define CHECK(call)                                                             \
  do {                                                                          \
    const cudaError_t err = (call);                                             \
    if (err != cudaSuccess) {                                                   \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(err));          \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

constexpr int kChains = 8, kIters = 4096;
template <int kMode>
__global__ void k(float* out, long long* cycles, float seed) {
  const long long t0 = clock64();
  float a[kChains];
  unsigned u[kChains];
  for (int i = 0; i < kChains; ++i) { a[i] = seed * (threadIdx.x + i); u[i] = __float_as_uint(a[i]); }
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int i = 0; i < kChains; ++i) {
      if (kMode & 1) asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(a[i]));
      if (kMode & 2) asm volatile("cvt.rn.bf16x2.f32 %0, %1, %1;" : "+r"(u[i]) : "f"(__uint_as_float(u[i])));
      if (kMode & 4) asm volatile("max.ftz.f32 %0, %0, %1;" : "+f"(a[i]) : "f"(seed));
      if (kMode & 8) asm volatile("mad.lo.u32 %0, %0, 3, 32768;" : "+r"(u[i]));
      if (kMode & 16) asm volatile("prmt.b32 %0, %0, %1, 0x7632;" : "+r"(u[i]) : "r"(u[(i + 1) % kChains]));
      if (kMode & 32) asm volatile("fma.rn.ftz.f32 %0, %0, %1, %1;" : "+f"(a[i]) : "f"(seed));
    }
  }
  float s = 0;
  for (int i = 0; i < kChains; ++i) s += a[i] + __uint_as_float(u[i]);
  if (s == 1.2345f) out[0] = s;
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - t0;
}
template <int kMode>
void run(const char* name) {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int blocks = sms * 4, threads = 256;  // 4 blocks of 8 warps per SM: 8 warps per sub-partition
  float* out;
  long long* cycles;
  CHECK(cudaMalloc(&out, 4));
  CHECK(cudaMalloc(&cycles, sizeof(long long) * blocks));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  k<kMode><<<blocks, threads>>>(out, cycles, 0.5f);
  CHECK(cudaEventRecord(e0));
  for (int r = 0; r < 5; ++r) k<kMode><<<blocks, threads>>>(out, cycles, 0.5f);
  CHECK(cudaEventRecord(e1));
  CHECK(cudaGetLastError());
  CHECK(cudaEventSynchronize(e1));
  float ms;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  std::vector<long long> c(blocks);
  CHECK(cudaMemcpy(c.data(), cycles, sizeof(long long) * blocks, cudaMemcpyDeviceToHost));
  const long long cmax = *std::max_element(c.begin(), c.end());
  // Each of a sub-partition's 8 warps issues kIters * kChains instructions
  // of each kind in the loop.
  printf("%-12s %7.3f ms  %6.2f cycles per warp instruction of a kind per SMSP, %.0f MHz\n", name, ms / 5,
         double(cmax) / (8.0 * kIters * kChains), double(cmax) / (ms / 5 * 1e3));
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  CHECK(cudaFree(out));
  CHECK(cudaFree(cycles));
}
int main() {
  run<1>("mufu");
  run<2>("f2fp");
  run<3>("mufu+f2fp");
  run<4>("fmnmx");
  run<5>("mufu+fmnmx");
  run<8>("imad");
  run<16>("prmt");
  run<24>("imad+prmt");
  run<32>("ffma");
  run<9>("mufu+imad");
  run<17>("mufu+prmt");
  run<12>("fmnmx+imad");
  run<20>("fmnmx+prmt");
  run<36>("fmnmx+ffma");
  return 0;
}
