// csrc/decoder_stack.h: the layer loop of LlamaForCausalLM.forward in C++, over the same
// kernels the Python path dispatches one at a time, in the model's activation dtype.
#include "decoder_stack.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>

#ifdef LMARITH_OPENMP
#include <omp.h>
#endif
#include "attention_team.h"
#include "bf16_matmul.h"
#include "f32_matmul.h"
#include "layer_ops.h"
#include "spin_barrier.h"

namespace lmarith {
namespace {

constexpr LogitsDtype kF32 = LogitsDtype::kFloat32;
constexpr int64_t kTeamTokens = 16;  // steps up to this many rows run as one thread team
// After a team step whose barriers waited long (another process took a core), the next
// steps run the serial layer loop before the team is tried again: 64, four times more while
// the retries stay contended, up to 1024 (~10 s of decode); an uncontended team step resets it.
// A contended team step costs ~10x a quiet one (its ~150 barriers each wait out a scheduler
// slice), so retrying every 17th step held Q4_1 decode beside a busy process at 0.30-0.37x
// its quiet speed; the serial loop alone gave 0.60-0.62x (AMD EPYC, 2 cores).
constexpr int kContendedSteps = 64, kMaxContendedSteps = 1024;
std::atomic<int> serial_steps_left{0}, serial_stretch{kContendedSteps};

// A buffer of activations in the stack's dtype (float storage, of which bfloat16 uses half):
// at(i) is element i's address.
struct Rows {
  std::vector<float> storage;
  int64_t element = 4;
  void resize(int64_t count, LogitsDtype dtype) {
    element = dtype == kF32 ? 4 : 2;
    storage.assign((count * element + 3) / 4, 0.0f);
  }
  void* at(int64_t index) { return reinterpret_cast<char*>(storage.data()) + index * element; }
  void* data() { return storage.data(); }
};

// Scratch rows of one forward: normed input, qkv, attention output, gate/up, activation,
// and one float32 part of a multi-part (quantized) projection.
struct Buffers {
  Rows hidden, residual, normed, qkv, attn, gate_up, act;
  std::vector<float> part;
  Buffers(const StackShape& s, const std::vector<StackLayer>& layers, int64_t tokens) {
    const int64_t q = (s.heads + 2 * s.kv_heads) * s.head_dim;
    for (auto [rows, width] : {std::pair<Rows*, int64_t>{&hidden, s.hidden}, {&residual, s.hidden},
                               {&normed, s.hidden}, {&qkv, q}, {&attn, s.heads * s.head_dim},
                               {&gate_up, 2 * s.intermediate}, {&act, s.intermediate}})
      rows->resize(tokens * width, s.dtype);
    int64_t widest = 0;
    for (const StackLayer& layer : layers)
      for (const StackLinear* linear : {&layer.qkv, &layer.o_proj, &layer.gate_up, &layer.down})
        if (linear->parts.size() > 1) widest = std::max(widest, linear->out_features);
    part.resize(tokens * widest);
  }
};

// One part's product into target [tokens, p.rows] (row stride p.rows); the panel kernels add
// the bias themselves (before a bfloat16 result is rounded, as BF16Linear does).
void part_product(const StackPart& p, const void* x, LogitsDtype dtype, int64_t tokens,
                  int64_t in, const float* bias, QuantIsa isa, void* target) {
  if (p.bf16 != nullptr)
    bf16_matmul(x, dtype, tokens, in, p.bf16, p.rows, bias, target, dtype, Bf16Isa::kAuto);
  else if (p.f32 != nullptr)
    f32_matmul(static_cast<const float*>(x), tokens, in, p.f32, p.rows, bias,
               static_cast<float*>(target), F32Isa::kAuto);
  else
    quant_matmul(x, dtype, tokens, in, p.data, p.qtype, p.rows, p.row_bytes, isa,
                 static_cast<float*>(target));
}

// y = x @ W.T (+ bias); several (quantized, float32) parts are computed one after another
// into `part` and placed side by side in each row of y, and the bias added after.
void linear(const StackLinear& w, const void* x, LogitsDtype dtype, int64_t tokens, QuantIsa isa,
            void* y, float* part) {
  const StackPart& first = w.parts.front();
  if (w.parts.size() == 1 && (first.f32 != nullptr || first.bf16 != nullptr))
    return part_product(first, x, dtype, tokens, w.in_features, w.bias, isa, y);
  float* out = static_cast<float*>(y);
  const bool single = w.parts.size() == 1;
  int64_t column = 0;
  for (const StackPart& p : w.parts) {
    part_product(p, x, dtype, tokens, w.in_features, nullptr, isa, single ? out : part);
    for (int64_t t = 0; !single && t < tokens; ++t)
      std::memcpy(out + t * w.out_features + column, part + t * p.rows, p.rows * sizeof(float));
    column += p.rows;
  }
  if (w.bias == nullptr) return;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < w.out_features; ++i) out[t * w.out_features + i] += w.bias[i];
}

CacheView cache_view(const StackStep& step, std::uintptr_t address) {
  return {reinterpret_cast<void*>(address), step.cache_strides[0], step.cache_strides[1],
          step.cache_strides[2], static_cast<LogitsDtype>(step.cache_dtype)};
}

// Rotary on q and k, and K/V into the caches.
void rotate_and_store(const StackShape& s, int64_t index, const StackStep& step, Buffers& b) {
  const int64_t dim = s.head_dim, width = (s.heads + 2 * s.kv_heads) * dim;
  rotary(b.qkv.data(), step.tokens, width, s.heads + s.kv_heads, dim, step.cos, step.sin, s.dtype);
  const int64_t rows[2] = {width, dim};
  store_kv(b.qkv.at(s.heads * dim), b.qkv.at((s.heads + s.kv_heads) * dim), rows, rows, s.dtype,
           step.tokens, s.kv_heads, dim, cache_view(step, step.key_caches[index]),
           cache_view(step, step.value_caches[index]), step.slot_pages, step.slot_offsets);
}

// The attention of q over layer `index`'s caches, into b.attn.
PagedAttentionArgs attention_args(const StackShape& s, const StackLayer& layer, int64_t index,
                                  const StackStep& step, Buffers& b) {
  const int64_t dim = s.head_dim, width = (s.heads + 2 * s.kv_heads) * dim;
  const CacheView key = cache_view(step, step.key_caches[index]);
  const CacheView value = cache_view(step, step.value_caches[index]);
  return {b.qkv.data(), static_cast<AttnDtype>(s.dtype), step.tokens, s.heads, dim, width, dim,
          {key.data, key.page_stride, key.slot_stride, key.head_stride},
          {value.data, value.page_stride, value.slot_stride, value.head_stride},
          step.cache_dtype, step.page_size, s.kv_heads, step.query_start, step.context_lens,
          step.block_tables, step.num_seqs, step.table_width, step.max_context_len, s.scale,
          layer.sliding_window, b.attn.data()};
}

void attend(const StackShape& s, const StackLayer& layer, int64_t index, const StackStep& step,
            Buffers& b) {
  rotate_and_store(s, index, step, b);
  paged_attention(attention_args(s, layer, index, step, b));
}

// The block's input norm: the first block starts the residual from its input, the others add
// their input to it first.
void input_norm(const StackShape& s, const StackLayer& layer, int64_t index, int64_t tokens,
                Buffers& b) {
  if (index == 0) {
    std::memcpy(b.residual.data(), b.hidden.data(), tokens * s.hidden * b.hidden.element);
    rms_norm(b.hidden.data(), nullptr, layer.input_norm, tokens, s.hidden, s.eps, s.dtype,
             b.normed.data(), nullptr);
  } else {
    rms_norm(b.hidden.data(), b.residual.data(), layer.input_norm, tokens, s.hidden, s.eps,
             s.dtype, b.normed.data(), b.residual.data());
  }
}

// One pre-norm block; b.hidden is its input (the previous block's output) and, after it,
// its output; b.residual carries the running sum.
void run_layer(const StackShape& s, const StackLayer& layer, int64_t index, const StackStep& step,
               Buffers& b) {
  const int64_t tokens = step.tokens, hidden = s.hidden;
  input_norm(s, layer, index, tokens, b);
  linear(layer.qkv, b.normed.data(), s.dtype, tokens, s.isa, b.qkv.data(), b.part.data());
  attend(s, layer, index, step, b);
  linear(layer.o_proj, b.attn.data(), s.dtype, tokens, s.isa, b.hidden.data(), b.part.data());
  rms_norm(b.hidden.data(), b.residual.data(), layer.post_norm, tokens, hidden, s.eps, s.dtype,
           b.normed.data(), b.residual.data());
  linear(layer.gate_up, b.normed.data(), s.dtype, tokens, s.isa, b.gate_up.data(), b.part.data());
  silu_mul(b.gate_up.data(), tokens, s.intermediate, s.dtype, b.act.data());
  linear(layer.down, b.act.data(), s.dtype, tokens, s.isa, b.hidden.data(), b.part.data());
}

// out = hidden + residual, rounded to the dtype as rms_norm rounds its summed rows.
void add_rows(Buffers& b, const StackShape& s, int64_t size, void* out) {
  if (s.dtype == kF32) {
    const float* x = static_cast<const float*>(b.hidden.data());
    const float* r = static_cast<const float*>(b.residual.data());
    for (int64_t i = 0; i < size; ++i) static_cast<float*>(out)[i] = x[i] + r[i];
    return;
  }
  const uint16_t* x = static_cast<const uint16_t*>(b.hidden.data());
  const uint16_t* r = static_cast<const uint16_t*>(b.residual.data());
  for (int64_t i = 0; i < size; ++i)
    static_cast<uint16_t*>(out)[i] =
        detail::float_to_bf16(detail::bf16_to_float(x[i]) + detail::bf16_to_float(r[i]));
}

// The threads of a team step: this thread's index, the team's size, their barrier and the
// attention plan they share.
struct Team {
  int id, size;
  SpinBarrier* barrier;
  AttentionTeamState* attention;
  void sync() const { barrier->wait(); }
  bool lead() const { return id == 0; }
};

// Whether a linear is made of quantized parts only (at most kTeamParts of them).
constexpr size_t kTeamParts = 4;
bool quantized(const StackLinear& w) {
  if (w.parts.size() > kTeamParts) return false;
  for (const StackPart& p : w.parts)
    if (p.data == nullptr || p.f32 != nullptr || p.bf16 != nullptr) return false;
  return true;
}

// This thread's share of a linear: the 16-row blocks of a single float panel part, or the
// 16-row chunks of quantized parts (written side by side into y's rows, as linear() does).
void team_linear(const StackLinear& w, const void* x, LogitsDtype dtype, int64_t tokens,
                 QuantIsa isa, void* y, const Team& team) {
  const StackPart& p = w.parts.front();
  if (p.data != nullptr) {
    QuantPart parts[kTeamParts];
    for (size_t i = 0; i < w.parts.size(); ++i)
      parts[i] = {w.parts[i].data, w.parts[i].qtype, w.parts[i].rows, w.parts[i].row_bytes};
    quant_matmul_share(x, dtype, tokens, w.in_features, parts, static_cast<int64_t>(w.parts.size()),
                       isa, w.bias, static_cast<float*>(y), w.out_features, team.id, team.size);
    team.sync();
    return;
  }
  static_assert(kF32Block == kBf16Block, "both panel formats split by the same blocks");
  // Shares of whole block groups: the f32 panels take 3 blocks at a time, bf16's AMX tile
  // passes 4, and a share's leftover blocks ran on the slower one-block path.
  const int64_t group = p.bf16 != nullptr ? 4 : kF32PanelBlocks;
  const int64_t blocks = (p.rows + kF32Block - 1) / kF32Block, groups = (blocks + group - 1) / group;
  const int64_t first = std::min(blocks, group * (groups * team.id / team.size));
  const int64_t last = std::min(blocks, group * (groups * (team.id + 1) / team.size));
  if (p.bf16 != nullptr)
    bf16_matmul_blocks(x, dtype, tokens, w.in_features, p.bf16, p.rows, w.bias, y, dtype,
                       Bf16Isa::kAuto, first, last);
  else
    f32_matmul_blocks(static_cast<const float*>(x), tokens, w.in_features, p.f32, p.rows, w.bias,
                      static_cast<float*>(y), F32Isa::kAuto, first, last);
  team.sync();
}

// run_layer as a team: every thread streams its share of each projection's weights (the
// bandwidth of all cores for decode GEMVs) and runs its share of the attention items; the
// lead runs the small row ops between them.
void run_layer_team(const StackShape& s, const StackLayer& layer, int64_t index,
                    const StackStep& step, Buffers& b, const Team& team) {
  const int64_t tokens = step.tokens, hidden = s.hidden;
  if (team.lead()) input_norm(s, layer, index, tokens, b);
  team.sync();
  team_linear(layer.qkv, b.normed.data(), s.dtype, tokens, s.isa, b.qkv.data(), team);
  if (team.lead()) rotate_and_store(s, index, step, b);
  team.sync();
  paged_attention_team(attention_args(s, layer, index, step, b), team.id, team.size, *team.barrier,
                       *team.attention);
  team.sync();
  team_linear(layer.o_proj, b.attn.data(), s.dtype, tokens, s.isa, b.hidden.data(), team);
  if (team.lead())
    rms_norm(b.hidden.data(), b.residual.data(), layer.post_norm, tokens, hidden, s.eps, s.dtype,
             b.normed.data(), b.residual.data());
  team.sync();
  team_linear(layer.gate_up, b.normed.data(), s.dtype, tokens, s.isa, b.gate_up.data(), team);
  if (team.lead()) silu_mul(b.gate_up.data(), tokens, s.intermediate, s.dtype, b.act.data());
  team.sync();
  team_linear(layer.down, b.act.data(), s.dtype, tokens, s.isa, b.hidden.data(), team);
}

// Whether a step runs as a team: few rows (decode; prefill's larger products parallelise
// inside each kernel), more than one thread, every projection one part of float panels or
// quantized parts only, and
// LMARITH_STACK_TEAM not "0" (read every step, so a benchmark can compare both in one run).
bool team_step(const std::vector<StackLayer>& layers, int64_t tokens) {
  const char* setting = std::getenv("LMARITH_STACK_TEAM");
  const bool enabled = setting == nullptr || std::string_view(setting) != "0";
#ifdef LMARITH_OPENMP
  if (!enabled || tokens > kTeamTokens || omp_in_parallel() || omp_get_max_threads() < 2) return false;
  if (serial_steps_left.load(std::memory_order_relaxed) > 0) {
    serial_steps_left.fetch_sub(1, std::memory_order_relaxed);
    return false;
  }
#else
  return false;
#endif
  for (const StackLayer& layer : layers)
    for (const StackLinear* w : {&layer.qkv, &layer.o_proj, &layer.gate_up, &layer.down})
      if (!quantized(*w) &&
          (w->parts.size() != 1 || (w->parts[0].f32 == nullptr && w->parts[0].bf16 == nullptr)))
        return false;
  return true;
}

void run_team(const StackShape& shape, const std::vector<StackLayer>& layers, const StackStep& step,
              Buffers& buffers) {
  SpinBarrier barrier;
  AttentionTeamState attention;
#ifdef LMARITH_OPENMP
#pragma omp parallel
#endif
  {
#ifdef LMARITH_OPENMP
    const Team team{omp_get_thread_num(), omp_get_num_threads(), &barrier, &attention};
#else
    const Team team{0, 1, &barrier, &attention};
#endif
    barrier.join(team.size);
    for (size_t index = 0; index < layers.size(); ++index)
      run_layer_team(shape, layers[index], static_cast<int64_t>(index), step, buffers, team);
  }
  if (!barrier.contended()) {
    serial_stretch.store(kContendedSteps, std::memory_order_relaxed);
    return;
  }
  const int stretch = serial_stretch.load(std::memory_order_relaxed);
  serial_steps_left.store(stretch, std::memory_order_relaxed);
  serial_stretch.store(std::min(4 * stretch, kMaxContendedSteps), std::memory_order_relaxed);
}

}  // namespace

void decoder_stack_forward(const StackShape& shape, const std::vector<StackLayer>& layers,
                           const StackStep& step) {
  if (step.tokens == 0) return;
  Buffers buffers(shape, layers, step.tokens);
  const int64_t size = step.tokens * shape.hidden;
  std::memcpy(buffers.hidden.data(), step.x, size * buffers.hidden.element);
  if (team_step(layers, step.tokens)) {
    run_team(shape, layers, step, buffers);
  } else {
    for (size_t index = 0; index < layers.size(); ++index)
      run_layer(shape, layers[index], static_cast<int64_t>(index), step, buffers);
  }
  add_rows(buffers, shape, size, step.out);
}

}  // namespace lmarith
