// Decoding against a KV cache on the CPU, split-KV: the new keys are appended
// in place, each (sequence, kv head, split) attends its chunk of the cache for
// every query head of the GQA group at once, and the partial outputs are
// merged through their log-sum-exp.
#include <ATen/Parallel.h>

#include "attention_cpu.h"
#include "tile.h"

namespace flash_ext::cpu {
namespace {

// Address of cache row `row` of sequence b, kv head kvh (contiguous or paged).
template <typename scalar_t>
scalar_t* cache_row(const KVCacheParams& p, void* cache, const int64_t* stride, int64_t b,
                    int64_t kvh, int64_t row) {
  int64_t slot = b, offset = row;
  if (p.block_table != nullptr) {
    slot = p.block_table[b * p.block_table_stride + row / p.page_size];
    offset = row % p.page_size;
  }
  return static_cast<scalar_t*>(cache) + slot * stride[0] + kvh * stride[1] + offset * stride[2];
}

template <typename scalar_t>
void append_new_rows(const KVCacheParams& p) {
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.kv_heads, kvh = item % p.kv_heads;
      const auto* k_new = static_cast<const scalar_t*>(p.k_new) + b * p.k_new_stride[0] + kvh * p.k_new_stride[1];
      const auto* v_new = static_cast<const scalar_t*>(p.v_new) + b * p.v_new_stride[0] + kvh * p.v_new_stride[1];
      for (int64_t t = 0; t < p.new_len; ++t) {
        const int64_t row = p.cache_seqlens[b] + t;
        std::copy_n(k_new + t * p.k_new_stride[2], p.head_dim,
                    cache_row<scalar_t>(p, p.k_cache, p.k_cache_stride, b, kvh, row));
        std::copy_n(v_new + t * p.v_new_stride[2], p.v_head_dim,
                    cache_row<scalar_t>(p, p.v_cache, p.v_cache_stride, b, kvh, row));
      }
    }
  });
}

template <typename scalar_t>
void kvcache_fwd_typed(const KVCacheParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  if (p.new_len > 0) append_new_rows<scalar_t>(p);

  const int64_t group = p.heads / p.kv_heads, rows = group * p.q_len;
  const int64_t d = p.head_dim, dv = p.v_head_dim, splits = p.num_splits;
  const acc_t scale = static_cast<acc_t>(p.scale);
  // Partial results, [split][batch][head][token] rows of dv values; one
  // split writes the output directly.
  const int64_t partial_rows = p.batch * p.heads * p.q_len;
  std::vector<acc_t> partial_out(splits > 1 ? splits * partial_rows * dv : 0);
  std::vector<acc_t> partial_lse(splits > 1 ? splits * partial_rows : 0);

  const auto attend = [&](const auto& next_item) {
    std::vector<acc_t> q_buf(rows * d), k_buf(kBlockK * d), v_buf(kBlockK * dv), scores(rows * kBlockK);
    OnlineSoftmax<acc_t> softmax;
    for (int64_t item; (item = next_item()) >= 0;) {
      const int64_t split = item % splits, bk = item / splits;
      const int64_t b = bk / p.kv_heads, kvh = bk % p.kv_heads;
      const int64_t total = p.cache_seqlens[b] + p.new_len;
      const VisibilityWindow window{p.window_left, p.window_right, total - p.q_len};
      // Keys some new token may see, dealt evenly over the splits.
      const KeyRange keys = visible_key_range(window, 0, p.q_len, total);
      const int64_t chunk = ceil_div(keys.end - keys.begin, splits);
      const int64_t key_begin = std::min(keys.end, keys.begin + split * chunk);
      const int64_t key_end = std::min(keys.end, key_begin + chunk);

      // Row r of the packed tile is query token r % q_len of head r / q_len.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = kvh * group + r / p.q_len, t = r % p.q_len;
        const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + t * p.q_stride[2];
        load_row(q, d, q_buf.data() + r * d);
      }
      const auto query_pos = [&](int64_t r) { return r % p.q_len; };
      // Row r belongs to head kvh * group + r / q_len: ALiBi slopes differ per row.
      const auto row_mods = [&](int64_t r) {
        return ScoreMods(p.softcap, p.alibi_slopes, p.alibi_batch_stride, b, kvh * group + r / p.q_len,
                         total - p.q_len);
      };

      softmax.reset(rows, dv);
      for (int64_t col0 = key_begin; col0 < key_end; col0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, key_end - col0);
        // Rows of a tile inside one page (or a contiguous cache) are evenly
        // strided: read in place (float32/float64) or converted once; a tile
        // across pages is gathered row by row. Tiles are the same either way,
        // so a paged cache gives the contiguous cache's results bit for bit.
        const bool strided = p.block_table == nullptr || col0 / p.page_size == (col0 + cols - 1) / p.page_size;
        const auto tile = [&](void* cache, const int64_t* stride, int64_t width, acc_t* buffer) {
          if (strided) {
            return stage_rows<acc_t>(cache_row<scalar_t>(p, cache, stride, b, kvh, col0), stride[2], cols, width,
                                     buffer);
          }
          for (int64_t c = 0; c < cols; ++c) {
            load_row(cache_row<scalar_t>(p, cache, stride, b, kvh, col0 + c), width, buffer + c * width);
          }
          return Matrix<const acc_t>{buffer, width};
        };
        const Matrix<const acc_t> k_tile = tile(p.k_cache, p.k_cache_stride, d, k_buf.data());
        const Matrix<const acc_t> v_tile = tile(p.v_cache, p.v_cache_stride, dv, v_buf.data());
        gemm<acc_t>(false, true, rows, cols, d, scale, {q_buf.data(), d}, k_tile, acc_t(0),
                    {scores.data(), kBlockK});
        if (p.softcap != 0.f || p.alibi_slopes != nullptr) {
          for (int64_t r = 0; r < rows; ++r) {
            row_mods(r).apply(scores.data() + r * kBlockK, kBlockK, 1, cols, col0,
                              [&](int64_t) { return query_pos(r); });
          }
        }
        apply_window(window, scores.data(), kBlockK, rows, cols, col0, query_pos);
        softmax.update(scores.data(), kBlockK, cols, v_tile, [](int64_t, int64_t) { return false; }, acc_t(1),
                       false);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = kvh * group + r / p.q_len, t = r % p.q_len;
        const int64_t row = (b * p.heads + h) * p.q_len + t;
        const acc_t lse = softmax.finalize_row(r);
        if (splits == 1) {
          auto* out = static_cast<scalar_t*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + t * p.o_stride[2];
          store_rows(softmax.out.data() + r * dv, dv, 1, dv, out, 0);
          p.lse[row] = static_cast<float>(lse);
        } else {
          partial_lse[split * partial_rows + row] = lse;
          std::copy_n(softmax.out.data() + r * dv, dv, partial_out.data() + (split * partial_rows + row) * dv);
        }
      }
    }
  };
  // Sequences of one length give every item the same work: equal contiguous
  // chunks then keep each (sequence, head) on the same thread from one decode
  // step to the next, its cache rows in that core's L2 (4 x 4 x 64 x 500,
  // float32, 2 threads: 101 -> 73 us). Ragged lengths are dealt one item at a
  // time, so no thread is left with the long sequences.
  const bool equal_lengths = std::all_of(p.cache_seqlens, p.cache_seqlens + p.batch,
                                         [&](int32_t n) { return n == p.cache_seqlens[0]; });
  parallel_items(p.batch * p.kv_heads * splits, attend, equal_lengths ? Deal::kEqualChunks : Deal::kOneAtATime);
  if (splits == 1) return;

  // Merge the splits: lse = log Σ exp(lse_s), out = Σ exp(lse_s − lse) out_s.
  at::parallel_for(0, partial_rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> merged(dv);
    for (int64_t row = begin; row < end; ++row) {
      acc_t max_lse = neg_inf<acc_t>();
      for (int64_t s = 0; s < splits; ++s) max_lse = std::max(max_lse, partial_lse[s * partial_rows + row]);
      std::fill(merged.begin(), merged.end(), acc_t(0));
      acc_t lse = neg_inf<acc_t>();
      if (max_lse != neg_inf<acc_t>()) {
        acc_t sum = 0;
        for (int64_t s = 0; s < splits; ++s) sum += std::exp(partial_lse[s * partial_rows + row] - max_lse);
        lse = max_lse + std::log(sum);
        for (int64_t s = 0; s < splits; ++s) {
          const acc_t weight = std::exp(partial_lse[s * partial_rows + row] - lse);
          if (weight == acc_t(0)) continue;
          const acc_t* part = partial_out.data() + (s * partial_rows + row) * dv;
          for (int64_t c = 0; c < dv; ++c) merged[c] += weight * part[c];
        }
      }
      const int64_t bh = row / p.q_len, t = row % p.q_len;
      const int64_t b = bh / p.heads, h = bh % p.heads;
      auto* out = static_cast<scalar_t*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + t * p.o_stride[2];
      store_rows(merged.data(), dv, 1, dv, out, 0);
      p.lse[row] = static_cast<float>(lse);
    }
  });
}

}  // namespace

void kvcache_fwd(const KVCacheParams& params) {
  dispatch_scalar(params.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    kvcache_fwd_typed<scalar_t>(params);
  });
}

}  // namespace flash_ext::cpu
