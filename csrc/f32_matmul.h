// f32_matmul: y [M, N] = x [M, K] @ W.T (+ bias) with W [N, K] in float32, pre-packed once at
// load (kernels/reference_f32.py pack_weight, the torch specification of this op): blocks of
// 16 output rows, each block [K][16] floats, i.e. for every input column the 16 rows'
// weights side by side; N is padded to a multiple of 16 with zero weights.
// A 64-byte load of one block column times a broadcast x[m][k] gives 16 outputs at once, so a
// decode GEMV streams the weight exactly once at the memory's rate, and a tile of up to 8
// activation rows reuses every load from registers.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmarith {

// Output rows per packed block (one zmm, or two ymm, of accumulators).
constexpr int64_t kF32Block = 16;
// 16-row blocks an AVX512 register panel takes at once; splits of the blocks among threads
// are best in whole groups of it (a share's leftover blocks take the one-block kernel).
constexpr int64_t kF32PanelBlocks = 3;

// Instruction paths of f32_matmul: the best this CPU runs, a portable scalar loop, AVX2+FMA,
// AVX512F.
enum class F32Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

// out [M, N] (float32) = x [M, K] (float32, row stride K) @ W.T + bias (f32 [N] or null), W
// packed as above (ceil(N / 16) * K * 16 floats). Sums are fp32; OpenMP over row blocks for
// large products only (a decode step's layer GEMVs stay on one thread).
void f32_matmul(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                const float* bias, float* out, F32Isa isa);

// f32_matmul's output columns [16 * first_block, min(n, 16 * last_block)) only, on the calling
// thread: a caller that already runs a thread team (the decoder stack) splits the blocks.
void f32_matmul_blocks(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                       const float* bias, float* out, F32Isa isa, int64_t first_block,
                       int64_t last_block);

// Whether this CPU (and build) runs an f32_matmul path (kAuto, kScalar: always).
bool f32_isa_supported(F32Isa isa);

}  // namespace lmarith
