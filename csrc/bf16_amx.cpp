// AMX-BF16 tiles of bf16_matmul (csrc/bf16_amx.h). Per pass: tiles 0-3 accumulate four
// output blocks, tile 4 holds 32 inputs of the activation rows, tiles 5-7 take turns
// holding weight tiles, so a weight load overlaps the previous block's multiply-add.
#include "bf16_amx.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LMARITH_AMX 1
#endif

namespace lmarith {
namespace amx {

#ifdef LMARITH_AMX
namespace {

constexpr int kArchRequestPermission = 0x1023;   // ARCH_REQ_XCOMP_PERM
constexpr int kTileDataFeature = 18;             // XFEATURE_XTILEDATA
constexpr int64_t kPairBytes = 64;               // one pair of a block: 16 lanes x 2 bf16
// Weight bytes ahead of the tile being loaded that each block's stream prefetches.
constexpr int64_t kPrefetchBytes = 2048;

bool cpu_has_amx_bf16() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), bf16 = edx & (1u << 22);
  return tile && bf16 && __builtin_cpu_supports("avx512bf16");
}

// The 64-byte tile configuration (palette 1): bytes per row and rows of each tile.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

inline void prefetch_ahead(const uint16_t* block, int64_t pair) {
  const char* at = reinterpret_cast<const char*>(block) + pair * kPairBytes + kPrefetchBytes;
  for (int64_t line = 0; line < kTilePairs * kPairBytes; line += 64) __builtin_prefetch(at + line, 0, 3);
}

// One pass of Count blocks (tile numbers are immediates, so the count is a template).
template <int Count>
__attribute__((target("amx-tile,amx-bf16"))) void tiles(const uint16_t* x, int64_t stride,
                                                          const uint16_t* const* blocks,
                                                          int64_t pairs, float* acc) {
  const int64_t x_bytes = stride * 2;
  _tile_zero(0);
  if (Count > 1) _tile_zero(1);
  if (Count > 2) _tile_zero(2);
  if (Count > 3) _tile_zero(3);
  for (int64_t p = 0; p < pairs; p += kTilePairs) {
    _tile_loadd(4, x + 2 * p, x_bytes);
    for (int j = 0; j < Count; ++j) prefetch_ahead(blocks[j], p);
    _tile_loadd(5, blocks[0] + 32 * p, kPairBytes);
    _tile_dpbf16ps(0, 4, 5);
    if (Count > 1) {
      _tile_loadd(6, blocks[1] + 32 * p, kPairBytes);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (Count > 2) {
      _tile_loadd(7, blocks[2] + 32 * p, kPairBytes);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (Count > 3) {
      _tile_loadd(5, blocks[3] + 32 * p, kPairBytes);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  constexpr int64_t c_bytes = 16 * sizeof(float);
  _tile_stored(0, acc, c_bytes);
  if (Count > 1) _tile_stored(1, acc + 1 * kTileRows * 16, c_bytes);
  if (Count > 2) _tile_stored(2, acc + 2 * kTileRows * 16, c_bytes);
  if (Count > 3) _tile_stored(3, acc + 3 * kTileRows * 16, c_bytes);
}

}  // namespace

bool bf16_ready() {
  static const bool ready = cpu_has_amx_bf16() &&
                            syscall(SYS_arch_prctl, kArchRequestPermission, kTileDataFeature) == 0;
  return ready;
}

// The tile configuration for `rows` activation rows: C tiles 0-3 and A tile 4 that tall,
// B tiles 5-7 kTilePairs tall, every row 64 bytes.
__attribute__((target("amx-tile"))) void configure(int rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64;
  for (int t = 0; t < 5; ++t) config.rows[t] = static_cast<uint8_t>(rows);  // C tiles, A
  for (int t = 5; t < 8; ++t) config.rows[t] = kTilePairs;                   // B tiles
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

void bf16_tiles(const uint16_t* x, int64_t stride, const uint16_t* const* blocks, int count,
                int64_t pairs, float* acc) {
  switch (count) {
    case 1: return tiles<1>(x, stride, blocks, pairs, acc);
    case 2: return tiles<2>(x, stride, blocks, pairs, acc);
    case 3: return tiles<3>(x, stride, blocks, pairs, acc);
    default: return tiles<4>(x, stride, blocks, pairs, acc);
  }
}

#else
bool bf16_ready() { return false; }
void configure(int) {}
void release() {}
void bf16_tiles(const uint16_t*, int64_t, const uint16_t* const*, int, int64_t, float*) {}
#endif

}  // namespace amx
}  // namespace lmarith
