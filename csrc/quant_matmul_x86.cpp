// quant_matmul's x86 kernels (driver and scalar path: csrc/quant_matmul.cpp). Each function
// carries its own target attribute and the driver picks one at run time from
// __builtin_cpu_supports, so a portable build (LMARITH_PORTABLE, no -march=native) still uses
// them. Per 32-block the int8 dot is exact:
//   AVX2: _mm256_maddubs_epi16 (u8 x s8 -> pairs of i16, at most 2 * 128 * 127 < 2^15 for
//         our operands) then _mm256_madd_epi16 with ones -> 8 x i32; one block per step.
//   VNNI: _mm512_dpbusd_epi32 (u8 x s8, four products summed into i32), two blocks per step
//         (lanes 0-7 the first block, 8-15 the second), _mm256_dpbusd_epi32 for an odd tail.
// The unsigned operand is the weight's nibbles (q4_0 / q4_1: the -8 or the min go through the
// activation block sums) or, for q8_0, |w| with the sign moved onto the activations.
// q4_k / q6_k have no SIMD kernels yet (the scalar ones, auto-vectorised, run on every path).
#include "quant_matmul.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define LMARITH_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LMARITH_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace lmarith {
namespace quant {
namespace {

// ---- AVX2 ----------------------------------------------------------------------------------

LMARITH_AVX2 inline float half_avx2(const uint8_t* bytes) { return _cvtsh_ss(load_u16(bytes)); }

// 16 nibble bytes -> 32 u8 in weight order (low nibbles = weights 0-15, high = 16-31).
LMARITH_AVX2 inline __m256i nibbles_avx2(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  return _mm256_set_m128i(high, _mm_and_si128(packed, mask));
}

// 8 x i32 partial sums of u8 u times s8 at x.
LMARITH_AVX2 inline __m256i dot_avx2(__m256i u, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), _mm256_set1_epi16(1));
}

LMARITH_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
}

LMARITH_AVX2 float q8_0_avx2(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * 34;
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.q + b * kActBlock));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    const __m256i dot = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    const __m256 scale = _mm256_set1_ps(half_avx2(block) * act.d[b]);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
  }
  return hsum_avx2(acc);
}

// q4_0 (kHasMin false: w = d * (q - 8)) and q4_1 (true: w = d * q + m).
template <bool kHasMin>
LMARITH_AVX2 float q4_avx2(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  constexpr int64_t kBytes = kHasMin ? 20 : 18, kQs = kHasMin ? 4 : 2;
  __m256 acc = _mm256_setzero_ps();
  float offsets = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = row + b * kBytes;
    const __m256i dot = dot_avx2(nibbles_avx2(block + kQs), act.q + b * kActBlock);
    const float scale = half_avx2(block) * act.d[b];
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
    const float sum = static_cast<float>(act.sum[b]);
    offsets += kHasMin ? half_avx2(block + 2) * act.d[b] * sum : -8.0f * scale * sum;
  }
  return hsum_avx2(acc) + offsets;
}

// ---- AVX512-VNNI ---------------------------------------------------------------------------

LMARITH_VNNI inline float half_vnni(const uint8_t* bytes) { return _cvtsh_ss(load_u16(bytes)); }

LMARITH_VNNI inline __m256i nibbles_vnni(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  return _mm256_set_m128i(high, _mm_and_si128(packed, mask));
}

LMARITH_VNNI inline __m512i join_vnni(__m256i low, __m256i high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

// Two blocks' scales, one per 8-lane half.
LMARITH_VNNI inline __m512 pair_scale(float first, float second) {
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(first), _mm512_set1_ps(second));
}

LMARITH_VNNI inline float hsum_vnni(__m256i v) {
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
  return static_cast<float>(_mm_cvtsi128_si32(sum));
}

// q8_0's signed x signed dot as unsigned x signed: |w| times x with w's sign.
LMARITH_VNNI inline __m512i signed_dot512(__m512i w, __m512i x) {
  const __mmask64 negative = _mm512_movepi8_mask(w);
  const __m512i signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), signed_x);
}

LMARITH_VNNI float q8_0_vnni(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= num_blocks; b += 2) {
    const uint8_t* block = row + b * 34;
    const __m512i w = join_vnni(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2)),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 36)));
    const __m512i x = _mm512_loadu_si512(act.q + b * kActBlock);
    const __m512 scale = pair_scale(half_vnni(block) * act.d[b], half_vnni(block + 34) * act.d[b + 1]);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(signed_dot512(w, x)), scale, acc);
  }
  float total = _mm512_reduce_add_ps(acc);
  if (b < num_blocks) {  // odd tail: one block with the 256-bit form
    const uint8_t* block = row + b * 34;
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.q + b * kActBlock));
    const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w),
                                            _mm256_sign_epi8(x, w));
    total += half_vnni(block) * act.d[b] * hsum_vnni(dot);
  }
  return total;
}

template <bool kHasMin>
LMARITH_VNNI float q4_vnni(const uint8_t* row, const ActRow& act, int64_t num_blocks) {
  constexpr int64_t kBytes = kHasMin ? 20 : 18, kQs = kHasMin ? 4 : 2;
  __m512 acc = _mm512_setzero_ps();
  float offsets = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= num_blocks; b += 2) {
    const uint8_t* block = row + b * kBytes;
    const __m512i u = join_vnni(nibbles_vnni(block + kQs), nibbles_vnni(block + kBytes + kQs));
    const __m512i x = _mm512_loadu_si512(act.q + b * kActBlock);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);
    const float first = half_vnni(block) * act.d[b];
    const float second = half_vnni(block + kBytes) * act.d[b + 1];
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), pair_scale(first, second), acc);
    const float sum0 = static_cast<float>(act.sum[b]), sum1 = static_cast<float>(act.sum[b + 1]);
    offsets += kHasMin ? half_vnni(block + 2) * act.d[b] * sum0 +
                             half_vnni(block + kBytes + 2) * act.d[b + 1] * sum1
                       : -8.0f * (first * sum0 + second * sum1);
  }
  float total = _mm512_reduce_add_ps(acc) + offsets;
  if (b < num_blocks) {  // odd tail
    const uint8_t* block = row + b * kBytes;
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.q + b * kActBlock));
    const float dot = hsum_vnni(_mm256_dpbusd_epi32(_mm256_setzero_si256(),
                                                   nibbles_vnni(block + kQs), x));
    const float scale = half_vnni(block) * act.d[b], sum = static_cast<float>(act.sum[b]);
    total += scale * dot + (kHasMin ? half_vnni(block + 2) * act.d[b] * sum : -8.0f * scale * sum);
  }
  return total;
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

RowDot avx2_row_dot(QuantType qtype) {
  switch (qtype) {
    case QuantType::kQ8_0: return q8_0_avx2;
    case QuantType::kQ4_0: return q4_avx2<false>;
    case QuantType::kQ4_1: return q4_avx2<true>;
    default: return nullptr;
  }
}

RowDot vnni_row_dot(QuantType qtype) {
  switch (qtype) {
    case QuantType::kQ8_0: return q8_0_vnni;
    case QuantType::kQ4_0: return q4_vnni<false>;
    case QuantType::kQ4_1: return q4_vnni<true>;
    default: return nullptr;
  }
}

}  // namespace quant
}  // namespace lmarith

#else  // not x86: the scalar kernels only

namespace lmarith {
namespace quant {
bool cpu_has_avx2() { return false; }
bool cpu_has_vnni() { return false; }
RowDot avx2_row_dot(QuantType) { return nullptr; }
RowDot vnni_row_dot(QuantType) { return nullptr; }
}  // namespace quant
}  // namespace lmarith

#endif
