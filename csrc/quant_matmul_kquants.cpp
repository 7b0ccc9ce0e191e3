// quant_matmul's AVX2 kernels of the K-quants (q4_k, q6_k; driver: csrc/quant_matmul.cpp,
// the 32-block formats' AVX2 kernels: csrc/quant_matmul_x86.cpp, the VNNI ones of the
// K-quants: csrc/quant_matmul_vnni_kquants.cpp). A super-block of 256 weights is 8
// activation 32-blocks; each is unpacked once per tile of R activation rows and its integer
// dot is exact:
// q4_k: u8 nibbles x s8 x (_mm256_maddubs_epi16), scaled per 32-block by d * scale, the mins
//   through the activation block sums (dmin * min * d_x * sum_x, subtracted);
// q6_k: u8 six-bit q x s8 x minus 32 * x, both with maddubs (pairs of at most 2 * 63 * 127),
//   then _mm256_madd_epi16 with each 16-weight sub-block's int8 scale, so a 32-block's
//   scaled sum is one exact i32 per lane, times d * d_x.
#include "quant_matmul.h"

#if defined(__x86_64__) || defined(__i386__)
#include "quant_avx2.h"

namespace lmarith {
namespace quant {
namespace {

// q4_k super-block: 2 fp16 (d, dmin), 12 bytes of scales / mins, 4 groups of 32 bytes (group
// g: sub-block 2g in the low nibbles, 2g + 1 in the high ones).
template <int R>
LMARITH_AVX2 void q4_k_avx2(const uint8_t* row, const ActTile& tile, int64_t num_blocks,
                            float* out, int64_t stride) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 offsets = _mm256_setzero_ps();   // lane r: -sum over blocks of dmin * min * d_x * sum_x
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t s = 0; s < num_blocks; ++s) {
    const uint8_t* block = row + s * 144;
    for (int64_t line = 0; line < 144; line += 64) prefetch_weights(block + line);
    const __m128i packed = k4_scales_x86(block + 4);
    const __m256 scales = k4_factors_avx2(packed, half_avx2(block));
    const __m256 mins = k4_factors_avx2(_mm_unpackhi_epi64(packed, packed), half_avx2(block + 2));
    for (int g = 0; g < 4; ++g) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * g));
      const __m256i nibbles[2] = {_mm256_and_si256(packed, mask),
                                  _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask)};
      for (int half = 0; half < 2; ++half) {
        const int sub = 2 * g + half;
        const int64_t b = s * 8 + sub;
        __m256i dots[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          dots[r] = dot_avx2(nibbles[half], load_x_avx2(tile, r, b));
        const __m256i lane = _mm256_set1_epi32(sub);
        scale_add_avx2<R>(acc, dots, _mm256_permutevar8x32_ps(scales, lane), tile, b);
        offsets = _mm256_fnmadd_ps(_mm256_permutevar8x32_ps(mins, lane),
                                   _mm256_loadu_ps(tile.dsum_t + b * kTile), offsets);
      }
    }
  }
  store_avx2<R>(acc, offsets, 1.0f, out, stride);
}

// q6_k super-block: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (one per
// 16 weights), fp16 d at byte 208.
template <int R>
LMARITH_AVX2 void q6_k_avx2(const uint8_t* row, const ActTile& tile, int64_t num_blocks,
                            float* out, int64_t stride) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i thirty_two = _mm256_set1_epi8(32);
  for (int64_t s = 0; s < num_blocks; ++s) {
    const uint8_t* block = row + s * 210;
    for (int64_t line = 0; line < 210; line += 64) prefetch_weights(block + line);
    const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
    const float d = half_avx2(block + 208);
    for (int half = 0; half < 2; ++half)
      for (int part = 0; part < 4; ++part) {
        const int first = 8 * half + 2 * part;   // the 32-block's two 16-weight sub-blocks
        const __m256i q = q6_quants_avx2(block, half, part);
        const __m256i sub_scales = _mm256_set_m128i(_mm_set1_epi16(scales[first + 1]),
                                                    _mm_set1_epi16(scales[first]));
        const int64_t b = s * 8 + 4 * half + part;
        __m256i dots[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i x = load_x_avx2(tile, r, b);
          const __m256i pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(q, x),
                                                 _mm256_maddubs_epi16(thirty_two, x));
          dots[r] = _mm256_madd_epi16(pairs, sub_scales);
        }
        scale_add_avx2<R>(acc, dots, d, tile, b);
      }
  }
  store_avx2<R>(acc, _mm256_setzero_ps(), 0.0f, out, stride);
}

#define LMARITH_CALL_Q4_K(R) LMARITH_ROWS(q4_k_avx2<R>)
#define LMARITH_CALL_Q6_K(R) LMARITH_ROWS(q6_k_avx2<R>)

LMARITH_AVX2 void q4_k_tile(const uint8_t* rows, int64_t row_bytes, int64_t count,
                            const ActTile& tile, int64_t num_blocks, float* out, int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q4_K)
}

LMARITH_AVX2 void q6_k_tile(const uint8_t* rows, int64_t row_bytes, int64_t count,
                            const ActTile& tile, int64_t num_blocks, float* out, int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q6_K)
}

}  // namespace

TileDot avx2_kquant_tile_dot(QuantType qtype) {
  if (qtype == QuantType::kQ4_K) return q4_k_tile;
  if (qtype == QuantType::kQ6_K) return q6_k_tile;
  return nullptr;
}

}  // namespace quant
}  // namespace lmarith

#else  // not x86: the scalar kernels only

namespace lmarith {
namespace quant {
TileDot avx2_kquant_tile_dot(QuantType) { return nullptr; }
}  // namespace quant
}  // namespace lmarith

#endif
