// Internals of quant_matmul (csrc/quant_matmul.cpp: driver, activation quantisation;
// csrc/quant_matmul_scalar.cpp: scalar kernels; csrc/quant_matmul_x86.cpp: AVX2 kernels and
// CPU detection; csrc/quant_matmul_kquants.cpp: the K-quants' AVX2 kernels;
// csrc/quant_matmul_vnni.cpp and _vnni_kquants.cpp (helpers: csrc/quant_vnni.h): AVX512-VNNI
// kernels; the SIMD ones are chosen at run time).
// Weights stay in GGML's block layout (kernels/quant_formats.py) and are read once; the
// activations are quantised per 32-block to int8 with an fp32 scale and their integer block
// sum, so every block's dot product is an exact int8 x int4/int8 integer sum.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lmarith {
namespace quant {

constexpr int64_t kActBlock = 32;

// One row's quantised activations: q [K] int8, d and sum [K / 32] (x ~= d * q per block,
// sum = the block's sum of q).
struct ActRow {
  const int8_t* q;
  const float* d;
  const int32_t* sum;
};

// The dot product of one weight row (num_blocks of the format's blocks, raw bytes) with one
// quantised activation row.
using RowDot = float (*)(const uint8_t* row, const ActRow& act, int64_t num_blocks);

// Activation rows the SIMD kernels take together, so each weight block is unpacked once per
// tile instead of once per row.
constexpr int kTile = 8;

// A tile of 1..kTile quantised activation rows: row r's int8 at q + r * k, its block scales at
// d + r * nb, and again each repeated 8 times at d_wide + r * nb * 8 (one 512-bit load gives
// blocks b, b + 1 in the lane halves VNNI's two-block step uses); dsum_t [nb][kTile] holds
// block b's scale times integer sum, d_x * sum_x, of the tile's rows side by side (zero past
// `rows`), for the per-block offset terms of all rows in one vector (one fma a block);
// dsum16, where the call has q6_k weights (else nullptr), row r's d_x * (sum of q) of every
// 16 weights at dsum16 + r * k / 16, for q6_k's -32 offset per 16-weight sub-block.
struct ActTile {
  const int8_t* q;
  const float* d;
  const float* d_wide;
  const float* dsum_t;
  const float* dsum16;
  int64_t k, nb;
  int rows;
};

// `count` consecutive weight rows (row_bytes apart) against a tile: out[r * out_stride + i] =
// the dot of weight row i with the tile's row r. Taking several weight rows per call keeps the
// call and the tile-height dispatch out of the per-row cost (~130 cycles a row at M = 1).
using TileDot = void (*)(const uint8_t* rows, int64_t row_bytes, int64_t count,
                         const ActTile& tile, int64_t num_blocks, float* out, int64_t out_stride);

// Expands to one call per tile height, CALL(R) with R a compile-time constant (the kernels
// keep their R accumulators in registers), chosen by the run-time `rows`.
#define LMARITH_TILE_SWITCH(rows, CALL) \
  switch (rows) {                        \
    case 1: CALL(1); break;              \
    case 2: CALL(2); break;              \
    case 3: CALL(3); break;              \
    case 4: CALL(4); break;              \
    case 5: CALL(5); break;              \
    case 6: CALL(6); break;              \
    case 7: CALL(7); break;              \
    default: CALL(8); break;             \
  }

// One tile height R over a TileDot's weight rows (its parameters rows, row_bytes, count,
// tile, num_blocks, out, stride in scope): the row kernel inlined into the loop.
#define LMARITH_ROWS(KERNEL)                                           \
  for (int64_t i = 0; i < count; ++i)                                  \
    KERNEL(rows + i * row_bytes, tile, num_blocks, out + i, stride)

// IEEE binary16 bits -> float (subnormals, inf and NaN included); the scalar path's decoder.
inline float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1Fu;
  const uint32_t mantissa = half & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 31 ? (sign | 0x7F800000u | (mantissa << 13))
                                       : (sign | ((exponent + 112) << 23) | (mantissa << 13));
  return detail::bits_float(bits);
}

inline uint16_t load_u16(const uint8_t* bytes) {
  uint16_t value;
  std::memcpy(&value, bytes, sizeof(value));
  return value;
}

inline uint32_t load_u32(const uint8_t* bytes) {
  uint32_t value;
  std::memcpy(&value, bytes, sizeof(value));
  return value;
}

// Byte layout of the 32-block nibble formats: q4_0 / q4_1 and, with kFive, q5_0 / q5_1
// (kHasMin: an fp16 min follows d). kOffsetFactor multiplies a block's offset term c * d_x *
// sum_x: +1 for the min, -8 / -16 for d (applied once at the end, exactly: a power of two).
template <bool kHasMin, bool kFive>
struct NibbleLayout {
  static constexpr int64_t kQh = kHasMin ? 4 : 2;         // q5: 4 bytes of fifth bits here
  static constexpr int64_t kQs = kQh + (kFive ? 4 : 0);   // 16 bytes of nibbles here
  static constexpr int64_t kBytes = kQs + 16;
  static constexpr float kOffsetFactor = kHasMin ? 1.0f : kFive ? -16.0f : -8.0f;
};

// ggml's get_scale_min_k4: q4_k's 12 packed bytes -> 8 six-bit scales and mins.
inline void k4_scales(const uint8_t* packed, uint8_t* scales, uint8_t* mins) {
  for (int j = 0; j < 4; ++j) scales[j] = packed[j] & 63, mins[j] = packed[j + 4] & 63;
  for (int j = 4; j < 8; ++j) {
    scales[j] = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
    mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

// The per-format kernels of each path: scalar row dots (every format), AVX2 / VNNI tile dots
// (nullptr where a path has none for that format; the driver then uses the scalar one).
RowDot scalar_row_dot(QuantType qtype);
TileDot avx2_tile_dot(QuantType qtype);
TileDot avx2_kquant_tile_dot(QuantType qtype);   // q4_k, q6_k (csrc/quant_matmul_kquants.cpp)
TileDot vnni_tile_dot(QuantType qtype);
TileDot vnni_kquant_tile_dot(QuantType qtype);   // q4_k, q6_k (csrc/quant_matmul_vnni_kquants.cpp)

// Whether this CPU runs the AVX2 (avx2, fma, f16c) / VNNI (+ avx512f/bw/vl/vnni) kernels.
bool cpu_has_avx2();
bool cpu_has_vnni();

}  // namespace quant
}  // namespace lmarith
