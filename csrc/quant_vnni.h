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

// Weight rows whose sums are reduced together: a kernel parks its rows' 16-lane sums, and
// one transposing tree (~45 ops) turns 16 of them into 16 outputs with one store, where a
// horizontal sum and a scalar store per output took ~12 each (M = 16 q4_1 ~8% faster on a
// Zen 4 host; M = 1, bound by streaming the weights, unchanged).
constexpr int kGroup = 16;

// parked[r * kGroup] = acc[r] with tail[r] and lane r of `offsets` times offset_factor added
// into lane 0 (the kernels' per-row scalars ride along into the tree). One explicit fma for
// all rows: left to the compiler, a scalar a * b + c was fused in some tile heights and not
// in others, and a row's output changed with its batch (tested).
template <int R>
LMARITH_VNNI inline void park_vnni(const __m512* acc, const float* tail, __m256 offsets,
                                   float offset_factor, __m512* parked) {
  alignas(32) float lanes[kTile] = {};
  for (int r = 0; r < R; ++r) lanes[r] = tail[r];
  _mm256_store_ps(lanes, _mm256_fmadd_ps(_mm256_set1_ps(offset_factor), offsets, _mm256_load_ps(lanes)));
  for (int r = 0; r < R; ++r)
    parked[r * kGroup] = _mm512_mask_add_ps(acc[r], 1, acc[r], _mm512_set1_ps(lanes[r]));
}

// Lane j of the result = the sum of v[j]'s 16 lanes: pairs interleaved and added (floats, then
// 64-bit pairs), then the 128-bit quarters transposed and added; every output sums its lanes
// in the same order wherever it sits in the group.
LMARITH_VNNI inline __m512 sum16_vnni(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int k = 0; k < 8; ++k)
    pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                             _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
    quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// A VNNI row kernel: one weight row against a tile of R rows, parking its sums (park_vnni).
template <int R>
using ParkingKernel = void (*)(const uint8_t* row, const ActTile& tile, int64_t num_blocks,
                               __m512* parked);

// A TileDot's loop for tile height R: weight rows 16 at a time through KERNEL, then the
// tree, out[r * stride + i] for the group's rows (a short last group padded with zeros).
template <int R, ParkingKernel<R> KERNEL>
LMARITH_VNNI inline void rows_vnni(const uint8_t* rows, int64_t row_bytes, int64_t count,
                                   const ActTile& tile, int64_t num_blocks, float* out,
                                   int64_t stride) {
  __m512 parked[R * kGroup];
  for (int64_t first = 0; first < count; first += kGroup) {
    const int group = static_cast<int>(count - first < kGroup ? count - first : kGroup);
    for (int i = 0; i < group; ++i) KERNEL(rows + (first + i) * row_bytes, tile, num_blocks, parked + i);
    for (int i = group; i < kGroup; ++i)
      for (int r = 0; r < R; ++r) parked[r * kGroup + i] = _mm512_setzero_ps();
    const __mmask16 mask = static_cast<__mmask16>((1u << group) - 1);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(out + r * stride + first, mask, sum16_vnni(parked + r * kGroup));
  }
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
