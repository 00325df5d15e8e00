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

// The sums of four vectors' lanes at once (a transposing reduction, about
// a third of the instructions of four horizontal_sum calls).
FLASH_INLINE void sum4(F8 a, F8 b, F8 c, F8 d, float (&out)[4]) {
  const F8 ab = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
                __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);  // a01 b01 a23 b23 a45 b45 a67 b67
  const F8 cd = __builtin_shufflevector(c, d, 0, 8, 2, 10, 4, 12, 6, 14) +
                __builtin_shufflevector(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
  const F8 abcd = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                  __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);  // a0-3 b0-3 c0-3 d0-3 a4-7 ...
  for (int l = 0; l < 4; ++l) out[l] = abcd[l] + abcd[l + 4];
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

FLASH_CPU_CLONES void small_gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const auto store = [&](int64_t i, int64_t j, float dot) {
    float& cij = c[i * ldc + j];
    cij = beta == 0.0f ? alpha * dot : alpha * dot + beta * cij;
  };
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = a + i * lda;
    int64_t j = 0;
    // Four rows of B at a time: four independent accumulators share each load of A.
    for (; j + 4 <= n; j += 4) {
      const float* b0 = b + j * ldb;
      const float *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
      F8 acc0 = splat(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      int64_t p = 0;
      for (; p + kLanes <= k; p += kLanes) {
        const F8 x = load8(ai + p);
        acc0 += x * load8(b0 + p);
        acc1 += x * load8(b1 + p);
        acc2 += x * load8(b2 + p);
        acc3 += x * load8(b3 + p);
      }
      float dots[4];
      sum4(acc0, acc1, acc2, acc3, dots);
      for (; p < k; ++p) {
        dots[0] += ai[p] * b0[p];
        dots[1] += ai[p] * b1[p];
        dots[2] += ai[p] * b2[p];
        dots[3] += ai[p] * b3[p];
      }
      for (int l = 0; l < 4; ++l) store(i, j + l, dots[l]);
    }
    for (; j < n; ++j) {
      const float* bj = b + j * ldb;
      F8 acc = splat(0.0f);
      int64_t p = 0;
      for (; p + kLanes <= k; p += kLanes) acc += load8(ai + p) * load8(bj + p);
      float dot = horizontal_sum(acc);
      for (; p < k; ++p) dot += ai[p] * bj[p];
      store(i, j, dot);
    }
  }
}

void small_gemm_nt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
                   int64_t ldb, double beta, double* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double dot = 0.0;
      for (int64_t p = 0; p < k; ++p) dot += a[i * lda + p] * b[j * ldb + p];
      double& cij = c[i * ldc + j];
      cij = beta == 0.0 ? alpha * dot : alpha * dot + beta * cij;
    }
  }
}

FLASH_CPU_CLONES void small_gemm_xn(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                    int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int64_t kChunk = 4 * kLanes;  // columns of C kept in registers over the whole k loop
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    const auto weight = [&](int64_t p) { return alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]); };
    const auto start = [&](const float* x) { return beta == 0.0f ? splat(0.0f) : splat(beta) * load8(x); };
    int64_t j = 0;
    for (; j + kChunk <= n; j += kChunk) {
      F8 c0 = start(ci + j), c1 = start(ci + j + 8), c2 = start(ci + j + 16), c3 = start(ci + j + 24);
      for (int64_t p = 0; p < k; ++p) {
        const F8 w = splat(weight(p));
        const float* bp = b + p * ldb + j;
        c0 += w * load8(bp);
        c1 += w * load8(bp + 8);
        c2 += w * load8(bp + 16);
        c3 += w * load8(bp + 24);
      }
      store8(ci + j, c0);
      store8(ci + j + 8, c1);
      store8(ci + j + 16, c2);
      store8(ci + j + 24, c3);
    }
    for (; j + kLanes <= n; j += kLanes) {
      F8 acc = start(ci + j);
      for (int64_t p = 0; p < k; ++p) acc += splat(weight(p)) * load8(b + p * ldb + j);
      store8(ci + j, acc);
    }
    for (; j < n; ++j) {
      float acc = beta == 0.0f ? 0.0f : beta * ci[j];
      for (int64_t p = 0; p < k; ++p) acc += weight(p) * b[p * ldb + j];
      ci[j] = acc;
    }
  }
}

void small_gemm_xn(bool trans_a, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                   const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    double* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == 0.0 ? 0.0 : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const double w = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      const double* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += w * bp[j];
    }
  }
}

}  // namespace flash_ext::cpu
