// quant_matmul's AVX2 kernels and the CPU detection (driver and scalar path:
// csrc/quant_matmul.cpp; AVX512-VNNI kernels: csrc/quant_matmul_vnni.cpp). Each function
// carries its own target attribute and the driver picks one at run time from
// __builtin_cpu_supports, so a portable build (LMARITH_PORTABLE, no -march=native) still uses
// them. Per 32-block the int8 dot is exact: _mm256_maddubs_epi16 (u8 x s8 -> pairs of i16, at
// most 2 * 128 * 127 < 2^15 for our operands) then _mm256_madd_epi16 with ones -> 8 x i32.
// The unsigned operand is the weight's nibbles (q4_0 / q4_1: the -8 or the min go through the
// activation block sums) or, for q8_0, |w| with the sign moved onto the activations.
// A kernel takes one weight row and a tile of R activation rows (ActTile): each block is
// loaded and unpacked once, then applied to the R rows, whose fp32 accumulators (one ymm each)
// stay in registers; the per-block offset terms of all R rows go in one ymm (lane = row).
// q4_k / q6_k: csrc/quant_matmul_kquants.cpp (avx2_tile_dot hands them out).
#include "quant_matmul.h"

#if defined(__x86_64__) || defined(__i386__)
#include "quant_avx2.h"

namespace lmarith {
namespace quant {
namespace {

// 16 nibble bytes -> 32 u8 in weight order (low nibbles = weights 0-15, high = 16-31).
LMARITH_AVX2 inline __m256i nibbles_avx2(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  return _mm256_set_m128i(high, _mm_and_si128(packed, mask));
}

template <int R>
LMARITH_AVX2 inline void q8_0_avx2(const uint8_t* row, const ActTile& tile,
                            int64_t num_blocks, float* out, int64_t stride) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * 34;
    prefetch_weights(block);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
    const __m256i magnitude = _mm256_sign_epi8(w, w);
    __m256i dots[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      dots[r] = dot_avx2(magnitude, _mm256_sign_epi8(load_x_avx2(tile, r, b), w));
    scale_add_avx2<R>(acc, dots, half_avx2(block), tile, b);
  }
  store_avx2<R>(acc, _mm256_setzero_ps(), 0.0f, out, stride);
}

// The tile's offset terms of block b, c * (d_x * sum_x) per row (lane): c is q4_1's / q5_1's
// min, or q4_0's / q5_0's d (the -8 / -16 is applied once at the end, exactly, as a power of two).
LMARITH_AVX2 inline __m256 offsets_avx2(__m256 acc, float c, const ActTile& tile, int64_t b) {
  return _mm256_fmadd_ps(_mm256_set1_ps(c), _mm256_loadu_ps(tile.dsum_t + b * kTile), acc);
}

// q4_0 (kHasMin false: w = d * (q - 8)) and q4_1 (true: w = d * q + m); with kFive, q5_0
// (w = d * (q - 16)) and q5_1, whose 4 bytes of fifth bits precede the nibbles.
template <bool kHasMin, bool kFive, int R>
LMARITH_AVX2 inline void q4_avx2(const uint8_t* row, const ActTile& tile,
                            int64_t num_blocks, float* out, int64_t stride) {
  using Layout = NibbleLayout<kHasMin, kFive>;
  constexpr int64_t kQh = Layout::kQh, kQs = Layout::kQs, kBytes = Layout::kBytes;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 offsets = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * kBytes;
    prefetch_weights(block);
    __m256i u = nibbles_avx2(block + kQs);
    if (kFive) u = _mm256_or_si256(u, fifth_bits_avx2(load_u32(block + kQh)));
    __m256i dots[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) dots[r] = dot_avx2(u, load_x_avx2(tile, r, b));
    const float d = half_avx2(block);
    scale_add_avx2<R>(acc, dots, d, tile, b);
    offsets = offsets_avx2(offsets, kHasMin ? half_avx2(block + 2) : d, tile, b);
  }
  store_avx2<R>(acc, offsets, Layout::kOffsetFactor, out, stride);
}

#define LMARITH_CALL_Q8_0(R) LMARITH_ROWS(q8_0_avx2<R>)
#define LMARITH_CALL_Q4(R) LMARITH_ROWS((q4_avx2<kHasMin, kFive, R>))

// The TileDots: the tile height picked at run time, once per call.
LMARITH_AVX2 void q8_0_tile_avx2(const uint8_t* rows, int64_t row_bytes, int64_t count,
                                 const ActTile& tile, int64_t num_blocks, float* out,
                                 int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q8_0)
}

template <bool kHasMin, bool kFive>
LMARITH_AVX2 void q4_tile_avx2(const uint8_t* rows, int64_t row_bytes, int64_t count,
                               const ActTile& tile, int64_t num_blocks, float* out,
                               int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q4)
}

}  // namespace

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

bool cpu_has_vnni() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

TileDot avx2_tile_dot(QuantType qtype) {
  switch (qtype) {
    case QuantType::kQ8_0: return q8_0_tile_avx2;
    case QuantType::kQ4_0: return q4_tile_avx2<false, false>;
    case QuantType::kQ4_1: return q4_tile_avx2<true, false>;
    case QuantType::kQ5_0: return q4_tile_avx2<false, true>;
    case QuantType::kQ5_1: return q4_tile_avx2<true, true>;
    default: return avx2_kquant_tile_dot(qtype);
  }
}

}  // namespace quant
}  // namespace lmarith

#else  // not x86: the scalar kernels only

namespace lmarith {
namespace quant {
bool cpu_has_avx2() { return false; }
bool cpu_has_vnni() { return false; }
TileDot avx2_tile_dot(QuantType) { return nullptr; }
}  // namespace quant
}  // namespace lmarith

#endif
