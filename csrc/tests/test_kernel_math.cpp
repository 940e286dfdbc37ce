// ctest for the arithmetic shared by the CPU and CUDA kernels (csrc/common/*.h), without torch:
// the docs/method.md §1 cell rule on hand-worked boxes, and the normalized-MSE plane terms against a
// direct two-pass computation.
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "../common/box_math.h"
#include "../common/nmse_math.h"

using lgd_ops::box_cells;
using lgd_ops::CellRange;

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

static bool same(CellRange r, int x0, int x1, int y0, int y1) {
  return r.x0 == x0 && r.x1 == x1 && r.y0 == y0 && r.y1 == y1;
}

static void test_box_cells() {
  // 100x200 input, 10x20 level: rx = ry = 0.1. Box (15, 5, 42, 30): cols 1.5..4.2 -> 2..4, rows 0.5..3 -> 1..3.
  expect(same(box_cells(15, 5, 42, 30, 100, 200, 10, 20), 2, 4, 1, 3), "interior box");
  // Edges on the grid are inside (inclusive rule, no +0.5 offset): cols 1..4, rows 0..2.
  expect(same(box_cells(10, 0, 40, 20, 100, 200, 10, 20), 1, 4, 0, 2), "box on grid lines");
  // Past the edge: clamped to [0, 199] x [0, 99] -> cols 0..19 (19.9 floors to 19), rows 0..9.
  expect(same(box_cells(-50, -50, 500, 500, 100, 200, 10, 20), 0, 19, 0, 9), "box past every edge");
  expect(box_cells(30, 10, 30, 40, 100, 200, 10, 20).empty(), "zero-width box covers nothing");
  expect(box_cells(30, 10, 20, 40, 100, 200, 10, 20).empty(), "x2 < x1 covers nothing");
  expect(box_cells(300, 10, 400, 40, 100, 200, 10, 20).empty(), "box right of the image covers nothing");
  // A small box between cells of a coarse level: cols 1.2..1.8 contain no integer.
  expect(box_cells(12, 12, 18, 18, 100, 200, 10, 20).empty(), "small box between cells");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect(box_cells(nan, 0, 10, 10, 100, 200, 10, 20).empty(), "NaN box covers nothing");
  const double inf = std::numeric_limits<double>::infinity();
  expect(same(box_cells(0, 0, inf, inf, 100, 200, 10, 20), 0, 19, 0, 9), "inf clamps to the edge");
  expect(same(box_cells(0, 0, 150, 90, 100, 200, 1, 1), 0, 0, 0, 0), "1x1 level");
  expect(box_cells(0, 0, 10, 10, 100, 200, 0, 0).empty(), "empty level");
  expect(box_cells(15, 5, 42, 30, 100, 200, 10, 20).count() == 9, "cell count");
}

static void test_nmse_terms() {
  const int n = 7;
  const double s[n] = {0.3, -1.2, 2.5, 0.0, 4.1, -0.7, 1.1};
  const double t[n] = {1.0, 0.2, -0.4, 2.2, 0.9, 0.1, -1.5};
  const double eps = 1e-5;
  double ms = 0, mt = 0;
  for (int i = 0; i < n; ++i) ms += s[i] / n, mt += t[i] / n;
  double s_m2 = 0, t_m2 = 0, st_c = 0;
  for (int i = 0; i < n; ++i) {
    s_m2 += (s[i] - ms) * (s[i] - ms);
    t_m2 += (t[i] - mt) * (t[i] - mt);
    st_c += (s[i] - ms) * (t[i] - mt);
  }
  const double rs = 1.0 / std::sqrt(s_m2 / n + eps), rt = 1.0 / std::sqrt(t_m2 / n + eps);
  double loss = 0, k = 0;
  for (int i = 0; i < n; ++i) {
    const double d = (s[i] - ms) * rs - (t[i] - mt) * rt;
    loss += d * d;
    k += d * (s[i] - ms) * rs / n;
  }
  const lgd_ops::PlaneTerms p = lgd_ops::nmse_plane_terms(n, s_m2, t_m2, st_c, eps);
  expect(std::fabs(p.loss - loss) < 1e-12, "plane loss");
  expect(std::fabs(p.k - k) < 1e-12, "plane k");
  expect(std::fabs(p.s_rstd - rs) < 1e-12 && std::fabs(p.t_rstd - rt) < 1e-12, "plane rstd");
  // Gradient of the plane loss / M against central differences.
  const double M = n, h = 1e-6;
  for (int i = 0; i < n; ++i) {
    double sp[n], sm[n];
    for (int j = 0; j < n; ++j) sp[j] = sm[j] = s[j];
    sp[i] += h;
    sm[i] -= h;
    auto plane_loss = [&](const double* x) {
      double m = 0, m2 = 0, c = 0;
      for (int j = 0; j < n; ++j) m += x[j] / n;
      for (int j = 0; j < n; ++j) m2 += (x[j] - m) * (x[j] - m), c += (x[j] - m) * (t[j] - mt);
      return lgd_ops::nmse_plane_terms(n, m2, t_m2, c, eps).loss / M;
    };
    const double numeric = (plane_loss(sp) - plane_loss(sm)) / (2 * h);
    const double analytic = lgd_ops::nmse_grad<double>(s[i], t[i], ms, rs, mt, rt, k, 2.0 / M);
    expect(std::fabs(numeric - analytic) < 1e-7, "plane gradient");
  }
  // A constant plane normalizes to zero: loss is the teacher's normalized energy.
  const lgd_ops::PlaneTerms c = lgd_ops::nmse_plane_terms(n, 0.0, t_m2, 0.0, eps);
  expect(std::fabs(c.loss - n * (t_m2 / n) * rt * rt) < 1e-12 && c.k == 0.0, "constant student plane");
  // A non-finite input gives NaN moments: the loss must stay NaN (not clamped to 0 or a finite value).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect(std::isnan(lgd_ops::nmse_plane_terms(n, nan, t_m2, nan, eps).loss), "NaN student moments");
  expect(std::isnan(lgd_ops::nmse_plane_terms(n, s_m2, nan, nan, eps).loss), "NaN teacher moments");
}

int main() {
  test_box_cells();
  test_nmse_terms();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel-math checks passed\n");
  return 0;
}
