// Attention backward on the CPU by recomputation: probabilities are rebuilt
// tile by tile from q, k and the saved log-sum-exp, so nothing of size L x S
// is kept between forward and backward.
//
// One work item owns a (batch, kv head): its key blocks accumulate dK and dV
// over every query head of the GQA group, and it owns those heads' dQ rows,
// so no two threads write the same gradient element.
#include "attention_cpu.h"
#include "dropout.h"
#include "tile.h"

namespace flash_ext::cpu {
namespace {

// Key tiles as wide as query tiles: wider ones would recompute more of the
// masked triangle on a causal diagonal for every query block.
constexpr int64_t kBlockKBwd = kBlockQ;

template <typename scalar_t>
void attention_bwd_typed(const AttentionBwdParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t d = p.head_dim, dv = p.v_head_dim;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool has_dropout = p.dropout.p > 0.0;
  const acc_t keep_scale = has_dropout ? acc_t(1) / (acc_t(1) - acc_t(p.dropout.p)) : acc_t(1);

  parallel_items(p.batch * p.kv_heads, [&](const auto& next_item) {
    // Sized for the longest sequence; a varlen sequence uses its first rows.
    std::vector<acc_t> dq_acc(group * p.q_len * d), row_dot(group * p.q_len), row_lse(group * p.q_len);
    std::vector<acc_t> q_buf(kBlockQ * d), do_buf(kBlockQ * dv), o_row(dv), do_row(dv);
    std::vector<acc_t> k_buf(kBlockKBwd * d), v_buf(kBlockKBwd * dv);
    std::vector<acc_t> dk_acc(kBlockKBwd * d), dv_acc(kBlockKBwd * dv);
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

      const scalar_t* k = in(p.k) + k_at(p.k_stride, kvh);
      const scalar_t* v = in(p.v) + k_at(p.v_stride, kvh);
      for (int64_t col0 = 0; col0 < S; col0 += kBlockKBwd) {
        const int64_t cols = std::min(kBlockKBwd, S - col0);
        const Matrix<const acc_t> k_tile =
            stage_rows<acc_t>(k + col0 * p.k_stride[2], p.k_stride[2], cols, d, k_buf.data());
        const Matrix<const acc_t> v_tile =
            stage_rows<acc_t>(v + col0 * p.v_stride[2], p.v_stride[2], cols, dv, v_buf.data());
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));

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
            const Matrix<const acc_t> q_tile =
                stage_rows<acc_t>(q + row0 * p.q_stride[2], p.q_stride[2], rows, d, q_buf.data());
            const Matrix<const acc_t> do_tile =
                stage_rows<acc_t>(dout + row0 * p.do_stride[2], p.do_stride[2], rows, dv, do_buf.data());

            // P = exp(S - lse), recomputed.
            gemm<acc_t>(false, true, rows, cols, d, scale, q_tile, k_tile, acc_t(0),
                        {probs.data(), kBlockKBwd});
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
            gemm<acc_t>(true, false, cols, dv, rows, acc_t(1), {pd, kBlockKBwd}, do_tile, acc_t(1),
                        {dv_acc.data(), dv});
            gemm<acc_t>(false, true, rows, cols, dv, acc_t(1), do_tile, v_tile, acc_t(0),
                        {dscores.data(), kBlockKBwd});
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
            gemm<acc_t>(false, false, rows, d, cols, scale, {dscores.data(), kBlockKBwd}, k_tile,
                        acc_t(1), {dq_acc.data() + (g * L + row0) * d, d});
            gemm<acc_t>(true, false, cols, d, rows, scale, {dscores.data(), kBlockKBwd}, q_tile,
                        acc_t(1), {dk_acc.data(), d});
          }
        }
        auto* dk = static_cast<scalar_t*>(p.dk) + k_at(p.dk_stride, kvh);
        auto* dvp = static_cast<scalar_t*>(p.dv) + k_at(p.dv_stride, kvh);
        store_rows(dk_acc.data(), d, cols, d, dk + col0 * p.dk_stride[2], p.dk_stride[2]);
        store_rows(dv_acc.data(), dv, cols, dv, dvp + col0 * p.dv_stride[2], p.dv_stride[2]);
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
    attention_bwd_typed<scalar_t>(params);
  });
}

}  // namespace flash_ext::cpu
