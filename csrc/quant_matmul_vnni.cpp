// quant_matmul's AVX512-VNNI kernels of the 32-block formats (driver: csrc/quant_matmul.cpp;
// shared building blocks: csrc/quant_vnni.h; the K-quants: csrc/quant_matmul_vnni_kquants.cpp;
// AVX2 kernels and the CPU detection: csrc/quant_matmul_x86.cpp). _mm512_dpbusd_epi32 (u8 x s8, four products summed
// into i32) takes two blocks per step (lanes 0-7 the first block, 8-15 the second), and
// _mm256_dpbusd_epi32 an odd tail; the integer dots are exact. The unsigned operand is the
// weight's nibbles (q4_0 / q4_1: the -8 or the min go through the activation block sums; q5
// adds the fifth bits and -16) or, for q8_0, |w| with the sign moved onto the activations.
// A kernel takes one weight row and a tile of R activation rows (ActTile): each pair of
// blocks is loaded and unpacked once and applied to the R rows, whose fp32 accumulators (one
// zmm each) stay in registers; the per-block offset terms of all R rows go in one ymm.
#include "quant_matmul.h"

#if defined(__x86_64__) || defined(__i386__)
#include "quant_vnni.h"

namespace lmarith {
namespace quant {
namespace {

// 16 nibble bytes -> 32 u8 in weight order (low nibbles = weights 0-15, high = 16-31).
LMARITH_VNNI inline __m256i nibbles_vnni(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  return _mm256_set_m128i(high, _mm_and_si128(packed, mask));
}

// Two consecutive q4 / q5 blocks' quants as 64 u8 in weight order (the first block in bytes
// 0-31): both blocks' nibble bytes unpacked in one ymm, then their 128-bit quarters put in
// order; with kFive, 16 added where the blocks' 64 fifth bits (one mask) are set.
template <bool kFive>
LMARITH_VNNI inline __m512i quant_pair_vnni(const uint8_t* block, int64_t bytes, int64_t qh,
                                            int64_t qs) {
  const __m256i packed = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + qs))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + bytes + qs)), 1);
  const __m512i halves = nibble_halves_vnni(packed);
  const __m512i quants = _mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0));
  if (!kFive) return quants;
  const __mmask64 fifth = static_cast<__mmask64>(load_u32(block + qh)) |
                          static_cast<__mmask64>(load_u32(block + bytes + qh)) << 32;
  return _mm512_mask_add_epi8(quants, fifth, quants, _mm512_set1_epi8(16));
}

LMARITH_VNNI inline float hsum_vnni(__m256i v) {
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
  return static_cast<float>(_mm_cvtsi128_si32(sum));
}

// q8_0's odd last block for each row: |w| times x with w's sign, 256-bit form.
template <int R>
LMARITH_VNNI inline void q8_0_tail(const uint8_t* block, const ActTile& tile, int64_t b,
                                   float* tail) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  const __m256i magnitude = _mm256_sign_epi8(w, w);
  const float d = half_vnni(block);
  for (int r = 0; r < R; ++r) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_at(tile, r, b)));
    const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude,
                                            _mm256_sign_epi8(x, w));
    tail[r] = d * tile.d[r * tile.nb + b] * hsum_vnni(dot);
  }
}

template <int R>
LMARITH_VNNI inline void q8_0_vnni(const uint8_t* row, const ActTile& tile,
                            int64_t num_blocks, __m512* parked) {
  __m512 acc[R];
  float tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= num_blocks; b += 2) {
    const uint8_t* block = row + b * 34;
    prefetch_weights(block);
    const __m512i w = join_vnni(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2)),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 36)));
    const __mmask64 negative = _mm512_movepi8_mask(w);
    const __m512i magnitude = _mm512_abs_epi8(w);
    __m512i dots[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_loadu_si512(x_at(tile, r, b));
      const __m512i signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
      dots[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, signed_x);
    }
    scale_add_vnni<R>(acc, dots, half_pair_vnni(block, block + 34), tile, b);
  }
  if (b < num_blocks) q8_0_tail<R>(row + b * 34, tile, b, tail);
  park_vnni<R>(acc, tail, _mm256_setzero_ps(), 0.0f, parked);
}

// A q4 block's 32 quants as u8; with kFive, q5's, whose fifth bits are the 4 bytes at qh.
template <bool kFive>
LMARITH_VNNI inline __m256i quants_vnni(const uint8_t* block, int64_t qh, int64_t qs) {
  const __m256i nibbles = nibbles_vnni(block + qs);
  return kFive ? _mm256_or_si256(nibbles, fifth_bits_avx2(load_u32(block + qh))) : nibbles;
}

// q4 / q5's odd last block for each row (its offset term goes through offsets_vnni).
template <bool kFive, int R>
LMARITH_VNNI inline void q4_tail(const uint8_t* block, int64_t qh, int64_t qs,
                                 const ActTile& tile, int64_t b, float* tail) {
  const __m256i u = quants_vnni<kFive>(block, qh, qs);
  const float d = half_vnni(block);
  for (int r = 0; r < R; ++r) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_at(tile, r, b)));
    const float dot = hsum_vnni(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x));
    tail[r] = d * tile.d[r * tile.nb + b] * dot;
  }
}

// q4_0 (kHasMin false: w = d * (q - 8)) and q4_1 (true: w = d * q + m); with kFive, q5_0
// (w = d * (q - 16)) and q5_1, whose 4 bytes of fifth bits precede the nibbles.
template <bool kHasMin, bool kFive, int R>
LMARITH_VNNI inline void q4_vnni(const uint8_t* row, const ActTile& tile,
                            int64_t num_blocks, __m512* parked) {
  using Layout = NibbleLayout<kHasMin, kFive>;
  constexpr int64_t kQh = Layout::kQh, kQs = Layout::kQs, kBytes = Layout::kBytes;
  __m512 acc[R];
  float tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512 pair_offsets = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= num_blocks; b += 2) {
    const uint8_t* block = row + b * kBytes;
    prefetch_weights(block);
    const __m512i u = quant_pair_vnni<kFive>(block, kBytes, kQh, kQs);
    __m512i dots[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      dots[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u,
                                    _mm512_loadu_si512(x_at(tile, r, b)));
    const __m512 scales = half_pair_vnni(block, block + kBytes);
    scale_add_vnni<R>(acc, dots, scales, tile, b);
    const __m512 c = kHasMin ? half_pair_vnni(block + 2, block + kBytes + 2) : scales;
    pair_offsets = offsets_pair_vnni(pair_offsets, c, tile, b);
  }
  __m256 offsets = fold_offsets(pair_offsets);
  if (b < num_blocks) {
    const uint8_t* block = row + b * kBytes;
    q4_tail<kFive, R>(block, kQh, kQs, tile, b, tail);
    offsets = offsets_vnni(offsets, _mm256_set1_ps(half_vnni(kHasMin ? block + 2 : block)), tile, b);
  }
  park_vnni<R>(acc, tail, offsets, Layout::kOffsetFactor, parked);
}

#define LMARITH_CALL_Q8_0(R) rows_vnni<R, q8_0_vnni<R>>(rows, row_bytes, count, tile, num_blocks, out, stride)
#define LMARITH_CALL_Q4(R) \
  rows_vnni<R, q4_vnni<kHasMin, kFive, R>>(rows, row_bytes, count, tile, num_blocks, out, stride)

// The TileDots: the tile height picked at run time, once per call.
LMARITH_VNNI void q8_0_tile_vnni(const uint8_t* rows, int64_t row_bytes, int64_t count,
                                 const ActTile& tile, int64_t num_blocks, float* out,
                                 int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q8_0)
}

template <bool kHasMin, bool kFive>
LMARITH_VNNI void q4_tile_vnni(const uint8_t* rows, int64_t row_bytes, int64_t count,
                               const ActTile& tile, int64_t num_blocks, float* out,
                               int64_t stride) {
  LMARITH_TILE_SWITCH(tile.rows, LMARITH_CALL_Q4)
}

}  // namespace

TileDot vnni_tile_dot(QuantType qtype) {
  switch (qtype) {
    case QuantType::kQ8_0: return q8_0_tile_vnni;
    case QuantType::kQ4_0: return q4_tile_vnni<false, false>;
    case QuantType::kQ4_1: return q4_tile_vnni<true, false>;
    case QuantType::kQ5_0: return q4_tile_vnni<false, true>;
    case QuantType::kQ5_1: return q4_tile_vnni<true, true>;
    default: return vnni_kquant_tile_dot(qtype);
  }
}

}  // namespace quant
}  // namespace lmarith

#else  // not x86: the scalar kernels only

namespace lmarith {
namespace quant {
TileDot vnni_tile_dot(QuantType) { return nullptr; }
}  // namespace quant
}  // namespace lmarith

#endif
