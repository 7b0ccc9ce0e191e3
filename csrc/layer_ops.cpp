// C++ faces of kernels/reference_layers.py (see csrc/layer_ops.h). At decode sizes a call is
// a few microseconds of arithmetic, so rows run serially unless a step carries enough rows
// (prefill) to pay for waking the OpenMP team.
#include "layer_ops.h"

#include <cmath>
#include <cstring>

namespace lmarith {
namespace {

using detail::bf16_to_float;
using detail::fast_exp;
using detail::float_to_bf16;

constexpr int64_t kParallelElements = 1 << 16;  // below this a step's rows run on one thread

// Storage types: float for float32, Bf16 (raw bits) for bfloat16. Kernels are templates
// over them so each loop is specialised and vectorises.
struct Bf16 {
  uint16_t bits;
};

inline float widen(float value) { return value; }
inline float widen(Bf16 value) { return bf16_to_float(value.bits); }
inline void put(float& slot, float value) { slot = value; }
inline void put(Bf16& slot, float value) { slot.bits = float_to_bf16(value); }

// A value as the storage type holds it (bf16: rounded), so chains round where torch does.
inline float held(float value, float) { return value; }
inline float held(float value, Bf16) { return bf16_to_float(float_to_bf16(value)); }

template <typename T>
void rms_norm_row(const T* x, const T* residual, const T* weight, int64_t hidden, float eps,
                  T* out, T* summed) {
  float squares = 0.0f;
  for (int64_t i = 0; i < hidden; ++i) {
    float value = widen(x[i]);
    if (residual != nullptr) {
      value = held(value + widen(residual[i]), T{});
      put(summed[i], value);
    }
    squares += value * value;
  }
  const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
  const T* source = residual != nullptr ? summed : x;
  for (int64_t i = 0; i < hidden; ++i)
    put(out[i], widen(weight[i]) * held(widen(source[i]) * inverse, T{}));
}

// One row's heads: (a, b) = (x[d], x[d + half]) -> (a cos - b sin, b cos + a sin).
template <typename T>
void rotary_row(T* x, int64_t heads, int64_t head_dim, const T* cos, const T* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* head = x + h * head_dim;
    for (int64_t d = 0; d < half; ++d) {
      const float first = widen(head[d]), second = widen(head[d + half]);
      const float first_out = held(first * widen(cos[d]), T{}) - held(second * widen(sin[d]), T{});
      const float second_out =
          held(second * widen(cos[d + half]), T{}) + held(first * widen(sin[d + half]), T{});
      put(head[d], first_out);
      put(head[d + half], second_out);
    }
  }
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, int64_t width, T* out) {
  for (int64_t i = 0; i < width; ++i) {
    const float value = widen(gate[i]);
    put(out[i], held(value / (1.0f + fast_exp(-value)), T{}) * widen(up[i]));
  }
}

template <typename T>
void rms_norm_typed(const void* x, const void* residual, const void* weight, int64_t rows,
                    int64_t hidden, float eps, void* out, void* summed) {
  const T* rows_in = static_cast<const T*>(x);
  const T* rows_residual = static_cast<const T*>(residual);
#ifdef LMARITH_OPENMP
#pragma omp parallel for if (rows * hidden >= kParallelElements)
#endif
  for (int64_t row = 0; row < rows; ++row)
    rms_norm_row(rows_in + row * hidden, rows_residual ? rows_residual + row * hidden : nullptr,
                 static_cast<const T*>(weight), hidden, eps, static_cast<T*>(out) + row * hidden,
                 summed ? static_cast<T*>(summed) + row * hidden : nullptr);
}

template <typename T>
void rotary_typed(void* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                  const void* cos, const void* sin) {
#ifdef LMARITH_OPENMP
#pragma omp parallel for if (rows * heads * head_dim >= kParallelElements)
#endif
  for (int64_t row = 0; row < rows; ++row)
    rotary_row(static_cast<T*>(x) + row * row_stride, heads, head_dim,
               static_cast<const T*>(cos) + row * head_dim, static_cast<const T*>(sin) + row * head_dim);
}

template <typename T>
void silu_mul_typed(const void* gate_up, int64_t rows, int64_t width, void* out) {
#ifdef LMARITH_OPENMP
#pragma omp parallel for if (rows * width >= kParallelElements)
#endif
  for (int64_t row = 0; row < rows; ++row) {
    const T* gate = static_cast<const T*>(gate_up) + row * 2 * width;
    silu_mul_row(gate, gate + width, width, static_cast<T*>(out) + row * width);
  }
}

// Element i of a float32 or bfloat16 buffer as float, and a float stored in that dtype.
inline float load(const void* base, LogitsDtype dtype, int64_t i) {
  return dtype == LogitsDtype::kBFloat16 ? bf16_to_float(static_cast<const uint16_t*>(base)[i])
                                         : static_cast<const float*>(base)[i];
}

inline void store(void* base, LogitsDtype dtype, int64_t i, float value) {
  if (dtype == LogitsDtype::kBFloat16)
    static_cast<uint16_t*>(base)[i] = float_to_bf16(value);
  else
    static_cast<float*>(base)[i] = value;
}

void copy_row(const void* src, LogitsDtype src_dtype, int64_t src_at, const CacheView& cache,
              int64_t dst_at, int64_t count) {
  if (src_dtype == cache.dtype) {
    const int64_t size = src_dtype == LogitsDtype::kBFloat16 ? 2 : 4;
    std::memcpy(static_cast<char*>(cache.data) + dst_at * size,
                static_cast<const char*>(src) + src_at * size, count * size);
    return;
  }
  for (int64_t i = 0; i < count; ++i)
    store(cache.data, cache.dtype, dst_at + i, load(src, src_dtype, src_at + i));
}

}  // namespace

void rms_norm(const void* x, const void* residual, const void* weight, int64_t rows,
              int64_t hidden, float eps, LogitsDtype dtype, void* out, void* summed) {
  if (dtype == LogitsDtype::kBFloat16)
    rms_norm_typed<Bf16>(x, residual, weight, rows, hidden, eps, out, summed);
  else
    rms_norm_typed<float>(x, residual, weight, rows, hidden, eps, out, summed);
}

void rotary(void* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
            const void* cos, const void* sin, LogitsDtype dtype) {
  if (dtype == LogitsDtype::kBFloat16)
    rotary_typed<Bf16>(x, rows, row_stride, heads, head_dim, cos, sin);
  else
    rotary_typed<float>(x, rows, row_stride, heads, head_dim, cos, sin);
}

void silu_mul(const void* gate_up, int64_t rows, int64_t width, LogitsDtype dtype, void* out) {
  if (dtype == LogitsDtype::kBFloat16)
    silu_mul_typed<Bf16>(gate_up, rows, width, out);
  else
    silu_mul_typed<float>(gate_up, rows, width, out);
}

void store_kv(const void* key, const void* value, const int64_t* key_strides,
              const int64_t* value_strides,
              LogitsDtype src_dtype,
              int64_t tokens, int64_t heads, int64_t head_dim, const CacheView& key_cache,
              const CacheView& value_cache, const int64_t* slot_pages, const int64_t* slot_offsets) {
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t page = slot_pages[n], offset = slot_offsets[n];
    if (page < 0) continue;
    for (int64_t h = 0; h < heads; ++h) {
      copy_row(key, src_dtype, n * key_strides[0] + h * key_strides[1], key_cache,
               page * key_cache.page_stride + offset * key_cache.slot_stride + h * key_cache.head_stride,
               head_dim);
      copy_row(value, src_dtype, n * value_strides[0] + h * value_strides[1], value_cache,
               page * value_cache.page_stride + offset * value_cache.slot_stride +
                   h * value_cache.head_stride,
               head_dim);
    }
  }
}

}  // namespace lmarith
