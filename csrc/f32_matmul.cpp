// f32_matmul (csrc/f32_matmul.h; torch specification kernels/reference_f32.py).
//
// oneDNN and MKL stream a float32 decode GEMV at well under this machine's read bandwidth
// (benchmarks/bench_f32.py); packed 16-row blocks let every 64-byte weight load feed one FMA
// per activation row:
//  * AVX512F: register panels of 8 activation rows x 3 blocks (24 zmm sums: each broadcast
//    x feeds 3 FMAs, each weight load 8), 192 columns at a time through every row of the call
//    so a weight line comes from DRAM once; the blocks past the last whole panel one at a
//    time (one zmm per block column, up to 8 rows, even and odd columns apart);
//  * AVX2 + FMA: the block column as two ymm halves, up to 4 rows;
//  * scalar: the same sums, portable (the compiler vectorises it where it can).
// OpenMP splits the row blocks in chunks of one panel (48 rows, which stay in L2 while the
// larger batches' tiles pass over them).
#include "f32_matmul.h"
#include "cpu_features.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMARITH_F32_X86 1
#endif

namespace lmarith {
namespace {

constexpr int kMaxTile = 8;          // activation rows per kernel call (AVX2: 4)
// AVX512 panel: 8 rows x 3 blocks = 24 zmm accumulators. Against 6 x 4 with 64 columns a
// pass, on an AMD EPYC (Zen 4) host, 2 threads, a prefill's four layer shapes at 512 rows:
// 174 -> 198 GFLOP/s (peak ~230), 16 rows 147 -> 165; sums bit for bit the same.
constexpr int kPanelRows = 8;
constexpr int kPanelBlocks = kF32PanelBlocks;
constexpr int64_t kPanelColumns = 192;  // columns a pass takes at a time: 36 KB of weights
constexpr int64_t kChunkBlocks = kF32PanelBlocks;  // row blocks per unit of OpenMP work
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
// acc [kPanelBlocks][kPanelRows][16] (+)= the tile's rows (<= kPanelRows) dotted with
// columns [begin, end) of kPanelBlocks blocks at once (avx512_panel).
using PanelDot = void (*)(const float* const* blocks, int64_t begin, int64_t end, const Tile& tile,
                          float* acc, bool first);

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

// acc[b][r][16] (+)= rows r < R of the tile dotted with columns [begin, end) of
// kPanelBlocks blocks: a register panel in which each broadcast x feeds kPanelBlocks FMAs
// and each weight load R (the one-block kernel spends a broadcast load per FMA, which held a
// 16-row batch to ~20% of the FMA peak). `first`: the panel's first columns (acc starts at 0,
// and this pass prefetches the weight stream for the row tiles after it).
template <int R>
LMARITH_AVX512 void avx512_panel(const float* const* blocks, int64_t begin, int64_t end,
                                 const Tile& tile, float* acc, bool first) {
  __m512 sums[R][kPanelBlocks];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kPanelBlocks; ++b)
      sums[r][b] = begin == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (b * kPanelRows + r) * kF32Block);
  for (int64_t j = begin; j < end; ++j) {
    __m512 w[kPanelBlocks];
    for (int b = 0; b < kPanelBlocks; ++b) {
      if (first)
        _mm_prefetch(reinterpret_cast<const char*>(blocks[b] + (j + kPrefetchColumns) * kF32Block), _MM_HINT_T0);
      w[b] = _mm512_loadu_ps(blocks[b] + j * kF32Block);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(tile.x[r * tile.stride + j]);
      for (int b = 0; b < kPanelBlocks; ++b) sums[r][b] = _mm512_fmadd_ps(w[b], x, sums[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kPanelBlocks; ++b) _mm512_storeu_ps(acc + (b * kPanelRows + r) * kF32Block, sums[r][b]);
}

LMARITH_AVX512 void avx512_panel_rows(const float* const* blocks, int64_t begin, int64_t end,
                                      const Tile& tile, float* acc, bool first) {
  switch (tile.rows) {
    case 1: avx512_panel<1>(blocks, begin, end, tile, acc, first); break;
    case 2: avx512_panel<2>(blocks, begin, end, tile, acc, first); break;
    case 3: avx512_panel<3>(blocks, begin, end, tile, acc, first); break;
    case 4: avx512_panel<4>(blocks, begin, end, tile, acc, first); break;
    case 5: avx512_panel<5>(blocks, begin, end, tile, acc, first); break;
    case 6: avx512_panel<6>(blocks, begin, end, tile, acc, first); break;
    case 7: avx512_panel<7>(blocks, begin, end, tile, acc, first); break;
    default: avx512_panel<8>(blocks, begin, end, tile, acc, first); break;
  }
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
  PanelDot panel = nullptr;   // AVX512 only
};

Kernel pick_kernel(F32Isa isa) {
  if (isa == F32Isa::kAuto)
    isa = cpu::has_avx512f() ? F32Isa::kAvx512 : cpu::has_avx2_fma() ? F32Isa::kAvx2 : F32Isa::kScalar;
#ifdef LMARITH_F32_X86
  if (isa == F32Isa::kAvx512) return {avx512_block, kMaxTile, avx512_panel_rows};
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

namespace {

// Blocks [first_block, last_block) one at a time by kernel.dot, kernel.max_rows rows a call.
void block_range(const Kernel& kernel, const float* x, int64_t m, int64_t k, const float* packed,
                 int64_t n, const float* bias, float* out, int64_t first_block, int64_t last_block) {
  alignas(64) float acc[kMaxTile * kF32Block];
  for (int64_t row0 = 0; row0 < m; row0 += kernel.max_rows) {
    const Tile tile{x + row0 * k, k, static_cast<int>(std::min<int64_t>(kernel.max_rows, m - row0))};
    for (int64_t b = first_block; b < last_block; ++b) {
      kernel.dot(packed + b * k * kF32Block, k, tile, acc);
      store_tile(acc, tile.rows, row0, b * kF32Block, n, bias, out);
    }
  }
}

// All m rows x the kPanelBlocks blocks from `block`: kPanelColumns columns at a time through
// every row tile, so each weight line comes from DRAM once and serves every row from L1 (the
// tiles' sums wait in `sums`, m x 256 bytes, in L2). A pass per 48 rows re-read a prefill's
// weights from DRAM 11 times.
void panel_pass(const Kernel& kernel, const float* x, int64_t m, int64_t k, const float* packed,
                int64_t block, int64_t n, const float* bias, float* out, std::vector<float>& sums) {
  constexpr int64_t kTileFloats = kPanelBlocks * kPanelRows * kF32Block;
  const int64_t tiles = (m + kPanelRows - 1) / kPanelRows;
  sums.resize(tiles * kTileFloats);
  const float* blocks[kPanelBlocks];
  for (int j = 0; j < kPanelBlocks; ++j) blocks[j] = packed + (block + j) * k * kF32Block;
  const auto rows_of = [m](int64_t t) {
    return static_cast<int>(std::min<int64_t>(kPanelRows, m - t * kPanelRows));
  };
  for (int64_t begin = 0; begin < k; begin += kPanelColumns)
    for (int64_t t = 0; t < tiles; ++t)
      kernel.panel(blocks, begin, std::min(k, begin + kPanelColumns),
                   Tile{x + t * kPanelRows * k, k, rows_of(t)}, sums.data() + t * kTileFloats, t == 0);
  for (int64_t t = 0; t < tiles; ++t)
    for (int j = 0; j < kPanelBlocks; ++j)
      store_tile(sums.data() + t * kTileFloats + j * kPanelRows * kF32Block, rows_of(t),
                 t * kPanelRows, (block + j) * kF32Block, n, bias, out);
}

// Blocks [first_block, last_block) in panel passes of kPanelBlocks blocks; the blocks past
// the last whole panel by the one-block kernel.
void panel_range(const Kernel& kernel, const float* x, int64_t m, int64_t k, const float* packed,
                 int64_t n, const float* bias, float* out, int64_t first_block, int64_t last_block) {
  thread_local std::vector<float> sums;
  const int64_t whole = first_block + (last_block - first_block) / kPanelBlocks * kPanelBlocks;
  for (int64_t b = first_block; b < whole; b += kPanelBlocks)
    panel_pass(kernel, x, m, k, packed, b, n, bias, out, sums);
  block_range(kernel, x, m, k, packed, n, bias, out, whole, last_block);
}

}  // namespace

void f32_matmul_blocks(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                       const float* bias, float* out, F32Isa isa, int64_t first_block,
                       int64_t last_block) {
  const Kernel kernel = pick_kernel(isa);
  // Panels at every batch size (even one row: they stream as fast), so a row's sums run in
  // one order whatever its batch holds, and a request's output does not depend on it.
  if (kernel.panel != nullptr)
    return panel_range(kernel, x, m, k, packed, n, bias, out, first_block, last_block);
  block_range(kernel, x, m, k, packed, n, bias, out, first_block, last_block);
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
