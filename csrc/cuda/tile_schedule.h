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
  int step, b, h;
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

}  // namespace flash_ext::cuda::sm90
