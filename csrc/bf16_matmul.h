// bf16_matmul: y [M, N] = x [M, K] @ W.T (+ bias) with W [N, K] in bfloat16, pre-packed once
// at load (kernels/reference_bf16.py pack_weight, the torch specification of this op):
// blocks of 16 output rows, each block [ceil(K / 2)][16][2] bf16, i.e. for every pair of
// input columns (2p, 2p + 1) the 16 rows' two weights side by side in one 32-bit lane.
// N is padded to a multiple of 16 and K to a multiple of 2 with zero weights.
// That is the operand layout of AVX512-BF16's vdpbf16ps (16 lanes, one bf16 pair each), so a
// 64-byte load of a block's pair p times a broadcast pair of x gives 16 output rows at once.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmarith {

// Output rows per packed block (one zmm of fp32 accumulators).
constexpr int64_t kBf16Block = 16;

// Instruction paths of bf16_matmul: the best this CPU runs, a portable scalar loop, AVX2+FMA
// (bf16 widened to fp32 by a 16-bit shift), AVX512-BF16 (vdpbf16ps), AMX-BF16 tiles
// (csrc/bf16_amx.h; kAuto takes them wherever the CPU has them).
enum class Bf16Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// out [M, N] (out_dtype) = x [M, K] (x_dtype, row-major) @ W.T + bias (f32 [N] or null), W
// packed as above (packed: ceil(N / 16) * ceil(K / 2) * 32 bf16 bit patterns). x is rounded
// to bf16 once per call (round to nearest even), sums are fp32; OpenMP over row blocks.
void bf16_matmul(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k, const uint16_t* packed,
                 int64_t n, const float* bias, void* out, LogitsDtype out_dtype, Bf16Isa isa);

// bf16_matmul's output columns [16 * first_block, min(n, 16 * last_block)) only, on the
// calling thread: a caller that already runs a thread team (the decoder stack) splits the blocks.
void bf16_matmul_blocks(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k,
                        const uint16_t* packed, int64_t n, const float* bias, void* out,
                        LogitsDtype out_dtype, Bf16Isa isa, int64_t first_block, int64_t last_block);

// Whether this CPU (and build) runs a bf16_matmul path (kAuto, kScalar: always).
bool bf16_isa_supported(Bf16Isa isa);

}  // namespace lmarith
