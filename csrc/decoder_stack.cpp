// csrc/decoder_stack.h: the layer loop of LlamaForCausalLM.forward in C++, over the same
// kernels the Python path dispatches one at a time.
#include "decoder_stack.h"

#include <algorithm>
#include <cstring>

#include "f32_matmul.h"
#include "layer_ops.h"

namespace lmarith {
namespace {

constexpr LogitsDtype kF32 = LogitsDtype::kFloat32;

// Scratch rows of one forward: normed input, qkv, attention output, gate/up, activation.
struct Buffers {
  std::vector<float> hidden, residual, normed, qkv, attn, gate_up, act, part;
  Buffers(const StackShape& s, const std::vector<StackLayer>& layers, int64_t tokens)
      : hidden(tokens * s.hidden), residual(tokens * s.hidden), normed(tokens * s.hidden),
        qkv(tokens * (s.heads + 2 * s.kv_heads) * s.head_dim), attn(tokens * s.heads * s.head_dim),
        gate_up(tokens * 2 * s.intermediate), act(tokens * s.intermediate) {
    int64_t widest = 0;
    for (const StackLayer& layer : layers)
      for (const StackLinear* linear : {&layer.qkv, &layer.o_proj, &layer.gate_up, &layer.down})
        if (linear->parts.size() > 1) widest = std::max(widest, linear->out_features);
    part.resize(tokens * widest);
  }
};

// y = x @ W.T (+ bias); several parts are computed one after another into `part` and
// placed side by side in each row of y.
void linear(const StackLinear& w, const float* x, int64_t tokens, QuantIsa isa, float* y,
            float* part) {
  const bool single = w.parts.size() == 1;
  int64_t column = 0;
  for (const StackPart& p : w.parts) {
    float* target = single ? y : part;
    if (p.f32 != nullptr)
      f32_matmul(x, tokens, w.in_features, p.f32, p.rows, nullptr, target, F32Isa::kAuto);
    else
      quant_matmul(x, kF32, tokens, w.in_features, p.data, p.qtype, p.rows, p.row_bytes, isa, target);
    for (int64_t t = 0; !single && t < tokens; ++t)
      std::memcpy(y + t * w.out_features + column, part + t * p.rows, p.rows * sizeof(float));
    column += p.rows;
  }
  if (w.bias == nullptr) return;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < w.out_features; ++i) y[t * w.out_features + i] += w.bias[i];
}

// Rotary on q and k, K/V into the caches, attention of q over them -> b.attn.
void attend(const StackShape& s, const StackLayer& layer, int64_t index, const StackStep& step,
            Buffers& b) {
  const int64_t dim = s.head_dim, width = (s.heads + 2 * s.kv_heads) * dim;
  float* qkv = b.qkv.data();
  rotary(qkv, step.tokens, width, s.heads + s.kv_heads, dim, step.cos, step.sin, kF32);
  const int64_t rows[2] = {width, dim};
  const CacheView key{reinterpret_cast<void*>(step.key_caches[index]), step.cache_strides[0],
                      step.cache_strides[1], step.cache_strides[2],
                      static_cast<LogitsDtype>(step.cache_dtype)};
  const CacheView value{reinterpret_cast<void*>(step.value_caches[index]), step.cache_strides[0],
                        step.cache_strides[1], step.cache_strides[2],
                        static_cast<LogitsDtype>(step.cache_dtype)};
  store_kv(qkv + s.heads * dim, qkv + (s.heads + s.kv_heads) * dim, rows, rows, kF32, step.tokens,
           s.kv_heads, dim, key, value, step.slot_pages, step.slot_offsets);
  const PagedAttentionArgs args{
      qkv, AttnDtype::kFloat32, step.tokens, s.heads, dim, width, dim,
      {key.data, key.page_stride, key.slot_stride, key.head_stride},
      {value.data, value.page_stride, value.slot_stride, value.head_stride},
      step.cache_dtype, step.page_size, s.kv_heads, step.query_start, step.context_lens,
      step.block_tables, step.num_seqs, step.table_width, step.max_context_len, s.scale,
      layer.sliding_window, b.attn.data()};
  paged_attention(args);
}

// One pre-norm block; b.hidden is its input (the previous block's output) and, after it,
// its output; b.residual carries the running sum.
void run_layer(const StackShape& s, const StackLayer& layer, int64_t index, const StackStep& step,
               Buffers& b) {
  const int64_t tokens = step.tokens, hidden = s.hidden;
  float* residual = b.residual.data();
  if (index == 0) {
    std::memcpy(residual, b.hidden.data(), tokens * hidden * sizeof(float));
    rms_norm(b.hidden.data(), nullptr, layer.input_norm, tokens, hidden, s.eps, kF32,
             b.normed.data(), nullptr);
  } else {
    rms_norm(b.hidden.data(), residual, layer.input_norm, tokens, hidden, s.eps, kF32,
             b.normed.data(), residual);
  }
  linear(layer.qkv, b.normed.data(), tokens, s.isa, b.qkv.data(), b.part.data());
  attend(s, layer, index, step, b);
  linear(layer.o_proj, b.attn.data(), tokens, s.isa, b.hidden.data(), b.part.data());
  rms_norm(b.hidden.data(), residual, layer.post_norm, tokens, hidden, s.eps, kF32,
           b.normed.data(), residual);
  linear(layer.gate_up, b.normed.data(), tokens, s.isa, b.gate_up.data(), b.part.data());
  silu_mul(b.gate_up.data(), tokens, s.intermediate, kF32, b.act.data());
  linear(layer.down, b.act.data(), tokens, s.isa, b.hidden.data(), b.part.data());
}

}  // namespace

void decoder_stack_forward(const StackShape& shape, const std::vector<StackLayer>& layers,
                           const StackStep& step) {
  if (step.tokens == 0) return;
  Buffers buffers(shape, layers, step.tokens);
  const int64_t size = step.tokens * shape.hidden;
  std::memcpy(buffers.hidden.data(), step.x, size * sizeof(float));
  for (size_t index = 0; index < layers.size(); ++index)
    run_layer(shape, layers[index], static_cast<int64_t>(index), step, buffers);
  for (int64_t i = 0; i < size; ++i) step.out[i] = buffers.hidden[i] + buffers.residual[i];
}

}  // namespace lmarith
