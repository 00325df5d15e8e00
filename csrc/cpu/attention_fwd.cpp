// Fused attention forward on the CPU: blocks of queries against blocks of keys
// with an online softmax; the L x S score matrix never exists in full.
#include "attention_cpu.h"
#include "dropout.h"
#include "packed_gemm.h"
#include "tile.h"

namespace flash_ext::cpu {
namespace {

template <typename scalar_t>
void attention_fwd_typed(const AttentionFwdParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t q_blocks = ceil_div(p.q_len, kBlockQ);
  const int64_t d = p.head_dim, dv = p.v_head_dim;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool has_dropout = p.dropout.p > 0.0;
  const acc_t keep_scale = has_dropout ? acc_t(1) / (acc_t(1) - acc_t(p.dropout.p)) : acc_t(1);

  parallel_items(p.batch * p.heads * q_blocks, [&](const auto& next_item) {
    std::vector<acc_t> q_buf(kBlockQ * d), k_buf(kBlockK * d), v_buf(kBlockK * dv);
    std::vector<acc_t> scores(kBlockQ * kBlockK);
    OnlineSoftmax<acc_t> softmax;
    for (int64_t item; (item = next_item()) >= 0;) {
      // A head's query blocks last to first: under a causal mask the last see
      // the most keys, so the items left for the end are the cheap ones.
      const int64_t qb = q_blocks - 1 - item % q_blocks, bh = item / q_blocks;
      const int64_t b = bh / p.heads, h = bh % p.heads, kvh = h / group;
      const SequenceBounds seq = sequence_bounds(p, b);
      const int64_t row0 = qb * kBlockQ;
      if (row0 >= seq.q_len) continue;  // past this sequence's end (varlen)
      const int64_t rows = std::min(kBlockQ, seq.q_len - row0);

      const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                      seq.q_row0 * p.q_stride[2];
      const auto* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1] +
                      seq.k_row0 * p.k_stride[2];
      const auto* v = static_cast<const scalar_t*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1] +
                      seq.k_row0 * p.v_stride[2];
      const Matrix<const acc_t> q_tile =
          stage_rows<acc_t>(q + row0 * p.q_stride[2], p.q_stride[2], rows, d, q_buf.data());
      const MaskTile<scalar_t> mask = mask_tile<scalar_t>(p, b, h);
      const ScoreMods mods(p.softcap, p.alibi_slopes, p.alibi_batch_stride, b, h,
                           seq.window.diagonal_offset);
      const DropoutMask dropout(p.dropout, static_cast<uint64_t>(bh));

      softmax.reset(rows, dv);
      const KeyRange keys = visible_key_range(seq.window, row0, row0 + rows, seq.kv_len);
      // Tiles are laid from the end of the visible range backwards, so under a
      // causal mask only the last one crosses the diagonal.
      for (int64_t col_end = keys.end; col_end > keys.begin; col_end -= kBlockK) {
        const int64_t col0 = std::max(keys.begin, col_end - kBlockK), cols = col_end - col0;
        const Matrix<const acc_t> k_tile =
            stage_rows<acc_t>(k + col0 * p.k_stride[2], p.k_stride[2], cols, d, k_buf.data());
        const Matrix<const acc_t> v_tile =
            stage_rows<acc_t>(v + col0 * p.v_stride[2], p.v_stride[2], cols, dv, v_buf.data());
        gemm<acc_t>(false, true, rows, cols, d, scale, q_tile, k_tile, acc_t(0),
                    {scores.data(), kBlockK});
        if (mods.active()) {
          mods.apply(scores.data(), kBlockK, rows, cols, col0, [row0](int64_t r) { return row0 + r; });
        }
        mask.apply(scores.data(), kBlockK, rows, cols, row0, col0);
        if (!tile_fully_visible(seq.window, row0, row0 + rows, col0, col0 + cols)) {
          apply_window(seq.window, scores.data(), kBlockK, rows, cols, col0,
                       [row0](int64_t r) { return row0 + r; });
        }
        softmax.update(
            scores.data(), kBlockK, cols, v_tile,
            [&](int64_t r, int64_t c) { return dropout.dropped(row0 + r, col0 + c); }, keep_scale,
            has_dropout);
      }

      auto* out = static_cast<scalar_t*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                  seq.q_row0 * p.o_stride[2];
      const int64_t lse0 = h * seq.lse_head_stride + seq.lse_row0 + row0;
      for (int64_t r = 0; r < rows; ++r) store_lse(p, lse0 + r, softmax.finalize_row(r));
      store_rows(softmax.out.data(), dv, rows, dv, out + row0 * p.o_stride[2], p.o_stride[2]);
    }
  });
}

// bfloat16/float16 where the CPU multiplies them natively (packed_gemm.h):
// K^T and V packed once, then each query block's tiles of up to four 64-key
// blocks multiply on them, the scores and the running output in float32, P
// rounded to the input type for P·V (as PyTorch's CPU SDPA does). Same
// visibility, masks, score mods, dropout and online softmax as the float path.
template <typename scalar_t>
void attention_fwd_packed(const AttentionFwdParams& p) {
  using acc_t = float;
  constexpr int64_t kTileBlocks = kBlockK / kPackedKeys;
  const PackedKV<scalar_t> packed(p);
  const int64_t group = p.heads / p.kv_heads;
  const int64_t q_blocks = ceil_div(p.q_len, kBlockQ);
  const int64_t d = p.head_dim, dv = p.v_head_dim;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool has_dropout = p.dropout.p > 0.0;
  const acc_t keep_scale = has_dropout ? acc_t(1) / (acc_t(1) - acc_t(p.dropout.p)) : acc_t(1);

  parallel_items(p.batch * p.heads * q_blocks, [&](const auto& next_item) {
    std::vector<acc_t> scores(kBlockQ * kBlockK);
    std::vector<scalar_t> probs(kBlockQ * kBlockK);
    OnlineSoftmax<acc_t> softmax;
    for (int64_t item; (item = next_item()) >= 0;) {
      const int64_t qb = q_blocks - 1 - item % q_blocks, bh = item / q_blocks;
      const int64_t b = bh / p.heads, h = bh % p.heads, kvh = h / group, bk = b * p.kv_heads + kvh;
      const SequenceBounds seq = sequence_bounds(p, b);
      const int64_t row0 = qb * kBlockQ;
      if (row0 >= seq.q_len) continue;
      const int64_t rows = std::min(kBlockQ, seq.q_len - row0);
      const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                      (seq.q_row0 + row0) * p.q_stride[2];
      const MaskTile<scalar_t> mask = mask_tile<scalar_t>(p, b, h);
      const ScoreMods mods(p.softcap, p.alibi_slopes, p.alibi_batch_stride, b, h, seq.window.diagonal_offset);
      const DropoutMask dropout(p.dropout, static_cast<uint64_t>(bh));

      softmax.reset(rows, dv);
      const KeyRange keys = visible_key_range(seq.window, row0, row0 + rows, seq.kv_len);
      const int64_t first_block = keys.begin / kPackedKeys;
      // Tiles of whole 64-key blocks from the end backwards (under a causal
      // mask only the last one crosses the diagonal); a tile's columns run
      // from its first block's first key, those outside keys masked.
      for (int64_t end_block = ceil_div(keys.end, kPackedKeys); end_block > first_block;) {
        const int64_t begin_block = std::max(first_block, end_block - kTileBlocks);
        const int64_t col0 = begin_block * kPackedKeys, cols = std::min(end_block * kPackedKeys, keys.end) - col0;
        const int64_t blocks = end_block - begin_block;
        for (int64_t j = 0; j < blocks; ++j) {
          packed_product(rows, d, q, p.q_stride[2], packed.k_block(bk, begin_block + j),
                         scores.data() + j * kPackedKeys, kBlockK, false);
        }
        for (int64_t r = 0; r < rows; ++r) scale_row(scores.data() + r * kBlockK, cols, scale);
        if (mods.active()) {
          mods.apply(scores.data(), kBlockK, rows, cols, col0, [row0](int64_t r) { return row0 + r; });
        }
        mask.apply(scores.data(), kBlockK, rows, cols, row0, col0);
        if (col0 < keys.begin || !tile_fully_visible(seq.window, row0, row0 + rows, col0, col0 + cols)) {
          apply_window(seq.window, scores.data(), kBlockK, rows, cols, col0,
                       [row0](int64_t r) { return row0 + r; });
        }
        softmax.to_probabilities(
            scores.data(), kBlockK, cols,
            [&](int64_t r, int64_t c) { return dropout.dropped(row0 + r, col0 + c); }, keep_scale, has_dropout);
        // P in the input type over the tile's whole blocks (0 past cols).
        const int64_t width = blocks * kPackedKeys;
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* src = scores.data() + r * kBlockK;
          scalar_t* dst = probs.data() + r * width;
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            float_to_bfloat16(src, reinterpret_cast<uint16_t*>(dst), cols);
          } else {
            at::vec::convert(src, dst, cols);
          }
          std::fill(dst + cols, dst + width, scalar_t(0));
        }
        for (int64_t c0 = 0; c0 < dv; c0 += kPackedKeys) {
          for (int64_t j = 0; j < blocks; ++j) {
            packed_product(rows, kPackedKeys, probs.data() + j * kPackedKeys, width,
                           packed.v_block(bk, begin_block + j, c0 / kPackedKeys), softmax.out.data() + c0, dv,
                           true);
          }
        }
        end_block = begin_block;
      }

      auto* out = static_cast<scalar_t*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                  seq.q_row0 * p.o_stride[2];
      const int64_t lse0 = h * seq.lse_head_stride + seq.lse_row0 + row0;
      for (int64_t r = 0; r < rows; ++r) store_lse(p, lse0 + r, softmax.finalize_row(r));
      store_rows(softmax.out.data(), dv, rows, dv, out + row0 * p.o_stride[2], p.o_stride[2]);
    }
    packed_gemm_release();
  });
}

}  // namespace

void attention_fwd(const AttentionFwdParams& params) {
  dispatch_scalar(params.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
      // Packing K and V pays off once several query blocks reuse them.
      if (params.q_len > kBlockQ && packed_gemm_usable<scalar_t>(params.head_dim, params.v_head_dim)) {
        attention_fwd_packed<scalar_t>(params);
        return;
      }
    }
    attention_fwd_typed<scalar_t>(params);
  });
}

}  // namespace flash_ext::cpu
