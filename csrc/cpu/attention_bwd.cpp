// Attention backward on the CPU by recomputation: probabilities are rebuilt
// tile by tile from q, k and the saved log-sum-exp, so nothing of size L x S
// is kept between forward and backward.
//
// One work item owns a (batch, kv head): its key blocks accumulate dK and dV
// over every query head of the GQA group, and it owns those heads' dQ rows,
// so no two threads write the same gradient element.
#include "attention_cpu.h"
#include "dropout.h"
#include "packed_gemm.h"
#include "tile.h"
#include "vec_math.h"

namespace flash_ext::cpu {
namespace {

// Key tiles as wide as query tiles: wider ones would recompute more of the
// masked triangle on a causal diagonal for every query block.
constexpr int64_t kBlockKBwd = kBlockQ;

// The backward's five products per (query block, key block) tile, with Q,
// dO, K and V staged as acc_t and multiplied through BLAS: every dtype.
template <typename scalar_t>
class StagedBwdProducts {
 public:
  using acc_t = acc_type_t<scalar_t>;

  explicit StagedBwdProducts(const AttentionBwdParams& p)
      : p_(p), d_(p.head_dim), dv_(p.v_head_dim), scale_(static_cast<acc_t>(p.scale)),
        q_buf_(kBlockQ * d_), do_buf_(kBlockQ * dv_), k_buf_(kBlockKBwd * d_), v_buf_(kBlockKBwd * dv_),
        dk_(kBlockKBwd * d_), dv_sum_(kBlockKBwd * dv_) {}

  // A (sequence, kv head) begins: q and dout at its group's first head and row.
  void start_item(const scalar_t*, const scalar_t*, int64_t) {}

  // A key tile of `cols` keys of k and v (at its first key); its dK and dV sums start at 0.
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    cols_ = cols;
    k_tile_ = stage_rows<acc_t>(k, p_.k_stride[2], cols, d_, k_buf_.data());
    v_tile_ = stage_rows<acc_t>(v, p_.v_stride[2], cols, dv_, v_buf_.data());
    std::fill(dk_.begin(), dk_.end(), acc_t(0));
    std::fill(dv_sum_.begin(), dv_sum_.end(), acc_t(0));
  }

  // Rows [row0, row0 + rows) of group head g (q and dout at the block's first row).
  void load_queries(const scalar_t* q, const scalar_t* dout, int64_t /*g*/, int64_t /*row0*/, int64_t rows) {
    rows_ = rows;
    q_tile_ = stage_rows<acc_t>(q, p_.q_stride[2], rows, d_, q_buf_.data());
    do_tile_ = stage_rows<acc_t>(dout, p_.do_stride[2], rows, dv_, do_buf_.data());
  }

  // s = scale * Q K^T
  void scores(acc_t* s, int64_t lds) {
    gemm<acc_t>(false, true, rows_, cols_, d_, scale_, q_tile_, k_tile_, acc_t(0), {s, lds});
  }
  // dV += P^T dO
  void add_dv(const acc_t* pd, int64_t ldp) {
    gemm<acc_t>(true, false, cols_, dv_, rows_, acc_t(1), {pd, ldp}, do_tile_, acc_t(1), {dv_sum_.data(), dv_});
  }
  // dpd = dO V^T
  void dprobs(acc_t* dpd, int64_t ld) {
    gemm<acc_t>(false, true, rows_, cols_, dv_, acc_t(1), do_tile_, v_tile_, acc_t(0), {dpd, ld});
  }
  // dQ += scale * dS K;  dK += scale * dS^T Q
  void add_dq_dk(const acc_t* ds, int64_t lds, acc_t* dq) {
    gemm<acc_t>(false, false, rows_, d_, cols_, scale_, {ds, lds}, k_tile_, acc_t(1), {dq, d_});
    gemm<acc_t>(true, false, cols_, d_, rows_, scale_, {ds, lds}, q_tile_, acc_t(1), {dk_.data(), d_});
  }
  // The key tile's dK and dV sums, (cols x dim) row-major each.
  const acc_t* dk() { return dk_.data(); }
  const acc_t* dv() { return dv_sum_.data(); }

 private:
  const AttentionBwdParams& p_;
  int64_t d_, dv_;
  acc_t scale_;
  std::vector<acc_t> q_buf_, do_buf_, k_buf_, v_buf_, dk_, dv_sum_;
  Matrix<const acc_t> q_tile_{nullptr, 0}, do_tile_{nullptr, 0}, k_tile_{nullptr, 0}, v_tile_{nullptr, 0};
  int64_t rows_ = 0, cols_ = 0;
};

// The same products for bfloat16/float16 on the CPU's matrix units
// (packed_gemm.h): 16-bit operands, float32 accumulators; P and dS are
// rounded to the input type for their products, as PyTorch's CPU SDPA
// backward does. The right-hand operands come packed: K^T, V^T and K once
// per key tile, P and dS per tile. dK and dV accumulate transposed (dK^T +=
// Q^T dS, dV^T += dO^T P) from Q^T and dO^T made once per (sequence, kv
// head), so no tile is transposed element by element in the inner loop.
template <typename scalar_t>
class PackedBwdProducts {
 public:
  using acc_t = float;

  explicit PackedBwdProducts(const AttentionBwdParams& p)
      : p_(p), d_(p.head_dim), dv_(p.v_head_dim), group_(p.heads / p.kv_heads),
        kt_(kBlockKBwd * d_), vt_(kBlockKBwd * dv_), k_(kBlockKBwd * d_),
        q_t_(group_ * d_ * padded_length(p.q_len)), do_t_(group_ * dv_ * padded_length(p.q_len)),
        staged_(std::max({d_, dv_, kBlockKBwd}) * kPackedKeys), a_(kBlockQ * kBlockKBwd),
        b_(kBlockQ * kBlockKBwd), dk_t_(d_ * kAccStride), dv_t_(dv_ * kAccStride), dk_(kBlockKBwd * d_),
        dv_sum_(kBlockKBwd * dv_), scaled_(kBlockKBwd) {}
  PackedBwdProducts(const PackedBwdProducts&) = delete;
  ~PackedBwdProducts() { packed_gemm_release(); }

  // Q^T and dO^T of the group's heads, (dim x lp) each, zero in column L when L is odd.
  void start_item(const scalar_t* q, const scalar_t* dout, int64_t L) {
    lp_ = padded_length(L);
    for (int64_t g = 0; g < group_; ++g) {
      transpose_rows(q + g * p_.q_stride[1], p_.q_stride[2], L, d_, q_t_.data() + g * d_ * lp_);
      transpose_rows(dout + g * p_.do_stride[1], p_.do_stride[2], L, dv_, do_t_.data() + g * dv_ * lp_);
    }
  }

  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    cols_ = cols;
    // K^T and V^T in 64-key blocks (zero past the last key), for Q K^T and dO V^T.
    for (int64_t j = 0; j * kPackedKeys < cols; ++j) {
      const int64_t n = std::min(kPackedKeys, cols - j * kPackedKeys);
      pack_transposed_rows(k + j * kPackedKeys * p_.k_stride[2], p_.k_stride[2], n, d_, staged_.data(),
                           kt_.data() + j * d_ * kPackedKeys);
      pack_transposed_rows(v + j * kPackedKeys * p_.v_stride[2], p_.v_stride[2], n, dv_, staged_.data(),
                           vt_.data() + j * dv_ * kPackedKeys);
    }
    // K in 64-column chunks of even(cols) rows, for dS K.
    for (int64_t c0 = 0; c0 < d_; c0 += kPackedKeys) {
      pack_row_block(k + c0, p_.k_stride[2], cols, even(cols), staged_.data(), k_.data() + c0 * kBlockKBwd);
    }
    std::fill(dk_t_.begin(), dk_t_.end(), 0.f);
    std::fill(dv_t_.begin(), dv_t_.end(), 0.f);
  }

  void load_queries(const scalar_t* q, const scalar_t* dout, int64_t g, int64_t row0, int64_t rows) {
    q_ = q;
    do_ = dout;
    rows_ = rows;
    q_t_block_ = q_t_.data() + g * d_ * lp_ + row0;
    do_t_block_ = do_t_.data() + g * dv_ * lp_ + row0;
  }

  void scores(float* s, int64_t lds) {
    for (int64_t j = 0; j * kPackedKeys < cols_; ++j) {
      packed_product(rows_, d_, q_, p_.q_stride[2], kt_.data() + j * d_ * kPackedKeys, s + j * kPackedKeys, lds,
                     false);
    }
    for (int64_t r = 0; r < rows_; ++r) scale_row(s + r * lds, cols_, static_cast<float>(p_.scale));
  }

  // dV^T += dO^T P
  void add_dv(const float* pd, int64_t ldp) {
    round_rows(pd, ldp, 1.f, a_.data());
    add_transposed_product(dv_, do_t_block_, a_.data(), dv_t_.data());
  }

  void dprobs(float* dpd, int64_t ld) {
    for (int64_t j = 0; j * kPackedKeys < cols_; ++j) {
      packed_product(rows_, dv_, do_, p_.do_stride[2], vt_.data() + j * dv_ * kPackedKeys, dpd + j * kPackedKeys,
                     ld, false);
    }
  }

  // dQ += (scale dS) K;  dK^T += Q^T (scale dS)
  void add_dq_dk(const float* ds, int64_t lds, float* dq) {
    round_rows(ds, lds, static_cast<float>(p_.scale), a_.data());
    for (int64_t c0 = 0; c0 < d_; c0 += kPackedKeys) {
      packed_product(rows_, even(cols_), a_.data(), kBlockKBwd, k_.data() + c0 * kBlockKBwd, dq + c0, d_, true);
    }
    add_transposed_product(d_, q_t_block_, a_.data(), dk_t_.data());
  }

  // The key tile's dK and dV sums, (cols x dim) row-major each, from the transposed ones.
  const float* dk() { return untransposed(dk_t_, d_, dk_); }
  const float* dv() { return untransposed(dv_t_, dv_, dv_sum_); }

 private:
  static int64_t even(int64_t n) { return n + (n & 1); }
  // Row stride of Q^T and dO^T: even, and 64 bytes off a multiple of 4 KB so
  // that the transposing writes down a column do not all fall in the same
  // few L1 sets (a power-of-two stride made the transpose a third of the
  // backward).
  static int64_t padded_length(int64_t L) { return even(L) + 32; }
  // Row stride of the transposed dK and dV sums, off a power of two for the
  // same reason (untransposed reads them down columns).
  static constexpr int64_t kAccStride = kBlockKBwd + 16;

  // src (rows x dim, row stride ld) transposed into dst (dim x lp_), zero
  // in column `rows` when rows is odd.
  void transpose_rows(const scalar_t* src, int64_t ld, int64_t rows, int64_t dim, scalar_t* dst) {
    transpose(rows, dim, src, ld, dst, lp_);
    if (rows % 2 != 0) {
      for (int64_t i = 0; i < dim; ++i) dst[i * lp_ + rows] = scalar_t(0);
    }
  }

  const float* untransposed(const std::vector<float>& sums_t, int64_t dim, std::vector<float>& sums) {
    transpose(dim, cols_, sums_t.data(), kAccStride, sums.data(), dim);
    return sums.data();
  }

  // factor * src (rows_ x cols_) rounded into dst, row stride kBlockKBwd, zero
  // past cols_ in every row's whole 64-key blocks and in row rows_ when odd.
  void round_rows(const float* src, int64_t ld, float factor, scalar_t* dst) {
    const int64_t width = ceil_div(cols_, kPackedKeys) * kPackedKeys;
    for (int64_t r = 0; r < even(rows_); ++r) {
      scalar_t* row = dst + r * kBlockKBwd;
      if (r == rows_) {
        std::fill(row, row + width, scalar_t(0));
        continue;
      }
      const float* values = src + r * ld;
      if (factor != 1.f) {
        for (int64_t c = 0; c < cols_; ++c) scaled_[c] = values[c] * factor;
        values = scaled_.data();
      }
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        float_to_bfloat16(values, reinterpret_cast<uint16_t*>(row), cols_);
      } else {
        static_assert(std::is_same_v<scalar_t, c10::Half>, "packed products take 16-bit floats");
        float_to_half(values, reinterpret_cast<uint16_t*>(row), cols_);
      }
      std::fill(row + cols_, row + width, scalar_t(0));
    }
  }

  // acc (dim x cols_, row stride kAccStride) += lhs (dim x even(rows_), row stride lp_) times
  // tile (even(rows_) x cols_, row stride kBlockKBwd), packed per 64 keys.
  void add_transposed_product(int64_t dim, const scalar_t* lhs, const scalar_t* tile, float* acc) {
    const int64_t k = even(rows_);
    for (int64_t j = 0; j * kPackedKeys < cols_; ++j) {
      pack_row_block(tile + j * kPackedKeys, kBlockKBwd, k, k, staged_.data(), b_.data());
      packed_product(dim, k, lhs, lp_, b_.data(), acc + j * kPackedKeys, kAccStride, true);
    }
  }

  const AttentionBwdParams& p_;
  int64_t d_, dv_, group_, lp_ = 0;
  std::vector<scalar_t> kt_, vt_, k_, q_t_, do_t_, staged_, a_, b_;
  std::vector<float> dk_t_, dv_t_, dk_, dv_sum_, scaled_;
  const scalar_t* q_ = nullptr;
  const scalar_t* do_ = nullptr;
  const scalar_t* q_t_block_ = nullptr;
  const scalar_t* do_t_block_ = nullptr;
  int64_t rows_ = 0, cols_ = 0;
};

template <typename scalar_t, typename Products>
void attention_bwd_typed(const AttentionBwdParams& p) {
  using acc_t = typename Products::acc_t;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t d = p.head_dim, dv = p.v_head_dim;
  const bool has_dropout = p.dropout.p > 0.0;
  const acc_t keep_scale = has_dropout ? acc_t(1) / (acc_t(1) - acc_t(p.dropout.p)) : acc_t(1);

  parallel_items(p.batch * p.kv_heads, [&](const auto& next_item) {
    // Sized for the longest sequence; a varlen sequence uses its first rows.
    std::vector<acc_t> dq_acc(group * p.q_len * d), row_dot(group * p.q_len), row_lse(group * p.q_len);
    std::vector<acc_t> o_row(dv), do_row(dv);
    Products products(p);
    std::vector<acc_t> probs(kBlockQ * kBlockKBwd), dropped(kBlockQ * kBlockKBwd), dscores(kBlockQ * kBlockKBwd);
    std::vector<acc_t> capped(p.softcap != 0.f ? kBlockQ * kBlockKBwd : 0);
    for (int64_t item; (item = next_item()) >= 0;) {
      const int64_t b = item / p.kv_heads, kvh = item % p.kv_heads;
      const SequenceBounds seq = sequence_bounds(p, b);
      const int64_t L = seq.q_len, S = seq.kv_len;
      // Offset of (b, h) in a query-side or key-side tensor, at the sequence's first row.
      const auto q_at = [&](const int64_t* stride, int64_t h) {
        return b * stride[0] + h * stride[1] + seq.q_row0 * stride[2];
      };
      const auto k_at = [&](const int64_t* stride, int64_t h) {
        return b * stride[0] + h * stride[1] + seq.k_row0 * stride[2];
      };
      const auto in = [](const void* base) { return static_cast<const scalar_t*>(base); };

      // D_i = rowsum(dO_i * O_i), the softmax-backward correction per row.
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g;
        const scalar_t* o = in(p.out) + q_at(p.o_stride, h);
        const scalar_t* dout = in(p.dout) + q_at(p.do_stride, h);
        for (int64_t i = 0; i < L; ++i) {
          load_row(o + i * p.o_stride[2], dv, o_row.data());
          load_row(dout + i * p.do_stride[2], dv, do_row.data());
          row_dot[g * L + i] = at::vec::map2_reduce_all<acc_t>(
              [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, o_row.data(),
              do_row.data(), dv);
          row_lse[g * L + i] = static_cast<acc_t>(load_lse(p, h * seq.lse_head_stride + seq.lse_row0 + i));
        }
      }
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      products.start_item(in(p.q) + q_at(p.q_stride, kvh * group), in(p.dout) + q_at(p.do_stride, kvh * group),
                          L);

      const scalar_t* k = in(p.k) + k_at(p.k_stride, kvh);
      const scalar_t* v = in(p.v) + k_at(p.v_stride, kvh);
      for (int64_t col0 = 0; col0 < S; col0 += kBlockKBwd) {
        const int64_t cols = std::min(kBlockKBwd, S - col0);
        products.load_keys(k + col0 * p.k_stride[2], v + col0 * p.v_stride[2], cols);

        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kvh * group + g, bh = b * p.heads + h;
          const scalar_t* q = in(p.q) + q_at(p.q_stride, h);
          const scalar_t* dout = in(p.dout) + q_at(p.do_stride, h);
          const MaskTile<scalar_t> mask = mask_tile<scalar_t>(p, b, h);
          const ScoreMods mods(p.softcap, p.alibi_slopes, p.alibi_batch_stride, b, h,
                               seq.window.diagonal_offset);
          const DropoutMask dropout(p.dropout, static_cast<uint64_t>(bh));

          for (int64_t row0 = 0; row0 < L; row0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, L - row0);
            const KeyRange keys = visible_key_range(seq.window, row0, row0 + rows, S);
            if (keys.end <= col0 || keys.begin >= col0 + cols) continue;  // tile fully masked
            products.load_queries(q + row0 * p.q_stride[2], dout + row0 * p.do_stride[2], g, row0, rows);

            // P = exp(S - lse), recomputed.
            products.scores(probs.data(), kBlockKBwd);
            if (mods.active()) {
              mods.apply(probs.data(), kBlockKBwd, rows, cols, col0, [row0](int64_t r) { return row0 + r; },
                         capped.empty() ? nullptr : capped.data());
            }
            mask.apply(probs.data(), kBlockKBwd, rows, cols, row0, col0);
            if (!tile_fully_visible(seq.window, row0, row0 + rows, col0, col0 + cols)) {
              apply_window(seq.window, probs.data(), kBlockKBwd, rows, cols, col0,
                           [row0](int64_t r) { return row0 + r; });
            }
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* prow = probs.data() + r * kBlockKBwd;
              const acc_t lse = row_lse[g * L + row0 + r];
              if (lse == neg_inf<acc_t>()) {  // the row saw no key: no gradient
                std::fill(prow, prow + cols, acc_t(0));
              } else {
                exp_shifted_sum(prow, cols, lse);
              }
            }
            // Pd: the probabilities after dropout, which produced O.
            acc_t* pd = probs.data();
            if (has_dropout) {
              pd = dropped.data();
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < cols; ++c) {
                  const acc_t prob = probs[r * kBlockKBwd + c];
                  pd[r * kBlockKBwd + c] =
                      dropout.dropped(row0 + r, col0 + c) ? acc_t(0) : prob * keep_scale;
                }
              }
            }
            // dV += Pdᵀ dO;  dPd = dO Vᵀ
            products.add_dv(pd, kBlockKBwd);
            products.dprobs(dscores.data(), kBlockKBwd);
            // dS = P ∘ (dP − D), with dP = dPd ∘ mask / (1 − p).
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* ds = dscores.data() + r * kBlockKBwd;
              if (has_dropout) {
                for (int64_t c = 0; c < cols; ++c) {
                  ds[c] = dropout.dropped(row0 + r, col0 + c) ? acc_t(0) : ds[c] * keep_scale;
                }
              }
              softmax_grad_row(ds, probs.data() + r * kBlockKBwd, cols, row_dot[g * L + row0 + r]);
            }
            if (p.dbias != nullptr) {
              const int64_t base = b * p.dbias_stride[0] + h * p.dbias_stride[1] +
                                   row0 * p.dbias_stride[2] + col0 * p.dbias_stride[3];
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < cols; ++c) {
                  const int64_t at = base + r * p.dbias_stride[2] + c * p.dbias_stride[3];
                  const acc_t value = dscores[r * kBlockKBwd + c];
                  if (p.dbias_float) {
                    static_cast<float*>(p.dbias)[at] = static_cast<float>(value);
                  } else {
                    static_cast<scalar_t*>(p.dbias)[at] = static_cast<scalar_t>(value);
                  }
                }
              }
            }
            // Through the cap: d(cap · tanh(x / cap)) / dx = 1 − tanh².
            if (!capped.empty()) {
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < cols; ++c) {
                  const acc_t t = capped[r * kBlockKBwd + c];
                  dscores[r * kBlockKBwd + c] *= acc_t(1) - t * t;
                }
              }
            }
            // dQ += scale · dS K;  dK += scale · dSᵀ Q
            products.add_dq_dk(dscores.data(), kBlockKBwd, dq_acc.data() + (g * L + row0) * d);
          }
        }
        auto* dk = static_cast<scalar_t*>(p.dk) + k_at(p.dk_stride, kvh);
        auto* dvp = static_cast<scalar_t*>(p.dv) + k_at(p.dv_stride, kvh);
        store_rows(products.dk(), d, cols, d, dk + col0 * p.dk_stride[2], p.dk_stride[2]);
        store_rows(products.dv(), dv, cols, dv, dvp + col0 * p.dv_stride[2], p.dv_stride[2]);
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g;
        auto* dq = static_cast<scalar_t*>(p.dq) + q_at(p.dq_stride, h);
        store_rows(dq_acc.data() + g * L * d, d, L, d, dq, p.dq_stride[2]);
      }
    }
  });
}

}  // namespace

void attention_bwd(const AttentionBwdParams& params) {
  dispatch_scalar(params.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
      // As in the forward: packing pays once several query blocks reuse it.
      if (params.q_len > kBlockQ && packed_gemm_usable<scalar_t>(params.head_dim, params.v_head_dim)) {
        attention_bwd_typed<scalar_t, PackedBwdProducts<scalar_t>>(params);
        return;
      }
    }
    attention_bwd_typed<scalar_t, StagedBwdProducts<scalar_t>>(params);
  });
}

}  // namespace flash_ext::cpu
