// CPU normalized_mse: one thread per (image, channel) plane. The forward reads each plane twice
// (means, then central moments, in float64 with four independent partial sums so the adds
// pipeline) and keeps only five numbers per plane; the backward is one elementwise sweep.
// Per-plane losses are added in plane order, so the loss is identical run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../../common/nmse_math.h"

namespace lgd_ops {
namespace {

constexpr int kLanes = 4;

template <typename scalar_t>
void plane_means(const scalar_t* s, const scalar_t* t, int64_t n, double* ms, double* mt) {
  double as[kLanes] = {0, 0, 0, 0}, at_[kLanes] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      as[l] += static_cast<double>(s[i + l]);
      at_[l] += static_cast<double>(t[i + l]);
    }
  for (; i < n; ++i) {
    as[0] += static_cast<double>(s[i]);
    at_[0] += static_cast<double>(t[i]);
  }
  *ms = ((as[0] + as[1]) + (as[2] + as[3])) / double(n);
  *mt = ((at_[0] + at_[1]) + (at_[2] + at_[3])) / double(n);
}

template <typename scalar_t>
void plane_moments(const scalar_t* s, const scalar_t* t, int64_t n, double ms, double mt,
                   double* s_m2, double* t_m2, double* st_c) {
  double ss[kLanes] = {0, 0, 0, 0}, tt[kLanes] = {0, 0, 0, 0}, st[kLanes] = {0, 0, 0, 0};
  auto add = [&](int l, int64_t i) {
    const double ds = static_cast<double>(s[i]) - ms, dt = static_cast<double>(t[i]) - mt;
    ss[l] += ds * ds;
    tt[l] += dt * dt;
    st[l] += ds * dt;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) add(l, i + l);
  for (; i < n; ++i) add(0, i);
  *s_m2 = (ss[0] + ss[1]) + (ss[2] + ss[3]);
  *t_m2 = (tt[0] + tt[1]) + (tt[2] + tt[3]);
  *st_c = (st[0] + st[1]) + (st[2] + st[3]);
}

void check_levels(at::TensorList student, at::TensorList teacher) {
  TORCH_CHECK(!student.empty() && student.size() == teacher.size(),
              "lgd_ops.normalized_mse: student and teacher must be equal-length non-empty lists, got ",
              student.size(), " and ", teacher.size());
  for (size_t l = 0; l < student.size(); ++l) {
    TORCH_CHECK(student[l].dim() == 4 && student[l].sizes() == teacher[l].sizes(),
                "lgd_ops.normalized_mse: level ", l, " student ", student[l].sizes(), " and teacher ",
                teacher[l].sizes(), " must be equal [B, C, H, W] shapes");
    TORCH_CHECK(student[l].scalar_type() == student[0].scalar_type() &&
                    teacher[l].scalar_type() == student[0].scalar_type(),
                "lgd_ops.normalized_mse: all maps must share one dtype");
    TORCH_CHECK(student[l].device() == student[0].device() &&
                    teacher[l].device() == student[0].device(),
                "lgd_ops.normalized_mse: all maps must be on one device");
  }
}

std::tuple<at::Tensor, at::Tensor> normalized_mse_cpu(at::TensorList student,
                                                      at::TensorList teacher, double eps) {
  check_levels(student, teacher);
  const auto acc_dtype = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  int64_t planes = 0, total = 0;
  for (const auto& s : student) {
    planes += s.size(0) * s.size(1);
    total += s.numel();
  }
  at::Tensor stats = at::empty({5, planes}, student[0].options().dtype(acc_dtype));
  std::vector<double> stat(5 * planes), loss(planes, 0.0);
  int64_t first = 0;  // index of the level's first plane
  for (size_t l = 0; l < student.size(); ++l) {
    const at::Tensor s = student[l].contiguous(), t = teacher[l].contiguous();
    const int64_t count = s.size(0) * s.size(1), n = s.size(2) * s.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "normalized_mse_cpu", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* tp = t.data_ptr<scalar_t>();
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          double ms = 0, mt = 0, s_m2 = 0, t_m2 = 0, st_c = 0;
          if (n > 0) {
            plane_means(sp + p * n, tp + p * n, n, &ms, &mt);
            plane_moments(sp + p * n, tp + p * n, n, ms, mt, &s_m2, &t_m2, &st_c);
          }
          const PlaneTerms r = nmse_plane_terms(n > 0 ? double(n) : 1.0, s_m2, t_m2, st_c, eps);
          const int64_t q = first + p;
          stat[q] = ms;
          stat[planes + q] = r.s_rstd;
          stat[2 * planes + q] = mt;
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
  at::Tensor out = at::scalar_tensor(total > 0 ? sum / double(total) : 0.0,
                                     student[0].options().dtype(at::kDouble));
  return {out.to(student[0].scalar_type()), stats};
}

std::vector<at::Tensor> normalized_mse_backward_cpu(const at::Tensor& grad, at::TensorList student,
                                                    at::TensorList teacher, const at::Tensor& stats) {
  check_levels(student, teacher);
  int64_t planes = 0, total = 0;
  for (const auto& s : student) {
    planes += s.size(0) * s.size(1);
    total += s.numel();
  }
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 5 && stats.size(1) == planes,
              "lgd_ops.normalized_mse_backward: stats must be [5, ", planes, "], got ", stats.sizes());
  TORCH_CHECK(grad.numel() == 1, "lgd_ops.normalized_mse_backward: grad must be a scalar");
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const double* sd = st.data_ptr<double>();
  const double scale = total > 0 ? grad.item<double>() * 2.0 / double(total) : 0.0;
  std::vector<at::Tensor> grads;
  int64_t first = 0;
  for (size_t l = 0; l < student.size(); ++l) {
    const at::Tensor s = student[l].contiguous(), t = teacher[l].contiguous();
    at::Tensor g = at::empty_like(s);
    const int64_t count = s.size(0) * s.size(1), n = s.size(2) * s.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "normalized_mse_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* tp = t.data_ptr<scalar_t>();
      scalar_t* gp = g.data_ptr<scalar_t>();
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
