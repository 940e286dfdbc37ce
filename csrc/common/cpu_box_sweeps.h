// The CPU box sweeps (cpu_box_sweep.inc) in two copies: namespace isa_base (baseline instruction set) and, on
// x86-64 with GCC/Clang, isa_avx2 (compiled for AVX2; cpu_isa.h picks one per call). A kernel file
// defines LGD_SWEEP_POOL or LGD_SWEEP_FILL before including this, to compile only the sweep it runs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_boxes.h"
#include "cpu_isa.h"

#if LGD_OPS_HAVE_AVX2_COPY
#include <immintrin.h>
#endif

namespace lgd_ops {
namespace isa_base {
#include "cpu_box_sweep.inc"
}  // namespace isa_base
#if LGD_OPS_HAVE_AVX2_COPY
LGD_OPS_AVX2_BEGIN
namespace isa_avx2 {
#define LGD_SWEEP_AVX2
#include "cpu_box_sweep.inc"
#undef LGD_SWEEP_AVX2
}  // namespace isa_avx2
LGD_OPS_AVX2_END
#endif
}  // namespace lgd_ops
