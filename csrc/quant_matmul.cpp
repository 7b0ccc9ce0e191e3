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
// This file holds the driver; csrc/quant_matmul_scalar.cpp the portable scalar kernels,
// csrc/quant_matmul_x86.cpp and csrc/quant_matmul_kquants.cpp the AVX2 ones,
// csrc/quant_matmul_vnni.cpp and csrc/quant_matmul_vnni_kquants.cpp the AVX512-VNNI ones.
#include "quant_matmul.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace lmarith {
namespace quant {
namespace {

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

// Row r's d_x * (integer sum) of every 16 weights (ActTile's dsum16).
void sixteen_sums(const int8_t* q, const float* d, int64_t k, float* dsum16) {
  for (int64_t j = 0; j < k / 16; ++j) {
    int32_t total = 0;
    for (int l = 0; l < 16; ++l) total += q[16 * j + l];
    dsum16[j] = d[j / 2] * static_cast<float>(total);
  }
}

// Quantised activations of all M rows, plus the copies of the scales and sums the SIMD
// kernels read (ActTile's d_wide, dsum_t and, with `sixteens`, dsum16).
struct Activations {
  int64_t m, k, nb, tiles;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> d_wide, dsum_t, dsum16;

  Activations(const void* x, LogitsDtype dtype, int64_t m_, int64_t k_, bool sixteens)
      : m(m_), k(k_), nb(k_ / kActBlock), tiles((m_ + kTile - 1) / kTile), q(m * k),
        d(m * nb), sum(m * nb), d_wide(m * nb * 8),
        dsum_t(tiles * nb * kTile, 0.0f), dsum16(sixteens ? m * (k / 16) : 0) {
#pragma omp parallel for schedule(static) if (m * k > (1 << 15))
    for (int64_t r = 0; r < m; ++r) {
      quantize_input_row(x, dtype, r, k, q.data(), d.data(), sum.data());
      float* dsum = dsum_t.data() + (r / kTile) * nb * kTile + r % kTile;
      for (int64_t b = 0; b < nb; ++b) {
        std::fill_n(d_wide.data() + (r * nb + b) * 8, 8, d[r * nb + b]);
        dsum[b * kTile] = d[r * nb + b] * static_cast<float>(sum[r * nb + b]);
      }
      if (sixteens) sixteen_sums(q.data() + r * k, d.data() + r * nb, k, dsum16.data() + r * (k / 16));
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
            dsum_t.data() + t * nb * kTile, dsum16.empty() ? nullptr : dsum16.data() + first * (k / 16),
            k, nb, rows};
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

// The weight's blocks per row: 256-weight super-blocks for the K-quants, else 32-blocks.
int64_t blocks_per_row(QuantType qtype, int64_t k) {
  const bool k_quant = qtype == QuantType::kQ4_K || qtype == QuantType::kQ6_K;
  return k / (k_quant ? 256 : kActBlock);
}

// Columns [first, last) of out [M, N] (row stride n): those weight rows against every
// activation row.
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
  const quant::Activations acts(x, x_dtype, m, k, qtype == QuantType::kQ6_K);
  const quant::Kernel kernel = quant::pick_kernel(qtype, isa);
  const int64_t num_blocks = quant::blocks_per_row(qtype, k);
  // Parallel only above ~128K 32-block dots (~100 us on one core at ~1 ns each): waking a
  // passive OpenMP team (OMP_WAIT_POLICY=passive) costs ~50 us, more than small decode
  // matmuls take alone (measured: 1536x576 q4_1 at M = 1, 38 us serial, 94 us on 2 threads).
  const int64_t block_dots = n * (k / quant::kActBlock) * m;
#pragma omp parallel for schedule(static) if (block_dots > (1 << 17))
  for (int64_t first = 0; first < n; first += quant::kRowChunk)
    quant::weight_rows(weight, row_bytes, first, std::min(n, first + quant::kRowChunk), acts,
                       kernel, num_blocks, n, out);
}

// Chunks of kRowChunk rows over the parts' concatenated rows, split evenly among the shares;
// each share quantises x itself (a few microseconds at decode sizes, no barrier).
void quant_matmul_share(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k,
                        const QuantPart* parts, int64_t count, QuantIsa isa, const float* bias,
                        float* out, int64_t out_stride, int share, int shares) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < count; ++i) chunks += (parts[i].rows + quant::kRowChunk - 1) / quant::kRowChunk;
  const int64_t begin = chunks * share / shares, end = chunks * (share + 1) / shares;
  if (m == 0 || begin == end) return;
  bool sixteens = false;
  for (int64_t i = 0; i < count; ++i) sixteens = sixteens || parts[i].qtype == QuantType::kQ6_K;
  const quant::Activations acts(x, x_dtype, m, k, sixteens);
  int64_t chunk = 0, column = 0;
  for (int64_t i = 0; i < count; column += parts[i].rows, ++i) {
    const QuantPart& p = parts[i];
    const int64_t part_chunks = (p.rows + quant::kRowChunk - 1) / quant::kRowChunk;
    const int64_t first = std::max(begin, chunk) - chunk, last = std::min(end, chunk + part_chunks) - chunk;
    chunk += part_chunks;
    if (first >= last) continue;
    const int64_t row_first = first * quant::kRowChunk, row_last = std::min(p.rows, last * quant::kRowChunk);
    quant::weight_rows(p.data, p.row_bytes, row_first, row_last, acts, quant::pick_kernel(p.qtype, isa),
                       quant::blocks_per_row(p.qtype, k), out_stride, out + column);
    for (int64_t r = 0; bias != nullptr && r < m; ++r)
      for (int64_t j = column + row_first; j < column + row_last; ++j) out[r * out_stride + j] += bias[j];
  }
}

}  // namespace lmarith
