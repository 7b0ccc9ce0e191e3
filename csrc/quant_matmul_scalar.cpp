// quant_matmul's portable scalar kernels, one weight row against one quantised activation
// row (driver: csrc/quant_matmul.cpp). The compiler vectorises the inner loops; the SIMD
// kernels (csrc/quant_matmul_x86.cpp, _kquants.cpp, _vnni.cpp) take tiles of rows instead.
#include "quant_matmul.h"

namespace lmarith {
namespace quant {
namespace {

float dot_q8_0(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  float total = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * 34;
    const int8_t* w = reinterpret_cast<const int8_t*>(block + 2);
    const int8_t* x = act.q + b * kActBlock;
    int32_t dot = 0;
    for (int j = 0; j < 32; ++j) dot += w[j] * x[j];
    total += half_to_float(load_u16(block)) * act.d[b] * static_cast<float>(dot);
  }
  return total;
}

// The integer dot of one 32-block's 16 nibble bytes (weight j low, j + 16 high) with x.
inline int32_t dot_nibbles(const uint8_t* qs, const int8_t* x) {
  int32_t dot = 0;
  for (int j = 0; j < 16; ++j) dot += (qs[j] & 0x0F) * x[j] + (qs[j] >> 4) * x[j + 16];
  return dot;
}

float dot_q4_0(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  float total = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * 18;
    const int32_t dot = dot_nibbles(block + 2, act.q + b * kActBlock) - 8 * act.sum[b];
    total += half_to_float(load_u16(block)) * act.d[b] * static_cast<float>(dot);
  }
  return total;
}

float dot_q4_1(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  float total = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * 20;
    const int32_t dot = dot_nibbles(block + 4, act.q + b * kActBlock);
    total += half_to_float(load_u16(block)) * act.d[b] * static_cast<float>(dot) +
             half_to_float(load_u16(block + 2)) * act.d[b] * static_cast<float>(act.sum[b]);
  }
  return total;
}

// q5_0 (kHasMin false: w = d * (q - 16)) and q5_1 (true: w = d * q + m): q is a nibble plus
// a fifth bit, weight j's being bit j of the little-endian word qh.
template <bool kHasMin>
float dot_q5(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  using Layout = NibbleLayout<kHasMin, true>;
  constexpr int64_t kBytes = Layout::kBytes, kQh = Layout::kQh;
  float total = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * kBytes;
    const uint32_t qh = load_u32(block + kQh);
    const int8_t* x = act.q + b * kActBlock;
    int32_t high = 0;   // the fifth bits' part of the dot, over 16
    for (int j = 0; j < 32; ++j) high += static_cast<int32_t>((qh >> j) & 1) * x[j];
    const int32_t dot = dot_nibbles(block + Layout::kQs, x) + 16 * high;
    const float d = half_to_float(load_u16(block));
    if (kHasMin)
      total += d * act.d[b] * static_cast<float>(dot) +
               half_to_float(load_u16(block + 2)) * act.d[b] * static_cast<float>(act.sum[b]);
    else
      total += d * act.d[b] * static_cast<float>(dot - 16 * act.sum[b]);
  }
  return total;
}

// q4_k: 256-weight super-blocks of 8 sub-blocks (one activation block each); group g's 32
// bytes hold sub-block 2g in the low nibbles and 2g + 1 in the high ones.
float dot_q4_k(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  float total = 0.0f;
  for (int64_t s = 0; s < num_blocks; ++s) {
    const uint8_t* block = row + s * 144;
    const float d = half_to_float(load_u16(block));
    const float dmin = half_to_float(load_u16(block + 2));
    uint8_t scales[8], mins[8];
    k4_scales(block + 4, scales, mins);
    for (int sub = 0; sub < 8; ++sub) {
      const uint8_t* qs = block + 16 + (sub / 2) * 32;
      const int shift = (sub & 1) * 4;
      const int64_t b = s * 8 + sub;
      const int8_t* x = act.q + b * kActBlock;
      int32_t dot = 0;
      for (int j = 0; j < 32; ++j) dot += ((qs[j] >> shift) & 0x0F) * x[j];
      total += act.d[b] * (d * scales[sub] * static_cast<float>(dot) -
                           dmin * mins[sub] * static_cast<float>(act.sum[b]));
    }
  }
  return total;
}

// q6_k: 16 sub-blocks of 16 weights with int8 scales; w = d * scale * (q - 32), q six bits
// from ql (low nibbles) and qh (2 bits), in ggml's dequantize_row_q6_K order.
float dot_q6_k(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  float total = 0.0f;
  for (int64_t s = 0; s < num_blocks; ++s) {
    const uint8_t* block = row + s * 210;
    const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
    const int8_t* x = act.q + s * 256;
    int32_t sums[16] = {0};
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = block + 64 * half;
      const uint8_t* qh = block + 128 + 32 * half;
      for (int part = 0; part < 4; ++part) {    // weights 128 * half + 32 * part + l
        const int base = 128 * half + 32 * part;
        const uint8_t* low = ql + (part & 1) * 32;
        const int low_shift = (part / 2) * 4, high_shift = 2 * part;
        for (int sub = 0; sub < 2; ++sub) {     // one scale's 16 weights: a vectorisable loop
          int32_t dot = 0;
          for (int l = 16 * sub; l < 16 * sub + 16; ++l) {
            const int q = ((low[l] >> low_shift) & 0x0F) | (((qh[l] >> high_shift) & 3) << 4);
            dot += (q - 32) * x[base + l];
          }
          sums[base / 16 + sub] = dot;
        }
      }
    }
    float block_total = 0.0f;
    for (int g = 0; g < 16; ++g)
      block_total += scales[g] * act.d[s * 8 + g / 2] * static_cast<float>(sums[g]);
    total += half_to_float(load_u16(block + 208)) * block_total;
  }
  return total;
}

}  // namespace

RowDot scalar_row_dot(QuantType qtype) {
  switch (qtype) {
    case QuantType::kQ8_0: return dot_q8_0;
    case QuantType::kQ4_0: return dot_q4_0;
    case QuantType::kQ4_1: return dot_q4_1;
    case QuantType::kQ4_K: return dot_q4_k;
    case QuantType::kQ6_K: return dot_q6_k;
    case QuantType::kQ5_0: return dot_q5<false>;
    case QuantType::kQ5_1: return dot_q5<true>;
  }
  return nullptr;
}


}  // namespace quant
}  // namespace lmarith
