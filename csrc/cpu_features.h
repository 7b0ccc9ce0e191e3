// What this CPU runs, asked once per process (__builtin_cpu_supports), for the matmul kernels
// that pick an instruction path at run time (csrc/f32_matmul.cpp, csrc/bf16_matmul.cpp).
// A non-x86 build answers no to all.
#pragma once

namespace lmarith {
namespace cpu {

#if defined(__x86_64__) || defined(__i386__)
inline bool has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

inline bool has_avx512f() {
  static const bool has = has_avx2_fma() && __builtin_cpu_supports("avx512f");
  return has;
}

inline bool has_avx512bf16() {
  static const bool has = has_avx512f() && __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
inline bool has_avx2_fma() { return false; }
inline bool has_avx512f() { return false; }
inline bool has_avx512bf16() { return false; }
#endif

}  // namespace cpu
}  // namespace lmarith
