// Fused attention forward on the CPU: blocks of queries against blocks of keys
// with an online softmax; the L x S score matrix never exists in full.
#include "attention_cpu.h"
#include "dropout.h"
#include "packed_gemm.h"
#include "tile.h"

namespace flash_ext::cpu {
namespace {

// Query rows per work item: kBlockQ, or half of it where that measured
// faster on the 2-core Sapphire Rapids (benchmarks/NOTES.md, session 9):
// short calls under a causal mask or window (less of the diagonal tiles is
// computed past the mask), and the matrix-unit path at head dims >= 128
// (its float32 score and output tiles then take half the L2).
inline int64_t forward_block_rows(const AttentionFwdParams& p, bool packed) {
  const bool short_masked = has_window(p.window) && p.q_len <= 512;
  return short_masked || (packed && p.head_dim >= 128) ? kBlockQ / 2 : kBlockQ;
}

// Row stride of a work item's score tile: kBlockK, or fewer columns when
// the keys are fewer (tiles of whole 64-key blocks at most). Short calls then
// allocate and clear small buffers: a fixed 128 KB tile went through mmap,
// page faults and a memset on every call, a third of a small one's time.
inline int64_t score_tile_stride(const AttentionFwdParams& p) {
  return std::min(kBlockK, ceil_div(std::max<int64_t>(p.kv_len, 1), kPackedKeys) * kPackedKeys);
}

// The loop both forward paths share: query blocks as work items, key tiles
// from the end of the visible range backwards (so under a causal mask only
// the last one crosses the diagonal), score mods, masks, dropout and the
// online softmax. `make_products()` gives each worker its Products, which lay
// out the tiles and compute a tile's scaled scores S and its P·V. Products
// with kRoundsProbabilities take P rounded to bfloat16 instead, which the
// softmax then writes in one pass over unscaled scores, where nothing needs
// the scaled ones first (no score mods, additive mask or dropout).
template <typename scalar_t, typename MakeProducts>
void forward_blocks(const AttentionFwdParams& p, MakeProducts make_products) {
  using acc_t = acc_type_t<scalar_t>;
  using Products = decltype(make_products());
  const int64_t group = p.heads / p.kv_heads;
  const int64_t block_q = forward_block_rows(p, Products::kPacked);
  const int64_t q_blocks = ceil_div(p.q_len, block_q);
  const int64_t lds = score_tile_stride(p);
  const bool has_dropout = p.dropout.p > 0.0;
  const acc_t keep_scale = has_dropout ? acc_t(1) / (acc_t(1) - acc_t(p.dropout.p)) : acc_t(1);
  const bool one_pass = Products::kRoundsProbabilities && !has_dropout && p.softcap == 0.0 &&
                        p.alibi_slopes == nullptr && p.mask_kind != MaskKind::kAdditive && p.scale > 0.0;

  const auto run_items = [&](const auto& next_item) {
    auto products = make_products();
    std::vector<acc_t> scores(std::min(block_q, p.q_len) * lds);
    OnlineSoftmax<acc_t> softmax;
    for (int64_t item; (item = next_item()) >= 0;) {
      // A head's query blocks last to first: under a causal mask the last see
      // the most keys, so the items left for the end are the cheap ones.
      const int64_t qb = q_blocks - 1 - item % q_blocks, bh = item / q_blocks;
      const int64_t b = bh / p.heads, h = bh % p.heads, kvh = h / group;
      const SequenceBounds seq = sequence_bounds(p, b);
      const int64_t row0 = qb * block_q;
      if (row0 >= seq.q_len) continue;  // past this sequence's end (varlen)
      const int64_t rows = std::min(block_q, seq.q_len - row0);
      products.start(b, h, kvh, seq, row0, rows);
      const MaskTile<scalar_t> mask = mask_tile<scalar_t>(p, b, h);
      const ScoreMods mods(p.softcap, p.alibi_slopes, p.alibi_batch_stride, b, h,
                           seq.window.diagonal_offset);
      const DropoutMask dropout(p.dropout, static_cast<uint64_t>(bh));

      softmax.reset(rows, p.v_head_dim);
      const KeyRange keys = visible_key_range(seq.window, row0, row0 + rows, seq.kv_len);
      for (int64_t col_end = keys.end, col0; col_end > keys.begin; col_end = col0) {
        col0 = products.tile_begin(keys.begin, col_end);
        const int64_t cols = col_end - col0;
        if constexpr (Products::kRoundsProbabilities) {
          if (one_pass) {  // -inf of a bool mask or the window is -inf scaled too
            products.unscaled_scores(col0, cols, scores.data(), lds);
            mask.apply(scores.data(), lds, rows, cols, row0, col0);
            if (!tile_fully_visible(seq.window, row0, row0 + rows, col0, col0 + cols)) {
              apply_window(seq.window, scores.data(), lds, rows, cols, col0,
                           [row0](int64_t r) { return row0 + r; });
            }
            softmax.to_bfloat16_probabilities(scores.data(), lds, cols, static_cast<float>(p.scale),
                                              products.rounded_probabilities(), products.width(cols));
            products.add_rounded_values(col0, cols, softmax.out.data());
            continue;
          }
        }
        products.scores(col0, cols, scores.data(), lds);
        if (mods.active()) {
          mods.apply(scores.data(), lds, rows, cols, col0, [row0](int64_t r) { return row0 + r; });
        }
        mask.apply(scores.data(), lds, rows, cols, row0, col0);
        if (!tile_fully_visible(seq.window, row0, row0 + rows, col0, col0 + cols)) {
          apply_window(seq.window, scores.data(), lds, rows, cols, col0,
                       [row0](int64_t r) { return row0 + r; });
        }
        softmax.to_probabilities(
            scores.data(), lds, cols,
            [&](int64_t r, int64_t c) { return dropout.dropped(row0 + r, col0 + c); }, keep_scale,
            has_dropout);
        products.add_values(col0, cols, scores.data(), lds, softmax.out.data());
      }

      auto* out = static_cast<scalar_t*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                  seq.q_row0 * p.o_stride[2];
      const int64_t lse0 = h * seq.lse_head_stride + seq.lse_row0 + row0;
      for (int64_t r = 0; r < rows; ++r) store_lse(p, lse0 + r, softmax.finalize_row(r));
      store_rows(softmax.out.data(), p.v_head_dim, rows, p.v_head_dim, out + row0 * p.o_stride[2],
                 p.o_stride[2]);
    }
  };
  // Short calls whose heads split evenly over the threads take whole heads
  // per thread, as the packing pass before them does (PackedKV::pack_all):
  // each head's packed K and V are then read on the core that wrote them,
  // which at a few query blocks per head costs more than the dynamic deal
  // saves (bf16, 2 threads, 1 x 12 x 256 x 64: 0.36 -> 0.31 ms, interleaved
  // runs; at 1024 the deal won, benchmarks/NOTES.md).
  const int64_t heads_total = p.batch * p.heads;
  const bool whole_heads =
      p.cu_seqlens_q == nullptr && p.q_len <= 2 * kBlockQ && heads_total % at::get_num_threads() == 0;
  parallel_items(heads_total * q_blocks, run_items, whole_heads ? Deal::kEqualChunks : Deal::kOneAtATime);
}

// Tile products in acc_t through BLAS (or small loops): Q, K and V read in
// place when they are float32/float64, else converted tile by tile.
template <typename scalar_t>
class StagedProducts {
 public:
  using acc_t = acc_type_t<scalar_t>;
  static constexpr bool kRoundsProbabilities = false;
  static constexpr bool kPacked = false;

  explicit StagedProducts(const AttentionFwdParams& p)
      : p_(p),
        q_buf_(std::min(kBlockQ, p.q_len) * p.head_dim),
        k_buf_(score_tile_stride(p) * p.head_dim),
        v_buf_(score_tile_stride(p) * p.v_head_dim) {}

  void start(int64_t b, int64_t h, int64_t kvh, const SequenceBounds& seq, int64_t row0, int64_t rows) {
    const auto* q = static_cast<const scalar_t*>(p_.q) + b * p_.q_stride[0] + h * p_.q_stride[1] +
                    (seq.q_row0 + row0) * p_.q_stride[2];
    q_tile_ = stage_rows<acc_t>(q, p_.q_stride[2], rows, p_.head_dim, q_buf_.data());
    rows_ = rows;
    k_ = static_cast<const scalar_t*>(p_.k) + b * p_.k_stride[0] + kvh * p_.k_stride[1] +
         seq.k_row0 * p_.k_stride[2];
    v_ = static_cast<const scalar_t*>(p_.v) + b * p_.v_stride[0] + kvh * p_.v_stride[1] +
         seq.k_row0 * p_.v_stride[2];
  }

  int64_t tile_begin(int64_t begin, int64_t end) const { return std::max(begin, end - kBlockK); }

  void scores(int64_t col0, int64_t cols, acc_t* s, int64_t lds) {
    const Matrix<const acc_t> k_tile =
        stage_rows<acc_t>(k_ + col0 * p_.k_stride[2], p_.k_stride[2], cols, p_.head_dim, k_buf_.data());
    gemm<acc_t>(false, true, rows_, cols, p_.head_dim, static_cast<acc_t>(p_.scale), q_tile_, k_tile, acc_t(0),
                {s, lds});
  }

  void add_values(int64_t col0, int64_t cols, const acc_t* probs, int64_t ldp, acc_t* out) {
    const Matrix<const acc_t> v_tile =
        stage_rows<acc_t>(v_ + col0 * p_.v_stride[2], p_.v_stride[2], cols, p_.v_head_dim, v_buf_.data());
    gemm<acc_t>(false, false, rows_, p_.v_head_dim, cols, acc_t(1), {probs, ldp}, v_tile, acc_t(1),
                {out, p_.v_head_dim});
  }

 private:
  const AttentionFwdParams& p_;
  std::vector<acc_t> q_buf_, k_buf_, v_buf_;
  Matrix<const acc_t> q_tile_{nullptr, 0};
  int64_t rows_ = 0;
  const scalar_t* k_ = nullptr;
  const scalar_t* v_ = nullptr;
};

// bfloat16/float16 products on the CPU's matrix units (packed_gemm.h): tiles
// of up to four whole 64-key blocks of the K^T and V packed once per call,
// Q read in place, P rounded to the input type for P·V (as PyTorch's CPU
// SDPA does); scores and the running output stay float32.
template <typename scalar_t>
class PackedProducts {
 public:
  static constexpr bool kRoundsProbabilities = std::is_same_v<scalar_t, c10::BFloat16>;
  static constexpr bool kPacked = true;

  PackedProducts(const AttentionFwdParams& p, const PackedKV<scalar_t>& packed)
      : p_(p), packed_(packed), probs_(std::min(kBlockQ, p.q_len) * score_tile_stride(p)) {}
  PackedProducts(const PackedProducts&) = delete;
  ~PackedProducts() { packed_gemm_release(); }

  void start(int64_t b, int64_t h, int64_t kvh, const SequenceBounds& seq, int64_t row0, int64_t rows) {
    q_ = static_cast<const scalar_t*>(p_.q) + b * p_.q_stride[0] + h * p_.q_stride[1] +
         (seq.q_row0 + row0) * p_.q_stride[2];
    rows_ = rows;
    bk_ = b * p_.kv_heads + kvh;
  }

  // Whole blocks: a tile may start before `begin` (those keys are masked).
  int64_t tile_begin(int64_t begin, int64_t end) const {
    const int64_t end_block = ceil_div(end, kPackedKeys);
    return std::max(begin / kPackedKeys, end_block - kBlockK / kPackedKeys) * kPackedKeys;
  }

  void unscaled_scores(int64_t col0, int64_t cols, float* s, int64_t lds) {
    for (int64_t j = 0; j * kPackedKeys < cols; ++j) {
      packed_product(rows_, p_.head_dim, q_, p_.q_stride[2], packed_.k_block(bk_, col0 / kPackedKeys + j),
                     s + j * kPackedKeys, lds, false);
    }
  }

  void scores(int64_t col0, int64_t cols, float* s, int64_t lds) {
    unscaled_scores(col0, cols, s, lds);
    for (int64_t r = 0; r < rows_; ++r) scale_row(s + r * lds, cols, static_cast<float>(p_.scale));
  }

  // Row stride of the rounded P of a tile of `cols` keys: whole blocks.
  int64_t width(int64_t cols) const { return ceil_div(cols, kPackedKeys) * kPackedKeys; }

  // Where the softmax writes P rounded (bits), `cols` per row of width(cols).
  uint16_t* rounded_probabilities() { return reinterpret_cast<uint16_t*>(probs_.data()); }

  void add_values(int64_t col0, int64_t cols, const float* probs, int64_t ldp, float* out) {
    for (int64_t r = 0; r < rows_; ++r) {
      scalar_t* dst = probs_.data() + r * width(cols);
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        float_to_bfloat16(probs + r * ldp, reinterpret_cast<uint16_t*>(dst), cols);
      } else {
        static_assert(std::is_same_v<scalar_t, c10::Half>, "packed products take 16-bit floats");
        float_to_half(probs + r * ldp, reinterpret_cast<uint16_t*>(dst), cols);
      }
    }
    add_rounded_values(col0, cols, out);
  }

  // out += P V with P rounded in probs_ (`cols` per row of width(cols)).
  void add_rounded_values(int64_t col0, int64_t cols, float* out) {
    const int64_t blocks = ceil_div(cols, kPackedKeys), ldp = width(cols);
    for (int64_t r = 0; r < rows_; ++r) {  // 0 past cols, over the tile's whole blocks
      scalar_t* dst = probs_.data() + r * ldp;
      std::fill(dst + cols, dst + ldp, scalar_t(0));
    }
    for (int64_t c0 = 0; c0 < p_.v_head_dim; c0 += kPackedKeys) {
      for (int64_t j = 0; j < blocks; ++j) {
        packed_product(rows_, kPackedKeys, probs_.data() + j * kPackedKeys, ldp,
                       packed_.v_block(bk_, col0 / kPackedKeys + j, c0 / kPackedKeys), out + c0, p_.v_head_dim,
                       true);
      }
    }
  }

 private:
  const AttentionFwdParams& p_;
  const PackedKV<scalar_t>& packed_;
  std::vector<scalar_t> probs_;
  const scalar_t* q_ = nullptr;
  int64_t rows_ = 0, bk_ = 0;
};

}  // namespace

void attention_fwd(const AttentionFwdParams& params) {
  dispatch_scalar(params.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
      // Packing K and V pays off once several query blocks reuse them.
      if (params.q_len > kBlockQ && packed_gemm_usable<scalar_t>(params.head_dim, params.v_head_dim)) {
        const PackedKV<scalar_t> packed(params);
        forward_blocks<scalar_t>(params, [&] { return PackedProducts<scalar_t>(params, packed); });
        return;
      }
    }
    forward_blocks<scalar_t>(params, [&] { return StagedProducts<scalar_t>(params); });
  });
}

}  // namespace flash_ext::cpu
