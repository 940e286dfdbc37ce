// Which copy of the CPU sweeps runs: the kernels' .cpp files include their sweeps (cpu_box_sweep.inc,
// normalized_mse_sweep.inc) twice, once compiled for AVX2 without FMA (namespace isa_avx2: GCC contracts
// a * b + c into an FMA in C++ whenever the target has one, which would round differently from the baseline
// copy) and once for the baseline x86-64 / other architectures (namespace isa_base), and pick one per call.
// The build itself stays portable (no -march flag).
// LGD_OPS_CPU_ISA=base forces the baseline copy (for tests and comparisons).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LGD_OPS_HAVE_AVX2_COPY 1
#define LGD_OPS_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2\")")
#define LGD_OPS_AVX2_END _Pragma("GCC pop_options")
#else
#define LGD_OPS_HAVE_AVX2_COPY 0
#define LGD_OPS_AVX2_BEGIN
#define LGD_OPS_AVX2_END
#endif

namespace lgd_ops {

inline bool use_avx2() {
#if LGD_OPS_HAVE_AVX2_COPY
  static const bool supported = __builtin_cpu_supports("avx2");
  const char* forced = std::getenv("LGD_OPS_CPU_ISA");
  return supported && !(forced && std::strcmp(forced, "base") == 0);
#else
  return false;
#endif
}

}  // namespace lgd_ops
