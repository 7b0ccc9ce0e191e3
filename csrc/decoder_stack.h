// A llama-family decoder stack with quantized or packed float linears, run layer after layer in C++: one
// call per forward instead of a dozen Python-dispatched ops per layer (the per-step
// overhead that kept decoding short of llama.cpp). It composes the kernels the Python
// path calls one by one (rms_norm, quant_matmul, rotary, store_kv, paged_attention,
// silu_mul, and f32_matmul / bf16_matmul for float weights), so it computes what LlamaForCausalLM.forward's layer loop computes, in
// the model's activation dtype (engine/models/native_stack.py builds it and checks eligibility).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace lmarith {

// One row block of a linear: GGML blocks (a fused projection may hold several qtypes) or,
// with f32 / bf16 set, the panels of f32_matmul / bf16_matmul (csrc/f32_matmul.h,
// csrc/bf16_matmul.h) that the Python layer loop's F32Linear / BF16Linear hold.
struct StackPart {
  const uint8_t* data;  // [rows, row_bytes] GGML blocks (null for f32 panels)
  QuantType qtype;
  int64_t rows, row_bytes;
  const float* f32 = nullptr;      // [ceil(rows / 16), in_features, 16]
  const uint16_t* bf16 = nullptr;  // [ceil(rows / 16), ceil(in_features / 2), 16, 2]
};

// y [M, out] = x [M, in] @ W.T + bias; W is the row-concatenation of parts.
struct StackLinear {
  std::vector<StackPart> parts;
  const float* bias = nullptr;  // [out] or null
  int64_t in_features = 0, out_features = 0;
};

struct StackLayer {
  const void* input_norm;  // [hidden], in the activations' dtype
  const void* post_norm;   // [hidden]
  StackLinear qkv, o_proj, gate_up, down;
  int64_t sliding_window;  // 0: none
};

// dtype: the activations' (the model's) dtype. float32 models may use every weight format;
// a bfloat16 model's linears are bf16 panels, and every activation is rounded to bfloat16
// where the Python loop rounds it (each op's output), so the two agree bit for bit.
struct StackShape {
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  float eps, scale;
  QuantIsa isa;
  LogitsDtype dtype = LogitsDtype::kFloat32;
};

// One forward's inputs (x, cos, sin, out in the activations' dtype): x [tokens, hidden] (the
// embeddings), cos/sin [tokens, head_dim],
// the step's attention metadata (int64) and every layer's caches (addresses; one dtype and
// one set of element strides for all layers). The result, x + residual after the last
// layer (what the final norm reads), is written to out [tokens, hidden].
struct StackStep {
  int64_t tokens;
  const void* x;
  const void* cos;
  const void* sin;
  const int64_t* slot_pages;
  const int64_t* slot_offsets;
  const int64_t* query_start;
  const int64_t* context_lens;
  const int64_t* block_tables;
  int64_t num_seqs, table_width, max_context_len;
  const std::uintptr_t* key_caches;    // [layers]
  const std::uintptr_t* value_caches;  // [layers]
  int64_t cache_strides[3];            // page, slot, head (elements)
  int64_t num_pages, page_size;
  AttnDtype cache_dtype;
  void* out;
};

void decoder_stack_forward(const StackShape& shape, const std::vector<StackLayer>& layers,
                           const StackStep& step);

}  // namespace lmarith
