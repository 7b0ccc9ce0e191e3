// Intel AMX-BF16 tiles for csrc/bf16_matmul.cpp. The packed weight block ([pairs][16][2]
// bf16, bf16_matmul.h) is already the B operand of tdpbf16ps: 16 of its pairs are one 1 KB
// tile (32 inputs x 16 outputs), so a tile multiply-add takes up to 16 activation rows
// against 16 output rows and 32 inputs, 8192 multiply-adds, where vdpbf16ps does 512 per
// instruction. That makes batched decode and prefill read-bound instead of compute-bound.
#pragma once

#include <cstdint>

namespace lmarith {
namespace amx {

constexpr int kTileRows = 16;       // activation rows per tile (and C tile rows)
constexpr int kTilePairs = 16;      // input pairs (32 inputs) per tile multiply-add
constexpr int kTileBlocks = 4;      // output blocks per pass: C tiles 0-3, A tile 4, B 5-7

// Whether this CPU has AMX-BF16 and the kernel lets this process use the tile registers
// (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
bool bf16_ready();

// Loads the tile configuration for `rows` (1..16) activation rows on the calling thread;
// release() returns the tile state (the thread's next context switch then saves less).
void configure(int rows);
void release();

// acc[j][r][16] = sum over the first `pairs` (a multiple of kTilePairs) pairs of
// x row r (bf16 pairs, row r at x + r * stride) . block j's pairs, for j < count
// (<= kTileBlocks) and r < the configured rows; blocks[j] points at block j's first pair.
void bf16_tiles(const uint16_t* x, int64_t stride, const uint16_t* const* blocks, int count,
                int64_t pairs, float* acc);

}  // namespace amx
}  // namespace lmarith
