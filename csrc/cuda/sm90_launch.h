// Entry points of the Hopper (sm_90a) kernel family, one explicit
// instantiation per (head dim, dtype) in instantiations/sm90_*, so dispatch.cu
// needs no CuTe header. Built only when FLASH_EXT_CUDA_ARCHS includes 9.0a
// (setup.py defines FLASH_EXT_SM90A).
#pragma once

#include <cuda_runtime.h>

#include "bwd_workspace.h"
#include "common/macros.h"
#include "common/mask.h"
#include "common/params.h"

namespace flash_ext::cuda::sm90 {

// Head dims with kernels; others run on the next size up: TMA zero-fills the
// extra dims on load and the epilogue never stores them.
constexpr int head_dim_instance(int64_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

// kVarlen: params has cu_seqlens (instantiated in sm90_fwd_varlen_*).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_fwd(const AttentionFwdParams& params, cudaStream_t stream);

// Whether the persistent forward deals its tiles through params.tile_counter
// (as blocks free up) rather than in a static round robin: when they differ
// in weight, under a causal mask or window or in a varlen batch of unequal
// lengths. Equal tiles keep the round robin, which needs no counter nor
// atomics, and measured 5-8 % faster than the dynamic deal at N = 512
// (benchmarks/NOTES.md). A varlen batch whose packed totals are the batch
// times the longest lengths has all its sequences equally long (seen on the
// host, without reading cu_seqlens).
inline bool fwd_deals_tiles_dynamically(const AttentionFwdParams& p) {
  const bool unequal_lengths =
      p.cu_seqlens_q != nullptr && (p.total_q != p.batch * p.q_len || p.total_k != p.batch * p.kv_len);
  return has_window(p.window) || unequal_lengths;
}

// Forward knobs for timing variants side by side on the GPU machine
// (scripts/fwd_tuning.py), read once per process from FLASH_EXT_FWD_TUNING as
// "key=N,..." (an unknown key or a value that is not N >= 0 throws); unset,
// the defaults below, measured best on the H100 (sessions 10 and 11,
// benchmarks/NOTES.md).
struct FwdTuning {
  // d = 128 without a window: calls with kv_len up to this take the 2-stage
  // configuration, which has room for O's staging beside Q and the K/V
  // stages (0: never).
  int64_t two_stage_max_kv = 0;
  // Calls with q_len up to this launch one block per query tile instead of
  // the persistent grid (0: never; d = 256 windows keep their own rule).
  int64_t per_tile_max_q = 0;
  // d = 128 calls without a window with kv_len (varlen: the longest) at
  // least this take 176-key tiles (FwdConfigWideKeys; 0: never), unless
  // they take the 192-row tiles (d128_tall_min, below: dense calls at
  // 2k-8k since session 35). From 4k
  // with cluster_pairs_min_kv: +3 % at 4k in three alternating runs on two
  // machines (sessions 29 and 30: H100 576 -> 593, H200 570 -> 590 and
  // 558 -> 576 TFLOP/s), +0-1 % at 2k (noise), so 2k stays on 128 keys.
  int64_t wide_keys_min_kv = 4096;
  // Calls with q_len up to this take their tiles a (batch, head) pair at a
  // time rather than a row of query tiles of many pairs at a time
  // (tile_schedule; 0: never), without and with a causal mask or window. Measured
  // (session 12, H100): +3-10 % at N = 512-2048 without a mask, +3-5 % at
  // 512 with one, but -2..-4 % at causal 1024-2048.
  int64_t pair_major_max_q = 2048;
  int64_t pair_major_max_q_causal = 512;
  // d = 128 calls on 176-key tiles (wide_keys_min_kv), dense, without a
  // mask or window, with an even number of query tiles and kv_len at least
  // this: the blocks run in cluster pairs that share their K/V loads
  // (FwdTraits::kClusterM; 0: never).
  int64_t cluster_pairs_min_kv = 4096;
  // Varlen batches (of equal lengths: fwd_pairs_fit) take those cluster
  // pairs when their sequences have at least this many query rows (0: any).
  // A sequence with an odd number of query tiles computes one more, past its
  // end (sm90_configs.cuh).
  int64_t cluster_pairs_varlen_min_q = 2048;
  // d = 64: calls with q_len up to these take 128-row query tiles, longer
  // ones 192 (d64_narrow_tiles), without and with a mask or window.
  int64_t d64_narrow_max_q = 1024;
  int64_t d64_narrow_max_q_causal = 2048;
  // Rows keep their running maximum while a tile's exceeds it by at most
  // this many log2 units of the scaled scores (0: only an equal one), so
  // more warps skip O's rescale; probabilities reach up to 2^N. Measured
  // (session 29, H100, alternating rounds): 4 against 0, d = 256 +2..+10 %
  // from 2k without a mask (+0..+5 % causal), d = 128 +0..+2 %, d = 64 level
  // to +3 %; 8 no better.
  int64_t rescale_slack = 4;
  // 1: where O is staged in a K stage (d = 128's three-stage 128-key tiles,
  // FwdTraits::kLateOStageRelease) the stage goes back to the producer after
  // the next tile's first softmax rather than at the epilogue's end, so no
  // warp waits for the TMA store's read on the way to the next tile (0: at
  // once). Measured (H100, session 31, three runs of 5-7 alternating
  // rounds on three machines): N = 512 +2.1 / +1.5 / +2.0 %, 1k -0.7 %, 2k
  // +0.9 / 0 / +0.2 %.
  int64_t o_release_late = 1;
  // 1: d = 128's key loop on 128-key tiles (FwdTraits::kFoldAhead) takes a
  // tile's exponentials against the running row maxima while it reduces the
  // tile's, and keeps them where no row of the warp moved its maximum past
  // rescale_slack (else it folds the tile again after the maxima, as with
  // 0): the maxima leave the chain from S to P. The same bits either way.
  int64_t fold_ahead = 1;
  // Dense d = 128 calls without a window, q_len and kv_len at least
  // d128_tall_min and kv_len at most d128_tall_max_kv, take 192-row query
  // tiles of 80 keys (0: never; sm90_configs.cuh's FwdConfigTall says what
  // they measured).
  int64_t d128_tall_min = 2048;
  int64_t d128_tall_max_kv = 8191;
  // The same for calls with a causal mask or window (0: never; causal 2k-8k
  // measured level on an H200, session 36).
  int64_t d128_tall_min_windowed = 0;
  // Those tiles in cluster pairs sharing their K/V loads where kv_len is at
  // least this and the query tiles pair up (fwd_pairs_fit; 0: never; within
  // 1 % on an H200, session 36: an H100 reading is still wanted).
  int64_t d128_tall_pairs_min_kv = 0;
};
const FwdTuning& fwd_tuning();

// Backward knobs, as FwdTuning's, from FLASH_EXT_BWD_TUNING.
struct BwdTuning {
  // Under a mask or window, the blocks go in sections of pairs holding
  // about this many rounds of num_sms key tiles (TileSchedule; 0: pair by
  // pair, as equal tiles).
  int64_t masked_section_rounds = 2;
  // d = 128 calls without a mask or window of at least this many queries
  // take 80-row query tiles (sm90_bwd_configs.cuh; 0: never); with
  // d128_tall_masked = 1 those under a mask or window too.
  int64_t d128_tall_min_q = 0;
  int64_t d128_tall_masked = 0;
};
const BwdTuning& bwd_tuning();

// Backward at head dims 64, 128 and 256 (instances), kVarlen as run_fwd's
// (instantiated in sm90_bwd_varlen_*). It wants a softmax_d workspace of
// bwd_softmax_d_floats floats: D and lse (log2 units) per query row, rows
// laid out by softmax_head_rows and softmax_row0 (bwd_workspace.h).
template <int kHeadDim, ScalarKind kDtype, bool kVarlen>
void run_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace flash_ext::cuda::sm90
