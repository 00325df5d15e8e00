// The Hopper kernels' order of work tiles, host and device: the forward's
// (query tile, batch entry, head) and the backward's (key tile, batch entry,
// kv head). The kernels place each tile with tile_coord, and the C++ tests
// check the placement against plain division.
#pragma once

#include <cstdint>

#include "common/fast_divmod.h"
#include "common/macros.h"

namespace flash_ext::cuda::sm90 {

// Work tiles in the order the blocks take them: the forward's query tiles
// (the first gridDim.x one each, the rest through the tile counter) and the
// backward's key tiles (one block each, which the GPU starts in block order
// as SMs free up). Sections of `section` (batch, head) pairs (the backward's
// (batch, kv head)), so that the blocks running at once share what the
// section's pairs read; inside a section the step (the pair's query or key
// tile) varies slowest, heaviest first under a mask, so the tiles are dealt
// longest first and the light ones fill in at the end. The first section
// takes the pairs the others leave (fewer): a short section last would end
// the grid on its few pairs' heavy tiles (by a simulation of the greedy
// deal, 5-24 % idle on shapes such as 3 x 12 heads at 2k, causal;
// benchmarks/NOTES.md, session 26). Built by make_tile_schedule.
struct TileSchedule {
  int steps, heads, batch_heads, section, first_pairs;
  // Steps from the pair's last tile down: the heaviest first where the last
  // tiles see the most (the forward under a causal mask; the backward under
  // a left window alone).
  bool descending;
  // tile_coord's divisors as multiply-highs, set up on the host: the
  // forward's consumers place their next tile between a tile's last P V and
  // its epilogue, where three integer divisions (~20 instructions each,
  // MUFU.RCP among them) outlasted the product (4 % of their ncu samples at
  // N = 512).
  FastDivmod first_section_pairs;  // first_pairs
  FastDivmod section_tiles;        // section * steps
  FastDivmod section_pairs;        // section
  FastDivmod head_count;           // heads
  FLASH_HOST_DEVICE int tiles() const { return steps * batch_heads; }
};

// `steps` per pair, batch_heads pairs, `section` pairs a section (clamped
// to [1, batch_heads]); all positive, and steps * batch_heads below 2^31.
// One section where tile_coord's offset tiles would pass 2^31 (the
// multiply-highs' range).
inline TileSchedule make_tile_schedule(int steps, int heads, int batch_heads, int section, bool descending) {
  const bool in_range = int64_t(steps) * (int64_t(batch_heads) + section) < (int64_t(1) << 31);
  const int pairs = !in_range ? batch_heads : section < 1 ? 1 : section < batch_heads ? section : batch_heads;
  const int first_pairs = batch_heads - (batch_heads - 1) / pairs * pairs;
  return {steps,
          heads,
          batch_heads,
          pairs,
          first_pairs,
          descending,
          FastDivmod(static_cast<uint32_t>(first_pairs)),
          FastDivmod(static_cast<uint32_t>(pairs * steps)),
          FastDivmod(static_cast<uint32_t>(pairs)),
          FastDivmod(static_cast<uint32_t>(heads))};
}

// Where tile `tile` lies in the schedule: its step (query or key tile),
// batch entry, head.
struct TileCoord {
  int m_block, b, h;
};

FLASH_HOST_DEVICE TileCoord tile_coord(const TileSchedule& s, int tile) {
  // As if the first section were whole, with section - first_pairs pairs
  // before the first: one division finds the section.
  const int lead = (s.section - s.first_pairs) * s.steps;
  const int section_index = static_cast<int>(s.section_tiles.div(static_cast<uint32_t>(tile + lead)));
  const bool first = section_index == 0;
  const int in_section = tile + (first ? 0 : lead) - section_index * s.section * s.steps;
  const int section0 = first ? 0 : section_index * s.section - (s.section - s.first_pairs);
  const FastDivmod& pairs = first ? s.first_section_pairs : s.section_pairs;
  const int step = static_cast<int>(pairs.div(static_cast<uint32_t>(in_section)));
  const int bh = section0 + in_section - step * static_cast<int>(pairs.divisor);
  const int b = static_cast<int>(s.head_count.div(static_cast<uint32_t>(bh)));
  return {s.descending ? s.steps - 1 - step : step, b, bh - b * s.heads};
}

// The split tail (stream-K): a non-causal call of T equal tiles of K key
// tiles on G blocks (clusters) takes ceil(T / G) rounds, the last one part
// empty. Split, the first `whole_tiles` tiles (a multiple of G) run as
// before, and a second launch takes the G + T % G after them (all T, under
// 2G), cut along their keys into G equal runs of key tiles, one a block, so
// that every block ends at about the same time. A run is up to three pieces
// (a tile's end, a whole tile, a tile's start); with at least K key tiles a
// run, a tile is cut at most once. Its first part (key tiles from the last,
// as the key loop walks them) is its run's last piece, its second part the
// next run's first: that one hands its partial result over early, and the
// first part's block takes it in at its end and stores the tile. Run r goes
// to block G - 1 - r, so a block waits only for a block of a lower index,
// which the GPU starts no later: with fewer blocks resident than the grid
// (another stream's kernel, MPS) the waits still end.
// Work ids, the ints the second launch's producer hands its consumers:
// whole_tiles + 3 * run + piece, and work_end for "no more".
struct SplitTail {
  int whole_tiles = 0, work_end = 0;
  int key_tiles = 0;    // K
  int split_iters = 0;  // (T - whole_tiles) * K key tiles in the runs
  FastDivmod grid;      // G
  FastDivmod keys;      // K
  FLASH_HOST_DEVICE bool splits() const { return whole_tiles < work_end; }
};

// The split of `tiles` tiles of `key_tiles` key tiles on `grid` blocks, or
// none (splits() false) where it cannot pay: a full last round, one nearly
// full (under an eighth empty: the hand-over and the extra tile boundary
// cost more), runs of a few key tiles, or run bounds past int32.
inline SplitTail split_tail(int tiles, int key_tiles, int grid) {
  SplitTail s;
  s.whole_tiles = s.work_end = tiles;
  const int rest = grid > 0 ? tiles % grid : 0;
  if (grid <= 0 || tiles <= grid || rest == 0 || int64_t(rest) * 8 > int64_t(grid) * 7 || key_tiles < 4) return s;
  const int split_tiles = tiles >= 2 * grid ? grid + rest : tiles;
  const int64_t iters = int64_t(split_tiles) * key_tiles;
  if (iters * (grid + 1) >= (int64_t(1) << 31)) return s;
  s.whole_tiles = tiles - split_tiles;
  s.work_end = s.whole_tiles + 3 * grid;
  s.key_tiles = key_tiles;
  s.split_iters = static_cast<int>(iters);
  s.grid = FastDivmod(static_cast<uint32_t>(grid));
  s.keys = FastDivmod(static_cast<uint32_t>(key_tiles));
  return s;
}

// Run `run`'s first work id, and the one after `work`.
FLASH_HOST_DEVICE int first_piece(const SplitTail& s, int run) { return s.whole_tiles + 3 * run; }
FLASH_HOST_DEVICE int next_piece(const SplitTail& s, int work) {
  return (work - s.whole_tiles) % 3 < 2 ? work + 1 : s.work_end;
}

// What work id `work` (in [whole_tiles, work_end)) computes: key tiles
// [n_begin, n_end) of tile `tile`, empty (n_begin >= n_end) where the run
// has no such piece.
struct WorkPiece {
  int tile, n_begin, n_end;
};

FLASH_HOST_DEVICE WorkPiece work_piece(const SplitTail& s, int work) {
  const int index = work - s.whole_tiles, run = index / 3, piece = index - 3 * run;
  const int begin = static_cast<int>(s.grid.div(static_cast<uint32_t>(run * s.split_iters)));
  const int end = static_cast<int>(s.grid.div(static_cast<uint32_t>((run + 1) * s.split_iters)));
  const int tile = static_cast<int>(s.keys.div(static_cast<uint32_t>(begin))) + piece;
  const int first = tile * s.key_tiles;
  // The run's key tiles [begin, end) in this tile, counted from its last
  // key tile (the key loop's order).
  const int lo = begin > first ? begin - first : 0;
  const int hi = end - first < s.key_tiles ? end - first : s.key_tiles;
  return {s.whole_tiles + tile, s.key_tiles - hi, s.key_tiles - lo};
}

}  // namespace flash_ext::cuda::sm90
