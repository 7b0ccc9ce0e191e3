// lmarith._C: pybind11 faces of csrc/kernels.h. Buffers arrive as integer addresses plus
// sizes, so the module never links against torch and survives torch upgrades; the caller
// (lmarith.bindings.ops) owns validation, contiguity and dtypes. The GIL is released
// while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bf16_matmul.h"
#include "f32_matmul.h"
#include "entry_checks.h"
#include "kernels.h"
#include "shm_allreduce.h"

namespace py = pybind11;

void bind_layer_ops(py::module_& m);      // bindings/layer_module.cpp
void bind_decoder_stack(py::module_& m);  // bindings/stack_module.cpp

namespace {

using lmarith::entry::address_as;
using lmarith::entry::check_paged_metadata;
using lmarith::entry::kQuantBlock;
using lmarith::entry::kQuantBlockBytes;
using lmarith::entry::kQuantTypes;
using lmarith::entry::require;

using Int2 = std::array<int64_t, 2>;
using Int3 = std::array<int64_t, 3>;



void combine_entry(std::uintptr_t logits, int logits_dtype, int64_t num_terms, int64_t batch,
                   int64_t vocab, std::uintptr_t weights, std::uintptr_t consts,
                   int64_t num_blocks, std::uintptr_t group_coefs, std::uintptr_t group_kinds,
                   int64_t num_groups, std::uintptr_t mask_weights, std::uintptr_t mask_log_alpha,
                   std::uintptr_t log_probs, std::uintptr_t lse) {
  require(num_terms >= 0 && batch >= 0 && vocab > 0, "combine: need T >= 0, B >= 0, V > 0");
  require(num_groups >= 0 && num_blocks == 1 + 2 * num_groups,
          "combine: the plan needs R == 1 + 2 * G row-blocks");
  require(logits_dtype == static_cast<int>(lmarith::LogitsDtype::kFloat32) ||
              logits_dtype == static_cast<int>(lmarith::LogitsDtype::kBFloat16),
          "combine: logits_dtype must be 0 (float32) or 1 (bfloat16)");
  require((mask_weights == 0) == (mask_log_alpha == 0),
          "combine: mask_weights and mask_log_alpha go together (both 0: no mask)");
  const lmarith::CombinePlan plan{address_as<const float>(weights), address_as<const float>(consts),
                                  address_as<const float>(group_coefs),
                                  address_as<const int32_t>(group_kinds), num_blocks, num_groups,
                                  address_as<const float>(mask_weights),
                                  address_as<const float>(mask_log_alpha)};
  lmarith::combine(address_as<const void>(logits), static_cast<lmarith::LogitsDtype>(logits_dtype),
                   num_terms, batch, vocab, plan, address_as<float>(log_probs),
                   address_as<float>(lse));
}

void sample_entry(std::uintptr_t log_probs, int64_t batch, int64_t vocab,
                  std::uintptr_t temperature, std::uintptr_t top_k, std::uintptr_t top_p,
                  std::uintptr_t min_p, std::uintptr_t seed, std::uintptr_t step,
                  std::uintptr_t tokens) {
  require(batch >= 0 && vocab > 0 && vocab <= INT32_MAX, "sample: need B >= 0, 0 < V < 2^31");
  const lmarith::SampleParams params{
      address_as<const float>(temperature), address_as<const int32_t>(top_k),
      address_as<const float>(top_p),       address_as<const float>(min_p),
      address_as<const int64_t>(seed),      address_as<const int64_t>(step)};
  lmarith::sample(address_as<const float>(log_probs), batch, vocab, params,
                  address_as<int64_t>(tokens));
}

void spec_accept_entry(std::uintptr_t target_log_probs, std::uintptr_t draft_log_probs,
                       std::uintptr_t draft_tokens, std::uintptr_t num_drafts, std::uintptr_t seed,
                       std::uintptr_t step, std::uintptr_t greedy, int64_t batch,
                       int64_t max_drafts, int64_t vocab, std::uintptr_t num_accepted,
                       std::uintptr_t next_token) {
  require(batch >= 0 && max_drafts >= 0 && vocab > 0 && vocab <= INT32_MAX,
          "spec_accept: need B >= 0, K >= 0, 0 < V < 2^31");
  require(batch == 0 || (max_drafts + 1) * vocab <= INT64_MAX / batch,
          "spec_accept: B * (K + 1) * V overflows");
  const lmarith::SpecAcceptInputs inputs{
      address_as<const float>(target_log_probs), address_as<const float>(draft_log_probs),
      address_as<const int64_t>(draft_tokens),   address_as<const int32_t>(num_drafts),
      address_as<const int64_t>(seed),           address_as<const int64_t>(step),
      address_as<const uint8_t>(greedy)};
  lmarith::spec_accept(inputs, batch, max_drafts, vocab, address_as<int32_t>(num_accepted),
                       address_as<int64_t>(next_token));
}

void paged_attention_entry(std::uintptr_t query, int query_dtype, Int3 query_shape,
                           Int2 query_strides, std::uintptr_t key_cache,
                           std::uintptr_t value_cache, int cache_dtype, Int3 key_strides,
                           Int3 value_strides, Int3 cache_shape, std::uintptr_t query_start,
                           std::uintptr_t context_lens, std::uintptr_t block_tables,
                           int64_t num_seqs, int64_t table_width, double scale,
                           int64_t sliding_window, std::uintptr_t out) {
  const auto [num_tokens, num_heads, head_dim] = query_shape;
  const auto [num_pages, page_size, kv_heads] = cache_shape;
  require(num_tokens >= 0 && num_seqs >= 0 && head_dim > 0 && page_size > 0 && kv_heads > 0 &&
              num_heads > 0 && num_heads % kv_heads == 0 && sliding_window >= 0,
          "paged_attention: need N >= 0, D > 0, page_size > 0, H a multiple of KVH, window >= 0");
  for (int code : {query_dtype, cache_dtype})
    require(code == 0 || code == 1, "paged_attention: dtypes must be 0 (float32) or 1 (bfloat16)");
  const int64_t longest = check_paged_metadata(
      address_as<const int64_t>(query_start), address_as<const int64_t>(context_lens),
      address_as<const int64_t>(block_tables), num_seqs, table_width, num_tokens, page_size,
      num_pages);
  lmarith::PagedAttentionArgs args{
      address_as<const void>(query), static_cast<lmarith::AttnDtype>(query_dtype), num_tokens,
      num_heads, head_dim, query_strides[0], query_strides[1],
      {address_as<const void>(key_cache), key_strides[0], key_strides[1], key_strides[2]},
      {address_as<const void>(value_cache), value_strides[0], value_strides[1], value_strides[2]},
      static_cast<lmarith::AttnDtype>(cache_dtype), page_size, kv_heads,
      address_as<const int64_t>(query_start), address_as<const int64_t>(context_lens),
      address_as<const int64_t>(block_tables), num_seqs, table_width, longest,
      static_cast<float>(scale), sliding_window, address_as<void>(out)};
  lmarith::paged_attention(args);
}

// quant_matmul: x f32/bf16 [M,K], weight u8 [N,row_bytes] in a GGML block format (qtype
// 0..6: q8_0, q4_0, q4_1, q4_k, q6_k, q5_0, q5_1), isa 0 auto / 1 scalar / 2 avx2 / 3 vnni -> out f32 [M,N].
void quant_matmul_entry(std::uintptr_t x, int x_dtype, int64_t m, int64_t k, std::uintptr_t weight,
                        int qtype, int64_t n, int64_t row_bytes, int isa, std::uintptr_t out) {
  require(qtype >= 0 && qtype < kQuantTypes,
          "quant_matmul: qtype must be 0..6 (q8_0 q4_0 q4_1 q4_k q6_k q5_0 q5_1)");
  require(x_dtype == 0 || x_dtype == 1, "quant_matmul: x_dtype must be 0 (float32) or 1 (bfloat16)");
  require(m >= 0 && n >= 0 && k > 0 && k % kQuantBlock[qtype] == 0,
          "quant_matmul: need M >= 0, N >= 0, K > 0 divisible by the format's block");
  require(row_bytes == k / kQuantBlock[qtype] * kQuantBlockBytes[qtype], "quant_matmul: row_bytes does not match K");
  require(isa >= 0 && isa <= 3, "quant_matmul: isa must be 0 (auto), 1 (scalar), 2 (avx2), 3 (vnni)");
  require(lmarith::quant_isa_supported(static_cast<lmarith::QuantIsa>(isa)),
          "quant_matmul: this CPU cannot run the requested instruction path");
  lmarith::quant_matmul(address_as<const void>(x), static_cast<lmarith::LogitsDtype>(x_dtype), m, k,
                        address_as<const uint8_t>(weight), static_cast<lmarith::QuantType>(qtype),
                        n, row_bytes, static_cast<lmarith::QuantIsa>(isa), address_as<float>(out));
}

// bf16_matmul: x f32/bf16 [M,K], packed bf16 weight (csrc/bf16_matmul.h), bias f32 [N] or 0,
// out [M,N] f32/bf16; isa 0 auto / 1 scalar / 2 avx2 / 3 avx512-bf16 / 4 amx.
void bf16_matmul_entry(std::uintptr_t x, int x_dtype, int64_t m, int64_t k, std::uintptr_t packed,
                       int64_t n, std::uintptr_t bias, std::uintptr_t out, int out_dtype, int isa) {
  require(x_dtype == 0 || x_dtype == 1, "bf16_matmul: x_dtype must be 0 (float32) or 1 (bfloat16)");
  require(out_dtype == 0 || out_dtype == 1, "bf16_matmul: out_dtype must be 0 (float32) or 1 (bfloat16)");
  require(m >= 0 && n >= 0 && k > 0, "bf16_matmul: need M >= 0, N >= 0, K > 0");
  require(isa >= 0 && isa <= 4,
          "bf16_matmul: isa must be 0 (auto), 1 (scalar), 2 (avx2), 3 (avx512bf16), 4 (amx)");
  require(lmarith::bf16_isa_supported(static_cast<lmarith::Bf16Isa>(isa)),
          "bf16_matmul: this CPU cannot run the requested instruction path");
  lmarith::bf16_matmul(address_as<const void>(x), static_cast<lmarith::LogitsDtype>(x_dtype), m, k,
                       address_as<const uint16_t>(packed), n, address_as<const float>(bias),
                       address_as<void>(out), static_cast<lmarith::LogitsDtype>(out_dtype),
                       static_cast<lmarith::Bf16Isa>(isa));
}

// f32_matmul: x f32 [M,K], packed f32 weight (csrc/f32_matmul.h), bias f32 [N] or 0, out f32
// [M,N]; isa 0 auto / 1 scalar / 2 avx2 / 3 avx512.
void f32_matmul_entry(std::uintptr_t x, int64_t m, int64_t k, std::uintptr_t packed, int64_t n,
                      std::uintptr_t bias, std::uintptr_t out, int isa) {
  require(m >= 0 && n >= 0 && k > 0, "f32_matmul: need M >= 0, N >= 0, K > 0");
  require(isa >= 0 && isa <= 3, "f32_matmul: isa must be 0 (auto), 1 (scalar), 2 (avx2), 3 (avx512)");
  require(lmarith::f32_isa_supported(static_cast<lmarith::F32Isa>(isa)),
          "f32_matmul: this CPU cannot run the requested instruction path");
  lmarith::f32_matmul(address_as<const float>(x), m, k, address_as<const float>(packed), n,
                      address_as<const float>(bias), address_as<float>(out),
                      static_cast<lmarith::F32Isa>(isa));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmarith native CPU kernels (raw buffer addresses; see lmarith.bindings.ops)";
  m.def("combine", &combine_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("logits"), py::arg("logits_dtype"), py::arg("num_terms"), py::arg("batch"),
        py::arg("vocab"), py::arg("weights"), py::arg("consts"), py::arg("num_blocks"),
        py::arg("group_coefs"), py::arg("group_kinds"), py::arg("num_groups"),
        py::arg("mask_weights"), py::arg("mask_log_alpha"), py::arg("log_probs"), py::arg("lse"),
        "Evaluate a formula plan: logits f32/bf16 [T,B,V], weights f32 [B,R,T], consts f32 "
        "[B,R], group_coefs f32 [B,G], group_kinds i32 [B,G], plausibility mask f32 [B,T] and "
        "f32 [B] (addresses 0: none) -> log_probs f32 [B,V], lse f32 [B].");
  m.def("sample", &sample_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("log_probs"), py::arg("batch"), py::arg("vocab"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seed"), py::arg("step"),
        py::arg("tokens"),
        "Draw one token per row: log_probs f32 [B,V], temperature/top_p/min_p f32 [B], "
        "top_k i32 [B], seed/step i64 [B] -> tokens i64 [B].");
  m.def("spec_accept", &spec_accept_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("target_log_probs"), py::arg("draft_log_probs"), py::arg("draft_tokens"),
        py::arg("num_drafts"), py::arg("seed"), py::arg("step"), py::arg("greedy"),
        py::arg("batch"), py::arg("max_drafts"), py::arg("vocab"), py::arg("num_accepted"),
        py::arg("next_token"),
        "Verify speculative proposals: target f32 [B,K+1,V], draft f32 [B,K,V], draft_tokens "
        "i64 [B,K], num_drafts i32 [B], seed/step i64 [B], greedy u8 [B] -> num_accepted i32 "
        "[B], next_token i64 [B].");
  m.def("paged_attention", &paged_attention_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("query"), py::arg("query_dtype"), py::arg("query_shape"),
        py::arg("query_strides"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("cache_dtype"), py::arg("key_strides"), py::arg("value_strides"),
        py::arg("cache_shape"), py::arg("query_start"), py::arg("context_lens"),
        py::arg("block_tables"), py::arg("num_seqs"), py::arg("table_width"), py::arg("scale"),
        py::arg("sliding_window"), py::arg("out"),
        "Paged causal attention: query f32/bf16 [N,H,D] (row, head strides), K/V caches "
        "f32/bf16 (page, slot, head strides; shape (pages, page_size, KVH)), i64 query_start "
        "[S+1], context_lens [S], block_tables [S,W]; sliding_window 0: none -> out [N,H,D] "
        "contiguous in the query dtype.");
  m.def("quant_matmul", &quant_matmul_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("k"), py::arg("weight"),
        py::arg("qtype"), py::arg("n"), py::arg("row_bytes"), py::arg("isa"), py::arg("out"),
        "out f32 [M,N] = x (f32/bf16 [M,K]) @ W.T, W u8 [N,row_bytes] GGML blocks (qtype 0..6: "
        "q8_0 q4_0 q4_1 q4_k q6_k q5_0 q5_1); isa 0 auto, 1 scalar, 2 avx2, 3 avx512-vnni.");
  m.def("quant_isa_supported", [](int isa) {
          return lmarith::quant_isa_supported(static_cast<lmarith::QuantIsa>(isa)); },
        py::arg("isa"), "Whether this CPU runs quant_matmul path isa (1 scalar, 2 avx2, 3 vnni).");
  m.def("bf16_matmul", &bf16_matmul_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("k"), py::arg("packed"),
        py::arg("n"), py::arg("bias"), py::arg("out"), py::arg("out_dtype"), py::arg("isa"),
        "out [M,N] (out_dtype 0 f32, 1 bf16) = x (f32/bf16 [M,K]) @ W.T + bias (f32 [N], 0: none), "
        "W packed bf16 (16-row blocks of column pairs); isa 0 auto, 1 scalar, 2 avx2, 3 avx512-bf16.");
  m.def("f32_matmul", &f32_matmul_entry, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("n"), py::arg("bias"),
        py::arg("out"), py::arg("isa"),
        "out f32 [M,N] = x (f32 [M,K]) @ W.T + bias (f32 [N], 0: none), W packed f32 (16-row "
        "blocks, [K][16] each); isa 0 auto, 1 scalar, 2 avx2, 3 avx512.");
  m.def("f32_isa_supported", [](int isa) {
          return lmarith::f32_isa_supported(static_cast<lmarith::F32Isa>(isa)); },
        py::arg("isa"), "Whether this CPU runs f32_matmul path isa (1 scalar, 2 avx2, 3 avx512).");
  m.def("bf16_isa_supported", [](int isa) {
          return lmarith::bf16_isa_supported(static_cast<lmarith::Bf16Isa>(isa)); },
        py::arg("isa"), "Whether this CPU runs bf16_matmul path isa (1 scalar, 2 avx2, 3 avx512-bf16, 4 amx).");
  bind_layer_ops(m);
  bind_decoder_stack(m);
  m.def("built_with_openmp", &lmarith::built_with_openmp,
        "True when rows run in parallel through OpenMP.");
  using lmarith::ShmAllReduce;
  py::class_<ShmAllReduce>(m, "ShmAllReduce",
                           "In-place all-reduce among the processes of one host through /dev/shm "
                           "(csrc/shm_allreduce.h; use it through lmarith.bindings.shm).")
      .def(py::init<const std::string&, int, int, int64_t, bool, double>(),
           py::call_guard<py::gil_scoped_release>(), py::arg("name"), py::arg("rank"),
           py::arg("world_size"), py::arg("max_bytes"), py::arg("create"), py::arg("timeout_s"))
      .def("all_reduce",
           [](ShmAllReduce& self, std::uintptr_t data, int64_t numel, int dtype, int op,
              double timeout_s) {
             self.all_reduce(address_as<void>(data), numel, static_cast<lmarith::ShmDtype>(dtype),
                             static_cast<lmarith::ShmOp>(op), timeout_s);
           },
           py::call_guard<py::gil_scoped_release>(), py::arg("data"), py::arg("numel"),
           py::arg("dtype"), py::arg("op"), py::arg("timeout_s") = -1.0,
           "Reduce numel elements at address data in place (dtype 0 f32, 1 bf16, 2 f64; op 0 "
           "sum, 1 max) in rank order; RuntimeError when a peer misses timeout_s.")
      .def("close", &ShmAllReduce::close, "Unmap; the creator also unlinks the segment's name.")
      .def_property_readonly("name", &ShmAllReduce::name)
      .def_property_readonly("rank", &ShmAllReduce::rank)
      .def_property_readonly("world_size", &ShmAllReduce::world_size)
      .def_property_readonly("max_bytes", &ShmAllReduce::max_bytes)
      .def_property_readonly("closed", &ShmAllReduce::closed);
}
