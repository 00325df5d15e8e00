#include "vec_math.h"

#include <cmath>
#include <cstring>
#include <limits>

// GCC's function multiversioning: an x86-64-v3 (AVX2, FMA) clone and a
// baseline one, chosen by the dynamic loader on the running CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLASH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FLASH_CPU_CLONES
#endif

// Helpers are forced inline so each clone compiles them for its own ISA;
// vectors then never cross a call (whose ABI differs between the two).
#define FLASH_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"

namespace flash_ext::cpu {
namespace {

// Eight floats as a GCC/Clang vector: element-wise arithmetic, comparisons
// and ?: selects, compiled to AVX2 in the x86-64-v3 clone and to SSE pairs in
// the baseline one.
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

FLASH_INLINE F8 splat(float v) { return F8{v, v, v, v, v, v, v, v}; }

FLASH_INLINE F8 load8(const float* x) {
  F8 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

FLASH_INLINE void store8(float* x, F8 v) { std::memcpy(x, &v, sizeof(v)); }

// The tail of a row, padded with `fill`.
FLASH_INLINE F8 load_tail(const float* x, int64_t n, float fill) {
  F8 v = splat(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = x[i];
  return v;
}

// exp(x) by Cody-Waite range reduction and Cephes' degree-7 polynomial
// (about 1 ulp); exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN.
FLASH_INLINE F8 exp8(F8 x) {
  const F8 lo = splat(-87.3365f), hi = splat(88.3762f);
  F8 c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const F8 t = c * splat(1.44269504088896341f);
  const I8 n = __builtin_convertvector(t + (t < 0.0f ? splat(-0.5f) : splat(0.5f)), I8);
  const F8 nf = __builtin_convertvector(n, F8);
  const F8 r = c - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
  F8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const F8 two_n = reinterpret_cast<F8>((n + 127) << 23);
  F8 result = p * two_n;
  result = x < lo ? splat(0.0f) : result;
  result = x > hi ? splat(std::numeric_limits<float>::infinity()) : result;
  return x != x ? x : result;
}

FLASH_INLINE float horizontal_sum(F8 v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

}  // namespace

FLASH_CPU_CLONES float row_max(const float* x, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  F8 m = splat(ninf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const F8 v = load8(x + i);
    m = (v > m) | (v != v) ? v : m;
  }
  const F8 tail = load_tail(x + i, n - i, ninf);
  m = (tail > m) | (tail != tail) ? tail : m;
  float result = ninf;
  for (int64_t l = 0; l < kLanes; ++l) result = (m[l] > result || m[l] != m[l]) ? m[l] : result;
  return result;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = (x[i] > m || x[i] != x[i]) ? x[i] : m;
  return m;
}

FLASH_CPU_CLONES float exp_shifted_sum(float* x, int64_t n, float shift) {
  const F8 s = splat(shift);
  F8 sum = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const F8 e = exp8(load8(x + i) - s);
    store8(x + i, e);
    sum += e;
  }
  if (i < n) {
    const F8 e = exp8(load_tail(x + i, n - i, -std::numeric_limits<float>::infinity()) - s);
    for (int64_t l = 0; l < n - i; ++l) x[i + l] = e[l];
    sum += e;
  }
  return horizontal_sum(sum);
}

double exp_shifted_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

FLASH_CPU_CLONES void softmax_grad_row(float* ds, const float* p, int64_t n, float dot) {
  const F8 d = splat(dot), zero = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const F8 prob = load8(p + i);
    store8(ds + i, prob == zero ? zero : prob * (load8(ds + i) - d));
  }
  for (; i < n; ++i) ds[i] = p[i] == 0.0f ? 0.0f : p[i] * (ds[i] - dot);
}

void softmax_grad_row(double* ds, const double* p, int64_t n, double dot) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] == 0.0 ? 0.0 : p[i] * (ds[i] - dot);
}

FLASH_CPU_CLONES void scale_row(float* x, int64_t n, float factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

void scale_row(double* x, int64_t n, double factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

}  // namespace flash_ext::cpu
