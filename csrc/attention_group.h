// AVX512 tiles of csrc/paged_attention.cpp for a group of up to kGroupLanes lanes (query
// vectors of one kv head that see the same keys, e.g. a decode row's GQA group): every K and
// V row is loaded (and, for a bfloat16 cache, widened in registers) once for the whole group
// instead of once per lane, and no widened copy of the tile is written. head_dim must be a
// multiple of 16; other shapes, and builds without AVX512, take attention_simd.h's per-lane
// path.
#pragma once

#include <cstdint>

#include "attention_simd.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lmarith {
namespace attention {

constexpr int64_t kGroupLanes = 3;  // 3 lanes x 8 keys = 24 score accumulators in registers

// The next tile's rows (K or V), prefetched a few at a time from inside this tile's loops:
// one burst of a whole tile's requests fills the core's miss buffers and stalls it, so the
// reads from DRAM would not overlap the arithmetic.
struct Ahead {
  const void* const* rows = nullptr;
  int64_t count = 0, bytes = 0;
  void fetch(int64_t from, int64_t to) const {
    for (int64_t t = from; t < to && t < count; ++t) {
      const char* row = static_cast<const char*>(rows[t]);
      for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(row + byte, 0, 2);
    }
  }
};

#if defined(__AVX512F__)
constexpr bool kHasGroupTiles = true;

// 16 elements of a float32 or bfloat16 row, as floats (bfloat16 is the top half of a float).
inline __m512 load16(const float* row) { return _mm512_loadu_ps(row); }
inline __m512 load16(const uint16_t* row) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// The largest and the sum of x[0, count), with whole-vector reductions (a serial chain of
// scalar adds, what the compiler made of the loop, cost more than the tile's exps).
inline __mmask16 tail_mask(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }
inline float max_of(const float* x, int64_t count) {
  __m512 top = _mm512_set1_ps(-__builtin_inff());
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(x + i));
  if (i < count) top = _mm512_mask_max_ps(top, tail_mask(count - i), top, _mm512_maskz_loadu_ps(tail_mask(count - i), x + i));
  return _mm512_reduce_max_ps(top);
}
inline float sum_of(const float* x, int64_t count) {
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(x + i));
  if (i < count) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(tail_mask(count - i), x + i));
  return _mm512_reduce_add_ps(sum);
}

// out[i] = sum of the 16 floats of v[i], for 8 vectors (the additions in reduce16's order).
inline __m256 reduce8(const __m512* v) {
  __m512 quads[2];
  reduce_quads<8>(v, quads);
  const __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                 _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(z, z, 0x08), _mm512_shuffle_f32x4(z, z, 0x0D));
  return _mm512_castps512_ps256(sums);
}

// scores[l * stride + t] = queries[l] . keys[t] for Lanes lanes and t < count (stride has
// room for count rounded up to 8).
template <typename Cache, int Lanes>
void score_group(const float* queries, const void* const* keys, int64_t count, int64_t dim,
                 float* scores, int64_t stride, const Ahead& ahead) {
  int64_t t0 = 0;
  for (; t0 < count; t0 += 8) {
    ahead.fetch(t0, t0 + 8);
    const Cache* rows[8];
    for (int64_t t = 0; t < 8; ++t) rows[t] = static_cast<const Cache*>(keys[t0 + t < count ? t0 + t : t0]);
    __m512 acc[Lanes][8];
    for (int l = 0; l < Lanes; ++l)
      for (int t = 0; t < 8; ++t) acc[l][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += 16)
      for (int t = 0; t < 8; ++t) {
        const __m512 key = load16(rows[t] + c);
        for (int l = 0; l < Lanes; ++l)
          acc[l][t] = _mm512_fmadd_ps(_mm512_loadu_ps(queries + l * dim + c), key, acc[l][t]);
      }
    for (int l = 0; l < Lanes; ++l) _mm256_storeu_ps(scores + l * stride + t0, reduce8(acc[l]));
  }
  ahead.fetch(t0, ahead.count);
}

// Floats [c, c + 16 * Chunks) of each lane's accumulator: acc = acc * alpha + weights . V.
template <typename Cache, int Lanes, int Chunks>
void accumulate_chunks(float* acc, const float* alpha, const float* weights, int64_t stride,
                       const void* const* values, int64_t count, int64_t dim, int64_t c,
                       const Ahead& ahead) {
  __m512 sums[Lanes][Chunks];
  for (int l = 0; l < Lanes; ++l)
    for (int j = 0; j < Chunks; ++j)
      sums[l][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + l * dim + c + 16 * j), _mm512_set1_ps(alpha[l]));
  for (int64_t t = 0; t < count; ++t) {
    ahead.fetch(t, t + 1);
    const Cache* row = static_cast<const Cache*>(values[t]) + c;
    __m512 weight[Lanes];
    for (int l = 0; l < Lanes; ++l) weight[l] = _mm512_set1_ps(weights[l * stride + t]);
    for (int j = 0; j < Chunks; ++j) {
      const __m512 value = load16(row + 16 * j);
      for (int l = 0; l < Lanes; ++l) sums[l][j] = _mm512_fmadd_ps(weight[l], value, sums[l][j]);
    }
  }
  for (int l = 0; l < Lanes; ++l)
    for (int j = 0; j < Chunks; ++j) _mm512_storeu_ps(acc + l * dim + c + 16 * j, sums[l][j]);
  ahead.fetch(count, ahead.count);
}

// Each lane's acc (dim floats, lanes contiguous) = acc * alpha[l] + sum_t weights[l][t] * V[t]
// (`ahead` is fetched during the first pass over the rows).
template <typename Cache, int Lanes>
void accumulate_group(float* acc, const float* alpha, const float* weights, int64_t stride,
                      const void* const* values, int64_t count, int64_t dim, const Ahead& ahead) {
  const Ahead none;
  int64_t c = 0;
  for (; c + 64 <= dim; c += 64)
    accumulate_chunks<Cache, Lanes, 4>(acc, alpha, weights, stride, values, count, dim, c,
                                       c == 0 ? ahead : none);
  for (; c < dim; c += 16)
    accumulate_chunks<Cache, Lanes, 1>(acc, alpha, weights, stride, values, count, dim, c,
                                       c == 0 ? ahead : none);
}

// score_group / accumulate_group for a run-time lane count in [1, kGroupLanes].
template <typename Cache>
void score_lanes(int64_t lanes, const float* queries, const void* const* keys, int64_t count,
                 int64_t dim, float* scores, int64_t stride, const Ahead& ahead) {
  if (lanes == 3) return score_group<Cache, 3>(queries, keys, count, dim, scores, stride, ahead);
  if (lanes == 2) return score_group<Cache, 2>(queries, keys, count, dim, scores, stride, ahead);
  score_group<Cache, 1>(queries, keys, count, dim, scores, stride, ahead);
}

template <typename Cache>
void accumulate_lanes(int64_t lanes, float* acc, const float* alpha, const float* weights,
                      int64_t stride, const void* const* values, int64_t count, int64_t dim,
                      const Ahead& ahead) {
  if (lanes == 3)
    return accumulate_group<Cache, 3>(acc, alpha, weights, stride, values, count, dim, ahead);
  if (lanes == 2)
    return accumulate_group<Cache, 2>(acc, alpha, weights, stride, values, count, dim, ahead);
  accumulate_group<Cache, 1>(acc, alpha, weights, stride, values, count, dim, ahead);
}
#else
constexpr bool kHasGroupTiles = false;

inline float max_of(const float* x, int64_t count) {
  float top = -__builtin_inff();
  for (int64_t i = 0; i < count; ++i) top = x[i] > top ? x[i] : top;
  return top;
}
inline float sum_of(const float* x, int64_t count) {
  float sum = 0.0f;
  for (int64_t i = 0; i < count; ++i) sum += x[i];
  return sum;
}

template <typename Cache>
void score_lanes(int64_t, const float*, const void* const*, int64_t, int64_t, float*, int64_t,
                 const Ahead&) {}
template <typename Cache>
void accumulate_lanes(int64_t, float*, const float*, const float*, int64_t, const void* const*,
                      int64_t, int64_t, const Ahead&) {}
#endif

}  // namespace attention
}  // namespace lmarith
