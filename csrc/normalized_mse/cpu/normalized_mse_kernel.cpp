// CPU normalized_mse: one thread per (image, channel) plane. The forward reads each plane once,
// accumulating float64 moments about the plane's first element (so the central moments keep
// their precision) in four independent lanes that the compiler vectorises, and keeps only five
// numbers per plane; the backward is one elementwise sweep. Per-plane losses are added in plane
// order, so the loss is identical run to run. channels_last levels are read in place: a thread takes
// one image's block of kBlockCL channels and sweeps its positions, the channels as vector lanes, and
// the gradient is written channels_last (other strides are made NCHW-contiguous first).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../../common/nmse_checks.h"
#include "../../common/nmse_math.h"

namespace lgd_ops {
namespace {

constexpr int kLanes = 4;
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

template <typename scalar_t>
Moments plane_moments(const scalar_t* s, const scalar_t* t, int64_t n) {
  const double s0 = static_cast<double>(s[0]), t0 = static_cast<double>(t[0]);
  double a[kLanes] = {}, b[kLanes] = {}, aa[kLanes] = {}, bb[kLanes] = {}, ab[kLanes] = {};
  auto add = [&](int l, int64_t i) {
    const double x = static_cast<double>(s[i]) - s0, y = static_cast<double>(t[i]) - t0;
    a[l] += x;
    b[l] += y;
    aa[l] += x * x;
    bb[l] += y * y;
    ab[l] += x * y;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) add(l, i + l);
  for (; i < n; ++i) add(0, i);
  auto total = [](const double* v) { return (v[0] + v[1]) + (v[2] + v[3]); };
  const double sa = total(a), sb = total(b), dn = double(n);
  return {s0 + sa / dn, t0 + sb / dn, total(aa) - sa * sa / dn, total(bb) - sb * sb / dn,
          total(ab) - sa * sb / dn};
}

std::tuple<at::Tensor, at::Tensor> normalized_mse_cpu(at::TensorList student,
                                                      at::TensorList teacher, double eps) {
  check_levels(student, teacher);
  const auto acc_dtype = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  int64_t total = 0;
  const int64_t planes = count_planes(student, &total);
  at::Tensor stats = at::empty({5, planes}, student[0].options().dtype(acc_dtype));
  std::vector<double> stat(5 * planes), loss(planes, 0.0);
  int64_t first = 0;  // index of the level's first plane
  for (size_t l = 0; l < student.size(); ++l) {
    const bool cl = is_channels_last(student[l]);
    const at::Tensor s = kernel_layout(student[l], cl), t = kernel_layout(teacher[l], cl);
    const int64_t count = s.size(0) * s.size(1), n = s.size(2) * s.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "normalized_mse_cpu", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* tp = t.data_ptr<scalar_t>();
      if (cl) {
        const int64_t C = s.size(1), blocks = (C + kBlockCL - 1) / kBlockCL;
        at::parallel_for(0, s.size(0) * blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t b = blk / blocks, c0 = (blk % blocks) * kBlockCL, cb = std::min(kBlockCL, C - c0);
            const scalar_t* sb = sp + b * n * C + c0;
            const scalar_t* tb = tp + b * n * C + c0;
            double s0[kBlockCL], t0[kBlockCL], a[kBlockCL] = {}, bs[kBlockCL] = {}, aa[kBlockCL] = {},
                bb[kBlockCL] = {}, ab[kBlockCL] = {};
            for (int64_t c = 0; c < cb; ++c) s0[c] = static_cast<double>(sb[c]), t0[c] = static_cast<double>(tb[c]);
            for (int64_t p = 0; p < n; ++p)
              for (int64_t c = 0; c < cb; ++c) {
                const double x = static_cast<double>(sb[p * C + c]) - s0[c], y = static_cast<double>(tb[p * C + c]) - t0[c];
                a[c] += x;
                bs[c] += y;
                aa[c] += x * x;
                bb[c] += y * y;
                ab[c] += x * y;
              }
            const double dn = double(n);
            for (int64_t c = 0; c < cb; ++c) {
              const PlaneTerms r = nmse_plane_terms(dn, aa[c] - a[c] * a[c] / dn, bb[c] - bs[c] * bs[c] / dn,
                                                    ab[c] - a[c] * bs[c] / dn, eps);
              const int64_t q = first + b * C + c0 + c;
              stat[q] = s0[c] + a[c] / dn;
              stat[planes + q] = r.s_rstd;
              stat[2 * planes + q] = t0[c] + bs[c] / dn;
              stat[3 * planes + q] = r.t_rstd;
              stat[4 * planes + q] = r.k;
              loss[q] = r.loss;
            }
          }
        });
        return;
      }
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const Moments m = plane_moments(sp + p * n, tp + p * n, n);  // n > 0: check_levels
          const PlaneTerms r = nmse_plane_terms(double(n), m.s_m2, m.t_m2, m.st_c, eps);
          const int64_t q = first + p;
          stat[q] = m.s_mean;
          stat[planes + q] = r.s_rstd;
          stat[2 * planes + q] = m.t_mean;
          stat[3 * planes + q] = r.t_rstd;
          stat[4 * planes + q] = r.k;
          loss[q] = r.loss;
        }
      });
    });
    first += count;
  }
  double sum = 0.0;
  for (double v : loss) sum += v;
  stats.copy_(at::from_blob(stat.data(), {5, planes}, at::TensorOptions().dtype(at::kDouble)));
  at::Tensor out = at::scalar_tensor(sum / double(total),
                                     student[0].options().dtype(at::kDouble));
  return {out.to(student[0].scalar_type()), stats};
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
  std::vector<at::Tensor> grads;
  int64_t first = 0;
  for (size_t l = 0; l < student.size(); ++l) {
    const bool cl = is_channels_last(student[l]);
    const at::Tensor s = kernel_layout(student[l], cl), t = kernel_layout(teacher[l], cl);
    at::Tensor g = at::empty_like(s);  // the student's layout
    const int64_t count = s.size(0) * s.size(1), n = s.size(2) * s.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "normalized_mse_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* tp = t.data_ptr<scalar_t>();
      scalar_t* gp = g.data_ptr<scalar_t>();
      if (cl) {  // element (b, p, c) at (b * n + p) * C + c, plane q = first + b * C + c
        const int64_t C = s.size(1);
        at::parallel_for(0, s.size(0) * n, 64, [&](int64_t begin, int64_t end) {
          for (int64_t bp = begin; bp < end; ++bp) {
            const int64_t q0 = first + (bp / n) * C;
            for (int64_t c = 0; c < C; ++c) {
              const int64_t q = q0 + c, i = bp * C + c;
              gp[i] = static_cast<scalar_t>(nmse_grad<acc_t>(
                  acc_t(sp[i]), acc_t(tp[i]), acc_t(sd[q]), acc_t(sd[planes + q]), acc_t(sd[2 * planes + q]),
                  acc_t(sd[3 * planes + q]), acc_t(sd[4 * planes + q]), acc_t(scale)));
            }
          }
        });
        return;
      }
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t q = first + p;
          const acc_t ms = acc_t(sd[q]), rs = acc_t(sd[planes + q]), mt = acc_t(sd[2 * planes + q]),
                      rt = acc_t(sd[3 * planes + q]), k = acc_t(sd[4 * planes + q]);
          for (int64_t i = p * n; i < (p + 1) * n; ++i)
            gp[i] = static_cast<scalar_t>(nmse_grad<acc_t>(acc_t(sp[i]), acc_t(tp[i]), ms, rs, mt, rt,
                                                           k, acc_t(scale)));
        }
      });
    });
    grads.push_back(g);
    first += count;
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CPU, m) {
  m.impl("normalized_mse", &normalized_mse_cpu);
  m.impl("normalized_mse_backward", &normalized_mse_backward_cpu);
}

}  // namespace lgd_ops
