// The AVX512-VNNI building blocks quant_matmul's VNNI kernels share (the 32-block formats in
// csrc/quant_matmul_vnni.cpp, the K-quants in csrc/quant_matmul_vnni_kquants.cpp): a block
// pair per zmm (lanes 0-7 block b, 8-15 block b + 1), one fp32 zmm accumulator per
// activation row. Include only from files compiled for x86; every function carries its own
// target attribute.
#pragma once

#include <immintrin.h>

#include "quant_avx2.h"   // AVX2 helpers (fifth bits, q6_k quants) inline into VNNI functions
#include "quant_matmul.h"

#define LMARITH_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace lmarith {
namespace quant {

LMARITH_VNNI inline float half_vnni(const uint8_t* bytes) { return _cvtsh_ss(load_u16(bytes)); }

LMARITH_VNNI inline __m512i join_vnni(__m256i low, __m256i high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

// 32 packed nibble bytes -> 64 u8: the low nibbles in the low 256 bits, the high ones above.
LMARITH_VNNI inline __m512i nibble_halves_vnni(__m256i packed) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  return join_vnni(_mm256_and_si256(packed, mask),
                   _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask));
}

// Two blocks' fp16 scales (at `first`, `second`) as floats, one per 8-lane half: two word
// broadcasts and one conversion.
LMARITH_VNNI inline __m512 half_pair_vnni(const uint8_t* first, const uint8_t* second) {
  const __m256i halves = _mm256_mask_set1_epi16(_mm256_set1_epi16(static_cast<int16_t>(load_u16(first))),
                                                0xFF00, static_cast<int16_t>(load_u16(second)));
  return _mm512_cvtph_ps(halves);
}

// `first` in lanes 0-7, `second` in 8-15: two blocks' float factors for one pair step.
LMARITH_VNNI inline __m512 pair_of(float first, float second) {
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(first), _mm512_set1_ps(second));
}

// The 8-lane halves of a pair's scales.
LMARITH_VNNI inline __m256 low_half(__m512 v) { return _mm512_castps512_ps256(v); }
LMARITH_VNNI inline __m256 high_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

LMARITH_VNNI inline const int8_t* x_at(const ActTile& tile, int r, int64_t b) {
  return tile.q + r * tile.k + b * kActBlock;
}

// acc[r] += dots[r] * (the pair's weight scales times row r's d_x of blocks b, b + 1).
template <int R>
LMARITH_VNNI inline void scale_add_vnni(__m512* acc, const __m512i* dots, __m512 w_scales,
                                        const ActTile& tile, int64_t b) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 x_scales = _mm512_loadu_ps(tile.d_wide + (r * tile.nb + b) * 8);
    const __m512 scale = _mm512_mul_ps(w_scales, x_scales);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
  }
}

// out[r * stride] = the sum of acc[r], tail[r] and lane r of `offsets` times offset_factor.
template <int R>
LMARITH_VNNI inline void store_vnni(const __m512* acc, const float* tail, __m256 offsets,
                                    float offset_factor, float* out, int64_t stride) {
  alignas(32) float lanes[kTile];
  _mm256_store_ps(lanes, offsets);
  for (int r = 0; r < R; ++r)
    out[r * stride] = _mm512_reduce_add_ps(acc[r]) + tail[r] + offset_factor * lanes[r];
}

// The tile's offset terms of block b, c * (d_x * sum_x) per row (lane): c is q4_1's min, or
// q4_0's d (the -8 is applied once at the end, exactly, as a power of two).
LMARITH_VNNI inline __m256 offsets_vnni(__m256 acc, __m256 c, const ActTile& tile, int64_t b) {
  return _mm256_fmadd_ps(c, _mm256_loadu_ps(tile.dsum_t + b * kTile), acc);
}

// The same for blocks b, b + 1 at once (c: block b's in lanes 0-7, b + 1's in 8-15, as
// dsum_t lays them out): one fma a pair, so the offsets' dependency chain is one fma long
// per pair, not two (at R = 1 that chain bounded the kernel). fold_offsets sums the halves.
LMARITH_VNNI inline __m512 offsets_pair_vnni(__m512 acc, __m512 c, const ActTile& tile, int64_t b) {
  return _mm512_fmadd_ps(c, _mm512_loadu_ps(tile.dsum_t + b * kTile), acc);
}

LMARITH_VNNI inline __m256 fold_offsets(__m512 pair_offsets) {
  return _mm256_add_ps(low_half(pair_offsets), high_half(pair_offsets));
}

}  // namespace quant
}  // namespace lmarith
