// CPU normalized_mse: one thread per (image, channel) plane. The forward reads each plane once,
// accumulating float64 moments about the plane's first element (so the central moments keep
// their precision) in eight lanes, and keeps only five numbers per plane; the backward is one
// elementwise sweep. Per-plane losses are added in plane order, so the loss is identical run to run.
// channels_last levels are read in place: a thread takes one image's block of kBlockCL channels and
// sweeps its positions, the channels as vector lanes, and the gradient is written channels_last (other
// strides are made NCHW-contiguous first). The sweeps (normalized_mse_sweep.inc) come in an AVX2 and a
// baseline copy (cpu_isa.h), which give the same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../common/cpu_isa.h"
#include "../../common/nmse_checks.h"
#include "../../common/nmse_math.h"

namespace lgd_ops {
namespace {

constexpr int64_t kBlockCL = 32;  // channels per thread of a channels_last level

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The level in a layout the kernels read in place: channels_last if the student is, else NCHW-contiguous.
at::Tensor kernel_layout(const at::Tensor& x, bool channels_last) {
  return x.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

struct Moments {
  double s_mean, t_mean, s_m2, t_m2, st_c;  // means and sums of squared / cross deviations
};

// The baseline copy's 32-byte vector types never cross this file, so GCC's note that their calling convention
// differs from the AVX2 copy's does not apply (it comes when templates are instantiated, at the file's end).
#pragma GCC diagnostic ignored "-Wpsabi"
namespace isa_base {
#include "normalized_mse_sweep.inc"
}  // namespace isa_base
#if LGD_OPS_HAVE_AVX2_COPY
LGD_OPS_AVX2_BEGIN
namespace isa_avx2 {
#include "normalized_mse_sweep.inc"
}  // namespace isa_avx2
LGD_OPS_AVX2_END
#endif

// The sweeps of one instruction set (cpu_isa.h).
template <bool kAvx2>
struct Sweeps {
  template <typename scalar_t>
  static Moments plane(const scalar_t* s, const scalar_t* t, int64_t n) {
#if LGD_OPS_HAVE_AVX2_COPY
    if constexpr (kAvx2) return isa_avx2::plane_moments(s, t, n);
#endif
    return isa_base::plane_moments(s, t, n);
  }
  template <typename scalar_t>
  static void block(const scalar_t* s, const scalar_t* t, int64_t n, int64_t C, int64_t cb, Moments* out) {
#if LGD_OPS_HAVE_AVX2_COPY
    if constexpr (kAvx2) return isa_avx2::block_moments(s, t, n, C, cb, out);
#endif
    isa_base::block_moments(s, t, n, C, cb, out);
  }
  template <typename scalar_t, typename acc_t>
  static void grad(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t n, acc_t ms, acc_t rs, acc_t mt,
                   acc_t rt, acc_t k, acc_t scale) {
#if LGD_OPS_HAVE_AVX2_COPY
    if constexpr (kAvx2) return isa_avx2::grad_plane(s, t, g, n, ms, rs, mt, rt, k, scale);
#endif
    isa_base::grad_plane(s, t, g, n, ms, rs, mt, rt, k, scale);
  }
  template <typename scalar_t, typename acc_t>
  static void grad_cl(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t positions, int64_t C,
                      const acc_t* st, acc_t scale) {
#if LGD_OPS_HAVE_AVX2_COPY
    if constexpr (kAvx2) return isa_avx2::grad_positions(s, t, g, positions, C, st, scale);
#endif
    isa_base::grad_positions(s, t, g, positions, C, st, scale);
  }
};

// One level's moments -> the statistics stat (5 rows of `planes`) and per-plane losses of its planes, which
// start at plane `first`.
template <bool kAvx2, typename scalar_t>
void forward_level(const at::Tensor& s, const at::Tensor& t, bool cl, double eps, int64_t first, int64_t planes,
                   double* stat, double* loss) {
  const int64_t B = s.size(0), C = s.size(1), n = s.size(2) * s.size(3);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  auto keep = [&](int64_t q, const Moments& m) {
    const PlaneTerms r = nmse_plane_terms(double(n), m.s_m2, m.t_m2, m.st_c, eps);
    stat[q] = m.s_mean;
    stat[planes + q] = r.s_rstd;
    stat[2 * planes + q] = m.t_mean;
    stat[3 * planes + q] = r.t_rstd;
    stat[4 * planes + q] = r.k;
    loss[q] = r.loss;
  };
  if (cl) {
    const int64_t blocks = (C + kBlockCL - 1) / kBlockCL;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      Moments m[kBlockCL];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk / blocks, c0 = (blk % blocks) * kBlockCL, cb = std::min(kBlockCL, C - c0);
        Sweeps<kAvx2>::block(sp + b * n * C + c0, tp + b * n * C + c0, n, C, cb, m);
        for (int64_t c = 0; c < cb; ++c) keep(first + b * C + c0 + c, m[c]);
      }
    });
    return;
  }
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) keep(first + p, Sweeps<kAvx2>::plane(sp + p * n, tp + p * n, n));  // n > 0
  });
}

std::tuple<at::Tensor, at::Tensor> normalized_mse_cpu(at::TensorList student,
                                                      at::TensorList teacher, double eps) {
  check_levels(student, teacher);
  const auto acc_dtype = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  int64_t total = 0;
  const int64_t planes = count_planes(student, &total);
  at::Tensor stats = at::empty({5, planes}, student[0].options().dtype(acc_dtype));
  std::vector<double> stat(5 * planes), loss(planes, 0.0);
  const bool avx2 = use_avx2();
  int64_t first = 0;  // index of the level's first plane
  for (size_t l = 0; l < student.size(); ++l) {
    const bool cl = is_channels_last(student[l]);
    const at::Tensor s = kernel_layout(student[l], cl), t = kernel_layout(teacher[l], cl);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "normalized_mse_cpu", [&] {
      if (avx2) forward_level<true, scalar_t>(s, t, cl, eps, first, planes, stat.data(), loss.data());
      else forward_level<false, scalar_t>(s, t, cl, eps, first, planes, stat.data(), loss.data());
    });
    first += s.size(0) * s.size(1);
  }
  double sum = 0.0;
  for (double v : loss) sum += v;
  stats.copy_(at::from_blob(stat.data(), {5, planes}, at::TensorOptions().dtype(at::kDouble)));
  at::Tensor out = at::scalar_tensor(sum / double(total),
                                     student[0].options().dtype(at::kDouble));
  return {out.to(student[0].scalar_type()), stats};
}

// One level's gradient g (the student's layout) from the statistics sd (5 rows of `planes`, float64) of its
// planes, which start at plane `first`.
template <bool kAvx2, typename scalar_t>
void backward_level(const at::Tensor& s, const at::Tensor& t, at::Tensor& g, bool cl, const double* sd,
                    int64_t planes, int64_t first, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.size(0), C = s.size(1), n = s.size(2) * s.size(3);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  if (cl) {  // element (b, p, c) at (b * n + p) * C + c, plane q = first + b * C + c
    std::vector<acc_t> st(5 * B * C);  // image b: rows st[(5 * b + j) * C + c], j = s_mean, s_rstd, t_mean, ...
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < 5; ++j)
        for (int64_t c = 0; c < C; ++c) st[(5 * b + j) * C + c] = acc_t(sd[j * planes + first + b * C + c]);
    at::parallel_for(0, B * n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bp = begin; bp < end;) {  // runs of positions inside one image
        const int64_t b = bp / n, stop = std::min(end, (b + 1) * n);
        Sweeps<kAvx2>::grad_cl(sp + bp * C, tp + bp * C, gp + bp * C, stop - bp, C, st.data() + 5 * b * C,
                               acc_t(scale));
        bp = stop;
      }
    });
    return;
  }
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t q = first + p;
      Sweeps<kAvx2>::grad(sp + p * n, tp + p * n, gp + p * n, n, acc_t(sd[q]), acc_t(sd[planes + q]),
                          acc_t(sd[2 * planes + q]), acc_t(sd[3 * planes + q]), acc_t(sd[4 * planes + q]),
                          acc_t(scale));
    }
  });
}

std::vector<at::Tensor> normalized_mse_backward_cpu(const at::Tensor& grad, at::TensorList student,
                                                    at::TensorList teacher, const at::Tensor& stats) {
  check_levels(student, teacher);
  int64_t total = 0;
  const int64_t planes = count_planes(student, &total);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 5 && stats.size(1) == planes,
              "lgd_ops.normalized_mse_backward: stats must be [5, ", planes, "], got ", stats.sizes());
  TORCH_CHECK(grad.numel() == 1, "lgd_ops.normalized_mse_backward: grad must be a scalar");
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const double* sd = st.data_ptr<double>();
  const double scale = grad.item<double>() * 2.0 / double(total);
  const bool avx2 = use_avx2();
  std::vector<at::Tensor> grads;
  int64_t first = 0;
  for (size_t l = 0; l < student.size(); ++l) {
    const bool cl = is_channels_last(student[l]);
    const at::Tensor s = kernel_layout(student[l], cl), t = kernel_layout(teacher[l], cl);
    at::Tensor g = at::empty_like(s);  // the student's layout
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "normalized_mse_backward_cpu", [&] {
      if (avx2) backward_level<true, scalar_t>(s, t, g, cl, sd, planes, first, scale);
      else backward_level<false, scalar_t>(s, t, g, cl, sd, planes, first, scale);
    });
    grads.push_back(g);
    first += s.size(0) * s.size(1);
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CPU, m) {
  m.impl("normalized_mse", &normalized_mse_cpu);
  m.impl("normalized_mse_backward", &normalized_mse_backward_cpu);
}

}  // namespace lgd_ops
