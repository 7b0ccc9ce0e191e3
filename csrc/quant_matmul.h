// Internals of quant_matmul (csrc/quant_matmul.cpp: driver, activation quantisation, scalar
// kernels; csrc/quant_matmul_x86.cpp: AVX2 and AVX512-VNNI kernels chosen at run time).
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

// The per-format row dots of each path; nullptr where a path has none for that format
// (the driver then uses the scalar one).
RowDot scalar_row_dot(QuantType qtype);
RowDot avx2_row_dot(QuantType qtype);
RowDot vnni_row_dot(QuantType qtype);

// Whether this CPU runs the AVX2 (avx2, fma, f16c) / VNNI (+ avx512f/bw/vl/vnni) kernels.
bool cpu_has_avx2();
bool cpu_has_vnni();

}  // namespace quant
}  // namespace lmarith
