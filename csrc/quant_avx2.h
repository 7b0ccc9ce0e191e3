// The AVX2 building blocks quant_matmul's x86 kernels share (the 32-block formats in
// csrc/quant_matmul_x86.cpp, the K-quants in csrc/quant_matmul_kquants.cpp): one weight row
// against a tile of R activation rows (ActTile), one fp32 ymm accumulator per row.
// Include only from files compiled for x86; every function carries its own target attribute.
#pragma once

#include "quant_matmul.h"

#include <immintrin.h>

#define LMARITH_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace lmarith {
namespace quant {

// How far ahead of the block being read the SIMD kernels prefetch the weight stream. The
// hardware prefetchers alone left one core's read of a weight larger than L2 at ~5 GB/s (Intel
// Xeon, q4_1, 84 MB, VNNI) where a plain read streams 12 GB/s; 2-8 KB ahead gave 7.4-7.6 GB/s
// (and 11.5 with the VNNI kernel's one-fma offsets chain).
constexpr int64_t kWeightPrefetch = 3072;

inline void prefetch_weights(const uint8_t* block) {
  _mm_prefetch(reinterpret_cast<const char*>(block + kWeightPrefetch), _MM_HINT_T0);
}

LMARITH_AVX2 inline float half_avx2(const uint8_t* bytes) { return _cvtsh_ss(load_u16(bytes)); }

// 8 x i32 partial sums of u8 u times s8 x; exact while u <= 128 (nibbles, six-bit quants,
// |q8|): a pair of i16 is then at most 2 * 128 * 127 < 2^15.
LMARITH_AVX2 inline __m256i dot_avx2(__m256i u, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}

LMARITH_AVX2 inline __m256i load_x_avx2(const ActTile& tile, int r, int64_t b) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.q + r * tile.k + b * kActBlock));
}

LMARITH_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
}

// acc[r] += dots[r] * (w_scale * d_x of row r for 32-block b), the fp32 step every format
// shares; w: the weight's scale in every lane.
template <int R>
LMARITH_AVX2 inline void scale_add_avx2(__m256* acc, const __m256i* dots, __m256 w,
                                        const ActTile& tile, int64_t b) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 scale = _mm256_mul_ps(w, _mm256_broadcast_ss(tile.d + r * tile.nb + b));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
  }
}

template <int R>
LMARITH_AVX2 inline void scale_add_avx2(__m256* acc, const __m256i* dots, float w_scale,
                                        const ActTile& tile, int64_t b) {
  scale_add_avx2<R>(acc, dots, _mm256_set1_ps(w_scale), tile, b);
}

// q4_k's 12 packed scale bytes -> its 8 six-bit scales (bytes 0-7) and 8 mins (bytes 8-15):
// k4_scales's unpacking done on three 32-bit words (j < 4: the low six bits of bytes j and
// j + 4; j >= 4: a nibble of byte j + 4 below the top two bits of byte j - 4 or j).
LMARITH_AVX2 inline __m128i k4_scales_x86(const uint8_t* packed) {
  const uint32_t low = load_u32(packed), mid = load_u32(packed + 4), high = load_u32(packed + 8);
  const uint32_t six = 0x3F3F3F3Fu, nibble = 0x0F0F0F0Fu, two = 0x03030303u;
  const uint32_t scales_high = (high & nibble) | (((low >> 6) & two) << 4);
  const uint32_t mins_high = ((high >> 4) & nibble) | (((mid >> 6) & two) << 4);
  return _mm_setr_epi32(static_cast<int>(low & six), static_cast<int>(scales_high),
                        static_cast<int>(mid & six), static_cast<int>(mins_high));
}

// The first 8 bytes of k4_scales_x86's result (scales, or mins after an unpackhi) times d,
// as floats: a super-block's 8 sub-block factors, converted once, not per sub-block.
LMARITH_AVX2 inline __m256 k4_factors_avx2(__m128i bytes, float d) {
  return _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
}

// out[r * stride] = the horizontal sum of acc[r] plus lane r of `offsets` times offset_factor,
// by an explicit fma: a plain a * b + c may be fused at some tile heights and not at others,
// and a row's output would then change with its batch.
template <int R>
LMARITH_AVX2 inline void store_avx2(const __m256* acc, __m256 offsets, float offset_factor,
                                    float* out, int64_t stride) {
  alignas(32) float lanes[kTile];
  _mm256_store_ps(lanes, offsets);
  for (int r = 0; r < R; ++r)
    out[r * stride] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(offset_factor), _mm_set_ss(lanes[r]),
                                                 _mm_set_ss(hsum_avx2(acc[r]))));
}

// q5's fifth bits (bit j of qh for weight j) as 32 bytes of 0 or 16, in weight order: each
// byte gets qh's byte j / 8, keeps bit j % 8, and becomes 0xFF where it was set.
LMARITH_AVX2 inline __m256i fifth_bits_avx2(uint32_t qh) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int32_t>(qh)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// The 32 six-bit quants of q6_k's part `part` (0-3) of half `half` (0-1) of a super-block:
// weights 128 * half + 32 * part + l, in ggml's dequantize_row_q6_K order.
LMARITH_AVX2 inline __m256i q6_quants_avx2(const uint8_t* block, int half, int part) {
  const uint8_t* ql = block + 64 * half + (part & 1) * 32;
  const uint8_t* qh = block + 128 + 32 * half;
  const __m256i low4 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
  const __m256i high2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
  const __m256i low = _mm256_and_si256(_mm256_srli_epi16(low4, (part / 2) * 4), _mm256_set1_epi8(0x0F));
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(high2, 2 * part), _mm256_set1_epi8(3));
  return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
}

}  // namespace quant
}  // namespace lmarith
