// The Hopper forward's order of work tiles (query tile, batch entry, head),
// host and device: the kernel places each tile with tile_coord, and the C++
// tests check the placement against plain division.
#pragma once

#include <cstdint>

#include "common/fast_divmod.h"
#include "common/macros.h"

namespace flash_ext::cuda::sm90 {

// Work tiles in the order the blocks take them (the first gridDim.x one
// each, the rest through the tile counter): sections of `section` (batch,
// head) pairs whose K and V fit in L2 together, so the blocks running at
// once share them; inside a section the query tile varies slowest, heaviest
// (seeing the most keys) first, so the tiles are dealt longest first and the
// light ones fill in at the end. Built by make_tile_schedule.
struct TileSchedule {
  int m_blocks, heads, batch_heads, section;
  bool last_rows_heaviest;  // false only when a left window alone bounds the keys
  // tile_coord's divisors as multiply-highs, set up on the host: the
  // consumers place their next tile between a tile's last P V and its
  // epilogue, where three integer divisions (~20 instructions each, MUFU.RCP
  // among them) outlasted the product (4 % of their ncu samples at N = 512).
  FastDivmod section_tiles;  // section * m_blocks
  FastDivmod section_pairs;  // section
  FastDivmod last_pairs;     // the last section's pairs (fewer where section does not divide batch_heads)
  FastDivmod head_count;     // heads
  FLASH_HOST_DEVICE int tiles() const { return m_blocks * batch_heads; }
};

// m_blocks query tiles (steps) per (batch, head) pair, batch_heads pairs,
// `section` pairs a section (clamped to batch_heads); all positive, and
// m_blocks * batch_heads below 2^31.
inline TileSchedule make_tile_schedule(int m_blocks, int heads, int batch_heads, int section,
                                       bool last_rows_heaviest) {
  const int pairs = section < batch_heads ? section : batch_heads;
  const int last_pairs = batch_heads - (batch_heads - 1) / pairs * pairs;
  return {m_blocks,
          heads,
          batch_heads,
          pairs,
          last_rows_heaviest,
          FastDivmod(static_cast<uint32_t>(pairs * m_blocks)),
          FastDivmod(static_cast<uint32_t>(pairs)),
          FastDivmod(static_cast<uint32_t>(last_pairs)),
          FastDivmod(static_cast<uint32_t>(heads))};
}

// Where tile `tile` lies in the schedule: its query tile, batch entry, head.
struct TileCoord {
  int m_block, b, h;
};

FLASH_HOST_DEVICE TileCoord tile_coord(const TileSchedule& s, int tile) {
  const int section_index = static_cast<int>(s.section_tiles.div(tile));
  const int in_section = tile - section_index * s.section * s.m_blocks;
  const int section0 = section_index * s.section;
  const FastDivmod& pairs = section0 + s.section > s.batch_heads ? s.last_pairs : s.section_pairs;
  const int m = static_cast<int>(pairs.div(in_section));
  const int bh = section0 + in_section - m * static_cast<int>(pairs.divisor);
  const int b = static_cast<int>(s.head_count.div(bh));
  return {s.last_rows_heaviest ? s.m_blocks - 1 - m : m, b, bh - b * s.heads};
}

}  // namespace flash_ext::cuda::sm90
