// lmarith._C: pybind11 faces of csrc/kernels.h. Buffers arrive as integer addresses plus
// sizes, so the module never links against torch and survives torch upgrades; the caller
// (lmarith.bindings.ops) owns validation, contiguity and dtypes. The GIL is released
// while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* address_as(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

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
  m.def("built_with_openmp", &lmarith::built_with_openmp,
        "True when rows run in parallel through OpenMP.");
}
