// Tile logic shared by the CPU kernels: staging rows into accumulation-type
// buffers, block products through ATen's BLAS, masking and online softmax.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/mask.h"
#include "../common/params.h"
#include "vec_math.h"

// MKL's per-thread thread count (mkl_service.h), weak so that a torch built
// without MKL leaves it null.
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

namespace flash_ext::cpu {

// Rows of queries and keys per block: large enough that each block product
// amortizes the call into BLAS, small enough that a score tile stays in L2.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// float64 inputs accumulate in float64, everything else in float32.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A row-major matrix in memory: element (r, c) at ptr[r * ld + c].
template <typename T>
struct Matrix {
  T* ptr;
  int64_t ld;
};

// Copies n elements into dst, converting to acc_t (16-bit floats to float32
// through vec_math's vectorized conversions).
template <typename acc_t, typename scalar_t>
void load_row(const scalar_t* src, int64_t n, acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::copy_n(src, n, dst);
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    bfloat16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    half_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Rows [0, rows) of `src` (row stride `stride`, `cols` contiguous elements
// each) as a matrix of acc_t. Same-type inputs are used in place; others are
// converted into `buffer` (at least rows * cols elements).
template <typename acc_t, typename scalar_t>
Matrix<const acc_t> stage_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t cols,
                               acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return {src, stride};
  } else {
    constexpr int64_t kAhead = 8;  // rows prefetched ahead of the conversion
    const int64_t row_bytes = cols * int64_t(sizeof(scalar_t));
    for (int64_t r = 0; r < rows; ++r) {
      if (r + kAhead < rows) {
        const char* ahead = reinterpret_cast<const char*>(src + (r + kAhead) * stride);
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b);
      }
      load_row(src + r * stride, cols, buffer + r * cols);
    }
    return {buffer, cols};
  }
}

// Writes a rows x cols acc_t matrix to `dst` (row stride `stride`) in scalar_t.
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, scalar_t* dst,
                int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      std::copy(src + r * ld, src + r * ld + cols, dst + r * stride);
    } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
      // at::vec in an extension gets the baseline ISA: its conversion was
      // 18 % of a bf16 forward at d = 128 (session 7).
      float_to_bfloat16(src + r * ld, reinterpret_cast<uint16_t*>(dst + r * stride), cols);
    } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
      float_to_half(src + r * ld, reinterpret_cast<uint16_t*>(dst + r * stride), cols);
    } else {
      at::vec::convert(src + r * ld, dst + r * stride, cols);
    }
  }
}

// Keeps the calling thread's BLAS serial while alive. torch turns MKL's
// dynamic threading off (pytorch#13757), so otherwise every block product
// inside a parallel region forks a nested OpenMP team onto cores our own
// threads already fill, and joins it with spin-waits and futex calls (~1500
// per 1x12x1024 forward).
class SerialBlas {
 public:
  SerialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int previous_;  // 0: the thread followed the global setting
};

// How parallel_items hands out its items.
enum class Deal {
  // One at a time to whichever thread asks next: a thread whose items were
  // cheap, or that other load delayed, leaves no one waiting at the end;
  // only the last item can.
  kOneAtATime,
  // parallel_for's equal contiguous chunks, for items of equal work: a
  // thread takes the same run of items on every call (a decode step's cache
  // rows stay in the caches of the core that read them the step before) and
  // whole runs of a head's items (read on the core whose share of the
  // forward's packing pass wrote them).
  kEqualChunks,
};

// Work items 0..n-1 over at::parallel_for's threads: body(next) runs once
// per thread (set up its buffers there) and calls next() for each item, -1
// once none are left.
template <typename Body>
void parallel_items(int64_t n, const Body& body, Deal deal = Deal::kOneAtATime) {
  const bool chunks = deal == Deal::kEqualChunks;
  std::atomic<int64_t> counter{0};
  // kOneAtATime: one range per thread, the items from the shared counter.
  const int64_t ranges = chunks ? n : std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    const SerialBlas serial_blas;
    int64_t item = begin;
    body([&]() -> int64_t {  // one type for both deals: body is compiled once
      if (chunks) return item < end ? item++ : -1;
      const int64_t next = counter.fetch_add(1, std::memory_order_relaxed);
      return next < n ? next : -1;
    });
  });
}

template <typename acc_t>
at::Tensor matrix_view(const acc_t* ptr, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor m = at::from_blob(const_cast<acc_t*>(ptr), {rows, cols}, {ld, 1}, options);
  return transpose ? m.t() : m;
}

// C (m x n) = alpha * op(A) * op(B) + beta * C through ATen's BLAS, where op
// transposes when asked. A is stored (m x k), or (k x m) when trans_a; B is
// stored (k x n), or (n x k) when trans_b. beta = 0 ignores C's contents.
template <typename acc_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha,
          Matrix<const acc_t> a, Matrix<const acc_t> b, acc_t beta, Matrix<acc_t> c) {
  if (m == 0 || n == 0) return;
  // Below this many multiply-adds a BLAS call costs more than the product.
  constexpr int64_t kSmallGemm = 32 * 1024;
  if (m * n * k <= kSmallGemm && !(trans_a && trans_b)) {
    if (trans_b) {
      small_gemm_nt(m, n, k, alpha, a.ptr, a.ld, b.ptr, b.ld, beta, c.ptr, c.ld);
    } else {
      small_gemm_xn(trans_a, m, n, k, alpha, a.ptr, a.ld, b.ptr, b.ld, beta, c.ptr, c.ld);
    }
    return;
  }
  at::Tensor out = matrix_view<acc_t>(c.ptr, m, n, c.ld, false);
  if (k == 0) {
    out.mul_(beta);
    return;
  }
  at::Tensor lhs = trans_a ? matrix_view(a.ptr, k, m, a.ld, true) : matrix_view(a.ptr, m, k, a.ld, false);
  at::Tensor rhs = trans_b ? matrix_view(b.ptr, n, k, b.ld, true) : matrix_view(b.ptr, k, n, b.ld, false);
  at::addmm_out(out, out, lhs, rhs, beta, alpha);
}

// Where attn_mask enters a tile of scores. Row r of the tile is query row
// `row0 + r`; column c is key `col0 + c`.
template <typename scalar_t>
struct MaskTile {
  MaskKind kind = MaskKind::kNone;
  const void* base = nullptr;  // already offset to (batch, head)
  int64_t row_stride = 0, col_stride = 0;

  template <typename acc_t>
  void apply(acc_t* s, int64_t lds, int64_t rows, int64_t cols, int64_t row0, int64_t col0) const {
    if (kind == MaskKind::kNone) return;
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* srow = s + r * lds;
      const int64_t offset = (row0 + r) * row_stride + col0 * col_stride;
      if (kind == MaskKind::kBool) {
        const bool* m = static_cast<const bool*>(base) + offset;
        for (int64_t c = 0; c < cols; ++c) {
          if (!m[c * col_stride]) srow[c] = neg_inf<acc_t>();
        }
      } else {
        const scalar_t* bias = static_cast<const scalar_t*>(base) + offset;
        for (int64_t c = 0; c < cols; ++c) {
          srow[c] += static_cast<acc_t>(bias[c * col_stride]);
        }
      }
    }
  }
};

// attn_mask of (batch b, head h) as a MaskTile.
template <typename scalar_t>
MaskTile<scalar_t> mask_tile(const AttentionFwdParams& p, int64_t b, int64_t h) {
  MaskTile<scalar_t> tile;
  tile.kind = p.mask_kind;
  if (p.mask_kind == MaskKind::kNone) return tile;
  const int64_t elem = p.mask_kind == MaskKind::kBool ? 1 : static_cast<int64_t>(sizeof(scalar_t));
  tile.base = static_cast<const char*>(p.mask) + (b * p.mask_stride[0] + h * p.mask_stride[1]) * elem;
  tile.row_stride = p.mask_stride[2];
  tile.col_stride = p.mask_stride[3];
  return tile;
}

// Sets scores of keys outside the visibility window to -inf. `query_pos(r)`
// gives the query index of tile row r. Each row's visible keys are one
// interval, so only its two ends are filled.
template <typename acc_t, typename QueryPos>
void apply_window(const VisibilityWindow& w, acc_t* s, int64_t lds, int64_t rows, int64_t cols,
                  int64_t col0, QueryPos query_pos) {
  if (!has_window(w)) return;
  for (int64_t r = 0; r < rows; ++r) {
    const KeyRange keys = visible_key_range(w, query_pos(r), query_pos(r) + 1, col0 + cols);
    const int64_t begin = std::clamp<int64_t>(keys.begin - col0, 0, cols);
    const int64_t end = std::clamp<int64_t>(keys.end - col0, begin, cols);
    acc_t* srow = s + r * lds;
    std::fill(srow, srow + begin, neg_inf<acc_t>());
    std::fill(srow + end, srow + cols, neg_inf<acc_t>());
  }
}

// Soft-capping and ALiBi of one (batch, head), applied to scale * q·k before
// attn_mask and the window.
struct ScoreMods {
  double softcap = 0.0;  // 0 = off
  double slope = 0.0;    // ALiBi slope, 0 = off
  int64_t diagonal_offset = 0;

  ScoreMods() = default;
  ScoreMods(double cap, const float* slopes, int64_t batch_stride, int64_t b, int64_t h,
            int64_t diagonal)
      : softcap(cap),
        slope(slopes != nullptr ? slopes[b * batch_stride + h] : 0.0),
        diagonal_offset(diagonal) {}

  bool active() const { return softcap != 0.0 || slope != 0.0; }

  // When `tanh_out` is given it receives tanh(s / softcap), which backward
  // needs for the derivative of the cap.
  template <typename acc_t, typename QueryPos>
  void apply(acc_t* s, int64_t lds, int64_t rows, int64_t cols, int64_t col0, QueryPos query_pos,
             acc_t* tanh_out = nullptr) const {
    const acc_t cap = static_cast<acc_t>(softcap), alibi = static_cast<acc_t>(slope);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* srow = s + r * lds;
      if (cap != acc_t(0)) {
        for (int64_t c = 0; c < cols; ++c) {
          const acc_t t = std::tanh(srow[c] / cap);
          if (tanh_out != nullptr) tanh_out[r * lds + c] = t;
          srow[c] = cap * t;
        }
      }
      if (alibi != acc_t(0)) {
        const int64_t diag = query_pos(r) + diagonal_offset;
        for (int64_t c = 0; c < cols; ++c) {
          srow[c] -= alibi * static_cast<acc_t>(std::abs(diag - (col0 + c)));
        }
      }
    }
  }
};

// Running state of the online softmax for a block of query rows: the row
// maximum m, the row sum l of exp(s - m), and the unnormalized output.
template <typename acc_t>
struct OnlineSoftmax {
  int64_t rows = 0, dv = 0;
  std::vector<acc_t> out, running_max, running_sum;

  void reset(int64_t n_rows, int64_t v_dim) {
    rows = n_rows;
    dv = v_dim;
    out.assign(rows * dv, acc_t(0));
    running_max.assign(rows, neg_inf<acc_t>());
    running_sum.assign(rows, acc_t(0));
  }

  // Turns the score tile s (rows x cols) into probabilities relative to the
  // updated row maxima, rescales the running output and sum, then adds P·V.
  // `drop(r, c)` says whether dropout removes element (r, c); kept
  // probabilities are scaled by keep_scale (the sum l uses the undropped ones).
  template <typename Drop>
  void update(acc_t* s, int64_t lds, int64_t cols, Matrix<const acc_t> v, Drop drop,
              acc_t keep_scale, bool has_dropout) {
    to_probabilities(s, lds, cols, drop, keep_scale, has_dropout);
    gemm<acc_t>(false, false, rows, dv, cols, acc_t(1), {s, lds}, v, acc_t(1), {out.data(), dv});
  }

  // update's first half: s becomes the tile's (dropped, scaled) P and the
  // running output is rescaled; the caller then adds P·V to `out`.
  template <typename Drop>
  void to_probabilities(acc_t* s, int64_t lds, int64_t cols, Drop drop, acc_t keep_scale, bool has_dropout) {
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* srow = s + r * lds;
      // NaN propagates (std::max would drop it): the row becomes NaN as in
      // the reference softmax.
      const acc_t tile_max = row_max(srow, cols);
      const acc_t new_max = (tile_max > running_max[r] || tile_max != tile_max) ? tile_max : running_max[r];
      if (new_max == neg_inf<acc_t>()) {  // nothing visible yet in this row
        std::fill(srow, srow + cols, acc_t(0));
        continue;
      }
      const acc_t rescale = std::exp(running_max[r] - new_max);
      const acc_t tile_sum = exp_shifted_sum(srow, cols, new_max);
      running_sum[r] = running_sum[r] * rescale + tile_sum;
      running_max[r] = new_max;
      if (rescale != acc_t(1)) scale_row(out.data() + r * dv, dv, rescale);
      if (has_dropout) {
        for (int64_t c = 0; c < cols; ++c) srow[c] = drop(r, c) ? acc_t(0) : srow[c] * keep_scale;
      }
    }
  }

  // to_probabilities for unscaled scores s (the scale, > 0, goes into the
  // exponent, so the row maxima are found before it) without dropout: P is
  // written rounded to bfloat16 into p (row stride ldp, `cols` per row) and
  // s is left as it was.
  //
  // A row that has seen keys first tries its running maximum as the shift,
  // with no pass for the tile's maximum (which the exponentials' pass finds
  // on the way): P then reaches up to e^kShiftHeadroom, harmless in float32
  // and to bf16's relative rounding, and neither the sum nor the output
  // needs rescaling. Only a tile whose maximum passes that is redone with
  // its own (under a causal mask the diagonal tile comes first, so that is
  // rare).
  void to_bfloat16_probabilities(const float* s, int64_t lds, int64_t cols, float scale, uint16_t* p,
                                 int64_t ldp) {
    static_assert(std::is_same_v<acc_t, float>, "bfloat16 probabilities come from float32 scores");
    constexpr float kShiftHeadroom = 8.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* srow = s + r * lds;
      uint16_t* prow = p + r * ldp;
      // From here on the tile's own maximum (scaled) becomes the row's: on a
      // row's first keys, or when the tile passes the headroom.
      float new_max, x_max;
      if (running_max[r] != neg_inf<float>()) {
        const float tile_sum = exp_scaled_to_bfloat16(srow, cols, scale, running_max[r], prow, &x_max);
        new_max = x_max * scale;
        if (!(new_max > running_max[r] + kShiftHeadroom)) {  // a NaN's sum is NaN either way
          running_sum[r] += tile_sum;
          continue;
        }
      } else {
        new_max = row_max(srow, cols) * scale;
        if (new_max == neg_inf<float>()) {  // nothing visible yet in this row
          std::fill(prow, prow + cols, uint16_t{0});
          continue;
        }
      }
      const float rescale = std::exp(running_max[r] - new_max);
      const float tile_sum = exp_scaled_to_bfloat16(srow, cols, scale, new_max, prow, &x_max);
      running_sum[r] = running_sum[r] * rescale + tile_sum;
      running_max[r] = new_max;
      if (rescale != 1.f) scale_row(out.data() + r * dv, dv, rescale);
    }
  }

  // Normalized output row r (written into the state) and its log-sum-exp;
  // a row that saw no key gives 0 and -inf.
  acc_t finalize_row(int64_t r) {
    acc_t* orow = out.data() + r * dv;
    if (running_sum[r] == acc_t(0)) {
      std::fill(orow, orow + dv, acc_t(0));
      return neg_inf<acc_t>();
    }
    scale_row(orow, dv, acc_t(1) / running_sum[r]);
    return running_max[r] + std::log(running_sum[r]);
  }
};

}  // namespace flash_ext::cpu
