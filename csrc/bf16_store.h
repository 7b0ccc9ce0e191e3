// How bf16_matmul (csrc/bf16_matmul.cpp) rounds to bfloat16 and writes a tile of outputs:
// round to nearest even as torch's .to(bfloat16), a whole 16-column block with AVX-512 (at
// prefill's row counts the scalar loop cost as much as the tiles' multiply-adds).
#pragma once

#include <algorithm>
#include <cstdint>

#include "bf16_matmul.h"
#include "cpu_features.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lmarith {
namespace bf16 {

// float -> bf16 bits, round to nearest even (NaN stays a quiet NaN), as torch's .to(bfloat16).
using detail::float_to_bf16;

#if defined(__x86_64__) || defined(__i386__)
// float_to_bf16 of 16 floats at once, bit for bit.
__attribute__((target("avx512f"))) inline __m256i narrow16(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

__attribute__((target("avx512f"))) inline void narrow16_store(const float* values, uint16_t* bits) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits), narrow16(_mm512_loadu_ps(values)));
}

// store_tile of one whole block (16 columns).
__attribute__((target("avx512f"))) inline void store_block16(
    const float* acc, int rows, int64_t row0, int64_t col0, int64_t n, const float* bias,
    void* out, LogitsDtype out_dtype) {
  const __m512 offset = bias != nullptr ? _mm512_loadu_ps(bias + col0) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    const __m512 value = _mm512_add_ps(_mm512_loadu_ps(acc + r * kBf16Block), offset);
    const int64_t at = (row0 + r) * n + col0;
    if (out_dtype == LogitsDtype::kBFloat16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + at), narrow16(value));
    else
      _mm512_storeu_ps(static_cast<float*>(out) + at, value);
  }
}
#endif

// values[0, count) -> bf16 bits (float_to_bf16), 16 at a time where the CPU has AVX-512.
inline void narrow_row(const float* values, int64_t count, uint16_t* bits) {
  int64_t j = 0;
#if defined(__x86_64__) || defined(__i386__)
  if (cpu::has_avx512f())
    for (; j + 16 <= count; j += 16) narrow16_store(values + j, bits + j);
#endif
  for (; j < count; ++j) bits[j] = float_to_bf16(values[j]);
}

// A tile's acc [rows][16] (+ bias) into out's rows [row0, row0 + rows), columns from col0.
inline void store_tile(const float* acc, int rows, int64_t row0, int64_t col0, int64_t n,
                       const float* bias, void* out, LogitsDtype out_dtype) {
  const int64_t width = std::min(kBf16Block, n - col0);
#if defined(__x86_64__) || defined(__i386__)
  if (width == kBf16Block && cpu::has_avx512f())
    return store_block16(acc, rows, row0, col0, n, bias, out, out_dtype);
#endif
  for (int r = 0; r < rows; ++r) {
    const int64_t at = (row0 + r) * n + col0;
    for (int64_t l = 0; l < width; ++l) {
      const float value = acc[r * kBf16Block + l] + (bias != nullptr ? bias[col0 + l] : 0.0f);
      if (out_dtype == LogitsDtype::kBFloat16)
        static_cast<uint16_t*>(out)[at + l] = float_to_bf16(value);
      else
        static_cast<float*>(out)[at + l] = value;
    }
  }
}

}  // namespace bf16
}  // namespace lmarith
