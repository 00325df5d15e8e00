// Softmax inner loops over one row of scores. The float32 versions are built
// for AVX2+FMA and for the baseline ISA, picked at load time, so the library
// runs anywhere yet vectorizes where it can (at::vec in an extension only
// gets the baseline ISA).
#pragma once

#include <cstdint>

namespace flash_ext::cpu {

// max_i x[i]; -inf for an empty row, NaN if any element is NaN.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// x[i] = exp(x[i] - shift) in place; returns the sum of the results.
// exp(-inf) = 0 and NaN stays NaN, as in the reference softmax.
float exp_shifted_sum(float* x, int64_t n, float shift);
double exp_shifted_sum(double* x, int64_t n, double shift);

// ds[i] = p[i] * (ds[i] - dot), the softmax backward (dS = P ∘ (dP − D));
// exactly 0 where p[i] == 0, so masked keys give no gradient even when dP
// is not finite there.
void softmax_grad_row(float* ds, const float* p, int64_t n, float dot);
void softmax_grad_row(double* ds, const double* p, int64_t n, double dot);

// x[i] *= factor.
void scale_row(float* x, int64_t n, float factor);
void scale_row(double* x, int64_t n, double factor);

// y[i] = exp(x[i] * scale - shift) rounded to bfloat16 (bits, nearest even;
// on CPUs with AVX512-BF16 by its instruction, which also takes results
// below float's normal range to 0), x left as it was; returns the sum of
// the unrounded exponentials and sets *x_max to max_i x[i] (NaN ignored,
// -inf for an empty row). One pass for a softmax tile that scale_row,
// exp_shifted_sum and float_to_bfloat16 would read and write three times.
float exp_scaled_to_bfloat16(const float* x, int64_t n, float scale, float shift, uint16_t* y, float* x_max);

// dst[i] = src[i] rounded to bfloat16 (nearest even; NaN -> 0x7fc0, as
// c10::BFloat16), stored as its 16 bits.
void float_to_bfloat16(const float* src, uint16_t* dst, int64_t n);

// dst[i] = the float whose value src[i]'s 16 bits hold, as bfloat16 (a
// shift) or as IEEE half (F16C's vcvtph2ps): exact, so every ISA gives the
// same floats. at::vec::convert in an extension gets the baseline ISA,
// where it converts one element at a time.
void bfloat16_to_float(const uint16_t* src, float* dst, int64_t n);
void half_to_float(const uint16_t* src, float* dst, int64_t n);

// dst[i] = src[i] rounded to IEEE half (nearest even, overflow to inf, as
// c10::Half), stored as its 16 bits; F16C where ATen runs vector kernels.
void float_to_half(const float* src, uint16_t* dst, int64_t n);

// Small products without a BLAS call (whose fixed cost, a few µs, is most
// of a decode step's tiles): C (m x n, row stride ldc) = alpha * op(A) *
// op(B) + beta * C, beta = 0 ignoring C's contents.
// small_gemm_nt: A (m x k) times B^T, B stored (n x k): dots of contiguous rows.
void small_gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc);
void small_gemm_nt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                   const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
// small_gemm_xn: op(A) times B, B stored (k x n); A stored (m x k), or (k x m)
// when trans_a: rows of C built from contiguous rows of B.
void small_gemm_xn(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                   const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void small_gemm_xn(bool trans_a, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                   const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

}  // namespace flash_ext::cpu
