// f32_matmul (csrc/f32_matmul.h; torch specification kernels/reference_f32.py).
//
// oneDNN and MKL stream a float32 decode GEMV at well under this machine's read bandwidth
// (benchmarks/bench_f32.py); packed 16-row blocks let every 64-byte weight load feed one FMA
// per activation row:
//  * AVX512F: one zmm per block column, up to 8 activation rows (x broadcast from memory),
//    two accumulators per row over alternate columns so no FMA waits on the previous one;
//  * AVX2 + FMA: the block column as two ymm halves, up to 4 rows;
//  * scalar: the same sums, portable (the compiler vectorises it where it can).
// OpenMP splits the row blocks in chunks of 4 (64 rows, whose panel stays in L2 while the
// larger batches' tiles pass over it).
#include "f32_matmul.h"
#include "cpu_features.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMARITH_F32_X86 1
#endif

namespace lmarith {
namespace {

constexpr int kMaxTile = 8;          // activation rows per kernel call (AVX2: 4)
constexpr int64_t kChunkBlocks = 4;  // row blocks per unit of OpenMP work
// How far ahead (block columns of 64 bytes) the weight stream is prefetched: the hardware
// prefetcher alone left a decode GEMV at ~2/3 of one core's read rate.
constexpr int64_t kPrefetchColumns = 32;

// `rows` activation rows: row r's column j at x[r * stride + j].
struct Tile {
  const float* x;
  int64_t stride;
  int rows;
};

// acc [rows][16] = the tile's rows dotted with one packed block of k columns.
using BlockDot = void (*)(const float* block, int64_t k, const Tile& tile, float* acc);

void scalar_block(const float* block, int64_t k, const Tile& tile, float* acc) {
  for (int r = 0; r < tile.rows; ++r) {
    float sum[kF32Block] = {};
    const float* x = tile.x + r * tile.stride;
    for (int64_t j = 0; j < k; ++j) {
      const float* w = block + j * kF32Block;
      for (int l = 0; l < kF32Block; ++l) sum[l] += w[l] * x[j];
    }
    std::memcpy(acc + r * kF32Block, sum, sizeof(sum));
  }
}

#ifdef LMARITH_F32_X86
#define LMARITH_AVX2 __attribute__((target("avx2,fma")))
#define LMARITH_AVX512 __attribute__((target("avx2,fma,avx512f")))

template <int R>
LMARITH_AVX2 void avx2_rows(const float* block, int64_t k, const Tile& tile, float* acc) {
  __m256 low[R], high[R];
  for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(block + (j + kPrefetchColumns) * kF32Block), _MM_HINT_T0);
    const __m256 w_low = _mm256_loadu_ps(block + j * kF32Block);
    const __m256 w_high = _mm256_loadu_ps(block + j * kF32Block + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(tile.x + r * tile.stride + j);
      low[r] = _mm256_fmadd_ps(w_low, x, low[r]);
      high[r] = _mm256_fmadd_ps(w_high, x, high[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kF32Block, low[r]);
    _mm256_storeu_ps(acc + r * kF32Block + 8, high[r]);
  }
}

LMARITH_AVX2 void avx2_block(const float* block, int64_t k, const Tile& tile, float* acc) {
  switch (tile.rows) {
    case 1: avx2_rows<1>(block, k, tile, acc); break;
    case 2: avx2_rows<2>(block, k, tile, acc); break;
    case 3: avx2_rows<3>(block, k, tile, acc); break;
    default: avx2_rows<4>(block, k, tile, acc); break;
  }
}

template <int R>
LMARITH_AVX512 void avx512_rows(const float* block, int64_t k, const Tile& tile, float* acc) {
  __m512 first[R], second[R];
  for (int r = 0; r < R; ++r) first[r] = second[r] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(block + (j + kPrefetchColumns) * kF32Block), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + (j + kPrefetchColumns + 1) * kF32Block), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(block + j * kF32Block);
    const __m512 w1 = _mm512_loadu_ps(block + (j + 1) * kF32Block);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* x = tile.x + r * tile.stride + j;
      first[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[0]), first[r]);
      second[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[1]), second[r]);
    }
  }
  if (j < k) {
    const __m512 w0 = _mm512_loadu_ps(block + j * kF32Block);
    for (int r = 0; r < R; ++r)
      first[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(tile.x[r * tile.stride + j]), first[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * kF32Block, _mm512_add_ps(first[r], second[r]));
}

LMARITH_AVX512 void avx512_block(const float* block, int64_t k, const Tile& tile, float* acc) {
  switch (tile.rows) {
    case 1: avx512_rows<1>(block, k, tile, acc); break;
    case 2: avx512_rows<2>(block, k, tile, acc); break;
    case 3: avx512_rows<3>(block, k, tile, acc); break;
    case 4: avx512_rows<4>(block, k, tile, acc); break;
    case 5: avx512_rows<5>(block, k, tile, acc); break;
    case 6: avx512_rows<6>(block, k, tile, acc); break;
    case 7: avx512_rows<7>(block, k, tile, acc); break;
    default: avx512_rows<8>(block, k, tile, acc); break;
  }
}

#endif

struct Kernel {
  BlockDot dot;
  int max_rows;
};

Kernel pick_kernel(F32Isa isa) {
  if (isa == F32Isa::kAuto)
    isa = cpu::has_avx512f() ? F32Isa::kAvx512 : cpu::has_avx2_fma() ? F32Isa::kAvx2 : F32Isa::kScalar;
#ifdef LMARITH_F32_X86
  if (isa == F32Isa::kAvx512) return {avx512_block, kMaxTile};
  if (isa == F32Isa::kAvx2) return {avx2_block, 4};
#endif
  return {scalar_block, kMaxTile};
}

// A tile's acc [rows][16] (+ bias) into out's rows [row0, row0 + rows), columns from col0.
void store_tile(const float* acc, int rows, int64_t row0, int64_t col0, int64_t n,
                const float* bias, float* out) {
  const int64_t width = std::min(kF32Block, n - col0);
  for (int r = 0; r < rows; ++r) {
    float* target = out + (row0 + r) * n + col0;
    const float* source = acc + r * kF32Block;
    if (bias == nullptr) {
      std::memcpy(target, source, width * sizeof(float));
      continue;
    }
    for (int64_t l = 0; l < width; ++l) target[l] = source[l] + bias[col0 + l];
  }
}

}  // namespace

bool f32_isa_supported(F32Isa isa) {
  if (isa == F32Isa::kAvx512) return cpu::has_avx512f();
  if (isa == F32Isa::kAvx2) return cpu::has_avx2_fma();
  return true;
}

void f32_matmul_blocks(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                       const float* bias, float* out, F32Isa isa, int64_t first_block,
                       int64_t last_block) {
  const Kernel kernel = pick_kernel(isa);
  alignas(64) float acc[kMaxTile * kF32Block];
  for (int64_t row0 = 0; row0 < m; row0 += kernel.max_rows) {
    const Tile tile{x + row0 * k, k, static_cast<int>(std::min<int64_t>(kernel.max_rows, m - row0))};
    for (int64_t b = first_block; b < last_block; ++b) {
      kernel.dot(packed + b * k * kF32Block, k, tile, acc);
      store_tile(acc, tile.rows, row0, b * kF32Block, n, bias, out);
    }
  }
}

void f32_matmul(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                const float* bias, float* out, F32Isa isa) {
  if (m == 0 || n == 0) return;
  const int64_t blocks = (n + kF32Block - 1) / kF32Block;
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  // As bf16_matmul: parallel from 4M multiply-adds (at M = 1 only an output head); waking the
  // team for each of a decode step's ~120 layer GEMVs costs more than the second core gives.
#pragma omp parallel for schedule(dynamic, 1) if (m * n * k > (1 << 22))
  for (int64_t c = 0; c < chunks; ++c)
    f32_matmul_blocks(x, m, k, packed, n, bias, out, isa, c * kChunkBlocks,
                      std::min(blocks, (c + 1) * kChunkBlocks));
}

}  // namespace lmarith
