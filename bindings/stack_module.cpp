// pybind11 face of csrc/decoder_stack.h: lmarith._C.DecoderStack, built once per model from
// its layers' weight addresses (engine/models/native_stack.py keeps the tensors alive) and
// called once per forward. Registered into lmarith._C by bindings/module.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "decoder_stack.h"
#include "entry_checks.h"

namespace py = pybind11;

namespace {

using lmarith::entry::require;
// data, qtype (-1 / -2: the float32 / bfloat16 panels of f32_matmul / bf16_matmul), rows,
// row_bytes
using Part = std::tuple<std::uintptr_t, int, int64_t, int64_t>;
using Linear = std::tuple<int64_t, int64_t, std::uintptr_t, std::vector<Part>>;  // in, out, bias, parts
using Layer = std::tuple<std::uintptr_t, std::uintptr_t, Linear, Linear, Linear, Linear, int64_t>;

using lmarith::entry::kQuantBlock;
using lmarith::entry::kQuantBlockBytes;
using lmarith::entry::kQuantTypes;
constexpr int kF32Panels = -1;   // a part's qtype code for packed float32 weights
constexpr int kBf16Panels = -2;  // ... and for packed bfloat16 ones

// One part: float32 / bfloat16 panels (row_bytes 4 * K / 2 * K rounded up to even) or GGML
// blocks of a C++ qtype (row_bytes matching K). A bfloat16 stack takes bfloat16 panels only,
// a float32 one everything else.
lmarith::StackPart make_part(const Part& spec, int64_t in, bool bf16_stack, const std::string& name) {
  const auto& [data, qtype, rows, row_bytes] = spec;
  require(rows > 0, "DecoderStack: " + name + " has an empty part");
  require((qtype == kBf16Panels) == bf16_stack,
          "DecoderStack: " + name + ": a bfloat16 stack takes bfloat16 panels, a float32 one the rest");
  if (qtype == kBf16Panels) {
    require(row_bytes == 2 * (in + in % 2),
            "DecoderStack: " + name + "'s bfloat16 panels need row_bytes 2 * K (K rounded up to even)");
    return {nullptr, lmarith::QuantType::kQ8_0, rows, row_bytes, nullptr,
            reinterpret_cast<const uint16_t*>(data)};
  }
  if (qtype == kF32Panels) {
    require(row_bytes == 4 * in, "DecoderStack: " + name + "'s float32 panels need row_bytes 4 * K");
    return {nullptr, lmarith::QuantType::kQ8_0, rows, row_bytes, reinterpret_cast<const float*>(data)};
  }
  require(qtype >= 0 && qtype < kQuantTypes && in % kQuantBlock[qtype] == 0 &&
              row_bytes == in / kQuantBlock[qtype] * kQuantBlockBytes[qtype],
          "DecoderStack: " + name + " has a part whose qtype/row_bytes do not match K");
  return {reinterpret_cast<const uint8_t*>(data), static_cast<lmarith::QuantType>(qtype), rows, row_bytes};
}

lmarith::StackLinear make_linear(const Linear& spec, int64_t in_features, int64_t out_features,
                                 bool bf16_stack, const std::string& name) {
  const auto& [in, out, bias, parts] = spec;
  require(in == in_features && out == out_features && !parts.empty(),
          "DecoderStack: " + name + " must be [" + std::to_string(out_features) + ", " +
              std::to_string(in_features) + "]");
  lmarith::StackLinear linear{{}, reinterpret_cast<const float*>(bias), in, out};
  int64_t rows = 0;
  for (const Part& part : parts) {
    linear.parts.push_back(make_part(part, in, bf16_stack, name));
    rows += linear.parts.back().rows;
  }
  require(rows == out, "DecoderStack: " + name + "'s parts do not add up to its rows");
  return linear;
}

class DecoderStack {
 public:
  DecoderStack(std::array<int64_t, 5> sizes, double eps, double scale, int isa,
               const std::vector<Layer>& layers, int dtype) {
    const auto [hidden, heads, kv_heads, head_dim, intermediate] = sizes;
    require(hidden > 0 && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 &&
                head_dim % 2 == 0 && intermediate > 0 && !layers.empty(),
            "DecoderStack: bad sizes");
    require(lmarith::quant_isa_supported(static_cast<lmarith::QuantIsa>(isa)),
            "DecoderStack: this CPU cannot run the requested instruction path");
    require(dtype == 0 || dtype == 1, "DecoderStack: dtype must be 0 (float32) or 1 (bfloat16)");
    shape_ = {hidden, heads, kv_heads, head_dim, intermediate, static_cast<float>(eps),
              static_cast<float>(scale), static_cast<lmarith::QuantIsa>(isa),
              static_cast<lmarith::LogitsDtype>(dtype)};
    const int64_t qkv = (heads + 2 * kv_heads) * head_dim;
    const bool bf16 = dtype == 1;
    for (const auto& [input_norm, post_norm, q, o, gu, down, window] : layers)
      layers_.push_back({reinterpret_cast<const void*>(input_norm),
                         reinterpret_cast<const void*>(post_norm),
                         make_linear(q, hidden, qkv, bf16, "qkv_proj"),
                         make_linear(o, heads * head_dim, hidden, bf16, "o_proj"),
                         make_linear(gu, hidden, 2 * intermediate, bf16, "gate_up_proj"),
                         make_linear(down, intermediate, hidden, bf16, "down_proj"), window});
  }

  // Addresses of the step's tensors: x, cos, sin, out (the stack's dtype), the metadata (int64) and
  // per-layer cache addresses; the checks keep every cache read and write in bounds.
  void forward(int64_t tokens, std::uintptr_t x, std::uintptr_t cos, std::uintptr_t sin,
               std::array<std::uintptr_t, 5> meta, int64_t num_seqs, int64_t table_width,
               std::uintptr_t key_caches, std::uintptr_t value_caches,
               std::array<int64_t, 3> cache_strides, std::array<int64_t, 2> cache_shape,
               int cache_dtype, std::uintptr_t out) const {
    require(cache_dtype == 0 || cache_dtype == 1, "DecoderStack: cache dtype must be 0 or 1");
    const auto* pages = reinterpret_cast<const int64_t*>(meta[0]);
    const auto* offsets = reinterpret_cast<const int64_t*>(meta[1]);
    const auto* starts = reinterpret_cast<const int64_t*>(meta[2]);
    const auto* contexts = reinterpret_cast<const int64_t*>(meta[3]);
    const auto* tables = reinterpret_cast<const int64_t*>(meta[4]);
    lmarith::entry::check_slots(pages, offsets, tokens, cache_shape[0], cache_shape[1]);
    const int64_t longest = lmarith::entry::check_paged_metadata(
        starts, contexts, tables, num_seqs, table_width, tokens, cache_shape[1], cache_shape[0]);
    const lmarith::StackStep step{
        tokens, reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(cos),
        reinterpret_cast<const void*>(sin), pages, offsets, starts, contexts, tables, num_seqs,
        table_width, longest, reinterpret_cast<const std::uintptr_t*>(key_caches),
        reinterpret_cast<const std::uintptr_t*>(value_caches),
        {cache_strides[0], cache_strides[1], cache_strides[2]}, cache_shape[0], cache_shape[1],
        static_cast<lmarith::AttnDtype>(cache_dtype), reinterpret_cast<void*>(out)};
    lmarith::decoder_stack_forward(shape_, layers_, step);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  lmarith::StackShape shape_{};
  std::vector<lmarith::StackLayer> layers_;
};

}  // namespace

void bind_decoder_stack(py::module_& m) {
  py::class_<DecoderStack>(m, "DecoderStack",
                           "A llama-family decoder stack with quantized or packed float linears, run in one call "
                           "per forward (csrc/decoder_stack.h; built by lmarith.models.native_stack).")
      .def(py::init<std::array<int64_t, 5>, double, double, int, const std::vector<Layer>&, int>(),
           py::arg("sizes"), py::arg("eps"), py::arg("scale"), py::arg("isa"), py::arg("layers"),
           py::arg("dtype") = 0)
      .def("forward", &DecoderStack::forward, py::call_guard<py::gil_scoped_release>(),
           py::arg("tokens"), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("meta"),
           py::arg("num_seqs"), py::arg("table_width"), py::arg("key_caches"),
           py::arg("value_caches"), py::arg("cache_strides"), py::arg("cache_shape"),
           py::arg("cache_dtype"), py::arg("out"),
           "out [tokens, hidden] (the stack's dtype) = x + residual after the last layer, for "
           "embeddings x; meta = (slot_pages, slot_offsets, query_start, context_lens, "
           "block_tables) int64 addresses; caches: int64 arrays of per-layer addresses.")
      .def_property_readonly("num_layers", &DecoderStack::num_layers);
}
