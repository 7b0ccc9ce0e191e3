// pybind11 faces of csrc/layer_ops.h (residual add + RMSNorm, rotary, SiLU-and-multiply,
// store_kv), registered into lmarith._C by bindings/module.cpp. Buffers arrive as integer
// addresses; lmarith.bindings.cpp_layers owns shapes, strides and dtypes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "entry_checks.h"
#include "layer_ops.h"

namespace py = pybind11;

namespace {

using lmarith::entry::address_as;
using Int2 = std::array<int64_t, 2>;
using Int3 = std::array<int64_t, 3>;

lmarith::LogitsDtype dtype_of(int code, const char* op) {
  if (code != 0 && code != 1)
    throw std::invalid_argument(std::string(op) + ": dtype must be 0 (float32) or 1 (bfloat16)");
  return static_cast<lmarith::LogitsDtype>(code);
}

void rms_norm_entry(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight,
                    int64_t rows, int64_t hidden, double eps, int dtype, std::uintptr_t out,
                    std::uintptr_t summed) {
  if (rows < 0 || hidden <= 0 || (residual == 0) != (summed == 0))
    throw std::invalid_argument("rms_norm: need rows >= 0, hidden > 0, residual and summed together");
  lmarith::rms_norm(address_as<const void>(x), address_as<const void>(residual),
                    address_as<const void>(weight), rows, hidden, static_cast<float>(eps),
                    dtype_of(dtype, "rms_norm"), address_as<void>(out), address_as<void>(summed));
}

void rotary_entry(std::uintptr_t x, int64_t rows, int64_t row_stride, int64_t heads,
                  int64_t head_dim, std::uintptr_t cos, std::uintptr_t sin, int dtype) {
  if (rows < 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 || row_stride < heads * head_dim)
    throw std::invalid_argument("rotary: need rows >= 0, an even head_dim, row_stride >= heads * head_dim");
  lmarith::rotary(address_as<void>(x), rows, row_stride, heads, head_dim,
                  address_as<const void>(cos), address_as<const void>(sin), dtype_of(dtype, "rotary"));
}

void silu_mul_entry(std::uintptr_t gate_up, int64_t rows, int64_t width, int dtype,
                    std::uintptr_t out) {
  if (rows < 0 || width <= 0) throw std::invalid_argument("silu_mul: need rows >= 0, width > 0");
  lmarith::silu_mul(address_as<const void>(gate_up), rows, width, dtype_of(dtype, "silu_mul"),
                    address_as<void>(out));
}

// Caches are (address, dtype, (page, slot, head) strides); K/V sources share one dtype.
void store_kv_entry(std::uintptr_t key, std::uintptr_t value, Int2 key_row_strides,
                    Int2 value_row_strides, int src_dtype, int64_t tokens, int64_t heads,
                    int64_t head_dim, std::uintptr_t key_cache, int key_dtype, Int3 key_strides,
                    std::uintptr_t value_cache, int value_dtype, Int3 value_strides,
                    Int2 cache_shape, std::uintptr_t slot_pages, std::uintptr_t slot_offsets) {
  if (tokens < 0 || heads <= 0 || head_dim <= 0)
    throw std::invalid_argument("store_kv: need tokens >= 0, heads > 0, head_dim > 0");
  const int64_t* pages = address_as<const int64_t>(slot_pages);
  const int64_t* offsets = address_as<const int64_t>(slot_offsets);
  lmarith::entry::check_slots(pages, offsets, tokens, cache_shape[0], cache_shape[1]);
  const lmarith::CacheView keys{address_as<void>(key_cache), key_strides[0], key_strides[1],
                                key_strides[2], dtype_of(key_dtype, "store_kv")};
  const lmarith::CacheView values{address_as<void>(value_cache), value_strides[0],
                                  value_strides[1], value_strides[2],
                                  dtype_of(value_dtype, "store_kv")};
  lmarith::store_kv(address_as<const void>(key), address_as<const void>(value), key_row_strides.data(),
                    value_row_strides.data(), dtype_of(src_dtype, "store_kv"), tokens, heads, head_dim, keys,
                    values, pages, offsets);
}

}  // namespace

void bind_layer_ops(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm_entry, release, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("dtype"), py::arg("out"),
        py::arg("summed"),
        "out [rows, hidden] = weight * rmsnorm(x (+ residual, written to summed; 0: none)); "
        "dtype 0 f32, 1 bf16 for every buffer.");
  m.def("rotary", &rotary_entry, release, py::arg("x"), py::arg("rows"), py::arg("row_stride"),
        py::arg("heads"), py::arg("head_dim"), py::arg("cos"), py::arg("sin"), py::arg("dtype"),
        "Rotate-half rotary embedding in place on x [rows, heads, head_dim] (row stride given), "
        "cos/sin [rows, head_dim] in x's dtype.");
  m.def("silu_mul", &silu_mul_entry, release, py::arg("gate_up"), py::arg("rows"),
        py::arg("width"), py::arg("dtype"), py::arg("out"),
        "out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:].");
  m.def("store_kv", &store_kv_entry, release, py::arg("key"), py::arg("value"),
        py::arg("key_row_strides"), py::arg("value_row_strides"), py::arg("src_dtype"), py::arg("tokens"),
        py::arg("heads"), py::arg("head_dim"), py::arg("key_cache"), py::arg("key_dtype"),
        py::arg("key_strides"), py::arg("value_cache"), py::arg("value_dtype"),
        py::arg("value_strides"), py::arg("cache_shape"), py::arg("slot_pages"),
        py::arg("slot_offsets"),
        "Write token rows [tokens, heads, head_dim] of key/value ((token, head) strides given) into their (page, offset) slots "
        "of strided caches of shape (pages, page_size, ...) (pages < 0 skipped), cast to each cache's dtype.");
}
