// bf16_matmul (csrc/bf16_matmul.h; torch specification kernels/reference_bf16.py).
//
// Batch-1 decode reads every weight once per token, so bf16 weights halve its traffic. The
// activations are rounded to bf16 once per call (as bf16 pairs, the packed weight's lane
// format) and every path sums in fp32:
//  * AMX-BF16 (csrc/bf16_amx.cpp): 16 activation rows x 4 blocks per pass of tiles; batches
//    and prefill, where vdpbf16ps is compute-bound, gain most;
//  * AVX512-BF16: one vdpbf16ps per 64-byte load (16 rows x one column pair), two
//    accumulators per row over alternate pairs;
//  * AVX2 + FMA: a lane's pair widened to two fp32 vectors by a shift and a mask, two FMAs;
//  * scalar: the same sums, portable (the compiler vectorises it where it can).
// A kernel takes up to 8 (AVX2: 4) activation rows per call, so each loaded weight block
// serves all of a small batch from registers. OpenMP splits the row blocks in chunks of 4
// (64 rows: a chunk stays in L2 while the larger batches' tiles pass over it).
#include "bf16_matmul.h"
#include "bf16_amx.h"
#include "bf16_store.h"
#include "cpu_features.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMARITH_BF16_X86 1
#endif

namespace lmarith {
namespace {

constexpr int kMaxTile = 8;            // activation rows per kernel call (AVX2: 4)
constexpr int64_t kChunkBlocks = 4;    // row blocks per unit of OpenMP work
// How far ahead (column pairs, 64 bytes each) the weight stream is prefetched: as in
// f32_matmul, the hardware prefetcher alone left the decode GEMV well short of a core's
// read rate.
constexpr int64_t kPrefetchPairs = 32;

// `rows` activation rows as bf16 bits, pairs-padded: row r's column j at x[r * stride + j].
struct Tile {
  const uint16_t* x;
  int64_t stride;
  int rows;
};

// acc [rows][16] = the tile's rows dotted with one packed block of `pairs` column pairs.
using BlockDot = void (*)(const uint16_t* block, int64_t pairs, const Tile& tile, float* acc);

using bf16::narrow_row;
using bf16::store_tile;

inline float widen(uint16_t bits) { return detail::bf16_to_float(bits); }

void scalar_block(const uint16_t* block, int64_t pairs, const Tile& tile, float* acc) {
  for (int r = 0; r < tile.rows; ++r) {
    float sum[kBf16Block] = {};
    const uint16_t* x = tile.x + r * tile.stride;
    for (int64_t p = 0; p < pairs; ++p) {
      const float even = widen(x[2 * p]), odd = widen(x[2 * p + 1]);
      const uint16_t* w = block + p * 2 * kBf16Block;
      for (int l = 0; l < kBf16Block; ++l) sum[l] += widen(w[2 * l]) * even + widen(w[2 * l + 1]) * odd;
    }
    std::memcpy(acc + r * kBf16Block, sum, sizeof(sum));
  }
}

#ifdef LMARITH_BF16_X86
#define LMARITH_AVX2 __attribute__((target("avx2,fma")))
#define LMARITH_AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512bf16")))

inline int32_t pair_at(const uint16_t* x, int64_t p) {
  int32_t pair;
  std::memcpy(&pair, x + 2 * p, sizeof(pair));
  return pair;
}

// Eight lanes' bf16 pairs -> their even (low half) and odd (high half) weights as fp32.
LMARITH_AVX2 inline __m256 even_avx2(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
LMARITH_AVX2 inline __m256 odd_avx2(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

template <int R>
LMARITH_AVX2 void avx2_rows(const uint16_t* block, int64_t pairs, const Tile& tile, float* acc) {
  __m256 low[R], high[R];
  for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* w = block + p * 2 * kBf16Block;
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchPairs * 2 * kBf16Block), _MM_HINT_T0);
    const __m256i w_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kBf16Block));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_set1_epi32(pair_at(tile.x + r * tile.stride, p));
      const __m256 even = even_avx2(x), odd = odd_avx2(x);
      low[r] = _mm256_fmadd_ps(odd_avx2(w_low), odd, _mm256_fmadd_ps(even_avx2(w_low), even, low[r]));
      high[r] = _mm256_fmadd_ps(odd_avx2(w_high), odd, _mm256_fmadd_ps(even_avx2(w_high), even, high[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kBf16Block, low[r]);
    _mm256_storeu_ps(acc + r * kBf16Block + 8, high[r]);
  }
}

LMARITH_AVX2 void avx2_block(const uint16_t* block, int64_t pairs, const Tile& tile, float* acc) {
  switch (tile.rows) {
    case 1: avx2_rows<1>(block, pairs, tile, acc); break;
    case 2: avx2_rows<2>(block, pairs, tile, acc); break;
    case 3: avx2_rows<3>(block, pairs, tile, acc); break;
    default: avx2_rows<4>(block, pairs, tile, acc); break;
  }
}

LMARITH_AVX512BF16 inline __m512bh bf16_pairs(__m512i bits) { return (__m512bh)bits; }  // a vector cast

LMARITH_AVX512BF16 inline __m512bh broadcast_pair(const uint16_t* x, int64_t p) {
  return bf16_pairs(_mm512_set1_epi32(pair_at(x, p)));
}

template <int R>
LMARITH_AVX512BF16 void bf16_rows(const uint16_t* block, int64_t pairs, const Tile& tile, float* acc) {
  __m512 first[R], second[R];
  for (int r = 0; r < R; ++r) first[r] = second[r] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    const uint16_t* w = block + p * 2 * kBf16Block;
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchPairs * 2 * kBf16Block), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchPairs + 1) * 2 * kBf16Block), _MM_HINT_T0);
    const __m512bh w0 = bf16_pairs(_mm512_loadu_si512(w));
    const __m512bh w1 = bf16_pairs(_mm512_loadu_si512(w + 2 * kBf16Block));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint16_t* x = tile.x + r * tile.stride;
      first[r] = _mm512_dpbf16_ps(first[r], w0, broadcast_pair(x, p));
      second[r] = _mm512_dpbf16_ps(second[r], w1, broadcast_pair(x, p + 1));
    }
  }
  if (p < pairs) {
    const __m512bh w0 = bf16_pairs(_mm512_loadu_si512(block + p * 2 * kBf16Block));
    for (int r = 0; r < R; ++r)
      first[r] = _mm512_dpbf16_ps(first[r], w0, broadcast_pair(tile.x + r * tile.stride, p));
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * kBf16Block, _mm512_add_ps(first[r], second[r]));
}

LMARITH_AVX512BF16 void bf16_block(const uint16_t* block, int64_t pairs, const Tile& tile, float* acc) {
  switch (tile.rows) {
    case 1: bf16_rows<1>(block, pairs, tile, acc); break;
    case 2: bf16_rows<2>(block, pairs, tile, acc); break;
    case 3: bf16_rows<3>(block, pairs, tile, acc); break;
    case 4: bf16_rows<4>(block, pairs, tile, acc); break;
    case 5: bf16_rows<5>(block, pairs, tile, acc); break;
    case 6: bf16_rows<6>(block, pairs, tile, acc); break;
    case 7: bf16_rows<7>(block, pairs, tile, acc); break;
    default: bf16_rows<8>(block, pairs, tile, acc); break;
  }
}

#endif

struct Kernel {
  BlockDot dot;
  int max_rows;
  bool tiles = false;   // AMX tiles (dot then serves the pairs past the last whole tile)
};

// Whether kAuto may take AMX tiles: LMARITH_BF16_AMX=0 keeps vdpbf16ps (for A/B runs).
bool auto_tiles() {
  static const bool enabled = [] {
    const char* knob = std::getenv("LMARITH_BF16_AMX");
    return amx::bf16_ready() && !(knob && std::string(knob) == "0");
  }();
  return enabled;
}

// kAuto: AMX tiles wherever the CPU has them; even at one activation row their 1 KB tile
// loads kept the weight stream faster than vdpbf16ps (bf16 decode 12.9 -> 12.0 ms/step).
Kernel pick_kernel(Bf16Isa isa) {
  if (isa == Bf16Isa::kAuto)
    isa = auto_tiles()                          ? Bf16Isa::kAmx
          : cpu::has_avx512bf16()               ? Bf16Isa::kAvx512Bf16
          : cpu::has_avx2_fma()                 ? Bf16Isa::kAvx2
                                                : Bf16Isa::kScalar;
#ifdef LMARITH_BF16_X86
  if (isa == Bf16Isa::kAmx) return {bf16_block, kMaxTile, true};
  if (isa == Bf16Isa::kAvx512Bf16) return {bf16_block, kMaxTile};
  if (isa == Bf16Isa::kAvx2) return {avx2_block, 4};
#endif
  return {scalar_block, kMaxTile};
}

// x as bf16 bits with an even row length: x itself when it is bf16 and K even, else a copy in
// `copy` (rounded to nearest even, a zero column appended when K is odd).
const uint16_t* bf16_rows_of(const void* x, LogitsDtype dtype, int64_t m, int64_t k,
                             std::vector<uint16_t>& copy) {
  const int64_t width = k + k % 2;
  if (dtype == LogitsDtype::kBFloat16 && width == k) return static_cast<const uint16_t*>(x);
  copy.assign(m * width, 0);
  for (int64_t r = 0; r < m; ++r) {
    uint16_t* row = copy.data() + r * width;
    if (dtype == LogitsDtype::kBFloat16) {
      std::memcpy(row, static_cast<const uint16_t*>(x) + r * k, k * sizeof(uint16_t));
      continue;
    }
    const float* values = static_cast<const float*>(x) + r * k;
    narrow_row(values, k, row);
  }
  return copy.data();
}

}  // namespace

bool bf16_isa_supported(Bf16Isa isa) {
  if (isa == Bf16Isa::kAmx) return amx::bf16_ready();
  if (isa == Bf16Isa::kAvx512Bf16) return cpu::has_avx512bf16();
  if (isa == Bf16Isa::kAvx2) return cpu::has_avx2_fma();
  return true;
}

namespace {

// acc [rows][16] += the pairs [from, pairs) of one block (x row r at x + r * stride), by
// `dot`, at most kMaxTile rows at a time.
void add_pairs(const BlockDot dot, const uint16_t* block, int64_t from, int64_t pairs,
               const uint16_t* x, int64_t stride, int rows, float* acc) {
  alignas(64) float part[kMaxTile * kBf16Block];
  for (int r0 = 0; r0 < rows; r0 += kMaxTile) {
    const Tile tile{x + r0 * stride + 2 * from, stride, std::min(kMaxTile, rows - r0)};
    dot(block + from * 2 * kBf16Block, pairs - from, tile, part);
    for (int i = 0; i < tile.rows * kBf16Block; ++i) acc[r0 * kBf16Block + i] += part[i];
  }
}

// Output blocks [first_block, last_block) by AMX tiles: 16 rows x 4 blocks per pass over
// the whole tiles of pairs, the rest of the pairs (K not a multiple of 32) by kernel.dot.
// Blocks outer, rows inner: a 4-block group (72-196 KB here) stays in L2 while every row
// tile passes over it, so a prefill reads each weight from DRAM once.
void tile_range(const uint16_t* rows, int64_t m, int64_t pairs, const uint16_t* packed,
                int64_t n, const float* bias, void* out, LogitsDtype out_dtype,
                const Kernel& kernel, int64_t first_block, int64_t last_block) {
  alignas(64) float acc[amx::kTileBlocks * amx::kTileRows * kBf16Block];
  const int64_t whole = pairs / amx::kTilePairs * amx::kTilePairs, stride = 2 * pairs;
  int configured = 0;
  for (int64_t b = first_block; b < last_block; b += amx::kTileBlocks) {
    const int count = static_cast<int>(std::min<int64_t>(amx::kTileBlocks, last_block - b));
    const uint16_t* blocks[amx::kTileBlocks];
    for (int j = 0; j < count; ++j) blocks[j] = packed + (b + j) * pairs * 2 * kBf16Block;
    for (int64_t row0 = 0; row0 < m; row0 += amx::kTileRows) {
      const int count_rows = static_cast<int>(std::min<int64_t>(amx::kTileRows, m - row0));
      const uint16_t* x = rows + row0 * stride;
      if (count_rows != configured) amx::configure(configured = count_rows);
      std::fill(acc, acc + count * amx::kTileRows * kBf16Block, 0.0f);
      if (whole > 0) amx::bf16_tiles(x, stride, blocks, count, whole, acc);
      for (int j = 0; j < count; ++j) {
        float* block_acc = acc + j * amx::kTileRows * kBf16Block;
        if (whole < pairs) add_pairs(kernel.dot, blocks[j], whole, pairs, x, stride, count_rows, block_acc);
        store_tile(block_acc, count_rows, row0, (b + j) * kBf16Block, n, bias, out, out_dtype);
      }
    }
  }
  amx::release();
}

// Output blocks [first_block, last_block) of x (already bf16 pairs) @ W.T on this thread.
void block_range(const uint16_t* rows, int64_t m, int64_t pairs, const uint16_t* packed, int64_t n,
                 const float* bias, void* out, LogitsDtype out_dtype, const Kernel& kernel,
                 int64_t first_block, int64_t last_block) {
  if (kernel.tiles)
    return tile_range(rows, m, pairs, packed, n, bias, out, out_dtype, kernel, first_block, last_block);
  alignas(64) float acc[kMaxTile * kBf16Block];
  for (int64_t row0 = 0; row0 < m; row0 += kernel.max_rows) {
    const Tile tile{rows + row0 * 2 * pairs, 2 * pairs,
                    static_cast<int>(std::min<int64_t>(kernel.max_rows, m - row0))};
    for (int64_t b = first_block; b < last_block; ++b) {
      kernel.dot(packed + b * pairs * 2 * kBf16Block, pairs, tile, acc);
      store_tile(acc, tile.rows, row0, b * kBf16Block, n, bias, out, out_dtype);
    }
  }
}

}  // namespace

void bf16_matmul_blocks(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k,
                        const uint16_t* packed, int64_t n, const float* bias, void* out,
                        LogitsDtype out_dtype, Bf16Isa isa, int64_t first_block, int64_t last_block) {
  if (m == 0 || first_block >= last_block) return;
  std::vector<uint16_t> copy;
  const uint16_t* rows = bf16_rows_of(x, x_dtype, m, k, copy);
  block_range(rows, m, (k + 1) / 2, packed, n, bias, out, out_dtype, pick_kernel(isa), first_block,
              last_block);
}

void bf16_matmul(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k, const uint16_t* packed,
                 int64_t n, const float* bias, void* out, LogitsDtype out_dtype, Bf16Isa isa) {
  if (m == 0 || n == 0) return;
  std::vector<uint16_t> copy;
  const uint16_t* rows = bf16_rows_of(x, x_dtype, m, k, copy);
  const Kernel kernel = pick_kernel(isa);
  const int64_t pairs = (k + 1) / 2, blocks = (n + kBf16Block - 1) / kBf16Block;
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  // Parallel from 4M multiply-adds (at M = 1 only an output head, 8 MB of weights): one core
  // nearly saturates this machine's DRAM on a decode GEMV, and waking the OpenMP team for
  // each of a decode step's ~120 smaller ones cost more than the second core gave (measured
  // with benchmarks/bench_bf16.py --sweep: 1.1-1.2x slower from a 0.5 MB threshold).
  // Dynamic chunks: a thread slowed by another process does not hold the others up.
#pragma omp parallel for schedule(dynamic, 1) if (m * n * k > (1 << 22))
  for (int64_t c = 0; c < chunks; ++c)
    block_range(rows, m, pairs, packed, n, bias, out, out_dtype, kernel, c * kChunkBlocks,
                std::min(blocks, (c + 1) * kChunkBlocks));
}

}  // namespace lmarith
