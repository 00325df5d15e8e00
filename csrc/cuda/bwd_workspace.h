// Layouts of the backward's float32 workspaces, plain C++ (host and device):
// dq_accum, which both kernel families add dQ into, and the Hopper pre-pass's
// D and lse rows. The C++ tests check that the (sequence, head) runs they
// place stay inside their buffers and apart.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/mask.h"
#include "common/params.h"

namespace flash_ext::cuda {

// `rows` rounded up to whole tiles of `tile` rows (rows >= 0).
FLASH_HOST_DEVICE int64_t whole_tiles(int64_t rows, int64_t tile) { return (rows + tile - 1) / tile * tile; }

// The Hopper d = 128 backward's tall query tiles (sm90_bwd_configs.cuh).
constexpr int kTallQueryTileRows = 80;

// A query length padded to whole tiles of every backward kernel's query tile
// (64 and 128 rows, and kTallQueryTileRows): whole 128-row tiles that also
// hold whole tall ones. At most kQueryRowSlack rows more than the length.
FLASH_HOST_DEVICE int64_t padded_query_rows(int64_t rows) {
  return whole_tiles(whole_tiles(rows, kTallQueryTileRows), 128);
}
constexpr int64_t kQueryRowSlack = 256;
static_assert(kQueryRowSlack >= kTallQueryTileRows - 1 + 127);

namespace sm80 {

// Layout of the float32 workspace: dq_accum (batch*heads, padded q_len,
// head_dim_inst), rows padded (padded_query_rows) so that atomics need no row
// test, or for varlen heads * (total_q + batch * kQueryRowSlack) rows of
// head_dim_inst (no padding to the longest sequence), sequence-major:
// sequence b's heads from row heads * (cu_seqlens_q[b] + b * kQueryRowSlack),
// each head's rows padded (which fits: the slack per sequence is
// kQueryRowSlack rows a head). Head-major, as FlashAttention-2 lays it
// out, the blocks at work at any time touched every head's part of a
// workspace hundreds of MB long, and the varlen backward's three kernels ran
// 4-12 % slower than the same dense batch's (session 22); then, when
// deterministic, one int semaphore per (batch*heads, query tile) counting the
// key tiles already added.
struct DqWorkspace {
  int64_t q_rows;  // rows per head (and batch unless varlen)
  int64_t dims;    // instantiated head dim
  int64_t floats;  // dq part
  int64_t semaphores;
};

inline DqWorkspace dq_workspace(const AttentionBwdParams& p, int head_dim_inst, int block_m) {
  DqWorkspace w;
  const bool varlen = p.cu_seqlens_q != nullptr;
  w.q_rows = varlen ? p.total_q + p.batch * kQueryRowSlack : padded_query_rows(p.q_len);
  w.dims = head_dim_inst;
  w.floats = (varlen ? 1 : p.batch) * p.heads * w.q_rows * w.dims;
  w.semaphores = p.deterministic ? p.batch * p.heads * ((p.q_len + block_m - 1) / block_m) : 0;
  return w;
}

// dq_accum row of query 0 of (batch b, head h).
FLASH_HOST_DEVICE int64_t dq_accum_row0(bool varlen, const AttentionBwdParams& p, const DqWorkspace& w,
                                        const SequenceBounds& seq, int64_t b, int64_t h) {
  return varlen ? p.heads * (seq.q_row0 + b * kQueryRowSlack) + h * padded_query_rows(seq.q_len)
                : (b * p.heads + h) * w.q_rows;
}

}  // namespace sm80

namespace sm90 {

// D and lse rows come padded as dq_accum's (padded_query_rows), so a query
// tile that starts inside a sequence stays inside its rows. Rows of padding
// per varlen sequence and head: the slack, and each sequence's first row
// rounded up to a multiple of 4 floats for the 16-byte aligned bulk copies
// of the tiles' D and lse.
constexpr int64_t kVarlenSoftmaxPad = kQueryRowSlack + 4;

// Rows per head of each of D and lse: dense, the padded query length, per
// (batch, head); varlen, every sequence with its padding (laid out
// sequence-major, as sm80::dq_accum_row0).
FLASH_HOST_DEVICE int64_t softmax_head_rows(const AttentionBwdParams& p) {
  return p.cu_seqlens_q != nullptr ? whole_tiles(p.total_q + kVarlenSoftmaxPad * p.batch, 4)
                                   : padded_query_rows(p.q_len);
}

// Row of query 0 of (batch b, head h); q_row0 and q_len are the sequence's
// first packed row and length (kVarlen: p has cu_seqlens). Varlen: sequence
// b's heads in turn from heads * (its first row, padded and aligned), each
// head's rows padded to whole tiles.
template <bool kVarlen>
FLASH_HOST_DEVICE int64_t softmax_row0(const AttentionBwdParams& p, int64_t head_rows, int64_t q_row0,
                                       int64_t q_len, int64_t b, int64_t h) {
  return kVarlen ? p.heads * whole_tiles(q_row0 + kVarlenSoftmaxPad * b, 4) + h * padded_query_rows(q_len)
                 : (b * p.heads + h) * head_rows;
}

// Floats of the pre-pass's workspace: D, then lse, each of softmax_head_rows
// rows per head (and batch, unless varlen).
inline int64_t bwd_softmax_d_floats(const AttentionBwdParams& p) {
  return 2 * (p.cu_seqlens_q != nullptr ? 1 : p.batch) * p.heads * softmax_head_rows(p);
}

}  // namespace sm90

}  // namespace flash_ext::cuda
