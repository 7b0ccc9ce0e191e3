// quant_matmul: y [M, N] = x [M, K] @ W.T with W [N, K] kept in GGML's quantized blocks
// (kernels/quant_formats.py; torch specification kernels/reference_quant.py).
//
// The activations are quantised once per call, per 32-block of a row, to int8 with an fp32
// scale d = max|x| / 127 (q = round_half_even(x * (1 / d)), as reference_quant.
// quantize_activations does) and the block's integer sum. Each block of a weight row then
// contributes d_w * d_x * (integer dot) plus the format's offset term (q4_0 / q5_0: -8 / -16 *
// d_w * d_x * sum; q4_1, q5_1 and q4_k's mins: m * d_x * sum), so only the scales are floating point.
// OpenMP splits the rows of W: a thread streams its rows once and computes every activation
// row against each while it is in L1 (for M = 1 decode the weights are the whole traffic).
// The SIMD kernels take the activation rows kTile (8) at a time, unpacking each weight block
// (nibbles, fp16 scales) once per tile and keeping one fp32 accumulator per row in registers;
// the scalar ones go row by row.
// This file holds the driver and the portable scalar kernels; csrc/quant_matmul_x86.cpp and
// csrc/quant_matmul_kquants.cpp the AVX2 ones (the VNNI path runs the K-quants' AVX2 kernels),
// csrc/quant_matmul_vnni.cpp the AVX512-VNNI ones.
#include "quant_matmul.h"

#include <algorithm>
#include <cmath>
#include <vector>

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
  constexpr int64_t kBytes = kHasMin ? 24 : 22, kQh = kHasMin ? 4 : 2;
  float total = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * kBytes;
    const uint32_t qh = load_u32(block + kQh);
    const int8_t* x = act.q + b * kActBlock;
    int32_t high = 0;   // the fifth bits' part of the dot, over 16
    for (int j = 0; j < 32; ++j) high += static_cast<int32_t>((qh >> j) & 1) * x[j];
    const int32_t dot = dot_nibbles(block + kQh + 4, x) + 16 * high;
    const float d = half_to_float(load_u16(block));
    if (kHasMin)
      total += d * act.d[b] * static_cast<float>(dot) +
               half_to_float(load_u16(block + 2)) * act.d[b] * static_cast<float>(act.sum[b]);
    else
      total += d * act.d[b] * static_cast<float>(dot - 16 * act.sum[b]);
  }
  return total;
}

// ggml's get_scale_min_k4: q4_k's 12 packed bytes -> 8 six-bit scales and mins.
void k4_scales(const uint8_t* packed, uint8_t* scales, uint8_t* mins) {
  for (int j = 0; j < 4; ++j) {
    scales[j] = packed[j] & 63;
    mins[j] = packed[j + 4] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    scales[j] = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
    mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
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

// One row's activations -> int8 blocks, fp32 scales and integer block sums.
void quantize_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum) {
  for (int64_t b = 0; b < k / kActBlock; ++b) {
    const float* xb = x + b * kActBlock;
    float amax = 0.0f;
    for (int j = 0; j < kActBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.0f;
    const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
    int32_t total = 0;
    for (int j = 0; j < kActBlock; ++j) {
      const int32_t value = static_cast<int32_t>(std::nearbyint(xb[j] * inverse));
      q[b * kActBlock + j] = static_cast<int8_t>(value);
      total += value;
    }
    d[b] = scale;
    sum[b] = total;
  }
}

// One row's activations (bf16 widened to float first) quantised into row r of q, d, sum.
void quantize_input_row(const void* x, LogitsDtype dtype, int64_t r, int64_t k, int8_t* q,
                        float* d, int32_t* sum) {
  std::vector<float> widened;
  const float* row = static_cast<const float*>(x) + r * k;
  if (dtype == LogitsDtype::kBFloat16) {
    const uint16_t* bits = static_cast<const uint16_t*>(x) + r * k;
    widened.resize(k);
    for (int64_t j = 0; j < k; ++j) widened[j] = detail::bits_float(uint32_t{bits[j]} << 16);
    row = widened.data();
  }
  const int64_t nb = k / kActBlock;
  quantize_row(row, k, q + r * k, d + r * nb, sum + r * nb);
}

// Quantised activations of all M rows, plus the copies of the scales and sums the SIMD
// kernels read (ActTile's d_wide, d_t, sum_t).
struct Activations {
  int64_t m, k, nb, tiles;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> d_wide, d_t, sum_t;

  Activations(const void* x, LogitsDtype dtype, int64_t m_, int64_t k_)
      : m(m_), k(k_), nb(k_ / kActBlock), tiles((m_ + kTile - 1) / kTile), q(m * k),
        d(m * nb), sum(m * nb), d_wide(m * nb * 8), d_t(tiles * nb * kTile, 0.0f),
        sum_t(tiles * nb * kTile, 0.0f) {
#pragma omp parallel for schedule(static) if (m * k > (1 << 15))
    for (int64_t r = 0; r < m; ++r) {
      quantize_input_row(x, dtype, r, k, q.data(), d.data(), sum.data());
      float* dt = d_t.data() + (r / kTile) * nb * kTile + r % kTile;
      float* st = sum_t.data() + (r / kTile) * nb * kTile + r % kTile;
      for (int64_t b = 0; b < nb; ++b) {
        std::fill_n(d_wide.data() + (r * nb + b) * 8, 8, d[r * nb + b]);
        dt[b * kTile] = d[r * nb + b];
        st[b * kTile] = static_cast<float>(sum[r * nb + b]);
      }
    }
  }

  ActRow row(int64_t r) const {
    return {q.data() + r * k, d.data() + r * nb, sum.data() + r * nb};
  }

  // Rows [t * kTile, min(m, (t + 1) * kTile)).
  ActTile tile(int64_t t) const {
    const int64_t first = t * kTile;
    const int rows = static_cast<int>(std::min<int64_t>(kTile, m - first));
    return {q.data() + first * k, d.data() + first * nb, d_wide.data() + first * nb * 8,
            d_t.data() + t * nb * kTile,
            sum_t.data() + t * nb * kTile, k, nb, rows};
  }
};

// The kernel for a format on a path: a SIMD tile dot, or (none on that path, or the scalar
// path asked for) the scalar row dot. VNNI without a kernel for the format falls back to AVX2.
struct Kernel {
  TileDot tile = nullptr;
  RowDot row = nullptr;
};

Kernel pick_kernel(QuantType qtype, QuantIsa isa) {
  if (isa == QuantIsa::kAuto)
    isa = cpu_has_vnni() ? QuantIsa::kVnni : cpu_has_avx2() ? QuantIsa::kAvx2 : QuantIsa::kScalar;
  Kernel kernel;
  if (isa == QuantIsa::kVnni) kernel.tile = vnni_tile_dot(qtype);
  if (kernel.tile == nullptr && isa != QuantIsa::kScalar && cpu_has_avx2())
    kernel.tile = avx2_tile_dot(qtype);
  if (kernel.tile == nullptr) kernel.row = scalar_row_dot(qtype);
  return kernel;
}

// Weight rows per unit of OpenMP work: the tiles after the first find them in L1 (16 rows of
// K = 1536 q8_0 are 26 KB), and n / 16 units still balance two threads.
constexpr int64_t kRowChunk = 16;

// Columns [first, last) of out [M, N]: those weight rows against every activation row.
void weight_rows(const uint8_t* weight, int64_t row_bytes, int64_t first, int64_t last,
                 const Activations& acts, const Kernel& kernel, int64_t num_blocks, int64_t n,
                 float* out) {
  const uint8_t* rows = weight + first * row_bytes;
  if (kernel.tile != nullptr) {
    for (int64_t t = 0; t < acts.tiles; ++t)
      kernel.tile(rows, row_bytes, last - first, acts.tile(t), num_blocks,
                  out + t * kTile * n + first, n);
    return;
  }
  for (int64_t row = first; row < last; ++row)
    for (int64_t r = 0; r < acts.m; ++r)
      out[r * n + row] = kernel.row(weight + row * row_bytes, acts.row(r), num_blocks);
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

bool quant_isa_supported(QuantIsa isa) {
  if (isa == QuantIsa::kVnni) return quant::cpu_has_vnni();
  if (isa == QuantIsa::kAvx2) return quant::cpu_has_avx2();
  return true;
}

void quant_matmul(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k,
                  const uint8_t* weight, QuantType qtype, int64_t n, int64_t row_bytes,
                  QuantIsa isa, float* out) {
  if (m == 0 || n == 0) return;
  const quant::Activations acts(x, x_dtype, m, k);
  const quant::Kernel kernel = quant::pick_kernel(qtype, isa);
  const bool k_quant = qtype == QuantType::kQ4_K || qtype == QuantType::kQ6_K;
  const int64_t num_blocks = k / (k_quant ? 256 : quant::kActBlock);
  // Parallel only above ~128K 32-block dots (~100 us on one core at ~1 ns each): waking a
  // passive OpenMP team (OMP_WAIT_POLICY=passive) costs ~50 us, more than small decode
  // matmuls take alone (measured: 1536x576 q4_1 at M = 1, 38 us serial, 94 us on 2 threads).
  const int64_t block_dots = n * (k / quant::kActBlock) * m;
#pragma omp parallel for schedule(static) if (block_dots > (1 << 17))
  for (int64_t first = 0; first < n; first += quant::kRowChunk)
    quant::weight_rows(weight, row_bytes, first, std::min(n, first + quant::kRowChunk), acts,
                       kernel, num_blocks, n, out);
}

}  // namespace lmarith
