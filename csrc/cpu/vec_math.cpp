#include "vec_math.h"

#include <ATen/Version.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// GCC's function multiversioning: an x86-64-v3 (AVX2, FMA) clone and a
// baseline one, chosen by the dynamic loader on the running CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLASH_X86_GCC 1
#define FLASH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FLASH_X86_GCC 0
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

// Sixteen floats, for the AVX-512 versions of the softmax loops (picked at
// run time, see has_avx512).
typedef float F16 __attribute__((vector_size(64)));

template <typename F>
constexpr int64_t lanes_of = static_cast<int64_t>(sizeof(F) / sizeof(float));

template <typename F>
FLASH_INLINE F splat_v(float v) {
  return F{} + v;
}

template <typename F>
FLASH_INLINE F load_v(const float* x) {
  F v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

template <typename F>
FLASH_INLINE void store_v(float* x, F v) {
  std::memcpy(x, &v, sizeof(v));
}

template <typename F>
FLASH_INLINE F load_tail_v(const float* x, int64_t n, float fill) {
  F v = splat_v<F>(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = x[i];
  return v;
}

// exp(x) by Cody-Waite range reduction and Cephes' degree-7 polynomial
// (about 1 ulp); exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN. F is a float
// vector, I the int32 vector of as many lanes.
template <typename F, typename I>
FLASH_INLINE F exp_v(F x) {
  const F lo = splat_v<F>(-87.3365f), hi = splat_v<F>(88.3762f);
  F c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const F t = c * splat_v<F>(1.44269504088896341f);
  const I n = __builtin_convertvector(t + (t < 0.0f ? splat_v<F>(-0.5f) : splat_v<F>(0.5f)), I);
  const F nf = __builtin_convertvector(n, F);
  const F r = c - nf * splat_v<F>(0.693359375f) - nf * splat_v<F>(-2.12194440e-4f);
  F p = splat_v<F>(1.9875691500e-4f);
  p = p * r + splat_v<F>(1.3981999507e-3f);
  p = p * r + splat_v<F>(8.3334519073e-3f);
  p = p * r + splat_v<F>(4.1665795894e-2f);
  p = p * r + splat_v<F>(1.6666665459e-1f);
  p = p * r + splat_v<F>(5.0000001201e-1f);
  p = p * r * r + r + splat_v<F>(1.0f);
  const F two_n = reinterpret_cast<F>((n + 127) << 23);
  F result = p * two_n;
  result = x < lo ? splat_v<F>(0.0f) : result;
  result = x > hi ? splat_v<F>(std::numeric_limits<float>::infinity()) : result;
  return x != x ? x : result;
}

template <typename F>
FLASH_INLINE float hsum_v(F v) {
  float s = 0.0f;
  for (int64_t i = 0; i < lanes_of<F>; ++i) s += v[i];
  return s;
}

template <typename F>
FLASH_INLINE float hmax_v(F v) {
  float m = v[0];
  for (int64_t i = 1; i < lanes_of<F>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// max_i x[i]: -inf for an empty row, NaN if any element is NaN.
template <typename F>
FLASH_INLINE float row_max_v(const float* x, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  constexpr int64_t kW = lanes_of<F>;
  // The maximum ignoring NaN, and apart whether any lane saw one. Four
  // running maxima, so that the loop is not one chain of max latencies (a
  // single one made this pass 12 % of a short bf16 forward).
  F m0 = splat_v<F>(ninf), m1 = m0, m2 = m0, m3 = m0, nan = splat_v<F>(0.0f);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    const F v0 = load_v<F>(x + i), v1 = load_v<F>(x + i + kW);
    const F v2 = load_v<F>(x + i + 2 * kW), v3 = load_v<F>(x + i + 3 * kW);
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
    m2 = v2 > m2 ? v2 : m2;
    m3 = v3 > m3 ? v3 : m3;
    const F v01 = v0 != v0 ? v0 : v1, v23 = v2 != v2 ? v2 : v3;  // a NaN of the four, if any
    const F v0123 = v01 != v01 ? v01 : v23;
    nan = v0123 != v0123 ? v0123 : nan;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  F m = m2 > m0 ? m2 : m0;
  for (; i + kW <= n; i += kW) {
    const F v = load_v<F>(x + i);
    m = v > m ? v : m;
    nan = v != v ? v : nan;  // keeps a NaN once seen
  }
  float result = ninf, nans = 0.0f;
  float lanes[kW], nan_lanes[kW];
  std::memcpy(lanes, &m, sizeof(m));
  std::memcpy(nan_lanes, &nan, sizeof(nan));
  for (int64_t l = 0; l < kW; ++l) {
    result = lanes[l] > result ? lanes[l] : result;
    nans = nan_lanes[l] != nan_lanes[l] ? nan_lanes[l] : nans;
  }
  for (; i < n; ++i) {
    result = x[i] > result ? x[i] : result;
    nans = x[i] != x[i] ? x[i] : nans;
  }
  return nans != nans ? std::numeric_limits<float>::quiet_NaN() : result;
}

template <typename F, typename I>
FLASH_INLINE float exp_shifted_sum_v(float* x, int64_t n, float shift) {
  constexpr int64_t kW = lanes_of<F>;
  const F s = splat_v<F>(shift);
  F sum = splat_v<F>(0.0f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const F e = exp_v<F, I>(load_v<F>(x + i) - s);
    store_v<F>(x + i, e);
    sum += e;
  }
  if (i < n) {
    const F e = exp_v<F, I>(load_tail_v<F>(x + i, n - i, -std::numeric_limits<float>::infinity()) - s);
    for (int64_t l = 0; l < n - i; ++l) x[i + l] = e[l];
    sum += e;
  }
  return hsum_v<F>(sum);
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

// Stores F float lanes rounded to bfloat16 bits (nearest even, NaN ->
// 0x7fc0) by integer arithmetic (U: uint32 lanes, H: uint16 lanes of the
// same count); `count` lanes only when below a full vector.
template <typename F, typename U, typename H>
struct IntegerRounding {
  static FLASH_INLINE void store(F x, uint16_t* dst, int64_t count) {
    const U bits = reinterpret_cast<U>(x);
    const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const U result = x != x ? U{} + 0x7fc0u : rounded;
    const H half = __builtin_convertvector(result, H);
    if (count == lanes_of<F>) {
      std::memcpy(dst, &half, sizeof(half));
    } else {
      for (int64_t l = 0; l < count; ++l) dst[l] = half[l];
    }
  }
};

// Rounds a row to bfloat16 bits, F float lanes at a time.
template <typename F, typename Rounding>
FLASH_INLINE void to_bfloat16_v(const float* src, uint16_t* dst, int64_t n) {
  constexpr int64_t kW = lanes_of<F>;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) Rounding::store(load_v<F>(src + i), dst + i, kW);
  if (i < n) Rounding::store(load_tail_v<F>(src + i, n - i, 0.0f), dst + i, n - i);
}

template <typename F, typename I, typename Rounding>
FLASH_INLINE float exp_scaled_to_bfloat16_v(const float* x, int64_t n, float scale, float shift, uint16_t* y,
                                             float* x_max) {
  constexpr int64_t kW = lanes_of<F>;
  const F sc = splat_v<F>(scale), sh = splat_v<F>(shift);
  F sum = splat_v<F>(0.0f), m = splat_v<F>(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const F in = load_v<F>(x + i);
    const F e = exp_v<F, I>(in * sc - sh);
    Rounding::store(e, y + i, kW);
    sum += e;
    m = in > m ? in : m;
  }
  if (i < n) {
    const F in = load_tail_v<F>(x + i, n - i, -std::numeric_limits<float>::infinity());
    const F e = exp_v<F, I>(in * sc - sh);
    Rounding::store(e, y + i, n - i);
    sum += e;
    m = in > m ? in : m;
  }
  *x_max = hmax_v<F>(m);
  return hsum_v<F>(sum);
}

typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));
using IntegerRounding8 = IntegerRounding<F8, U8, H8>;
using IntegerRounding16 = IntegerRounding<F16, U16, H16>;


}  // namespace

FLASH_CPU_CLONES float row_max_avx2(const float* x, int64_t n) { return row_max_v<F8>(x, n); }

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = (x[i] > m || x[i] != x[i]) ? x[i] : m;
  return m;
}

FLASH_CPU_CLONES float exp_shifted_sum_avx2(float* x, int64_t n, float shift) {
  return exp_shifted_sum_v<F8, I8>(x, n, shift);
}

#if FLASH_X86_GCC
// The loops sixteen lanes wide where the CPU has AVX-512: twice the
// exponentials per instruction (measured 1.8x on session 6's Xeon).
__attribute__((target("arch=x86-64-v4"))) float row_max_avx512(const float* x, int64_t n) {
  return row_max_v<F16>(x, n);
}

// Only where ATen runs its AVX-512 kernels, so that ATEN_CPU_CAPABILITY=avx2
// keeps these loops on AVX2 too (how the tests reach the AVX2 versions on a
// CPU with AVX-512).
bool has_avx512() {
  static const bool yes = at::get_cpu_capability() == "AVX512" && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
  return yes;
}

float row_max(const float* x, int64_t n) { return has_avx512() ? row_max_avx512(x, n) : row_max_avx2(x, n); }

__attribute__((target("arch=x86-64-v4"))) void float_to_bfloat16_avx512(const float* src, uint16_t* dst,
                                                                        int64_t n) {
  to_bfloat16_v<F16, IntegerRounding16>(src, dst, n);
}

// 2^t for 16 lanes, a cheaper exponential than exp_v: t = n + f (|f| <=
// 1/2), 2^f by its degree-6 Taylor polynomial (relative error <= 1.7e-7,
// about exp_v's 1 ulp) and 2^n by vscalefps. Results below float's normal
// range are 0: denormals cost each later addition a microcode assist
// (masked keys made a softmax loop 2x slower). 2^-inf = 0, 2^inf = inf,
// NaN stays NaN.
__attribute__((target("arch=x86-64-v4"))) FLASH_INLINE __m512 exp2_avx512(__m512 t) {
  constexpr float kLn2 = 0.693147180559945309f;
  // max/min return their second operand when one is NaN: NaN goes through.
  t = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), t));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  // Horner over ln2^k / k!, k = 6 .. 0.
  __m512 p = _mm512_set1_ps(kLn2 * kLn2 * kLn2 * kLn2 * kLn2 * kLn2 / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLn2 * kLn2 * kLn2 * kLn2 * kLn2 / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLn2 * kLn2 * kLn2 * kLn2 / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLn2 * kLn2 * kLn2 / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLn2 * kLn2 / 2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLn2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(normal, p, whole);
}

// The lanes of a 16-wide step at i of an n-long row.
FLASH_INLINE __mmask16 step_lanes(int64_t i, int64_t n) {
  return n - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

constexpr float kLog2e = 1.44269504088896341f;

// exp_shifted_sum on AVX-512 through exp2_avx512: (x - shift) first, so the
// large shared shift adds no error of its own.
__attribute__((target("arch=x86-64-v4"))) float exp_shifted_sum_avx512(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift), log2e = _mm512_set1_ps(kLog2e);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = step_lanes(i, n);
    const __m512 in = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), lanes, x + i);
    const __m512 e = exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(in, sh), log2e));
    sum = _mm512_add_ps(sum, e);
    _mm512_mask_storeu_ps(x + i, lanes, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// exp_scaled_to_bfloat16 where the CPU has AVX512-BF16, which also rounds
// (vcvtneps2bf16: nearest even, NaN stays a NaN, and exp2_avx512 leaves no
// denormals for it to flush). The exponent from one FMA, x * scale *
// log2(e) - shift * log2(e): the rounding of shift * log2(e) scales a whole
// row alike, which the normalization cancels. Session 7's profile of the
// bf16 forward: the integer rounding cost 27 % and exp_v 30 %.
__attribute__((target("arch=x86-64-v4,avx512bf16"))) float exp_scaled_to_bfloat16_avx512_bf16(
    const float* x, int64_t n, float scale, float shift, uint16_t* y, float* x_max) {
  const __m512 sc = _mm512_set1_ps(scale * kLog2e), sh = _mm512_set1_ps(shift * kLog2e);
  __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = step_lanes(i, n);
    const __m512 in = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), lanes, x + i);
    const __m512 e = exp2_avx512(_mm512_fmsub_ps(in, sc, sh));
    sum = _mm512_add_ps(sum, e);
    m = _mm512_max_ps(in, m);  // a NaN lane keeps m
    _mm256_mask_storeu_epi16(y + i, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
  *x_max = _mm512_reduce_max_ps(m);
  return _mm512_reduce_add_ps(sum);
}

float exp_shifted_sum(float* x, int64_t n, float shift) {
  return has_avx512() ? exp_shifted_sum_avx512(x, n, shift) : exp_shifted_sum_avx2(x, n, shift);
}

bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}
#endif

FLASH_CPU_CLONES float exp_scaled_to_bfloat16_avx2(const float* x, int64_t n, float scale, float shift,
                                                   uint16_t* y, float* x_max) {
  return exp_scaled_to_bfloat16_v<F8, I8, IntegerRounding8>(x, n, scale, shift, y, x_max);
}

FLASH_CPU_CLONES void float_to_bfloat16_avx2(const float* src, uint16_t* dst, int64_t n) {
  to_bfloat16_v<F8, IntegerRounding8>(src, dst, n);
}

#if FLASH_X86_GCC
void float_to_bfloat16(const float* src, uint16_t* dst, int64_t n) {
  has_avx512() ? float_to_bfloat16_avx512(src, dst, n) : float_to_bfloat16_avx2(src, dst, n);
}
float exp_scaled_to_bfloat16(const float* x, int64_t n, float scale, float shift, uint16_t* y, float* x_max) {
  // AVX-512 without BF16 takes the AVX2 loop: one path fewer that no test
  // machine here runs.
  return has_avx512_bf16() ? exp_scaled_to_bfloat16_avx512_bf16(x, n, scale, shift, y, x_max)
                           : exp_scaled_to_bfloat16_avx2(x, n, scale, shift, y, x_max);
}
#else
float exp_scaled_to_bfloat16(const float* x, int64_t n, float scale, float shift, uint16_t* y, float* x_max) {
  return exp_scaled_to_bfloat16_avx2(x, n, scale, shift, y, x_max);
}
void float_to_bfloat16(const float* src, uint16_t* dst, int64_t n) { float_to_bfloat16_avx2(src, dst, n); }
float row_max(const float* x, int64_t n) { return row_max_avx2(x, n); }
float exp_shifted_sum(float* x, int64_t n, float shift) { return exp_shifted_sum_avx2(x, n, shift); }
#endif

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

namespace {

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

#if FLASH_X86_GCC
// AVX2 and F16C (both in x86-64-v3) wherever ATen runs vectorized kernels,
// so ATEN_CPU_CAPABILITY=default reaches the element loops below.
bool has_avx2_f16c() {
  static const bool yes = at::get_cpu_capability() != "DEFAULT" && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("arch=x86-64-v3"))) int64_t bfloat16_to_float_avx2(const uint16_t* src, float* dst,
                                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  return i;
}

__attribute__((target("arch=x86-64-v3"))) int64_t half_to_float_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  return i;
}

__attribute__((target("arch=x86-64-v3"))) int64_t float_to_half_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return i;
}
#endif

}  // namespace

void float_to_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if FLASH_X86_GCC
  if (has_avx2_f16c()) i = float_to_half_avx2(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}

void bfloat16_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if FLASH_X86_GCC
  if (has_avx2_f16c()) i = bfloat16_to_float_avx2(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = float_from_bits(uint32_t{src[i]} << 16);
}

void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if FLASH_X86_GCC
  if (has_avx2_f16c()) i = half_to_float_avx2(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
}

}  // namespace flash_ext::cpu
