// The small per-layer ops of a decoder block, each one call instead of the handful of torch
// ops (and their Python dispatch) it replaces: residual add + RMSNorm, rotary embedding in
// place, SiLU-and-multiply, and writing K/V into the paged cache. Activations are float32
// or bfloat16 (kernels.h LogitsDtype); bf16 results are rounded where torch rounds, so
// the faces agree to the bit on most elements (kernels/reference_layers.py is the spec).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmarith {

// out[r] = weight * dtype(x[r] * rsqrt(mean(x[r]^2) + eps)) for rows [rows, hidden]; with a
// residual, x[r] + residual[r] (rounded to dtype) is normalised instead and written to summed.
// residual and summed are both null or both set.
void rms_norm(const void* x, const void* residual, const void* weight, int64_t rows,
              int64_t hidden, float eps, LogitsDtype dtype, void* out, void* summed);

// Rotate-half rotary embedding in place on x [rows, heads, head_dim] (row stride row_stride
// elements, heads contiguous) with cos/sin [rows, head_dim] in x's dtype.
void rotary(void* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
            const void* cos, const void* sin, LogitsDtype dtype);

// out [rows, width] = silu(gate) * up, where gate_up [rows, 2 * width] holds gate then up.
void silu_mul(const void* gate_up, int64_t rows, int64_t width, LogitsDtype dtype, void* out);

// A strided [pages, page_size, heads, head_dim] cache (head_dim contiguous) in one dtype.
struct CacheView {
  void* data;
  int64_t page_stride, slot_stride, head_stride;
  LogitsDtype dtype;
};

// Token n's key/value rows [heads, head_dim] (strides (token, head) in key_strides /
// value_strides, head_dim contiguous) go to
// slot (slot_pages[n], slot_offsets[n]) of each cache, cast to its dtype; page < 0: skipped.
void store_kv(const void* key, const void* value, const int64_t* key_strides,
              const int64_t* value_strides,
              LogitsDtype src_dtype, int64_t tokens, int64_t heads, int64_t head_dim,
              const CacheView& key_cache,
              const CacheView& value_cache, const int64_t* slot_pages, const int64_t* slot_offsets);

}  // namespace lmarith
