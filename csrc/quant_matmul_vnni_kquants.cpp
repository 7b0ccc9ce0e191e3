// quant_matmul's AVX512-VNNI kernels of the K-quants (q4_k, q6_k; the shared building blocks:
// csrc/quant_vnni.h; the AVX2 ones: csrc/quant_matmul_kquants.cpp). A super-block of 256
// weights is 8 activation 32-blocks, taken two at a time, one vpdpbusd pair each; the
// integer dots are exact.
#include "quant_matmul.h"

#if defined(__x86_64__) || defined(__i386__)
#include "quant_vnni.h"

namespace lmarith {
namespace quant {
namespace {

// Lanes 0-7 sub-block 2g's factor, lanes 8-15 sub-block 2g + 1's: one permute per pair.
LMARITH_VNNI inline __m512 k4_pair(__m512 factors, int g) {
  const __m512i pick = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * g), _mm512_set1_epi32(2 * g + 1));
  return _mm512_permutexvar_ps(pick, factors);
}

// q4_k: a super-block's group g (32 bytes) holds sub-blocks 2g (low nibbles) and 2g + 1 (high),
// which are activation blocks b, b + 1: one load gives a dpbusd pair, scaled per half by
// d * scale; the mins go through the activation sums (dmin * min * d_x * sum_x, subtracted).
// The scales and mins are unpacked and turned into floats once per super-block, 8 lanes at
// a time (scalar, that setup bounded the kernel at M = 1).
template <int R>
LMARITH_VNNI inline void q4_k_vnni(const uint8_t* row, const ActTile& tile, int64_t num_blocks,
                                   __m512* parked) {
  __m512 acc[R];
  const float no_tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512 pair_offsets = _mm512_setzero_ps();
  for (int64_t s = 0; s < num_blocks; ++s) {
    const uint8_t* block = row + s * 144;
    for (int64_t line = 0; line < 144; line += 64) prefetch_weights(block + line);
    const __m128i packed = k4_scales_x86(block + 4);
    const __m512 scales = _mm512_castps256_ps512(k4_factors_avx2(packed, half_vnni(block)));
    const __m512 mins = _mm512_castps256_ps512(
        k4_factors_avx2(_mm_unpackhi_epi64(packed, packed), half_vnni(block + 2)));
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256i quants = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * g));
      const __m512i u = nibble_halves_vnni(quants);
      const int64_t b = s * 8 + 2 * g;
      __m512i dots[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        dots[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(x_at(tile, r, b)));
      scale_add_vnni<R>(acc, dots, k4_pair(scales, g), tile, b);
      pair_offsets = offsets_pair_vnni(pair_offsets, k4_pair(mins, g), tile, b);
    }
  }
  park_vnni<R>(acc, no_tail, fold_offsets(pair_offsets), -1.0f, parked);
}

// q6_k: parts p, p + 1 of a half are activation blocks b, b + 1, one vpdpbusd pair of the
// six-bit quants q (0..63); each 4-lane group of the i32 sums lies in one 16-weight
// sub-block, so the int8 sub-block scales (times d) scale the lanes in float. The -32 of
// every weight goes in once per super-block and row: its 16 sub-block scales (times 32 d)
// against the row's d_x * sum of q per 16 weights (ActTile::dsum16), one fma, where a
// second vpdpbusd per pair and row did it before.
template <int R>
LMARITH_VNNI inline void q6_k_vnni(const uint8_t* row, const ActTile& tile, int64_t num_blocks,
                                   __m512* parked) {
  __m512 acc[R];
  const float no_tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const int64_t sixteens = tile.k / 16;
  for (int64_t s = 0; s < num_blocks; ++s) {
    const uint8_t* block = row + s * 210;
    for (int64_t line = 0; line < 210; line += 64) prefetch_weights(block + line);
    const float d_w = half_vnni(block + 208);
    const __m512 d = _mm512_set1_ps(d_w);
    for (int half = 0; half < 2; ++half)
      for (int part = 0; part < 4; part += 2) {
        const __m512i q = join_vnni(q6_quants_avx2(block, half, part), q6_quants_avx2(block, half, part + 1));
        const __m128i sub = _mm_cvtsi32_si128(static_cast<int>(load_u32(block + 192 + 8 * half + 2 * part)));
        const __m512 scales = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(sub, spread))));
        const int64_t b = s * 8 + 4 * half + part;
        __m512i dots[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          dots[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(x_at(tile, r, b)));
        scale_add_vnni<R>(acc, dots, scales, tile, b);
      }
    const __m512i sub_scales = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)));
    const __m512 offset_scales = _mm512_mul_ps(_mm512_set1_ps(32.0f * d_w), _mm512_cvtepi32_ps(sub_scales));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fnmadd_ps(offset_scales, _mm512_loadu_ps(tile.dsum16 + r * sixteens + s * 16), acc[r]);
  }
  park_vnni<R>(acc, no_tail, _mm256_setzero_ps(), 0.0f, parked);
}

#define LMARITH_CALL_Q4_K(R) rows_vnni<R, q4_k_vnni<R>>(rows, row_bytes, count, tile, num_blocks, out, stride)
#define LMARITH_CALL_Q6_K(R) rows_vnni<R, q6_k_vnni<R>>(rows, row_bytes, count, tile, num_blocks, out, stride)

LMARITH_VNNI void q4_k_tile_vnni(const uint8_t* rows, int64_t row_bytes, int64_t count,
                                 const ActTile& tile, int64_t num_blocks, float* out,
                                 int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q4_K)
}

LMARITH_VNNI void q6_k_tile_vnni(const uint8_t* rows, int64_t row_bytes, int64_t count,
                                 const ActTile& tile, int64_t num_blocks, float* out,
                                 int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q6_K)
}

}  // namespace

TileDot vnni_kquant_tile_dot(QuantType qtype) {
  if (qtype == QuantType::kQ4_K) return q4_k_tile_vnni;
  if (qtype == QuantType::kQ6_K) return q6_k_tile_vnni;
  return nullptr;
}

}  // namespace quant
}  // namespace lmarith

#else  // not x86: the scalar kernels only

namespace lmarith {
namespace quant {
TileDot vnni_kquant_tile_dot(QuantType) { return nullptr; }
}  // namespace quant
}  // namespace lmarith

#endif
