// Per-plane and per-element arithmetic of the normalized-MSE loss (docs/method.md §4), shared by the
// CPU and CUDA kernels and the ctest target. xs = (s - mean_s) * rstd_s, xt likewise for the
// teacher; the loss of a plane is sum (xs - xt)^2 and only the student receives a gradient.
#pragma once

#include <cmath>

#include "box_math.h"

namespace lgd_ops {

// What a (b, c) plane contributes, from its central moments (sums of squared/cross deviations
// about the exact means). `k` = mean((xs - xt) * xs), the one constant the gradient needs, so the
// backward pass is a single elementwise sweep that never stores a normalized map.
struct PlaneTerms {
  double s_rstd, t_rstd, loss, k;
};

LGD_HOST_DEVICE PlaneTerms nmse_plane_terms(double n, double s_m2, double t_m2, double st_c,
                                            double eps) {
  PlaneTerms p;
  // Biased (InstanceNorm) moments; rounding can leave a one-pass sum of squares slightly negative.
  // The clamps test `< 0` so that a NaN (a non-finite input) passes through to the loss.
  const double vs = s_m2 < 0.0 ? 0.0 : s_m2 / n, vt = t_m2 < 0.0 ? 0.0 : t_m2 / n, cst = st_c / n;
  p.s_rstd = 1.0 / std::sqrt(vs + eps);
  p.t_rstd = 1.0 / std::sqrt(vt + eps);
  const double ss = vs * p.s_rstd * p.s_rstd;     // mean(xs^2)
  const double tt = vt * p.t_rstd * p.t_rstd;     // mean(xt^2)
  const double st = cst * p.s_rstd * p.t_rstd;    // mean(xs * xt)
  const double per_elem = ss + tt - 2.0 * st;
  p.loss = per_elem < 0.0 ? 0.0 : n * per_elem;
  p.k = ss - st;
  return p;
}

// d loss / d s for one element, `scale` = grad_out * 2 / (total number of student elements).
// The mean(xs - xt) term of the InstanceNorm backward is zero because both maps are centred.
template <typename acc_t>
LGD_HOST_DEVICE acc_t nmse_grad(acc_t s, acc_t t, acc_t s_mean, acc_t s_rstd, acc_t t_mean,
                                acc_t t_rstd, acc_t k, acc_t scale) {
  const acc_t xs = (s - s_mean) * s_rstd;
  const acc_t xt = (t - t_mean) * t_rstd;
  return scale * s_rstd * ((xs - xt) - xs * k);
}

}  // namespace lgd_ops
