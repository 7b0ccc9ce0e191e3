// SIMD pieces of csrc/paged_attention.cpp's per-lane path (one query vector at a time:
// head_dim not a multiple of 16, builds without AVX512, or LMARITH_ATTENTION_GROUPS=0):
// bfloat16 <-> float, q.k scores of a tile of keys and the weighted V accumulation, with
// AVX512 paths and plain loops the compiler vectorises.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace lmarith {
namespace attention {

using detail::bits_float;
using detail::float_bits;

using detail::bf16_to_float;
using detail::float_to_bf16;

// One element of a float32 (kFloat32) or bfloat16 (kBFloat16) buffer, as float.
inline float load(const void* base, AttnDtype dtype, int64_t index) {
  if (dtype == AttnDtype::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

#if defined(__AVX512F__)
// The first two stages of reducing N vectors of 16 floats (N a multiple of 4): pairs within
// 128-bit lanes, then quads; quads[i] lane k, element j is lane k's partial sum of v[4i + j].
template <int N>
inline void reduce_quads(const __m512* v, __m512* quads) {
  __m512 pairs[N / 2];
  for (int i = 0; i < N / 2; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < N / 4; ++i) {
    const __m512d c = _mm512_castps_pd(pairs[2 * i]), d = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
}

// out[i] = sum of the 16 floats of v[i], for 16 vectors at once (45 shuffles and adds
// instead of 16 serial horizontal reductions): reduce_quads, then across the four lanes.
inline __m512 reduce16(const __m512* v) {
  __m512 quads[4];
  reduce_quads<16>(v, quads);
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// scores[0, 16) = q . keys[t] for 16 keys (dim a multiple of 16). With head_dim % 16 == 0
// the grouped tiles (attention_group.h) run instead, so on AVX512 builds this per-lane code
// is the LMARITH_ATTENTION_GROUPS=0 baseline of A/B runs (tested in a child pytest).
inline void score16(const float* q, const float* const* keys, int64_t dim, float* scores) {
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < dim; c += 16) {
    const __m512 qc = _mm512_loadu_ps(q + c);
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(keys[t] + c), acc[t]);
  }
  _mm512_storeu_ps(scores, reduce16(acc));
}
#endif

// scores[t] = q . keys[t] for t < count (dim floats each); scores has room for 16 more.
inline void score_keys(const float* q, const float* const* keys, int64_t count, int64_t dim,
                       float* scores) {
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    const float* padded[16];
    for (int64_t t0 = 0; t0 < count; t0 += 16) {
      for (int64_t t = 0; t < 16; ++t) padded[t] = keys[t0 + t < count ? t0 + t : t0];
      score16(q, padded, dim, scores + t0);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < count; ++t) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < dim; ++d) sum += q[d] * keys[t][d];
    scores[t] = sum;
  }
}

#if defined(__AVX512F__)
// accumulate_values on floats [c, c + 64) of acc: four chunks in registers, two
// accumulators each (even and odd rows), so no FMA waits on the previous one.
inline void accumulate64(float* acc, float alpha, const float* weights,
                         const float* const* values, int64_t c, int64_t count) {
  __m512 even[4], odd[4];
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int j = 0; j < 4; ++j)
    even[j] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * j), scale), odd[j] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 1 < count; t += 2) {
    const __m512 w0 = _mm512_set1_ps(weights[t]), w1 = _mm512_set1_ps(weights[t + 1]);
    for (int j = 0; j < 4; ++j) {
      even[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values[t] + c + 16 * j), even[j]);
      odd[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(values[t + 1] + c + 16 * j), odd[j]);
    }
  }
  if (t < count) {
    const __m512 w0 = _mm512_set1_ps(weights[t]);
    for (int j = 0; j < 4; ++j)
      even[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values[t] + c + 16 * j), even[j]);
  }
  for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + 16 * j, _mm512_add_ps(even[j], odd[j]));
}

// The same on one 16-float chunk (head_dim not a multiple of 64), four accumulators.
inline void accumulate16(float* acc, float alpha, const float* weights,
                         const float* const* values, int64_t c, int64_t count) {
  __m512 parts[4] = {_mm512_mul_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(alpha)),
                     _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t t = 0; t < count; ++t)
    parts[t & 3] = _mm512_fmadd_ps(_mm512_set1_ps(weights[t]), _mm512_loadu_ps(values[t] + c),
                                   parts[t & 3]);
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_add_ps(parts[0], parts[1]),
                                      _mm512_add_ps(parts[2], parts[3])));
}
#endif

// acc = acc * alpha + sum_t weights[t] * values[t] (dim floats each).
inline void accumulate_values(float* acc, float alpha, const float* weights,
                              const float* const* values, int64_t count, int64_t dim) {
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    int64_t c = 0;
    for (; c + 64 <= dim; c += 64) accumulate64(acc + c, alpha, weights, values, c, count);
    for (; c < dim; c += 16) accumulate16(acc + c, alpha, weights, values, c, count);
    return;
  }
#endif
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) acc[d] *= alpha;
  for (int64_t t = 0; t < count; ++t) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += weights[t] * values[t][d];
  }
}

}  // namespace attention
}  // namespace lmarith
